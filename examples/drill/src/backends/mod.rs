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

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}
