//! A generated fleet (types, nested groups, 200+ things, certificates with
//! policies, shadows) replicated from one moto region to another, compared
//! field by field; also through injected faults, replayed, and by JITR.

mod common;

use common::faults::FaultProxy;
use common::fleet::seed;
use common::moto::Moto;
use common::region_state::region_state;
use common::runner::Run;
use serde_json::{Value, json};

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";
const THINGS: usize = 200;

/// Shadow versions depend on how often an update reached the region: a
/// dropped answer retried counts twice. Compare states without them.
fn without_shadow_versions(mut state: Value) -> Value {
    for thing in state["things"].as_object_mut().unwrap().values_mut() {
        for shadow in thing["shadows"].as_object_mut().unwrap().values_mut() {
            shadow.as_object_mut().unwrap().remove("version");
        }
    }
    state
}

fn assert_same(source: &Value, target: &Value) {
    for part in ["types", "groups", "policies", "certificates", "billing_groups"] {
        assert_eq!(source[part], target[part], "{part} differ");
    }
    let (from, to) = (source["things"].as_object().unwrap(), target["things"].as_object().unwrap());
    assert_eq!(from.len(), to.len(), "thing counts differ");
    for (name, thing) in from {
        assert_eq!(Some(thing), to.get(name), "thing {name} differs");
    }
}

#[tokio::test]
async fn a_generated_fleet_arrives_field_by_field() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, THINGS).await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &fleet.events, "");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));

    let source = region_state(&moto, SOURCE).await;
    let target = region_state(&moto, TARGET).await;
    assert_eq!(source["things"].as_object().unwrap().len(), fleet.things);
    assert_eq!(source["certificates"].as_object().unwrap().len(), fleet.things / 4);
    assert_same(&source, &target);
    // The sample the comparison rests on is what the fleet generator made.
    assert_eq!(
        target["things"]["dev-0000"]["attributes"],
        json!({ "site": "berlin", "customer": "acme", "firmware": "2.1" })
    );
    assert_eq!(target["groups"]["berlin"]["parent"], "europe");
    assert_eq!(target["things"]["dev-0000"]["certificates"].as_array().unwrap().len(), 1);

    // Replaying the whole stream: identical, shadow versions included.
    let again = test.run(&moto);
    assert_eq!(again["run"]["dead_letters"], 0, "{again}");
    assert_eq!(region_state(&moto, TARGET).await, target, "a replay changes nothing");
    let shadow_updates = fleet.events.iter().filter(|e| e.contains("/shadow/")).count();
    assert_eq!(again["run"]["stale"], shadow_updates, "shadow updates already applied are skipped: {again}");
    assert!(summary["calls_per_change"].as_f64().unwrap() <= 1.2, "{summary}");
}

#[tokio::test]
async fn thirty_percent_of_calls_failing_loses_nothing() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, THINGS).await;
    let proxy = FaultProxy::start(&moto.url, 0.3);
    let test = Run::new(SOURCE, &moto.url, TARGET, &proxy.url, &fleet.events, "max_attempts = 12");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let failures = summary["requests"]["throttled"].as_u64().unwrap()
        + summary["requests"]["transient_failures"].as_u64().unwrap();
    assert!(failures > 100, "the proxy did inject faults: {summary}");

    let source = without_shadow_versions(region_state(&moto, SOURCE).await);
    let target = without_shadow_versions(region_state(&moto, TARGET).await);
    assert_same(&source, &target);
}

#[tokio::test]
async fn a_jitr_certificate_arrives_pending_with_the_named_policy() {
    let moto = Moto::start();
    let iot = moto.iot(SOURCE).await;
    iot.create_policy()
        .policy_name("jitr-policy")
        .policy_document(r#"{"Version":"2012-10-17","Statement":[]}"#)
        .send()
        .await
        .unwrap();
    // JITR: the device's certificate was registered under a CA; AWS publishes this event.
    let created = iot.create_keys_and_certificate().send().await.unwrap();
    let id = created.certificate_id.unwrap();
    let event = json!({
        "topic": format!("$aws/events/certificates/registered/{}", "ca0".repeat(21) + "c"),
        "payload": { "certificateId": id, "caCertificateId": "ca0".repeat(21) + "c", "timestamp": 1_764_000_000_000u64,
                     "certificateStatus": "PENDING_ACTIVATION", "awsAccountId": "123456789012",
                     "certificateRegistrationTimestamp": "1764000000000" }
    });
    let test =
        Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[event.to_string()], r#"jitr_policies = ["jitr-policy"]"#);
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&id], json!({ "status": "PENDING_ACTIVATION", "policies": ["jitr-policy"] }));
    assert_eq!(target["policies"]["jitr-policy"]["versions"], 1);
}
