//! Decoding every AWS event shape into one `Event`, in every accepted form.

use iotdr::event::{DecodeError, Entity, Event, Operation, decode_dynamodb_image, decode_line, decode_record, related};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::path::PathBuf;

const REGION: &str = "us-east-1";

fn fixture(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/aws").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("fixture is JSON")).collect()
}

fn all_fixtures() -> Vec<Value> {
    ["registry.jsonl", "jitr.jsonl", "shadow.jsonl"].iter().flat_map(|f| fixture(f)).collect()
}

/// Plain JSON → DynamoDB JSON, as an IoT rule's DynamoDBv2 action stores a record.
fn to_dynamodb(value: &Value) -> Value {
    match value {
        Value::Null => json!({ "NULL": true }),
        Value::Bool(b) => json!({ "BOOL": b }),
        Value::Number(n) => json!({ "N": n.to_string() }),
        Value::String(s) => json!({ "S": s }),
        Value::Array(items) => json!({ "L": items.iter().map(to_dynamodb).collect::<Vec<_>>() }),
        Value::Object(map) => json!({ "M": map_to_dynamodb(map) }),
    }
}

fn map_to_dynamodb(map: &serde_json::Map<String, Value>) -> Value {
    Value::Object(map.iter().map(|(k, v)| (k.clone(), to_dynamodb(v))).collect())
}

fn decode(record: &Value) -> Event {
    decode_record(record, REGION).unwrap_or_else(|e| panic!("{record}: {e}"))
}

#[test]
fn every_fixture_decodes_with_its_entity_and_operation() {
    let events: Vec<Event> = all_fixtures().iter().map(decode).collect();
    let summary: Vec<(Entity, Operation, &str)> =
        events.iter().map(|e| (e.entity, e.operation, e.name.as_str())).collect();
    assert_eq!(
        summary,
        vec![
            (Entity::ThingType, Operation::Created, "sensor-v2"),
            (Entity::ThingGroup, Operation::Created, "europe"),
            (Entity::ThingGroup, Operation::Created, "berlin-plant"),
            (Entity::ThingGroupHierarchy, Operation::Added, "berlin-plant"),
            (Entity::Thing, Operation::Created, "pump-0001"),
            (Entity::ThingTypeAssociation, Operation::Added, "pump-0001"),
            (Entity::Thing, Operation::Updated, "pump-0001"),
            (Entity::ThingGroupMembership, Operation::Added, "pump-0001"),
            (Entity::ThingType, Operation::Updated, "sensor-v2"),
            (Entity::ThingGroupMembership, Operation::Removed, "pump-0001"),
            (Entity::Thing, Operation::Deleted, "pump-0001"),
            (
                Entity::Certificate,
                Operation::Created,
                "9e1d7c5b3a2f4e6d8c0b1a3f5e7d9c2b4a6f8e0d1c3b5a7f9e2d4c6b8a0f1e3d"
            ),
            (Entity::Shadow, Operation::Updated, "pump-0002"),
            (Entity::Shadow, Operation::Updated, "pump-0002"),
            (Entity::Shadow, Operation::Deleted, "pump-0002"),
        ]
    );
    for event in &events {
        assert_eq!(event.source_region, REGION);
        assert!(!event.id.is_empty(), "{event:?} has an id");
        assert!(event.timestamp_ms > 0, "{event:?} has a timestamp");
        assert!(event.targets.is_empty(), "targets are the pipeline's to set");
    }
}

#[test]
fn registry_events_carry_the_full_state_to_apply() {
    let events: Vec<Event> = fixture("registry.jsonl").iter().map(decode).collect();
    let created = &events[4];
    assert_eq!(created.account_id, "111122223333");
    assert_eq!(created.id, "605b1f4c3d9e8c7d2e0f5a4b3c2d1ea5");
    assert_eq!(created.timestamp_ms, 1763900000005);
    assert_eq!(created.version, Some(1));
    assert_eq!(created.attributes.get("customer").map(String::as_str), Some("acme"));
    assert_eq!(created.attributes.len(), 3);

    let child = &events[2];
    assert_eq!(child.related(related::PARENT_GROUP), Some("europe"));
    let document: Value = serde_json::from_str(events[1].document.as_deref().expect("group document")).unwrap();
    assert_eq!(document["description"], "All European sites");
    assert_eq!(events[1].attributes.get("tier").map(String::as_str), Some("gold"));

    let hierarchy = &events[3];
    assert_eq!(hierarchy.related(related::PARENT_GROUP), Some("europe"));

    let association = &events[5];
    assert_eq!(association.related(related::THING_TYPE), Some("sensor-v2"));

    let membership = &events[7];
    assert_eq!(membership.related(related::THING_GROUP), Some("berlin-plant"));

    let thing_type: Value = serde_json::from_str(events[0].document.as_deref().expect("type document")).unwrap();
    assert_eq!(thing_type["description"], "Second generation climate sensor");
    assert_eq!(thing_type["searchableAttributes"], json!(["site", "model"]));
    assert_eq!(thing_type["deprecated"], false);
}

