//! `iotdr health serve` against two real mosquitto brokers with mutual TLS
//! (one per region) and moto: each check is an MQTT round trip of its own,
//! 200 or 503 on its own evidence, never counting another check's messages.

mod common;

use common::broker::Broker;
use common::moto::Moto;
use common::{free_port, http};
use iotdr::failover::MqttCheck;
use iotdr::failover::config::{Credentials, Health};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EAST: &str = "us-east-1";
const WEST: &str = "eu-west-1";
const SECRET: &str = "health-secret-3b9d";

fn region(name: &str, broker: &Broker, endpoint_url: &str) -> String {
    let path = |file: &str| broker.file(file).display().to_string();
    format!(
        "[regions.{name}]\nmqtt_endpoint = \"{}\"\nendpoint_url = \"{endpoint_url}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
        broker.endpoint(),
        path("ca.crt"),
        path("client.crt"),
        path("client.key")
    )
}

/// A DR file for the two brokers on a free port; the west region's API is unreachable.
fn dr_file(dir: &Path, east: &Broker, west: &Broker, moto: &Moto) -> std::path::PathBuf {
    let port = free_port();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let text = format!(
        "{}{}[health]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"secret\"\ntimeout_ms = 3000\n",
        region(EAST, east, &moto.url),
        region(WEST, west, &closed)
    );
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
    let path = dir.join("dr.toml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Server {
    child: Child,
    log: std::path::PathBuf,
    port: u16,
}

impl Server {
    fn start(moto: &Moto, config: &Path) -> Server {
        let listen = iotdr::failover::DrConfig::load(config).unwrap().health().unwrap().listen;
        let port = listen.port();
        let log = config.with_file_name("health.log");
        let child = Command::new(env!("CARGO_BIN_EXE_iotdr"))
            .args(["health", "serve"])
            .arg(config)
            .envs(moto.env())
            .env("IOTDR_LOG", common::log_filter())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("iotdr starts");
        let mut server = Server { child, log, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http(port, "GET", "/healthz", None).0 == 200)
        {
            assert!(server.child.try_wait().unwrap().is_none(), "iotdr health serve ended:\n{}", server.log());
            assert!(Instant::now() < deadline, "iotdr health serve did not start:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (code, body) = http(self.port, "GET", path, None);
        (code, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.log();
        common::assert_no_secrets("the health server's log", &log);
        assert!(!log.contains(SECRET), "the health server's log shows the secret:\n{log}");
    }
}

#[test]
fn each_region_answers_on_its_own_evidence_and_the_control_plane_apart() {
    let (moto, east, west, dir) = (Moto::start(), Broker::start(), Broker::start(), tempfile::tempdir().unwrap());
    let server = Server::start(&moto, &dr_file(dir.path(), &east, &west, &moto));
    let secret = format!("?secret={SECRET}");

    // Without the secret, or a wrong one: refused before any check.
    assert_eq!(server.get(&format!("/health/{EAST}")).0, 403);
    assert_eq!(server.get(&format!("/health/{EAST}?secret=nope")).0, 403);
    assert_eq!(server.get("/health").0, 403);
    assert_eq!(server.get(&format!("/control-plane/{EAST}?region={EAST}")).0, 403);
    assert_eq!(server.get("/healthz").0, 200, "the liveness probe wants no secret");
    assert_eq!(server.get(&format!("/health/us-west-2{secret}")).0, 404);

    let (code, report) = server.get(&format!("/health/{EAST}{secret}"));
    assert_eq!(code, 200, "{report}");
    assert_eq!(
        (report["healthy"].as_bool(), report["sent"].as_u64(), report["received"].as_u64()),
        (Some(true), Some(2), Some(2)),
        "{report}"
    );
    assert!(report["round_trip_ms"].as_u64().is_some() && report["connect_ms"].as_u64().is_some(), "{report}");

    // The east broker goes down: its check fails, the west one still passes.
    east.stop();
    let (code, report) = server.get(&format!("/health/{EAST}{secret}"));
    assert_eq!(code, 503, "{report}");
    assert_eq!((report["healthy"].as_bool(), report["received"].as_u64()), (Some(false), Some(0)), "{report}");
    assert!(report["failure"].as_str().is_some_and(|f| !f.is_empty()), "{report}");
    assert_eq!(server.get(&format!("/health/{WEST}{secret}")).0, 200);
    let (code, all) = server.get(&format!("/health{secret}"));
    assert_eq!((code, all["healthy"].as_bool()), (503, Some(false)), "{all}");
    assert_eq!(all["regions"].as_array().map(Vec::len), Some(2), "{all}");

    // Back up: the next check passes on its own round trip, nothing carried over.
    east.restart(false);
    let (code, report) = server.get(&format!("/health/{EAST}{secret}"));
    assert_eq!((code, report["received"].as_u64()), (200, Some(2)), "{report}");

    // The control plane is reported apart: moto answers for east, nothing for west.
    let (code, probe) = server.get(&format!("/control-plane/{EAST}{secret}"));
    assert_eq!((code, probe["operation"].as_str()), (200, Some("ListThings")), "{probe}");
    let (code, probe) = server.get(&format!("/control-plane/{WEST}{secret}"));
    assert_eq!((code, probe["healthy"].as_bool()), (503, Some(false)), "{probe}");
    assert!(probe["failure"].as_str().is_some(), "{probe}");
}

#[test]
fn concurrent_checks_count_only_their_own_messages() {
    let (moto, east, west, dir) = (Moto::start(), Broker::start(), Broker::start(), tempfile::tempdir().unwrap());
    let server = Server::start(&moto, &dr_file(dir.path(), &east, &west, &moto));
    let reports: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let asks: Vec<_> =
            (0..12).map(|_| scope.spawn(|| server.get(&format!("/health/{WEST}?secret={SECRET}")))).collect();
        asks.into_iter().map(|ask| ask.join().unwrap()).collect()
    });
    let mut client_ids = std::collections::BTreeSet::new();
    for (code, report) in &reports {
        assert_eq!(*code, 200, "{report}");
        assert_eq!((report["sent"].as_u64(), report["received"].as_u64()), (Some(2), Some(2)), "{report}");
        client_ids.insert(report["client_id"].as_str().unwrap().to_string());
    }
    assert_eq!(client_ids.len(), 12, "every check connects as itself");
}

/// In-process: a check that fails (a timeout too short to finish) leaves
/// nothing behind, and the next passes with exactly its own messages.
#[tokio::test]
async fn a_check_after_a_failed_one_stands_on_its_own() {
    let broker = Broker::start();
    let credentials = Credentials {
        ca: broker.file("ca.crt"),
        certificate: broker.file("client.crt"),
        private_key: broker.file("client.key"),
    };
    let health = |timeout: Duration| Health {
        listen: "127.0.0.1:0".parse().unwrap(),
        credentials: None,
        client_id: "iotdr-health".into(),
        topic: "iotdr/health".into(),
        messages: 3,
        timeout,
        secret_file: None,
        concurrency: 1,
    };
    let hasty = MqttCheck::new(EAST, &broker.endpoint(), &credentials, &health(Duration::from_millis(1))).unwrap();
    let failed = hasty.run().await;
    assert!(!failed.healthy && failed.failure.is_some(), "{failed:?}");
    let check = MqttCheck::new(EAST, &broker.endpoint(), &credentials, &health(Duration::from_secs(5))).unwrap();
    for _ in 0..3 {
        let report = check.run().await;
        assert!(report.healthy, "{report:?}");
        assert_eq!((report.sent, report.received), (3, 3), "{report:?}");
        assert_ne!(report.client_id, failed.client_id);
    }
}
