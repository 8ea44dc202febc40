//! The WebAssembly plug-in runtime: one engine, compiled plug-ins cached on
//! disk, stages with memory and time limits, and the host side of the contract.

mod batch;
mod bindings;
mod engine;
mod stage;

pub use batch::dictionary_codes;
pub use engine::{CONTRACT_PACKAGE, CONTRACT_VERSION, LoadError, Plugin, PluginEngine};
pub use stage::{Fate, StageLimits, StageRunner, StartError};
