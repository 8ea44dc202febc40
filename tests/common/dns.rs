//! Shared with the drill: `examples/drill/src/backends/dns.rs`.
#![allow(unused_imports)] // each test file uses a different part of this
pub use iotdr_drill::backends::dns::*;