#[test]
fn jitr_and_shadow_events_keep_status_names_and_documents() {
    let certificate = decode(&fixture("jitr.jsonl")[0]);
    assert_eq!(certificate.related(related::CERTIFICATE_STATUS), Some("PENDING_ACTIVATION"));
    assert_eq!(
        certificate.related(related::CA_CERTIFICATE),
        Some("4f2a9c1e7b3d5a8c0e6f2b4d9a1c7e3f5b8d0a2c4e6f8a1b3d5c7e9f0a2b4c6d")
    );
    assert_eq!(certificate.account_id, "111122223333");

    let shadows: Vec<Event> = fixture("shadow.jsonl").iter().map(decode).collect();
    assert_eq!(shadows[0].related(related::SHADOW_NAME), None, "the classic shadow has no name");
    assert_eq!(shadows[0].version, Some(7));
    assert_eq!(shadows[0].timestamp_ms, 1763900000 * 1000, "shadow seconds become milliseconds");
    let state: Value = serde_json::from_str(shadows[0].document.as_deref().expect("shadow document")).unwrap();
    assert_eq!(state, json!({ "state": { "reported": { "temperature": 21.5, "rpm": 1440 } } }));
    assert_eq!(shadows[1].related(related::SHADOW_NAME), Some("maintenance"));
    assert_eq!(shadows[2].document, None, "a delete carries no state");
    assert_eq!(shadows[2].version, Some(8));
    let ids: std::collections::HashSet<&str> = shadows.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "shadow events without an AWS event id still get distinct ids");
}

#[test]
fn a_dynamodb_image_or_stream_record_decodes_like_the_plain_record() {
    for record in all_fixtures() {
        let plain = decode(&record);
        let image = map_to_dynamodb(record.as_object().unwrap());
        assert_eq!(decode_dynamodb_image(&image, REGION).unwrap(), plain, "item image of {record}");
        assert_eq!(decode(&image), plain, "item image detected by its shape");
        let stream = json!({ "eventName": "INSERT", "dynamodb": { "NewImage": image } });
        assert_eq!(decode(&stream), plain, "stream record of {record}");
    }
}

#[test]
fn flat_and_string_payload_forms_decode_like_the_plain_record() {
    for record in all_fixtures() {
        let plain = decode(&record);
        let mut flat = record["payload"].as_object().unwrap().clone();
        flat.insert("topic".into(), record["topic"].clone());
        assert_eq!(decode(&Value::Object(flat)), plain);
        let stringly = json!({ "topic": record["topic"], "payload": record["payload"].to_string() });
        assert_eq!(decode(&stringly), plain);
    }
}

