//! Plug-ins that loop, hoard memory, trap, panic, lie or probe the sandbox:
//! the host keeps running, only the poison event fails, and each stage's
//! `on_error` decides what becomes of it.

mod common;

use common::{kept_one, stage, test_plugin, thing};
use iotdr::config::Pipeline as PipelineConfig;
use iotdr::pipeline::Pipeline;
use iotdr::plugin::{Fate, LoadError, StageLimits, StageRunner};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn hostile(config: serde_json::Value) -> StageRunner {
    let limits = StageLimits { memory_bytes: 16 << 20, timeout: Duration::from_millis(100), ..StageLimits::default() };
    stage(&test_plugin("hostile"), config, limits)
}

fn batch_around(poison: &str) -> Vec<iotdr::event::Event> {
    let mut events: Vec<_> = (0..7).map(|i| thing(&format!("good-{i}"), &[("n", &i.to_string())])).collect();
    events.insert(3, thing(poison, &[("n", "poison")]));
    events
}

/// Every event but the poison one passed (changed by the plug-in); the
/// poison one failed, unchanged, for `reason_part`.
fn assert_only_poison_failed(fates: &[Fate], poison: &str, reason_part: &str) {
    assert_eq!(fates.len(), 8);
    for (index, fate) in fates.iter().enumerate() {
        if index == 3 {
            let Fate::Failed(event, reason) = fate else { panic!("the poison event must fail, got {fate:?}") };
            assert_eq!(event.name, poison);
            assert!(reason.contains(reason_part), "reason {reason:?} should say {reason_part:?}");
            assert!(!event.attributes.contains_key("touched-by-hostile"), "a failed event comes back as it went in");
        } else {
            let event = kept_one(fate);
            assert!(event.name.starts_with("good-"));
            assert_eq!(event.attributes.get("touched-by-hostile").map(String::as_str), Some("yes"));
        }
    }
}

/// After a misdeed the same stage still serves a clean batch.
fn assert_still_serves(runner: &mut StageRunner) {
    let fates = runner.process(vec![thing("after-1", &[]), thing("after-2", &[])]);
    assert_eq!(kept_one(&fates[0]).name, "after-1");
    assert_eq!(kept_one(&fates[1]).name, "after-2");
}

#[test]
fn an_infinite_loop_times_out_and_fails_only_its_event() {
    let mut runner = hostile(json!({ "loop_on": "spinner" }));
    let fates = runner.process(batch_around("spinner"));
    assert_only_poison_failed(&fates, "spinner", "timed out: the call took longer than 100 ms");
    assert_still_serves(&mut runner);
}

#[test]
fn a_memory_bomb_hits_the_limit_and_fails_only_its_event() {
    let mut runner = hostile(json!({ "bomb_on": "hoarder" }));
    let fates = runner.process(batch_around("hoarder"));
    assert_only_poison_failed(&fates, "hoarder", "exceeded its memory limit of 16 MiB");
    assert_still_serves(&mut runner);
}

#[test]
fn a_trap_fails_only_its_event() {
    let mut runner = hostile(json!({ "trap_on": "trapper" }));
    let fates = runner.process(batch_around("trapper"));
    assert_only_poison_failed(&fates, "trapper", "trapped");
    assert_still_serves(&mut runner);
}

#[test]
fn a_panic_is_reported_with_its_message() {
    let mut runner = hostile(json!({ "panic_on": "panicker" }));
    let fates = runner.process(batch_around("panicker"));
    assert_only_poison_failed(&fates, "panicker", "hostile plug-in refuses panicker");
    assert_still_serves(&mut runner);
}

#[test]
fn the_sandbox_grants_no_files_sockets_or_environment() {
    // SAFETY: set before any thread of this test reads the environment; the
    // host must not pass it on whatever it holds.
    unsafe { std::env::set_var("IOTDR_TEST_SECRET", "do-not-leak") };
    let mut runner = hostile(json!({ "probe_sandbox": true }));
    let fates = runner.process(vec![thing("prober", &[])]);
    let event = kept_one(&fates[0]);
    let attribute = |key: &str| event.attributes.get(key).cloned().unwrap_or_default();
    assert!(attribute("probe-file").starts_with("denied"), "file access: {}", attribute("probe-file"));
    assert!(attribute("probe-socket").starts_with("denied"), "socket: {}", attribute("probe-socket"));
    assert_eq!(attribute("probe-env-vars"), "0", "no environment variables reach a plug-in");
}

#[test]
fn retryable_failures_are_retried_up_to_the_limit() {
    // One failure per instance: the retry succeeds.
    let mut runner = hostile(json!({ "flaky_failures": 1 }));
    let fates = runner.process(vec![thing("flaky", &[])]);
    assert_eq!(kept_one(&fates[0]).name, "flaky");

    // More failures than retries: the event fails, with the plug-in's reason.
    let limits = StageLimits { retries: 2, ..StageLimits::default() };
    let mut runner = stage(&test_plugin("hostile"), json!({ "flaky_failures": 5 }), limits);
    let fates = runner.process(vec![thing("flaky", &[])]);
    assert!(matches!(&fates[0], Fate::Failed(_, reason) if reason == "flaky"), "{:?}", fates[0]);
}

