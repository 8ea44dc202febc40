//! Write an iotdr pipeline stage in a few lines of Rust.
//!
//! ```ignore
//! use iotdr_plugin::{Event, Outcome, Stage};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { attribute: String }
//!
//! struct DropTest(Config);
//!
//! impl Stage for DropTest {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> { Ok(DropTest(config)) }
//!     fn process_event(&mut self, event: &Event) -> Outcome {
//!         match event.attribute(&self.0.attribute).as_deref() {
//!             Some("test") => Outcome::Drop("test device".into()),
//!             _ => Outcome::Keep,
//!         }
//!     }
//! }
//!
//! iotdr_plugin::export_stage!(DropTest);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`: the result is a
//! component the host loads. The same code runs natively against
//! [`testing::TestBatch`], so a stage's unit tests are plain `cargo test`.
//!
//! Events stay in the host: every accessor is a call across the component
//! boundary, so read what you need once, and in hot paths prefer the column
//! reads ([`Batch::entities`], [`Batch::attribute_codes`]) and the writes to
//! many events at once ([`Batch::set_targets_of`], [`Batch::set_attribute_of`],
//! [`Batch::rename_attribute_of`], [`Batch::remove_attribute_of`]).

// The generated bindings name this crate by its public path, also from inside it.
extern crate self as iotdr_plugin;

mod glob;
mod types;

// Plug-ins are single-threaded components.
#[cfg(all(not(target_feature = "atomics"), target_family = "wasm"))]
#[global_allocator]
static ALLOCATOR: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

pub use glob::glob_match;
pub use types::{Entity, Operation, Outcome};

#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "stage",
        pub_export_macro: true,
        export_macro_name: "__export_stage_bindings",
        default_bindings_module: "iotdr_plugin::bindings",
        runtime_path: "iotdr_plugin::__private::wit_bindgen::rt",
    });
}

/// A pipeline stage. Implement [`Stage::process_event`] for per-event logic,
/// or [`Stage::process`] to work on the whole batch at once.
pub trait Stage: Sized + 'static {
    /// The stage's `config` table from the pipeline file.
    type Config: serde::de::DeserializeOwned;

    /// Builds the stage from its config; an `Err` stops the pipeline from starting,
    /// with this message.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The entities this stage handles; the host passes it nothing else.
    /// Empty (the default): every entity.
    fn entities(&self) -> Vec<Entity> {
        Vec::new()
    }

    /// One outcome per event that was in the batch when the call began.
    fn process(&mut self, batch: &Batch) -> Vec<Outcome> {
        (0..batch.len()).map(|index| self.process_event(&batch.event(index))).collect()
    }

    /// Decides one event. Changes made through `event` apply in place.
    fn process_event(&mut self, _event: &Event) -> Outcome {
        Outcome::Keep
    }
}

/// Log levels for [`log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Writes to the host's log, tagged with the stage's name.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use bindings::iotdr::plugin::host;
        let level = match level {
            Level::Debug => host::Level::Debug,
            Level::Info => host::Level::Info,
            Level::Warn => host::Level::Warn,
            Level::Error => host::Level::Error,
        };
        host::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    testing::record_log(level, message);
}

/// Adds `delta` to the stage's counter `metric` in the host's metrics.
pub fn count(metric: &str, delta: u64) {
    #[cfg(target_arch = "wasm32")]
    bindings::iotdr::plugin::host::count(metric, delta);
    #[cfg(not(target_arch = "wasm32"))]
    testing::record_count(metric, delta);
}

#[cfg(target_arch = "wasm32")]
type Inner<'a> = &'a bindings::iotdr::plugin::types::Batch;
#[cfg(not(target_arch = "wasm32"))]
type Inner<'a> = &'a testing::TestBatch;

/// The events of one call, owned by the host.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    inner: Inner<'a>,
}

