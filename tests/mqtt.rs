//! The `mqtt` source against a real mosquitto broker with mutual TLS (the
//! project's script starts it, with certificates it makes): a persistent
//! session at QoS 1, acknowledged only once stored; what is published while
//! iotdr is down arrives after its restart; a broker that lost its sessions
//! is subscribed to again.

mod common;

use common::broker::Broker;
use common::fleet::seed;
use common::moto::Moto;
use common::region_state::{assert_same, region_state, same};
use common::runner::Run;

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";

fn mqtt_run(moto: &Moto, broker: &Broker) -> Run {
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    test.read_source(&broker.source_table("iotdr-replicator"));
    test
}

fn run_until_idle(moto: &Moto, test: &Run) -> serde_json::Value {
    let out = common::runner::iotdr(
        moto,
        test.dir.path(),
        &["run", test.pipeline.to_str().unwrap(), "--until-idle", "--idle-after", "2s"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iotdr run failed:\n{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("summary: ")).unwrap_or_else(|| panic!("no summary:\n{stderr}"));
    serde_json::from_str(line.trim_start_matches("summary: ")).unwrap()
}

#[tokio::test]
async fn a_fleet_published_on_the_registry_topics_arrives_and_what_came_while_iotdr_was_down_follows() {
    let moto = Moto::start();
    let broker = Broker::start();
    let fleet = seed(&moto, SOURCE, 200).await;
    let test = mqtt_run(&moto, &broker);
    // A first run makes the persistent session (and its subscriptions) on the broker.
    let summary = run_until_idle(&moto, &test);
    assert_eq!(summary["run"]["records"], 0, "{summary}");

    let (first, second) = fleet.events.split_at(fleet.events.len() / 2);
    broker.publish(first).await;
    let mut child = test.spawn(&moto);
    let target = moto.iot(TARGET).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while target.list_things().send().await.unwrap().things.unwrap_or_default().is_empty() {
        assert!(std::time::Instant::now() < deadline, "nothing arrived: {}", test.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Killed midway; the rest of the fleet's events are published while it is down.
    child.kill().unwrap();
    child.wait().unwrap();
    broker.publish(second).await;

    let summary = run_until_idle(&moto, &test);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    assert_same(&region_state(&moto, SOURCE).await, &region_state(&moto, TARGET).await);
    let again = run_until_idle(&moto, &test);
    assert_eq!(again["run"]["records"], 0, "everything was acknowledged: {again}");
}

#[tokio::test]
async fn a_broker_that_lost_its_sessions_is_subscribed_to_again_and_what_is_published_after_arrives() {
    let moto = Moto::start();
    let broker = Broker::start();
    let fleet = seed(&moto, SOURCE, 60).await;
    let test = mqtt_run(&moto, &broker);
    let (first, second) = fleet.events.split_at(fleet.events.len() / 2);
    // Following the broker (no idle end), as in production.
    let log = test.dir.path().join("run.log");
    let _child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_iotdr"))
            .args(["run", test.pipeline.to_str().unwrap()])
            .current_dir(test.dir.path())
            .env("IOTDR_CACHE_DIR", common::cache_dir())
            .env("IOTDR_LOG", common::log_filter())
            .envs(moto.env())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let subscriptions = || std::fs::read_to_string(&log).unwrap_or_default().matches("subscribing").count();
    let target = moto.iot(TARGET).await;
    let arrived = async || !target.list_things().send().await.unwrap().things.unwrap_or_default().is_empty();

    wait_until(30, "the first subscription", &test, async || subscriptions() >= 1).await;
    // The SUBACK may trail the log line: publish again until something
    // arrives (redeliveries are dropped by event id).
    broker.publish(first).await;
    wait_until(60, "the first half", &test, async || {
        arrived().await || {
            broker.publish(first).await;
            false
        }
    })
    .await;

    // The broker comes back with no session: iotdr must subscribe again.
    broker.restart(true);
    wait_until(60, "a second subscription", &test, async || subscriptions() >= 2).await;
    broker.publish(second).await;
    let source = region_state(&moto, SOURCE).await;
    wait_until(120, "the target to equal the source", &test, async || {
        same(&source, &region_state(&moto, TARGET).await) || {
            broker.publish(second).await;
            false
        }
    })
    .await;
    // Its log, read back, shows no private key, PEM or secret.
    test.log();
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `condition` every half second until it holds, failing after `seconds`.
async fn wait_until(seconds: u64, what: &str, test: &Run, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !condition().await {
        assert!(std::time::Instant::now() < deadline, "waited {seconds} s for {what}: {}", test.log());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
