//! Real runs against the moto AWS emulator: events replicated into a target
//! region, read back through the SDK field by field.

mod common;

use common::moto::Moto;
use common::runner::Run;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Output;

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

fn pipeline(moto: &Moto, events: &[String], apply_extra: &str) -> Run {
    Run::new(SOURCE, &moto.url, TARGET, &moto.url, events, apply_extra)
}

fn run(moto: &Moto, test: &Run) -> Value {
    test.run(moto)
}

fn iotdr(moto: &Moto, dir: &Path, args: &[&str]) -> Output {
    common::runner::iotdr(moto, dir, args)
}

async fn target_state(moto: &Moto) -> Value {
    common::region_state::region_state(moto, TARGET).await
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
                "certificates": [],
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
                "certificates": [],
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
    let again = test.rerun(&moto);
    assert_eq!(again["run"]["dead_letters"], 0, "{again}");
    // Stale: the three shadow updates already there, and every change older
    // than its entity's newest (sensor-v1's creation, pump-0001's creation
    // and type association, pump-0003's creation and its membership's
    // addition and removal, all older than its deletion). The rest is the
    // newest change of its entity, applied again to the same effect.
    assert_eq!(again["run"]["stale"], 9, "{again}");
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
        letters.iter().map(|l| (l["step"].as_str().unwrap(), l["reason"].as_str().unwrap())).collect();
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
    let ids: Vec<String> = letters.iter().filter(|l| l["step"] == "apply").map(|l| l["id"].to_string()).collect();
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

/// AWS publishes each topic's events in no common order: a shadow report
/// or a membership can come before the `created` event of what it needs,
/// in another batch. Such a change waits for it, and never becomes a dead
/// letter while it may still come; what never comes is one at the end.
#[tokio::test]
async fn a_change_that_comes_before_what_it_needs_waits_for_it() {
    let moto = Moto::start();
    let membership = |thing: &str, group: &str, at: u64| {
        record(
            &format!("$aws/events/thingGroupMembership/thingGroup/{group}/thing/{thing}/added"),
            json!({ "eventId": format!("m-{thing}-{at}"), "timestamp": at, "operation": "ADDED",
                    "accountId": "111122223333" }),
        )
    };
    // Times as the source made them (the thing and group first), in the
    // order they arrived, two to a batch: the first report waits, and the
    // second, in the thing's batch, must not overtake it (each carries only
    // what changed: the first would be stale, its `rpm` lost).
    let events = vec![
        shadow_event("late-1", None, 1, json!({ "reported": { "rpm": 900 } })),
        membership("late-1", "late-group", 3),
        thing_event("CREATED", "late-1", None, json!({ "site": "porto" }), 1),
        shadow_event("late-1", None, 2, json!({ "reported": { "temperature": 20 } })),
        record(
            "$aws/events/thingGroup/late-group/created",
            json!({ "eventType": "THING_GROUP_EVENT", "eventId": "g-late", "timestamp": 2, "operation": "CREATED",
                    "accountId": "111122223333", "thingGroupName": "late-group", "versionNumber": 1, "attributes": {} }),
        ),
        // Its type never arrives.
        thing_event("CREATED", "orphan-2", Some("never-type"), json!({}), 4),
    ];
    let test = pipeline(&moto, &events, "");
    let text =
        std::fs::read_to_string(&test.pipeline).unwrap().replace("name = \"test\"", "name = \"test\"\nbatch_size = 2");
    std::fs::write(&test.pipeline, text).unwrap();
    let summary = run(&moto, &test);
    assert_eq!(summary["run"]["dead_letters"], 1, "only the orphan: {summary}");
    assert!(summary["run"]["waited"].as_u64().unwrap() >= 3, "{summary}");

    let state = target_state(&moto).await;
    let late = &state["things"]["late-1"];
    assert_eq!(late["groups"], json!(["late-group"]), "{state}");
    assert_eq!(late["attributes"], json!({ "site": "porto" }));
    assert_eq!(late["shadows"]["classic"]["state"]["reported"], json!({ "rpm": 900, "temperature": 20 }), "{state}");
    assert!(state["things"].get("orphan-2").is_none());
    let out = iotdr(&moto, test.dir.path(), &["dead-letters", "list", test.pipeline.to_str().unwrap()]);
    let letters: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["event"]["name"], "orphan-2");
    assert!(letters[0]["reason"].as_str().unwrap().contains("never arrived"), "{letters:?}");
}