#[test]
fn a_plug_in_that_breaks_the_contract_fails_its_events_not_the_host() {
    let mut runner = hostile(json!({ "wrong_outcome_count": true }));
    let fates = runner.process(vec![thing("a", &[]), thing("b", &[])]);
    for fate in &fates {
        let Fate::Failed(event, reason) = fate else { panic!("{fate:?}") };
        assert!(reason.contains("broke the contract: returned 2 outcomes for 1 events"), "{reason}");
        assert!(event.attributes.is_empty(), "changes of a rejected call are undone");
    }
}

#[test]
fn a_plug_in_that_refuses_its_config_is_reported_at_start() {
    let loaded = Arc::new(common::engine().load(&test_plugin("hostile")).unwrap());
    let error = StageRunner::start(
        "refuser",
        loaded.clone(),
        json!({ "refuse_init": "no thanks" }).to_string(),
        StageLimits::default(),
    )
    .err()
    .expect("init refuses");
    assert_eq!(error.to_string(), "the plug-in rejected its config: no thanks");
    let error = StageRunner::start("typo", loaded, json!({ "lop_on": "x" }).to_string(), StageLimits::default())
        .err()
        .expect("unknown keys are refused");
    assert!(error.to_string().contains("unknown field `lop_on`"), "{error}");
}

#[test]
fn a_plug_in_built_for_another_major_version_is_refused() {
    let path = test_plugin("future-major");
    let error = common::engine().load(&path).expect_err("an incompatible contract is refused");
    assert!(matches!(error, LoadError::IncompatibleVersion { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("iotdr:plugin@1.0.0"), "{message}");
    assert!(message.contains("this host implements iotdr:plugin@0.1.0"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn a_file_that_is_not_a_component_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-plugin.wasm");
    std::fs::write(&path, b"\0asm garbage").unwrap();
    let error = common::engine().load(&path).expect_err("garbage is refused");
    assert!(matches!(error, LoadError::Compile { .. }), "{error:?}");
    assert!(error.to_string().starts_with(&path.display().to_string()), "{error}");
    let missing = dir.path().join("missing.wasm");
    let error = common::engine().load(&missing).expect_err("a missing file is refused");
    assert!(error.to_string().contains("cannot read the plug-in"), "{error}");
}

fn pipeline_with(on_error: &str) -> Pipeline {
    let plugin = test_plugin("hostile");
    let text = format!(
        r#"
[pipeline]
name = "hostile"
source_region = "us-east-1"
targets = ["eu-west-1"]

[source]
kind = "file"
path = "fixtures/aws/registry.jsonl"

[[stage]]
name = "trap-on-poison"
plugin = "{}"
config = {{ trap_on = "poison" }}
on_error = "{on_error}"
"#,
        plugin.display()
    );
    let file = common::root().join("tests/hostile-pipeline.toml");
    let config = PipelineConfig::parse(&file, &text, &|_| None).expect("valid pipeline");
    Pipeline::build(&config, common::engine()).expect("pipeline builds")
}

#[test]
fn on_error_dead_letter_keeps_the_rest_of_the_batch_going() {
    let mut pipeline = pipeline_with("dead-letter");
    let processed = pipeline.process(batch_around("poison")).expect("dead-letter never halts");
    assert_eq!(processed.events.len(), 7);
    assert_eq!(processed.dead_letters.len(), 1);
    let letter = &processed.dead_letters[0];
    assert_eq!(letter.step, iotdr::state::Step::Stage("trap-on-poison".into()));
    assert!(letter.reason.contains("trapped"), "{}", letter.reason);
    assert_eq!(letter.event.as_ref().map(|e| e.name.as_str()), Some("poison"));
}

#[test]
fn on_error_skip_passes_the_event_on_unchanged() {
    let mut pipeline = pipeline_with("skip");
    let processed = pipeline.process(batch_around("poison")).expect("skip never halts");
    assert_eq!(processed.events.len(), 8);
    assert_eq!(processed.skipped, 1);
    assert!(processed.dead_letters.is_empty());
    let poison = processed.events.iter().find(|e| e.name == "poison").expect("the poison event went on");
    assert!(!poison.attributes.contains_key("touched-by-hostile"));
    // In its place: a skipped event must not overtake or trail the others.
    let order: Vec<&str> = processed.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(order, ["good-0", "good-1", "good-2", "poison", "good-3", "good-4", "good-5", "good-6"]);
}

#[test]
fn on_error_halt_stops_the_run_and_names_the_event() {
    let mut pipeline = pipeline_with("halt");
    let halted = pipeline.process(batch_around("poison")).expect_err("halt stops");
    assert_eq!(halted.stage, "trap-on-poison");
    assert_eq!(halted.name, "poison");
    assert!(halted.to_string().contains("its on_error is halt"), "{halted}");
}
