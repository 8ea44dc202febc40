//! Hot swap under a running `iotdr run` on moto: the region router's
//! routing table changed 20 times while events flow, broken versions
//! refused, each event applied once under the version in effect when its
//! batch started (checked by where each thing landed).

mod common;

use common::moto::Moto;
use common::{free_port, http};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SOURCE: &str = "us-east-1";
const WEST: &str = "eu-west-1";
const CENTRAL: &str = "eu-central-1";
const PER_ROUND: usize = 4;

/// The pipeline: one router stage sending acme's things to `region`, with
/// `extra` appended (more stages, tests).
fn pipeline(url: &str, region: &str, extra: &str) -> String {
    format!(
        r#"
[pipeline]
name = "swap"
source_region = "{SOURCE}"
targets = ["{WEST}", "{CENTRAL}"]
batch_size = 8
[regions.{SOURCE}]
endpoint_url = "{url}"
[regions.{WEST}]
endpoint_url = "{url}"
[regions.{CENTRAL}]
endpoint_url = "{url}"
[source]
kind = "file"
path = "events.jsonl"
[[stage]]
name = "route"
plugin = "{router}"
config = {{ by_attribute = "customer", routes = {{ acme = ["{region}"] }} }}
{extra}
[ingest]
recheck_after_ms = 0
[apply]
initial_backoff_ms = 10
max_backoff_ms = 200
"#,
        router = common::plugin("region-router").display()
    )
}