fn fixture_lines(name: &str) -> Vec<String> {
    let path = common::root().join("tests/fixtures/aws").join(name);
    std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

#[tokio::test]
async fn every_aws_fixture_is_replicated() {
    let moto = Moto::start();
    // The shadow fixtures are about a thing that was replicated before them.
    moto.iot(TARGET).await.create_thing().thing_name("pump-0002").send().await.unwrap();
    // The JITR fixture's certificate must exist in the source to be fetched:
    // register one there and point the event at it.
    let created = moto.iot(SOURCE).await.create_keys_and_certificate().send().await.unwrap();
    let id = created.certificate_id.unwrap();
    let mut jitr: Value = serde_json::from_str(&fixture_lines("jitr.jsonl")[0]).unwrap();
    jitr["payload"]["certificateId"] = id.clone().into();

    let mut events = fixture_lines("registry.jsonl");
    events.push(jitr.to_string());
    events.extend(fixture_lines("shadow.jsonl"));
    let test = pipeline(&moto, &events, "");
    let summary = run(&moto, &test);
    assert_eq!(summary["run"]["dead_letters"], 0, "{:?}", test.dead_letters(&moto));
    assert_eq!(summary["run"]["records"], events.len());

    let state = target_state(&moto).await;
    assert_eq!(
        state["types"]["sensor-v2"],
        json!({ "description": "Second generation climate sensor", "searchable": ["site", "model"], "deprecated": true })
    );
    assert_eq!(state["groups"]["berlin-plant"]["parent"], "europe");
    assert_eq!(state["groups"]["europe"]["attributes"], json!({ "tier": "gold" }));
    assert!(state["things"].get("pump-0001").is_none(), "created, updated, grouped, then deleted");
    // The event says PENDING_ACTIVATION; the source, read at ingest, says
    // what the certificate is now (moto makes it INACTIVE): that wins.
    assert_eq!(state["certificates"][&id]["status"], "INACTIVE");
    let pump = &state["things"]["pump-0002"];
    assert!(pump["shadows"].get("classic").is_none(), "the classic shadow was deleted last: {pump}");
    assert_eq!(pump["shadows"]["maintenance"]["state"]["desired"], json!({ "window": "02:00-04:00" }));
}

#[tokio::test]
async fn the_global_registry_holds_every_thing_of_the_source() {
    let moto = Moto::start();
    let test = pipeline(&moto, &scenario(), r#"global_registry_table = "fleet-registry""#);
    let summary = run(&moto, &test);
    assert_eq!(summary["run"]["dead_letters"], 0, "{:?}", test.dead_letters(&moto));
    let things = registry_rows(&moto).await;
    assert_eq!(
        things,
        vec![
            json!({ "name": "pump-0001", "region": "us-east-1", "state": "active", "type": "sensor-v2",
                    "groups": ["berlin-plant"], "attributes": { "site": "berlin", "customer": "acme" }, "billing": null }),
            json!({ "name": "pump-0002", "region": "us-east-1", "state": "active", "type": "sensor-v2",
                    "groups": [], "attributes": { "site": "munich" }, "billing": "fleet-a" }),
            json!({ "name": "pump-0003", "region": "us-east-1", "state": "deleted", "type": null,
                    "groups": [], "attributes": {}, "billing": null }),
        ]
    );

    // An older change arriving late (a replayed letter) does not roll a row back.
    let late = thing_event("UPDATED", "pump-0001", Some("sensor-v2"), json!({ "site": "old" }), 8);
    let test = pipeline(&moto, &[late], r#"global_registry_table = "fleet-registry""#);
    let summary = run(&moto, &test);
    assert_eq!(summary["run"]["dead_letters"], 0, "{:?}", test.dead_letters(&moto));
    assert_eq!(registry_rows(&moto).await, things);
}

/// The global registry's rows, by thing name.
async fn registry_rows(moto: &Moto) -> Vec<Value> {
    let dynamodb = aws_sdk_dynamodb::Client::new(&moto.sdk_config(TARGET).await);
    let items = dynamodb.scan().table_name("fleet-registry").send().await.unwrap().items.unwrap_or_default();
    let mut things: Vec<Value> = items
        .iter()
        .map(|item| {
            let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
            let mut groups: Vec<String> =
                item.get("thingGroups").and_then(|v| v.as_ss().ok()).cloned().unwrap_or_default();
            groups.sort();
            let attributes: std::collections::BTreeMap<String, String> = item
                .get("attributes")
                .and_then(|v| v.as_m().ok())
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_s().unwrap().clone())).collect())
                .unwrap_or_default();
            json!({
                "name": s("thingName"), "region": s("sourceRegion"), "state": s("state"), "type": s("thingType"),
                "groups": groups, "attributes": attributes, "billing": s("billingGroup"),
            })
        })
        .collect();
    things.sort_by_key(|t| t["name"].as_str().unwrap().to_string());
    things
}