#[test]
fn native_events_round_trip() {
    for record in all_fixtures() {
        let event = decode(&record);
        let line = json!({ "event": event }).to_string();
        assert_eq!(decode_line(&line, "eu-west-1").unwrap(), event);
    }
    let minimal = decode_line(r#"{"event":{"entity":"thing","operation":"created","name":"a"}}"#, REGION).unwrap();
    assert_eq!(minimal.source_region, REGION);
    assert!(!minimal.id.is_empty());
}

#[test]
fn publishers_that_say_created_and_deleted_for_links_are_understood() {
    let topics = [
        "$aws/events/thingTypeAssociation/thing/pump-0001/sensor-v2",
        "$aws/events/thingGroupMembership/thingGroup/g/thing/pump-0001/added",
        "$aws/events/thingGroupHierarchy/thingGroup/p/childThingGroup/c/added",
    ];
    for topic in topics {
        for (word, expected) in [
            ("CREATED", Operation::Added),
            ("ADDED", Operation::Added),
            ("DELETED", Operation::Removed),
            ("REMOVED", Operation::Removed),
        ] {
            let record = json!({ "topic": topic, "payload": { "operation": word, "timestamp": 1, "eventId": "e" } });
            assert_eq!(decode(&record).operation, expected, "{topic} {word}");
        }
    }
}

#[test]
fn membership_names_come_from_arns_when_present() {
    let record = json!({
        "topic": "$aws/events/thingGroupMembership/thingGroup/g-topic/thing/t-topic/added",
        "payload": {
            "operation": "ADDED", "timestamp": 1,
            "thingArn": "arn:aws:iot:us-east-1:111122223333:thing/t-arn",
            "groupArn": "arn:aws:iot:us-east-1:111122223333:thinggroup/g-arn"
        }
    });
    let event = decode(&record);
    assert_eq!(event.name, "t-arn");
    assert_eq!(event.related(related::THING_GROUP), Some("g-arn"));
}

#[test]
fn malformed_and_unknown_input_are_errors_that_say_what_is_wrong() {
    let cases: Vec<(&str, DecodeError)> = vec![
        ("{not json", DecodeError::NotJson(String::new())),
        ("[1,2]", DecodeError::NotARecord),
        (r#"{"payload":{}}"#, DecodeError::NotARecord),
        (r#"{"topic":"$aws/events/spaceship/x/created","payload":{}}"#, DecodeError::UnknownTopic(String::new())),
        (
            r#"{"topic":"$aws/events/thing/x/created","payload":{"timestamp":1}}"#,
            DecodeError::MissingField("operation"),
        ),
        (
            r#"{"topic":"$aws/events/thing/x/created","payload":{"operation":"EXPLODED"}}"#,
            DecodeError::UnknownOperation(String::new()),
        ),
        (
            r#"{"topic":"$aws/events/thing/x/created","payload":{"operation":"CREATED","attributes":{"a":1}}}"#,
            DecodeError::BadField { field: "attributes", problem: String::new() },
        ),
        (
            r#"{"topic":"$aws/events/thing/x/created","payload":{"operation":"CREATED","timestamp":-4}}"#,
            DecodeError::BadField { field: "timestamp", problem: String::new() },
        ),
        (
            r#"{"topic":"$aws/events/certificates/registered/ca","payload":{"certificateStatus":"ACTIVE"}}"#,
            DecodeError::MissingField("certificateId"),
        ),
        (
            r#"{"topic":"$aws/things/t/shadow/update/accepted","payload":{"version":1}}"#,
            DecodeError::MissingField("state"),
        ),
        (r#"{"topic":{"S":"x"},"payload":{"Q":"?"}}"#, DecodeError::BadDynamoDb(String::new())),
        (r#"{"dynamodb":{"OldImage":{}}}"#, DecodeError::BadDynamoDb(String::new())),
        (
            r#"{"event":{"entity":"spaceship","operation":"created","name":"x"}}"#,
            DecodeError::BadNativeEvent(String::new()),
        ),
    ];
    for (line, expected) in cases {
        let error = decode_line(line, REGION).expect_err(line);
        assert_eq!(std::mem::discriminant(&error), std::mem::discriminant(&expected), "{line}: {error}");
        if let (DecodeError::BadField { field, .. }, DecodeError::BadField { field: want, .. }) = (&error, &expected) {
            assert_eq!(field, want, "{line}");
        }
        assert!(!error.to_string().is_empty());
    }
    let error = decode_line(r#"{"topic":"$aws/events/spaceship/x/created","payload":{}}"#, REGION).unwrap_err();
    assert_eq!(error.to_string(), "unknown topic `$aws/events/spaceship/x/created`");
}

/// Any JSON value, nested a few levels, with keys that matter to the decoder
/// mixed in so the generator reaches past the first checks.
fn arbitrary_json() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "topic",
        "payload",
        "operation",
        "thingName",
        "attributes",
        "timestamp",
        "version",
        "state",
        "event",
        "dynamodb",
        "NewImage",
        "S",
        "N",
        "M",
        "L",
        "NULL",
        "BOOL",
        "SS",
        "NS",
        "entity",
        "name",
        "certificateId",
        "x",
    ]);
    let topics = prop::sample::select(vec![
        "$aws/events/thing/t/created",
        "$aws/events/thingType/t/updated",
        "$aws/events/thingGroup/g/deleted",
        "$aws/events/thingTypeAssociation/thing/t/ty",
        "$aws/events/thingGroupMembership/thingGroup/g/thing/t/added",
        "$aws/events/thingGroupHierarchy/thingGroup/p/childThingGroup/c/removed",
        "$aws/events/certificates/registered/ca",
        "$aws/things/t/shadow/update/accepted",
        "$aws/things/t/shadow/name/n/delete/accepted",
        "$aws/things//shadow/update/accepted",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        ".{0,12}".prop_map(Value::String),
        topics.prop_map(|t| Value::String(t.to_string())),
        prop::sample::select(vec!["CREATED", "UPDATED", "DELETED", "ADDED", "REMOVED", "thing", "created"])
            .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((keys.clone(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_decoder_never_panics_on_any_json(value in arbitrary_json()) {
        let _ = decode_record(&value, REGION);
        let _ = decode_dynamodb_image(&value, REGION);
    }

    #[test]
    fn the_decoder_never_panics_on_any_text(line in ".{0,200}") {
        let _ = decode_line(&line, REGION);
    }

    #[test]
    fn the_decoder_never_panics_on_damaged_fixtures(index in 0usize..15, cut in 0usize..2000, byte in any::<u8>()) {
        let fixtures = all_fixtures();
        let mut text = fixtures[index % fixtures.len()].to_string().into_bytes();
        let at = cut % text.len();
        text[at] = byte;
        let damaged = String::from_utf8_lossy(&text).into_owned();
        let _ = decode_line(&damaged, REGION);
        let _ = decode_line(&damaged[..damaged.char_indices().nth(at).map_or(damaged.len(), |(i, _)| i)], REGION);
    }
}