/// Replaces the file the way an editor does: a new file renamed over it.
fn write(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

fn wait_for(what: &str, child: &mut Child, log: &Path, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if done(&text) {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "iotdr run ended while waiting for {what}:\n{text}");
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `iotdr run <path> <args>` following its source, its stderr in `log`.
fn start(moto: &Moto, path: &Path, log: &Path, args: &[&str], filter: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .arg("run")
        .arg(path)
        .args(args)
        .current_dir(path.parent().unwrap())
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .env("IOTDR_LOG", filter)
        .envs(moto.env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

async fn exists(iot: &aws_sdk_iot::Client, thing: &str) -> bool {
    iot.describe_thing().thing_name(thing).send().await.is_ok()
}

#[tokio::test]
async fn the_router_swapped_twenty_times_routes_each_event_by_the_version_of_its_batch() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.toml");
    std::fs::write(dir.path().join("events.jsonl"), "").unwrap();
    std::fs::write(&path, pipeline(&moto.url, WEST, "")).unwrap();
    let log = dir.path().join("run.log");
    let mut child = start(&moto, &path, &log, &["--log-format", "json"], "warn,iotdr=debug");
    let mut events = std::fs::OpenOptions::new().append(true).open(dir.path().join("events.jsonl")).unwrap();
    let west = moto.iot(WEST).await;
    let central = moto.iot(CENTRAL).await;
    let mut version = 1;
    let mut region = WEST;
    let mut placed: Vec<(String, &str)> = Vec::new();
    for round in 0..24 {
        if round > 0 {
            // Rounds 7, 11 and 15 try a version that must be refused; the others alternate the table.
            let (text, refused) = match round {
                11 => {
                    // Another source: not something a running pipeline can change.
                    std::fs::write(dir.path().join("other.jsonl"), "").unwrap();
                    let other = pipeline(&moto.url, if region == WEST { CENTRAL } else { WEST }, "");
                    (other.replace("path = \"events.jsonl\"", "path = \"other.jsonl\""), true)
                }
                7 => {
                    // Its own test fails: it expects acme nowhere near where the table sends it.
                    let test = format!(
                        "[[tests]]\nname = \"acme stays home\"\ninput = ['{{\"event\":{{\"entity\":\"thing\",\"operation\":\"created\",\"name\":\"t\",\"attributes\":{{\"customer\":\"acme\"}}}}}}']\ntargets = [\"{SOURCE}\"]\n"
                    );
                    (pipeline(&moto.url, if region == WEST { CENTRAL } else { WEST }, &test), true)
                }
                15 => {
                    let hostile = format!(
                        "[[stage]]\nname = \"broken\"\nplugin = \"{}\"\nconfig = {{ refuse_init = \"no\" }}\n",
                        common::test_plugin("hostile").display()
                    );
                    (pipeline(&moto.url, if region == WEST { CENTRAL } else { WEST }, &hostile), true)
                }
                _ => {
                    region = if region == WEST { CENTRAL } else { WEST };
                    (pipeline(&moto.url, region, ""), false)
                }
            };
            let refusals = std::fs::read_to_string(&log).unwrap_or_default().matches("change refused").count();
            write(&path, &text);
            if refused {
                wait_for("a refusal", &mut child, &log, |l| l.matches("change refused").count() > refusals);
            } else {
                version += 1;
                let ready = format!("pipeline version {version} ready");
                wait_for(&ready, &mut child, &log, |l| l.contains(&ready));
            }
        }
        // This round's events, under the version just made ready.
        for k in 0..PER_ROUND {
            let name = format!("r{round:02}-{k}");
            let line = format!(
                r#"{{"event":{{"id":"{name}","entity":"thing","operation":"created","name":"{name}","attributes":{{"customer":"acme","round":"{round}"}},"timestamp_ms":{}}}}}"#,
                1_764_000_000_000u64 + (round * PER_ROUND + k) as u64
            );
            writeln!(events, "{line}").unwrap();
            placed.push((name, region));
        }
        events.flush().unwrap();
        // Applied (the queue is applied in order: the round's last event
        // last) before the next version is written.
        let last = &placed.last().unwrap().0;
        let iot = if region == WEST { &west } else { &central };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !exists(iot, last).await {
            assert!(
                Instant::now() < deadline,
                "{last} never reached {region}:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    common::assert_no_secrets("the run's log", &text);
    // One JSON object per line (--log-format json), a line per batch at debug.
    for line in text.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    assert!(text.contains("\"message\":\"batch applied\""), "{text}");
    assert_eq!(version, 21, "20 versions swapped in after the first");
    assert_eq!(text.matches("change refused").count(), 3, "{text}");
    assert!(text.contains("[source] changed, which a running pipeline cannot change"), "{text}");
    assert!(text.contains("its test `acme stays home` fails"), "{text}");
    assert!(text.contains("stage `broken`") && text.contains("no"), "{text}");
    // Every thing in the region of its version, and only there.
    for (thing, region) in &placed {
        let (here, other) = if *region == WEST { (&west, &central) } else { (&central, &west) };
        assert!(exists(here, thing).await, "{thing} missing in {region}");
        assert!(!exists(other, thing).await, "{thing} also outside {region}");
    }
}

/// The admin endpoint of a running run: health, status, Prometheus metrics,
/// a reload; off loopback it needs a token, and without one it does not start.
#[tokio::test]
async fn the_admin_endpoint_shows_status_and_metrics_and_reloads() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.toml");
    let port = free_port();
    let admin = format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n");
    std::fs::write(dir.path().join("events.jsonl"), "").unwrap();
    std::fs::write(&path, pipeline(&moto.url, WEST, &admin)).unwrap();
    let log = dir.path().join("run.log");
    let mut child = start(&moto, &path, &log, &[], &common::log_filter());
    wait_for("the admin endpoint", &mut child, &log, |_| {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/healthz", None).0 == 200
    });
    let line = r#"{"event":{"id":"a-1","entity":"thing","operation":"created","name":"a-1","attributes":{"customer":"acme"},"timestamp_ms":1764000000001}}"#;
    // A line that does not decode first: its dead letter is stored before a-1 is.
    std::fs::write(dir.path().join("events.jsonl"), format!("not json\n{line}\n")).unwrap();
    let west = moto.iot(WEST).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !exists(&west, "a-1").await {
        assert!(Instant::now() < deadline, "a-1 never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (code, body) = http(port, "GET", "/status", None);
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((&status["pipeline"], &status["version"]), (&"swap".into(), &1.into()), "{status}");
    assert_eq!(status["stages"][0]["name"], "route", "{status}");
    assert_eq!(status["stages"][0]["sha256"].as_str().unwrap().len(), 64, "{status}");
    assert_eq!((&status["queue_depth"], &status["dead_letters"]), (&0.into(), &1.into()), "{status}");
    assert_eq!(status["dead_letters_by_step"], serde_json::json!({"decode": 1}), "{status}");
    assert!(status["lag_seconds"].as_f64().is_some_and(|lag| lag > 1000.0), "an event of last year: {status}");
    assert!(status["changes_applied"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["source_positions"].as_object().is_some_and(|p| !p.is_empty()), "{status}");

    let (code, metrics) = http(port, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(metrics.contains(r#"iotdr_api_calls_total{region="eu-west-1",operation="CreateThing"} 1"#), "{metrics}");
    assert!(metrics.contains("iotdr_pipeline_version 1") && metrics.contains("iotdr_queue_depth 0"), "{metrics}");
    assert!(metrics.contains("# TYPE iotdr_changes_applied counter"), "{metrics}");
    assert!(metrics.contains(r#"iotdr_stage_events_in_total{stage="route"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"iotdr_stage_events_out_total{stage="route"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"iotdr_dead_letters_by_step{step="decode"} 1"#), "{metrics}");
    assert!(metrics.contains("iotdr_lag_seconds_count 1"), "{metrics}");
    assert!(metrics.contains(r#"iotdr_lag_seconds_bucket{le="3600.0"} 0"#), "a year late: {metrics}");

    // A change, asked for by /reload (the file watch may have taken it first).
    std::fs::write(&path, pipeline(&moto.url, CENTRAL, &admin)).unwrap();
    let (code, body) = http(port, "POST", "/reload", None);
    assert_eq!(code, 200, "{body}");
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(["ready", "unchanged"].contains(&outcome["outcome"].as_str().unwrap()), "{outcome}");
    let status: serde_json::Value = serde_json::from_str(&http(port, "GET", "/status", None).1).unwrap();
    assert_eq!(status["last_reload"]["outcome"], "ready", "{status}");
    assert_eq!(status["last_reload"]["version"], 2, "{status}");
    child.kill().unwrap();
    child.wait().unwrap();
    common::assert_no_secrets("the run's log", &std::fs::read_to_string(&log).unwrap());

    // Off loopback: without a token the run does not start; with one, /status needs it.
    let port = free_port();
    std::fs::write(&path, pipeline(&moto.url, WEST, &format!("[admin]\nlisten = \"0.0.0.0:{port}\"\n"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(["run", path.to_str().unwrap(), "--until-idle"])
        .current_dir(dir.path())
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .env_remove("IOTDR_ADMIN_TOKEN")
        .envs(moto.env())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a loopback address: set admin.token_file or IOTDR_ADMIN_TOKEN"), "{stderr}");
    std::fs::write(dir.path().join("token"), "s3cret-admin-token\n").unwrap();
    let admin = format!("[admin]\nlisten = \"0.0.0.0:{port}\"\ntoken_file = \"token\"\n");
    std::fs::write(&path, pipeline(&moto.url, WEST, &admin)).unwrap();
    let mut child = start(&moto, &path, &log, &[], "warn");
    wait_for("the admin endpoint", &mut child, &log, |_| {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/healthz", None).0 == 200
    });
    assert_eq!(http(port, "GET", "/status", None).0, 401);
    assert_eq!(http(port, "POST", "/reload", Some("wrong")).0, 401);
    assert_eq!(http(port, "GET", "/status", Some("s3cret-admin-token")).0, 200);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!std::fs::read_to_string(&log).unwrap().contains("s3cret-admin-token"));
}
