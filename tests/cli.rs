//! The `iotdr` binary as an operator runs it: exit codes, messages, output.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn iotdr(args: &[&str], cwd: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(args)
        .current_dir(cwd)
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .env_remove("IOTDR_LOG")
        .output()
        .expect("iotdr runs");
    common::assert_no_secrets(&format!("iotdr {}", args.join(" ")), &text(&out.stdout));
    common::assert_no_secrets(&format!("iotdr {}", args.join(" ")), &text(&out.stderr));
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The demo pipeline, copied to `dir` with its relative paths made absolute
/// and `edit` applied to its text.
fn demo_pipeline_in(dir: &Path, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let root = common::root();
    let original = std::fs::read_to_string(root.join("pipelines/demo.toml")).unwrap();
    let text = edit(original.replace("\"../", &format!("\"{}/", root.display())));
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn validate_accepts_the_demo_pipeline() {
    let root = common::root();
    common::plugin("attribute-filter");
    let out = iotdr(&["validate", "pipelines/demo.toml"], &root);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("valid: pipeline `demo`"), "{stdout}");
    assert!(stdout.contains("skip-test-devices → tidy-attributes → per-customer-route → policies-for-target"));
}

#[test]
fn validate_names_file_line_and_column_of_each_mistake() {
    let dir = tempfile::tempdir().unwrap();
    // (what, text to replace, its replacement, what the error must say)
    let cases = [
        ("unknown key", "name = \"demo\"", "nmae = \"demo\"", ":5:1: unknown field `nmae`"),
        (
            "bad region",
            "targets = [\"eu-west-1\",",
            "targets = [\"Europe\",",
            ":7:12: `Europe` is not an AWS region name",
        ),
        (
            "duplicate stage",
            "name = \"tidy-attributes\"",
            "name = \"skip-test-devices\"",
            "duplicate stage name `skip-test-devices`",
        ),
        ("missing plug-in", "attribute-filter.wasm", "no-such-plugin.wasm", "no-such-plugin.wasm"),
        ("bad limit", "memory_mb = 16", "memory_mb = 0", "memory_mb"),
        ("bad on_error", "on_error = \"dead-letter\"", "on_error = \"ignore\"", "ignore"),
    ];
    for (what, from, to, expected) in cases {
        let path = demo_pipeline_in(dir.path(), |t| t.replacen(from, to, 1));
        let out = iotdr(&["validate", path.to_str().unwrap()], dir.path());
        assert_eq!(out.status.code(), Some(1), "{what}: exit code");
        let stderr = text(&out.stderr);
        assert!(stderr.starts_with(&format!("error: {}:", path.display())), "{what}: names the file: {stderr}");
        assert!(stderr.contains(expected), "{what}: {stderr} should contain {expected:?}");
        assert!(out.stdout.is_empty(), "{what}: nothing on stdout");
    }
}

#[test]
fn validate_reports_a_stage_config_the_plug_in_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_pipeline_in(dir.path(), |t| t.replacen("drop_values = [\"test\"]", "drop_valuez = [\"test\"]", 1));
    let out = iotdr(&["validate", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("stage `skip-test-devices`"), "{stderr}");
    assert!(stderr.contains("drop_valuez"), "{stderr}");
}

#[test]
fn the_shipped_pipelines_pass_their_own_tests() {
    let root = common::root();
    common::plugin("attribute-filter");
    for pipeline in ["pipelines/demo.toml", "pipelines/replicate.toml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_iotdr"))
            .args(["test", pipeline])
            .current_dir(&root)
            .env("IOTDR_CACHE_DIR", common::cache_dir())
            .env("IOTDR_EVENTS", "../examples/events/demo.jsonl")
            .env("IOTDR_ENDPOINT", "http://127.0.0.1:9")
            .output()
            .unwrap();
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{pipeline}: {stdout}{}", text(&out.stderr));
        assert!(stdout.contains(" passed, 0 failed") && !stdout.starts_with("0 passed"), "{pipeline}: {stdout}");
    }
}