// On wasm32 the host's enums convert into ours; natively they already are ours.
#[allow(clippy::useless_conversion)]
impl<'a> Batch<'a> {
    #[doc(hidden)]
    pub fn from_inner(inner: Inner<'a>) -> Batch<'a> {
        Batch { inner }
    }

    /// Events in the batch now (copies made with [`Event::duplicate`] included).
    pub fn len(&self) -> u32 {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn event(&self, index: u32) -> Event<'a> {
        Event { batch: *self, index }
    }

    /// Every event's entity, in one call.
    pub fn entities(&self) -> Vec<Entity> {
        self.inner.entities().into_iter().map(Into::into).collect()
    }

    /// Every event's value of attribute `key`, in one call.
    pub fn attribute_column(&self, key: &str) -> Vec<Option<String>> {
        self.inner.attribute_column(key)
    }

    /// Every event's value of attribute `key`, dictionary-coded, in one call:
    /// each distinct value crosses once, so decide once per value
    /// ([`CodedColumn::values`]) and look events up by [`CodedColumn::code`].
    pub fn attribute_codes(&self, key: &str) -> CodedColumn {
        #[cfg(target_arch = "wasm32")]
        {
            let column = self.inner.attribute_codes(key);
            CodedColumn { values: column.values, codes: column.codes }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let (values, codes) = self.inner.attribute_codes(key);
            CodedColumn { values, codes }
        }
    }

    /// [`Event::set_targets`] on every event in `indices`, in one call.
    pub fn set_targets_of<S: AsRef<str>>(&self, indices: &[u32], regions: &[S]) {
        if indices.is_empty() {
            return;
        }
        let regions: Vec<String> = regions.iter().map(|r| r.as_ref().to_string()).collect();
        self.inner.set_targets_of(indices, &regions)
    }

    /// [`Event::set_attribute`] on every event in `indices`, in one call.
    pub fn set_attribute_of(&self, indices: &[u32], key: &str, value: &str) {
        if !indices.is_empty() {
            self.inner.set_attribute_of(indices, key, value)
        }
    }

    /// [`Event::remove_attribute`] on every event in `indices`, in one call.
    pub fn remove_attribute_of(&self, indices: &[u32], key: &str) {
        if !indices.is_empty() {
            self.inner.remove_attribute_of(indices, key)
        }
    }

    /// Renames attribute `key` to `new_key` (replacing any `new_key`) on every
    /// event in `indices` that has `key`, in one call.
    pub fn rename_attribute_of(&self, indices: &[u32], key: &str, new_key: &str) {
        if !indices.is_empty() {
            self.inner.rename_attribute_of(indices, key, new_key)
        }
    }
}

/// An attribute of every event of a batch, each distinct value once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodedColumn {
    /// The distinct values, in order of first appearance.
    pub values: Vec<String>,
    codes: Vec<u32>,
}

impl CodedColumn {
    /// The index into [`CodedColumn::values`] of event `index`'s value; `None`
    /// when the event lacks the attribute.
    pub fn code(&self, index: u32) -> Option<usize> {
        match self.codes.get(index as usize) {
            Some(&code) if code > 0 => Some(code as usize - 1),
            _ => None,
        }
    }

    /// Event `index`'s value.
    pub fn value(&self, index: u32) -> Option<&str> {
        self.code(index).map(|code| self.values[code].as_str())
    }

    /// Events in the column.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
}

/// One event of a [`Batch`]. Getters read from the host; setters change the
/// event in place.
#[derive(Clone, Copy)]
pub struct Event<'a> {
    batch: Batch<'a>,
    index: u32,
}

