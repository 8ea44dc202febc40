//! Hot swap under a running `iotdr run` on moto: the region router's
//! routing table changed 20 times while events flow, broken versions
//! refused, each event applied once under the version in effect when its
//! batch started (checked by where each thing landed).

mod common;

use common::moto::Moto;
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(["run", path.to_str().unwrap(), "--log-format", "json"])
        .current_dir(dir.path())
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .env("IOTDR_LOG", "warn,iotdr=debug")
        .envs(moto.env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
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