/// A test whose expectation the pipeline does not meet: `iotdr test` names
/// the test and what differs, and exits 1; `iotdr validate` refuses the file.
#[test]
fn a_failing_pipeline_test_is_reported_with_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = r#"
[[tests]]
name = "globex goes everywhere"
input = ['{"topic":"$aws/events/thing/c-2/created","payload":{"eventType":"THING_EVENT","eventId":"x","timestamp":1,"operation":"CREATED","accountId":"123456789012","thingName":"c-2","versionNumber":1,"attributes":{"customer":"globex","fw":"1"}}}']
targets = ["eu-west-1", "eu-central-1"]
attributes = { fw = "1" }
"#;
    let path = demo_pipeline_in(dir.path(), |t| t + wrong);
    let out = iotdr(&["test", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("ok    globex's devices go to eu-west-1 only"), "{stdout}");
    assert!(stdout.contains("FAIL  globex goes everywhere"), "{stdout}");
    assert!(stdout.contains(r#"targets: expected ["eu-central-1", "eu-west-1"], got ["eu-west-1"]"#), "{stdout}");
    assert!(stdout.contains(r#"attributes.fw: expected "1", but it is absent"#), "{stdout}");
    assert!(stdout.contains("3 passed, 1 failed"), "{stdout}");
    let out = iotdr(&["validate", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("its tests fail"), "{}", text(&out.stderr));

    // A test checked after a stage the pipeline does not have: named where it is written.
    let path = demo_pipeline_in(dir.path(), |t| t + &wrong.replace("targets =", "after = \"routing\"\ntargets ="));
    let out = iotdr(&["test", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no stage `routing` (stages: skip-test-devices, tidy-attributes"), "{stderr}");
    assert!(stderr.contains(&format!("{}:", path.display())), "{stderr}");
}

#[test]
fn a_dry_run_of_the_demo_prints_one_planned_call_per_line() {
    let root = common::root();
    common::plugin("attribute-filter");
    let out = iotdr(&["run", "pipelines/demo.toml", "--dry-run", "--until-idle"], &root);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let calls: Vec<Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert!(calls.len() >= 10, "{calls:?}");
    for call in &calls {
        assert!(call["region"].is_string() && call["operation"].is_string() && call["input"].is_object(), "{call}");
    }
    let operations: Vec<(&str, &str)> =
        calls.iter().map(|c| (c["region"].as_str().unwrap(), c["operation"].as_str().unwrap())).collect();
    for expected in ["CreateThingType", "CreateThingGroup", "CreateThing", "AddThingToThingGroup", "UpdateThingShadow"]
    {
        assert!(operations.iter().any(|(_, op)| *op == expected), "{expected} in {operations:?}");
    }
    // The test device is filtered out; acme's things go to both regions.
    assert!(!text(&out.stdout).contains("\"env\":\"test\""));
    let acme_creates: Vec<&str> = calls
        .iter()
        .filter(|c| {
            c["operation"] == "CreateThing" && c["input"]["attributePayload"]["attributes"]["customer"] == "acme"
        })
        .map(|c| c["region"].as_str().unwrap())
        .collect();
    assert!(acme_creates.contains(&"eu-west-1") && acme_creates.contains(&"eu-central-1"), "{acme_creates:?}");
    // Renamed by the transform stage, never the source name.
    assert!(!text(&out.stdout).contains("\"fw\""));
    // Certificates' PEMs never reach the output.
    assert!(!text(&out.stdout).contains("BEGIN CERTIFICATE"));
    let stderr = text(&out.stderr);
    let summary_line = stderr.lines().find(|l| l.starts_with("summary: ")).expect("a summary on stderr");
    let summary: Value = serde_json::from_str(summary_line.trim_start_matches("summary: ")).unwrap();
    assert_eq!(summary["calls"].as_u64(), Some(calls.len() as u64));
    assert_eq!(summary["dropped"], 1);
    assert_eq!(summary["dead_letters"], 0);
}

#[test]
fn run_points_a_scan_source_to_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_pipeline_in(dir.path(), |t| {
        let without_path: Vec<&str> = t.lines().filter(|l| !l.starts_with("path = ")).collect();
        without_path.join("\n").replacen("kind = \"file\"", "kind = \"scan\"", 1)
    });
    let out = iotdr(&["run", path.to_str().unwrap(), "--until-idle"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("run it with `iotdr sync"), "{}", text(&out.stderr));
}

#[test]
fn plugin_test_prints_an_outcome_per_event_and_fails_on_failures() {
    let root = common::root();
    let filter = common::plugin("attribute-filter");
    let filter_demo_events = |config: &str| {
        let args = ["plugin", "test", filter.to_str().unwrap(), "--events", "examples/events/demo.jsonl"];
        iotdr(&[&args[..], &["--config", config]].concat(), &root)
    };
    let out = filter_demo_events(r#"{"attribute":"env","drop_values":["test"]}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let records = std::fs::read_to_string(root.join("examples/events/demo.jsonl")).unwrap();
    let expected = records.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).count();
    assert_eq!(lines.len(), expected, "one line per event");
    let drops: Vec<&Value> = lines.iter().filter(|l| l["outcome"] == "drop").collect();
    assert_eq!(drops.len(), 1);
    assert_eq!(drops[0]["reason"], "env=test");
    assert!(lines.iter().all(|l| l["outcome"] == "keep" || l["outcome"] == "drop"));

    // A bad config is refused before any event flows.
    let out = filter_demo_events("{\"x\":1}");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unknown field `x`"), "{}", text(&out.stderr));

    // Failures and undecodable lines make the exit code 3.
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        "{\"topic\":\"$aws/events/thing/poison/created\",\"payload\":{\"operation\":\"CREATED\"}}\nnot json\n",
    )
    .unwrap();
    let hostile = common::test_plugin("hostile");
    let out = iotdr(
        &[
            "plugin",
            "test",
            hostile.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--config",
            r#"{"trap_on":"poison"}"#,
        ],
        &root,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let outcomes: Vec<&str> = lines.iter().map(|l| l["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, vec!["invalid", "fail"]);
    assert!(lines[0]["reason"].as_str().unwrap().starts_with("not JSON"));
}

#[test]
fn a_halted_run_keeps_the_dead_letters_its_batch_made_before_once() {
    let shadow = |thing: &str| {
        serde_json::json!({ "topic": format!("$aws/things/{thing}/shadow/update/accepted"),
                            "payload": { "state": { "reported": { "on": true } }, "version": 1 } })
        .to_string()
    };
    let events = ["{not json".to_string(), shadow("fine"), shadow("poison")];
    let stage =
        common::runner::stage("trap-on-poison", &common::test_plugin("hostile"), r#"{ trap_on = "poison" }"#, "halt");
    // Both regions are down: nothing gets as far as them.
    let down = "http://127.0.0.1:9";
    let test = common::runner::Run::new("us-east-1", down, "eu-west-1", down, &events, &stage);
    let (dir, pipeline) = (test.dir.path(), &test.pipeline);
    // Twice: the halted batch stays queued and halts the next run again; the
    // decode failure stored with it at ingest is one letter, not two.
    for _ in 0..2 {
        let out = iotdr(&["run", pipeline.to_str().unwrap(), "--until-idle"], dir);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("its on_error is halt"), "{}", text(&out.stderr));
    }
    let listed = iotdr(&["dead-letters", "list", pipeline.to_str().unwrap()], dir);
    let letters: Vec<Value> = text(&listed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0]["step"].as_str(), letters[0]["origin"].as_str()), (Some("decode"), Some("events.jsonl:1")));
}