#[allow(clippy::useless_conversion)]
impl<'a> Event<'a> {
    pub fn index(&self) -> u32 {
        self.index
    }
    pub fn entity(&self) -> Entity {
        self.batch.inner.entity(self.index).into()
    }
    pub fn operation(&self) -> Operation {
        self.batch.inner.operation(self.index).into()
    }
    pub fn id(&self) -> String {
        self.batch.inner.id(self.index)
    }
    pub fn name(&self) -> String {
        self.batch.inner.name(self.index)
    }
    pub fn set_name(&self, name: &str) {
        self.batch.inner.set_name(self.index, name)
    }
    pub fn source_region(&self) -> String {
        self.batch.inner.source_region(self.index)
    }
    pub fn account_id(&self) -> String {
        self.batch.inner.account_id(self.index)
    }
    pub fn timestamp_ms(&self) -> u64 {
        self.batch.inner.timestamp_ms(self.index)
    }
    pub fn version(&self) -> Option<u64> {
        self.batch.inner.version(self.index)
    }
    pub fn targets(&self) -> Vec<String> {
        self.batch.inner.targets(self.index)
    }
    pub fn set_targets<S: AsRef<str>>(&self, regions: &[S]) {
        let regions: Vec<String> = regions.iter().map(|r| r.as_ref().to_string()).collect();
        self.batch.inner.set_targets(self.index, &regions)
    }
    pub fn attribute(&self, key: &str) -> Option<String> {
        self.batch.inner.attribute(self.index, key)
    }
    pub fn attributes(&self) -> Vec<(String, String)> {
        self.batch.inner.attributes(self.index)
    }
    pub fn set_attribute(&self, key: &str, value: &str) {
        self.batch.inner.set_attribute(self.index, key, value)
    }
    /// Returns whether the attribute was there.
    pub fn remove_attribute(&self, key: &str) -> bool {
        self.batch.inner.remove_attribute(self.index, key)
    }
    /// The first related entity of `kind` (`thing-type`, `thing-group`, `parent-group`, ...).
    pub fn related(&self, kind: &str) -> Option<String> {
        self.batch.inner.related(self.index, kind)
    }
    pub fn related_all(&self) -> Vec<(String, String)> {
        self.batch.inner.related_all(self.index)
    }
    pub fn set_related(&self, kind: &str, name: Option<&str>) {
        self.batch.inner.set_related(self.index, kind, name)
    }
    /// Adds an entry of `kind`; kinds such as `policy` and `principal` repeat.
    pub fn add_related(&self, kind: &str, name: &str) {
        self.batch.inner.add_related(self.index, kind, name)
    }
    pub fn document(&self) -> Option<String> {
        self.batch.inner.document(self.index)
    }
    pub fn set_document(&self, document: Option<&str>) {
        self.batch.inner.set_document(self.index, document)
    }
    /// Appends a copy of this event to the batch; return both indices in
    /// [`Outcome::Split`] to emit both.
    pub fn duplicate(&self) -> Event<'a> {
        let index = self.batch.inner.duplicate(self.index);
        Event { batch: self.batch, index }
    }
}

/// What the export macro calls; not for plug-in authors.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    use super::{Batch, Stage};

    pub fn init<S: Stage>(config: &str) -> Result<(S, Vec<super::Entity>), String> {
        #[cfg(target_arch = "wasm32")]
        std::panic::set_hook(Box::new(|info| super::log(super::Level::Error, &format!("panicked: {info}"))));
        let config: S::Config = serde_json::from_str(if config.trim().is_empty() { "{}" } else { config })
            .map_err(|e| format!("invalid config: {e}"))?;
        let stage = S::new(config)?;
        let entities = stage.entities();
        Ok((stage, entities))
    }

    /// Runs the stage on a batch. "Every event kept" crosses as an empty
    /// list, so a wrong count must not: it stops the call here.
    pub fn process<S: Stage>(stage: &mut S, batch: Batch) -> Vec<super::Outcome> {
        let events = batch.len();
        let outcomes = stage.process(&batch);
        if outcomes.len() != events as usize {
            panic!("the plug-in broke the contract: returned {} outcomes for {events} events", outcomes.len());
        }
        if outcomes.iter().all(|o| matches!(o, super::Outcome::Keep)) {
            return Vec::new();
        }
        outcomes
    }
}

/// Exports a [`Stage`] implementation as the component's `stage` world.
#[macro_export]
macro_rules! export_stage {
    ($stage:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::iotdr::plugin::types as __types;
            ::std::thread_local! {
                static __STAGE: ::std::cell::RefCell<::std::option::Option<$stage>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }
            struct __Exports;
            impl $crate::bindings::Guest for __Exports {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<$crate::bindings::Registration, ::std::string::String> {
                    let (stage, entities) = $crate::__private::init::<$stage>(&config)?;
                    __STAGE.with(|cell| *cell.borrow_mut() = ::std::option::Option::Some(stage));
                    ::std::result::Result::Ok($crate::bindings::Registration {
                        entities: entities.into_iter().map(::std::convert::Into::into).collect(),
                    })
                }
                fn process(events: &__types::Batch) -> ::std::vec::Vec<__types::Outcome> {
                    __STAGE.with(|cell| {
                        let mut guard = cell.borrow_mut();
                        let stage = guard.as_mut().expect("the host calls init before process");
                        $crate::__private::process(stage, $crate::Batch::from_inner(events))
                            .into_iter()
                            .map(::std::convert::Into::into)
                            .collect()
                    })
                }
            }
    $crate::bindings::__export_stage_bindings!(__Exports with_types_in $crate::bindings);
        };
    };
}
