//! A stage built against a future major version of the contract. Its logic is
//! irrelevant: the host must refuse to load it, saying why.

#[cfg(target_arch = "wasm32")]
mod stage {
    wit_bindgen::generate!({ path: "wit", world: "stage" });

    struct PassThrough;

    impl Guest for PassThrough {
        fn init(_config: String) -> Result<Registration, String> {
            Ok(Registration { entities: Vec::new() })
        }
        fn process(events: &Batch) -> Vec<Outcome> {
            (0..events.len()).map(|_| Outcome::Keep).collect()
        }
    }

    export!(PassThrough);
}
