//! Real runs against the moto AWS emulator: events replicated into a target
//! region, read back through the SDK field by field.

mod common;

use common::moto::Moto;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";

fn record(topic: &str, payload: Value) -> String {
    json!({ "topic": topic, "payload": payload }).to_string()
}

fn native(event: Value) -> String {
    json!({ "event": event }).to_string()
}

fn thing_event(operation: &str, name: &str, thing_type: Option<&str>, attributes: Value, at: u64) -> String {
    record(
        &format!("$aws/events/thing/{name}/{}", operation.to_lowercase()),
        json!({
            "eventType": "THING_EVENT", "eventId": format!("thing-{name}-{at}"), "timestamp": at,
            "operation": operation, "accountId": "111122223333", "thingName": name,
            "versionNumber": 1, "thingTypeName": thing_type, "attributes": attributes
        }),
    )
}

fn shadow_event(thing: &str, shadow: Option<&str>, version: u64, state: Value) -> String {
    let topic = match shadow {
        Some(name) => format!("$aws/things/{thing}/shadow/name/{name}/update/accepted"),
        None => format!("$aws/things/{thing}/shadow/update/accepted"),
    };
    record(&topic, json!({ "state": state, "version": version, "timestamp": 1763900000 + version }))
}

/// A fleet's day: types, a group hierarchy, things created, retyped, updated
/// (an attribute removed), grouped, billed, shadowed and deleted.
fn scenario() -> Vec<String> {
    let policy_document = json!({
        "Version": "2012-10-17",
        "Statement": [{ "Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:us-east-1:111122223333:client/*" }]
    });
    vec![
        record(
            "$aws/events/thingType/sensor-v2/created",
            json!({ "eventType": "THING_TYPE_EVENT", "eventId": "tt-1", "timestamp": 1, "operation": "CREATED",
                    "accountId": "111122223333", "thingTypeName": "sensor-v2", "isDeprecated": false,
                    "searchableAttributes": ["site", "model"], "description": "Second generation sensor" }),
        ),
        record(
            "$aws/events/thingType/sensor-v1/created",
            json!({ "eventType": "THING_TYPE_EVENT", "eventId": "tt-2", "timestamp": 2, "operation": "CREATED",
                    "accountId": "111122223333", "thingTypeName": "sensor-v1", "isDeprecated": false }),
        ),
        record(
            "$aws/events/thingType/sensor-v1/updated",
            json!({ "eventType": "THING_TYPE_EVENT", "eventId": "tt-3", "timestamp": 3, "operation": "UPDATED",
                    "accountId": "111122223333", "thingTypeName": "sensor-v1", "isDeprecated": true }),
        ),
        record(
            "$aws/events/thingGroup/europe/created",
            json!({ "eventType": "THING_GROUP_EVENT", "eventId": "g-1", "timestamp": 4, "operation": "CREATED",
                    "accountId": "111122223333", "thingGroupName": "europe", "versionNumber": 1,
                    "description": "All European sites", "attributes": { "tier": "gold" } }),
        ),
        record(
            "$aws/events/thingGroup/berlin-plant/created",
            json!({ "eventType": "THING_GROUP_EVENT", "eventId": "g-2", "timestamp": 5, "operation": "CREATED",
                    "accountId": "111122223333", "thingGroupName": "berlin-plant", "versionNumber": 1,
                    "parentGroupName": "europe", "attributes": {} }),
        ),
        record(
            "$aws/events/thingGroupHierarchy/thingGroup/europe/childThingGroup/berlin-plant/added",
            json!({ "eventType": "THING_GROUP_HIERARCHY_EVENT", "eventId": "h-1", "timestamp": 6, "operation": "ADDED",
                    "accountId": "111122223333", "thingGroupName": "europe", "childGroupName": "berlin-plant" }),
        ),
        thing_event("CREATED", "pump-0001", None, json!({ "site": "berlin", "customer": "acme", "serial": "SN-1" }), 7),
        record(
            "$aws/events/thingTypeAssociation/thing/pump-0001/sensor-v2",
            json!({ "eventId": "a-1", "timestamp": 8, "operation": "ADDED", "accountId": "111122223333",
                    "thingName": "pump-0001", "thingTypeName": "sensor-v2" }),
        ),
        thing_event("UPDATED", "pump-0001", Some("sensor-v2"), json!({ "site": "berlin", "customer": "acme" }), 9),
        record(
            "$aws/events/thingGroupMembership/thingGroup/berlin-plant/thing/pump-0001/added",
            json!({ "eventId": "m-1", "timestamp": 10, "operation": "ADDED", "accountId": "111122223333",
                    "thingArn": "arn:aws:iot:us-east-1:111122223333:thing/pump-0001",
                    "groupArn": "arn:aws:iot:us-east-1:111122223333:thinggroup/berlin-plant" }),
        ),
        thing_event("CREATED", "pump-0002", Some("sensor-v2"), json!({ "site": "munich" }), 11),
        shadow_event("pump-0002", None, 1, json!({ "reported": { "temperature": 21.5 } })),
        shadow_event("pump-0002", None, 2, json!({ "reported": { "rpm": 1440 } })),
        shadow_event("pump-0002", Some("maintenance"), 1, json!({ "desired": { "window": "02:00-04:00" } })),
        thing_event("CREATED", "pump-0003", None, json!({}), 12),
        record(
            "$aws/events/thingGroupMembership/thingGroup/europe/thing/pump-0003/added",
            json!({ "eventId": "m-2", "timestamp": 13, "operation": "ADDED", "accountId": "111122223333" }),
        ),
        record(
            "$aws/events/thingGroupMembership/thingGroup/europe/thing/pump-0003/removed",
            json!({ "eventId": "m-3", "timestamp": 14, "operation": "REMOVED", "accountId": "111122223333" }),
        ),
        thing_event("DELETED", "pump-0003", None, json!({}), 15),
        native(json!({ "entity": "policy", "operation": "created", "name": "device-policy",
                       "document": policy_document.to_string(), "account_id": "111122223333" })),
        native(json!({ "entity": "billing-group", "operation": "created", "name": "fleet-a",
                       "document": json!({ "description": "Fleet A" }).to_string() })),
        native(json!({ "entity": "billing-group-membership", "operation": "added", "name": "pump-0002",
                       "related": [["billing-group", "fleet-a"]] })),
    ]
}

