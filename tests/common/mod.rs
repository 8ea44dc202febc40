//! Shared by the integration tests: where the built plug-ins are, a plug-in
//! engine with a compile cache that outlives one test, and event builders.
#![allow(dead_code)] // each test file uses a different part of this

#[allow(unused_imports)] // each test file uses a different part of this
pub use iotdr_drill::backends::free_port;

pub mod broker;
pub mod dns;
pub mod faults;
pub mod fleet;
pub mod moto;
pub mod region_state;
pub mod runner;

use iotdr::event::{Entity, Event, Operation};
use iotdr::plugin::{Fate, PluginEngine, StageLimits, StageRunner};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// Fails when `text` (a log or output of `iotdr`) holds what must never be
/// printed: the tests' secret access key, a certificate PEM, a private key.
/// Every output the harness reads goes through it.
pub fn assert_no_secrets(what: &str, text: &str) {
    for secret in [moto::SECRET_ACCESS_KEY, "BEGIN CERTIFICATE", "PRIVATE KEY"] {
        assert!(!text.contains(secret), "{what} shows {secret:?}:\n{text}");
    }
}

/// The log filter of every `iotdr` the tests start: iotdr's own lines down
/// to `debug`, so that what [`assert_no_secrets`] reads covers them
/// (IOTDR_TEST_LOG overrides it).
pub fn log_filter() -> String {
    std::env::var("IOTDR_TEST_LOG").unwrap_or_else(|_| "warn,iotdr=debug".into())
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_path_buf()
}

/// A bundled plug-in (`plugins/dist/<name>.wasm`).
pub fn plugin(name: &str) -> PathBuf {
    built(root().join("plugins/dist").join(format!("{name}.wasm")))
}

/// A test-only plug-in (`tests/plugins/dist/<name>.wasm`).
pub fn test_plugin(name: &str) -> PathBuf {
    built(root().join("tests/plugins/dist").join(format!("{name}.wasm")))
}

fn built(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} is missing: run scripts/build-plugins.sh first (scripts/test.sh does)", path.display());
    path
}

/// Where the tests keep compiled plug-ins: inside the build directory, so the
/// developer's own cache is left alone.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("iotdr-plugin-cache")
}

/// One engine per test binary, as in the real host (one per process).
pub fn engine() -> &'static PluginEngine {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    ENGINE.get_or_init(|| PluginEngine::new(Some(cache_dir())).expect("a wasmtime engine"))
}

/// Starts one stage of `plugin` with `config` (JSON).
pub fn stage(plugin: &std::path::Path, config: serde_json::Value, limits: StageLimits) -> StageRunner {
    let loaded = Arc::new(engine().load(plugin).expect("the plug-in loads"));
    StageRunner::start("under-test", loaded, config.to_string(), limits).expect("the stage starts")
}

pub fn thing(name: &str, attributes: &[(&str, &str)]) -> Event {
    let mut event = Event::new(Entity::Thing, Operation::Created, name);
    event.id = format!("id-{name}");
    event.source_region = "us-east-1".into();
    event.account_id = "111122223333".into();
    event.targets = vec!["eu-west-1".into()];
    event.attributes = attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    event
}

/// The single event a `Kept` fate holds.
pub fn kept_one(fate: &Fate) -> &Event {
    match fate {
        Fate::Kept(event) => event,
        other => panic!("expected one kept event, got {other:?}"),
    }
}

/// One HTTP/1.1 request to a server of `iotdr` on loopback (the admin
/// endpoint, the health server): (status code, body).
pub fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let code = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}
