//! The real backends the tests, the benchmarks and the drill run against,
//! each started by the project's own script on loopback and stopped when
//! dropped: moto (AWS), mosquitto (MQTT with mutual TLS), dnsmasq (DNS).

pub mod broker;
pub mod dns;
pub mod moto;

use std::path::PathBuf;

/// The workspace root (the scripts are found from it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the workspace root")
}