struct Run {
    dir: tempfile::TempDir,
    pipeline: PathBuf,
}

/// A pipeline without stages from `events` to the moto target, state in a temp folder.
fn pipeline(moto: &Moto, events: &[String], apply_extra: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let events_path = dir.path().join("events.jsonl");
    std::fs::write(&events_path, events.join("\n") + "\n").unwrap();
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"
[pipeline]
name = "apply-test"
source_region = "{SOURCE}"
targets = ["{TARGET}"]

[regions.{TARGET}]
endpoint_url = "{url}"

[source]
kind = "file"
path = "events.jsonl"

[apply]
initial_backoff_ms = 10
max_backoff_ms = 200
{apply_extra}
"#,
            url = moto.url
        ),
    )
    .unwrap();
    Run { dir, pipeline }
}

fn iotdr(moto: &Moto, dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(args)
        .current_dir(dir)
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .envs(moto.env())
        .output()
        .expect("iotdr runs")
}

fn run(moto: &Moto, run: &Run) -> Value {
    let out = iotdr(moto, run.dir.path(), &["run", run.pipeline.to_str().unwrap(), "--until-idle"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iotdr run failed:\n{stderr}");
    let line =
        stderr.lines().find(|l| l.starts_with("summary: ")).unwrap_or_else(|| panic!("no summary in:\n{stderr}"));
    serde_json::from_str(line.trim_start_matches("summary: ")).unwrap()
}

/// Everything a test compares about the target region.
async fn target_state(moto: &Moto) -> Value {
    let iot = moto.iot(TARGET).await;
    let data = moto.data(TARGET).await;
    let mut things = serde_json::Map::new();
    for thing in iot.list_things().send().await.unwrap().things.unwrap_or_default() {
        let name = thing.thing_name.unwrap();
        let described = iot.describe_thing().thing_name(&name).send().await.unwrap();
        let groups: Vec<String> = iot
            .list_thing_groups_for_thing()
            .thing_name(&name)
            .send()
            .await
            .unwrap()
            .thing_groups
            .unwrap_or_default()
            .into_iter()
            .filter_map(|g| g.group_name)
            .collect();
        let mut shadows = serde_json::Map::new();
        let named =
            data.list_named_shadows_for_thing().thing_name(&name).send().await.unwrap().results.unwrap_or_default();
        for shadow in std::iter::once(None).chain(named.into_iter().map(Some)) {
            if let Ok(got) = data.get_thing_shadow().thing_name(&name).set_shadow_name(shadow.clone()).send().await {
                let document: Value = serde_json::from_slice(got.payload.unwrap().as_ref()).unwrap();
                shadows.insert(
                    shadow.unwrap_or_else(|| "classic".into()),
                    json!({ "state": document["state"], "version": document["version"] }),
                );
            }
        }
        let attributes: HashMap<String, String> = described.attributes.unwrap_or_default();
        things.insert(
            name,
            json!({
                "type": described.thing_type_name,
                "attributes": attributes,
                "groups": groups,
                "billing_group": described.billing_group_name,
                "shadows": shadows,
            }),
        );
    }
    let mut types = serde_json::Map::new();
    for t in iot.list_thing_types().send().await.unwrap().thing_types.unwrap_or_default() {
        let properties = t.thing_type_properties.unwrap();
        types.insert(
            t.thing_type_name.unwrap(),
            json!({
                "description": properties.thing_type_description,
                "searchable": properties.searchable_attributes,
                "deprecated": t.thing_type_metadata.map(|m| m.deprecated),
            }),
        );
    }
    let mut groups = serde_json::Map::new();
    for g in iot.list_thing_groups().send().await.unwrap().thing_groups.unwrap_or_default() {
        let name = g.group_name.unwrap();
        let described = iot.describe_thing_group().thing_group_name(&name).send().await.unwrap();
        let properties = described.thing_group_properties.unwrap();
        groups.insert(
            name,
            json!({
                "parent": described.thing_group_metadata.and_then(|m| m.parent_group_name),
                "description": properties.thing_group_description,
                "attributes": properties.attribute_payload.and_then(|p| p.attributes).unwrap_or_default(),
            }),
        );
    }
    let mut policies = serde_json::Map::new();
    for p in iot.list_policies().send().await.unwrap().policies.unwrap_or_default() {
        let name = p.policy_name.unwrap();
        let got = iot.get_policy().policy_name(&name).send().await.unwrap();
        let versions = iot.list_policy_versions().policy_name(&name).send().await.unwrap();
        policies.insert(
            name,
            json!({
                "document": serde_json::from_str::<Value>(&got.policy_document.unwrap()).unwrap(),
                "versions": versions.policy_versions.unwrap_or_default().len(),
            }),
        );
    }
    let billing: Vec<String> = iot
        .list_billing_groups()
        .send()
        .await
        .unwrap()
        .billing_groups
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| g.group_name)
        .collect();
    json!({ "things": things, "types": types, "groups": groups, "policies": policies, "billing_groups": billing })
}

#[tokio::test]
async fn a_fleets_changes_arrive_in_the_target_region() {
    let moto = Moto::start();
    let test = pipeline(&moto, &scenario(), "");
    let summary = run(&moto, &test);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary}");
    assert_eq!(summary["run"]["records"], 21);

    let state = target_state(&moto).await;
    assert_eq!(
        state["things"],
        json!({
            "pump-0001": {
                "type": "sensor-v2",
                "attributes": { "site": "berlin", "customer": "acme" },
                "groups": ["berlin-plant"],
                "billing_group": null,
                "shadows": {},
            },
            "pump-0002": {
                "type": "sensor-v2",
                "attributes": { "site": "munich" },
                "groups": [],
                "billing_group": "fleet-a",
                "shadows": {
                    "classic": { "state": { "reported": { "temperature": 21.5, "rpm": 1440 } }, "version": 2 },
                    // A desired state nothing reported yet shows as a delta, as in AWS.
                    "maintenance": {
                        "state": { "desired": { "window": "02:00-04:00" }, "delta": { "window": "02:00-04:00" } },
                        "version": 1
                    },
                },
            },
        }),
        "things: {state:#}"
    );
    assert_eq!(
        state["types"],
        json!({
            "sensor-v2": { "description": "Second generation sensor", "searchable": ["site", "model"], "deprecated": false },
            "sensor-v1": { "description": null, "searchable": null, "deprecated": true },
        })
    );
    assert_eq!(
        state["groups"],
        json!({
            "europe": { "parent": null, "description": "All European sites", "attributes": { "tier": "gold" } },
            "berlin-plant": { "parent": "europe", "description": null, "attributes": {} },
        })
    );
    assert_eq!(state["policies"]["device-policy"]["versions"], 1);
    assert_eq!(
        state["policies"]["device-policy"]["document"]["Statement"][0]["Resource"],
        "arn:aws:iot:us-east-1:111122223333:client/*"
    );
    assert_eq!(state["billing_groups"], json!(["fleet-a"]));
    // Nothing leaked into the source region.
    assert!(moto.iot(SOURCE).await.list_things().send().await.unwrap().things.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn replaying_the_stream_changes_nothing_more() {
    let moto = Moto::start();
    let test = pipeline(&moto, &scenario(), "");
    run(&moto, &test);
    let first = target_state(&moto).await;
    let again = run(&moto, &test);
    assert_eq!(again["run"]["dead_letters"], 0, "{again}");
    assert_eq!(again["run"]["stale"], 3, "the three shadow updates are already there: {again}");
    let second = target_state(&moto).await;
    assert_eq!(first, second, "a replay converges to the same state (shadow versions included)");

    // The same stream from a fresh state folder (iotdr's memory lost) converges too.
    let fresh = pipeline(&moto, &scenario(), "");
    let third_run = run(&moto, &fresh);
    assert_eq!(third_run["run"]["dead_letters"], 0, "{third_run}");
    let third = target_state(&moto).await;
    assert_eq!(first["types"], third["types"]);
    assert_eq!(first["groups"], third["groups"]);
    assert_eq!(first["policies"], third["policies"], "no duplicate policy versions");
    assert_eq!(first["things"]["pump-0001"], third["things"]["pump-0001"]);
}

#[tokio::test]
async fn bad_input_becomes_dead_letters_and_the_rest_is_applied() {
    let moto = Moto::start();
    let mut events = vec![
        "{not json".to_string(),
        record("$aws/events/spaceship/x/created", json!({ "operation": "CREATED" })),
        // Its type never arrives in the target.
        thing_event("CREATED", "orphan-1", Some("no-such-type"), json!({ "a": "1" }), 1),
        native(json!({ "entity": "thing-group-membership", "operation": "added", "name": "pump-0002" })),
    ];
    events.extend(scenario());
    let test = pipeline(&moto, &events, "dependency_attempts = 1\ndependency_pause_ms = 10");
    let summary = run(&moto, &test);
    assert_eq!(summary["run"]["dead_letters"], 4, "{summary}");
    let state = target_state(&moto).await;
    assert!(state["things"]["pump-0002"].is_object(), "the good events went through");
    assert!(state["things"].get("orphan-1").is_none());

    let out = iotdr(&moto, test.dir.path(), &["dead-letters", "list", test.pipeline.to_str().unwrap()]);
    assert!(out.status.success());
    let letters: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reasons: Vec<(&str, &str)> =
        letters.iter().map(|l| (l["stage"].as_str().unwrap(), l["reason"].as_str().unwrap())).collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].0 == "decode" && reasons[0].1.starts_with("not JSON"), "{reasons:?}");
    assert!(reasons[1].1.contains("unknown topic"), "{reasons:?}");
    assert!(
        reasons.iter().any(|(stage, reason)| *stage == "plan" && reason.contains("without a thing-group")),
        "{reasons:?}"
    );
    let orphan = reasons.iter().find(|(stage, _)| *stage == "apply").expect("the orphan failed to apply");
    assert!(orphan.1.starts_with("eu-west-1: CreateThing: ResourceNotFoundException"), "{orphan:?}");
    assert!(orphan.1.contains("never arrived"), "{orphan:?}");
    assert_eq!(letters[0]["origin"], "events.jsonl:1");

    // Once its type exists, replaying the orphan applies it and clears the letter.
    moto.iot(TARGET).await.create_thing_type().thing_type_name("no-such-type").send().await.unwrap();
    let ids: Vec<String> = letters.iter().filter(|l| l["stage"] == "apply").map(|l| l["id"].to_string()).collect();
    let out =
        iotdr(&moto, test.dir.path(), &["dead-letters", "replay", test.pipeline.to_str().unwrap(), "--id", &ids[0]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["replayed"], 1, "{report}");
    let described = moto.iot(TARGET).await.describe_thing().thing_name("orphan-1").send().await.unwrap();
    assert_eq!(described.thing_type_name.as_deref(), Some("no-such-type"));
    let out = iotdr(&moto, test.dir.path(), &["dead-letters", "list", test.pipeline.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let out = iotdr(&moto, test.dir.path(), &["dead-letters", "purge", test.pipeline.to_str().unwrap(), "--all"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 3"));
}
