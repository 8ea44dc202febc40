//! `iotdr failover` against moto's Route 53: health checks and the failover
//! record pair created once and found again, `promote` and `failback`
//! switching the pair and the TXT record, `--dry-run` changing nothing.
//! moto evaluates no health and serves no DNS (docs/failover.md).

mod common;

use common::moto::Moto;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const EAST_HOST: &str = "broker.us-east-1.drill.test";
const WEST_HOST: &str = "broker.eu-west-1.drill.test";
const SECRET: &str = "r53-secret-77a1";

fn dr_file(dir: &Path, moto: &Moto, zone: &str, check: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[regions.us-east-1]
mqtt_endpoint = "{EAST_HOST}:8883"
[regions.eu-west-1]
mqtt_endpoint = "{WEST_HOST}:8883"

[health]
listen = "127.0.0.1:8443"
ca = "ca.crt"
certificate = "health.crt"
private_key = "health.key"
secret_file = "secret"

[failover]
hosted_zone_id = "{zone}"
name = "iot.drill.test"
primary = "us-east-1"
secondary = "eu-west-1"
ttl = 5
endpoint_url = "{url}"
health_check = {{ fqdn = "health.drill.test", {check} }}
"#,
        url = moto.url
    );
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let path = dir.join("dr.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `iotdr failover <args>`: (exit code, stdout); stderr must be quiet of secrets.
fn failover(moto: &Moto, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .arg("failover")
        .args(args)
        .envs(moto.env())
        .env("IOTDR_LOG", common::log_filter())
        .output()
        .expect("iotdr runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for text in [&stdout, &stderr] {
        common::assert_no_secrets("iotdr failover", text);
        assert!(!text.contains(SECRET), "iotdr failover shows the health secret:\n{text}");
    }
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// What moto holds: health checks (id, path, interval, threshold) and the records of the name.
async fn route53_state(client: &aws_sdk_route53::Client, zone: &str) -> (Vec<(String, String, i32, i32)>, Vec<Value>) {
    let checks = client.list_health_checks().send().await.unwrap();
    let mut checks: Vec<(String, String, i32, i32)> = checks
        .health_checks()
        .iter()
        .map(|c| {
            let config = c.health_check_config().unwrap();
            (
                c.id().to_string(),
                config.resource_path().unwrap_or_default().to_string(),
                config.request_interval().unwrap_or_default(),
                config.failure_threshold().unwrap_or_default(),
            )
        })
        .collect();
    checks.sort_by(|a, b| a.1.cmp(&b.1));
    let sets = client.list_resource_record_sets().hosted_zone_id(zone).send().await.unwrap();
    let records = sets
        .resource_record_sets()
        .iter()
        .filter(|r| r.name().trim_end_matches('.').ends_with("iot.drill.test"))
        .map(|r| {
            serde_json::json!({
                "name": r.name().trim_end_matches('.'),
                "type": r.r#type().as_str(),
                "set": r.set_identifier(),
                "failover": r.failover().map(|f| f.as_str().to_string()),
                "value": r.resource_records().iter().map(|v| v.value().to_string()).collect::<Vec<_>>().join(" "),
                "health_check": r.health_check_id(),
            })
        })
        .collect();
    (checks, records)
}

/// The CNAME that is PRIMARY, its health check, and the TXT decision's primary.
fn primary_of(records: &[Value], checks: &[(String, String, i32, i32)]) -> (String, String, String) {
    let primary = records.iter().find(|r| r["failover"] == "PRIMARY").expect("a PRIMARY record");
    let check = &primary["health_check"];
    let path = checks.iter().find(|c| c.0 == check.as_str().unwrap()).map(|c| c.1.clone()).expect("its health check");
    let txt = records.iter().find(|r| r["type"] == "TXT").expect("the TXT record");
    let text = iotdr::failover::route53::txt_text(txt["value"].as_str().unwrap());
    let decision: Value = serde_json::from_str(&text).unwrap();
    (primary["value"].as_str().unwrap().to_string(), path, decision["primary"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn records_are_made_once_then_promoted_and_failed_back() {
    let moto = Moto::start();
    let route53 = aws_sdk_route53::Client::new(&moto.sdk_config("us-east-1").await);
    let zone = route53
        .create_hosted_zone()
        .name("drill.test")
        .caller_reference("iotdr-test")
        .send()
        .await
        .unwrap()
        .hosted_zone()
        .unwrap()
        .id()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dr_file(dir.path(), &moto, &zone, "port = 8443, type = \"HTTP\"");
    let config = config.to_str().unwrap();

    // A dry run says what it would do and writes nothing.
    let (code, out) = failover(&moto, &["apply", config, "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("create the health check of us-east-1: HTTP health.drill.test:8443/health/us-east-1?secret=***"),
        "{out}"
    );
    assert!(out.contains("upsert CNAME iot.drill.test PRIMARY -> broker.us-east-1.drill.test"), "{out}");
    let (checks, records) = route53_state(&route53, &zone).await;
    assert!(checks.is_empty() && records.is_empty(), "a dry run wrote {checks:?} {records:?}");

    let (code, out) = failover(&moto, &["apply", config]);
    assert_eq!(code, 0, "{out}");
    let (checks, records) = route53_state(&route53, &zone).await;
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert_eq!(checks[1].1, format!("/health/us-east-1?secret={SECRET}"));
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(primary_of(&records, &checks), (EAST_HOST.into(), checks[1].1.clone(), "us-east-1".into()));
    let secondary = records.iter().find(|r| r["failover"] == "SECONDARY").unwrap();
    assert_eq!(
        (secondary["value"].as_str(), secondary["health_check"].as_str()),
        (Some(WEST_HOST), Some(checks[0].0.as_str()))
    );

    // Again: nothing to change, nothing added.
    let (code, out) = failover(&moto, &["apply", config]);
    assert!(code == 0 && out.contains("nothing to change"), "{out}");
    assert_eq!(route53_state(&route53, &zone).await, (checks.clone(), records.clone()));

    // Promote the secondary: the pair and the TXT record switch, the checks stay.
    let (code, out) = failover(&moto, &["promote", config, "eu-west-1"]);
    assert_eq!(code, 0, "{out}");
    let (after, records) = route53_state(&route53, &zone).await;
    assert_eq!(after, checks, "promote keeps the health checks");
    assert_eq!(primary_of(&records, &checks), (WEST_HOST.into(), checks[0].1.clone(), "eu-west-1".into()));
    // `apply` keeps the decision made; `status` shows it.
    let (code, out) = failover(&moto, &["apply", config]);
    assert!(code == 0 && out.contains("primary eu-west-1") && out.contains("nothing to change"), "{out}");
    let (code, out) = failover(&moto, &["status", config, "--json"]);
    assert_eq!(code, 0, "{out}");
    let status: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(status["decision"]["primary"], "eu-west-1", "{status}");
    assert_eq!(status["health_checks"].as_array().map(Vec::len), Some(2), "{status}");

    let (code, out) = failover(&moto, &["failback", config]);
    assert_eq!(code, 0, "{out}");
    let (_, records) = route53_state(&route53, &zone).await;
    assert_eq!(primary_of(&records, &checks), (EAST_HOST.into(), checks[1].1.clone(), "us-east-1".into()));

    // A region that is neither: refused, nothing written.
    let (code, out) = failover(&moto, &["promote", config, "us-west-2"]);
    assert!(code != 0 && out.contains("us-west-2 is neither the primary"), "{out}");

    // A changed threshold updates the checks in place; a changed interval
    // (fixed once made) replaces them, records first, then the old are deleted.
    let config = dr_file(dir.path(), &moto, &zone, "port = 8443, type = \"HTTP\", failure_threshold = 2");
    let (code, out) = failover(&moto, &["apply", config.to_str().unwrap()]);
    assert!(code == 0 && out.contains("update health check"), "{out}");
    let (updated, _) = route53_state(&route53, &zone).await;
    let ids = |c: &[(String, String, i32, i32)]| c.iter().map(|c| c.0.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&updated), ids(&checks));
    assert!(updated.iter().all(|c| c.3 == 2), "{updated:?}");
    let config =
        dr_file(dir.path(), &moto, &zone, "port = 8443, type = \"HTTP\", failure_threshold = 2, interval = 10");
    let (code, out) = failover(&moto, &["apply", config.to_str().unwrap()]);
    assert!(code == 0 && out.contains("delete health check"), "{out}");
    let (replaced, records) = route53_state(&route53, &zone).await;
    assert_eq!(replaced.len(), 2, "{replaced:?}");
    assert!(replaced.iter().all(|c| c.2 == 10 && !ids(&checks).contains(&c.0)), "{replaced:?}");
    assert_eq!(primary_of(&records, &replaced), (EAST_HOST.into(), replaced[1].1.clone(), "us-east-1".into()));
}

/// `iotdr failover watch` on two real brokers: the primary's broker stops,
/// the secondary is promoted after `failure_threshold` failed checks in a
/// row; it comes back, and with `auto_failback` the primary is promoted again.
#[test]
fn the_watch_fails_over_when_the_primary_broker_stops_and_back_when_it_returns() {
    use common::broker::Broker;
    use std::io::BufRead;
    let moto = Moto::start();
    let (east, west) = (Broker::start(), Broker::start());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let route53 = runtime.block_on(async { aws_sdk_route53::Client::new(&moto.sdk_config("us-east-1").await) });
    let zone = runtime.block_on(async {
        let zone = route53.create_hosted_zone().name("drill.test").caller_reference("watch").send().await.unwrap();
        zone.hosted_zone().unwrap().id().to_string()
    });
    let region = |name: &str, broker: &Broker| {
        let path = |file: &str| broker.file(file).display().to_string();
        format!(
            "[regions.{name}]\nmqtt_endpoint = \"{}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
            broker.endpoint(),
            path("ca.crt"),
            path("client.crt"),
            path("client.key")
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dr.toml");
    std::fs::write(
        &config,
        format!(
            "{}{}[health]\nlisten = \"127.0.0.1:1\"\ntimeout_ms = 1000\n\
             [failover]\nhosted_zone_id = \"{zone}\"\nname = \"iot.drill.test\"\nprimary = \"us-east-1\"\n\
             secondary = \"eu-west-1\"\nendpoint_url = \"{}\"\nwatch_interval_ms = 300\nauto_failback = true\n\
             health_check = {{ fqdn = \"health.drill.test\", failure_threshold = 2 }}\n",
            region("us-east-1", &east),
            region("eu-west-1", &west),
            moto.url
        ),
    )
    .unwrap();
    let log = dir.path().join("watch.log");
    /// Killed when the test ends, passing or not.
    struct Watch(std::process::Child);
    impl Drop for Watch {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(["failover", "watch"])
        .arg(&config)
        .envs(moto.env())
        .env("IOTDR_LOG", common::log_filter())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Watch)
        .unwrap();
    let (tx, decisions) = std::sync::mpsc::channel::<Value>();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).unwrap_or(Value::String(line)));
        }
    });
    let next_decision = |what: &str| {
        let decision = decisions.recv_timeout(std::time::Duration::from_secs(30));
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        common::assert_no_secrets("iotdr failover watch", &log);
        decision.unwrap_or_else(|_| panic!("no {what} decision; the watch's log:\n{log}"))
    };
    // The TXT record's primary, once the watch has written one.
    let txt_primary = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (_, records) = runtime.block_on(route53_state(&route53, &zone));
            if let Some(txt) = records.iter().find(|r| r["type"] == "TXT") {
                let text = iotdr::failover::route53::txt_text(txt["value"].as_str().unwrap());
                let decision: Value = serde_json::from_str(&text).unwrap();
                return decision["primary"].as_str().unwrap().to_string();
            }
            assert!(std::time::Instant::now() < deadline, "the watch wrote no TXT record");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };

    // Healthy: no decision for a while (the records are made with the configured primary).
    assert!(decisions.recv_timeout(std::time::Duration::from_millis(1500)).is_err(), "a decision without a failure");
    assert_eq!(txt_primary(), "us-east-1");

    let stopped = std::time::Instant::now();
    east.stop();
    let decision = next_decision("failover");
    let after = stopped.elapsed();
    assert_eq!(
        (decision["action"].as_str(), decision["primary"].as_str()),
        (Some("promote"), Some("eu-west-1")),
        "{decision}"
    );
    assert!(decision["checks_in_a_row"].as_u64() >= Some(2), "{decision}");
    assert!(after >= std::time::Duration::from_millis(300), "decided after {after:?}: before two checks could fail");
    assert_eq!(txt_primary(), "eu-west-1");

    east.restart(false);
    let decision = next_decision("failback");
    assert_eq!(
        (decision["action"].as_str(), decision["primary"].as_str()),
        (Some("failback"), Some("us-east-1")),
        "{decision}"
    );
    assert_eq!(txt_primary(), "us-east-1");
    drop(child);
}
