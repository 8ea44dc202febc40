//! What the moto benchmarks share: the tests' fleet generator and moto
//! harness (shared with the tests rather than copied) and their environment.

#[path = "../../tests/common/fleet.rs"]
pub mod fleet;
#[path = "../../tests/common/moto.rs"]
pub mod moto;

/// The workspace root (the moto harness finds its script from it).
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// moto's test credentials for the SDK's chain. Call it first in `main`,
/// before any thread starts.
pub fn use_test_credentials() {
    // SAFETY: called before any thread starts; the SDK's credential chain reads them.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
}
