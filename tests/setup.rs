//! `iotdr setup` against moto: what the emulator holds (the event table with
//! its stream and time to live, the topic rules) is made once and found the
//! second time, a dry run changes nothing, and items shaped as the rules
//! write them are replicated by the stream source. moto implements no
//! UpdateEventConfigurations and fires no rules: that step is reported
//! failed, and the test writes the rules' items itself.

mod common;

use aws_sdk_dynamodb::types::{AttributeValue, StreamViewType, TimeToLiveStatus};
use common::moto::Moto;
use common::region_state::region_state;
use common::runner::{Run, iotdr};
use serde_json::json;

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";
const TABLE: &str = "iotdr-events";
const ROLE: &str = "arn:aws:iam::123456789012:role/iotdr-rules";

fn setup(moto: &Moto, test: &Run, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["setup", test.pipeline.to_str().unwrap(), "--role-arn", ROLE];
    args.extend_from_slice(extra);
    let out = iotdr(moto, test.dir.path(), &args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test]
async fn setup_makes_the_event_table_and_its_rules_once_and_the_stream_source_reads_their_items() {
    let moto = Moto::start();
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    test.read_stream(TABLE);
    let dynamodb = moto.dynamodb(SOURCE).await;
    let iot = moto.iot(SOURCE).await;

    let (code, out) = setup(&moto, &test, &["--dry-run"]);
    assert_eq!(code, Some(1), "moto has no event configurations: {out}");
    assert!(out.contains("dry run: nothing changed"), "{out}");
    assert!(out.contains(&format!("table {TABLE}")) && out.contains("would create it"), "{out}");
    assert!(out.contains("would create it: SELECT *, topic() AS topic"), "{out}");
    assert!(dynamodb.describe_table().table_name(TABLE).send().await.is_err(), "a dry run made the table");

    let (code, out) = setup(&moto, &test, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("registry events") && out.contains("FAILED") && out.contains("emulator"), "{out}");
    let table = dynamodb.describe_table().table_name(TABLE).send().await.unwrap().table.unwrap();
    assert_eq!(table.key_schema()[0].attribute_name, "id");
    let stream = table.stream_specification().unwrap();
    assert!(stream.stream_enabled);
    assert_eq!(stream.stream_view_type, Some(StreamViewType::NewImage));
    let ttl = dynamodb.describe_time_to_live().table_name(TABLE).send().await.unwrap();
    let ttl = ttl.time_to_live_description.unwrap();
    assert_eq!(ttl.time_to_live_status, Some(TimeToLiveStatus::Enabled));
    assert_eq!(ttl.attribute_name.as_deref(), Some("expires_at"));
    for (rule, from) in [("iotdr_test_events", "FROM '$aws/events/#'"), ("iotdr_test_shadows", "/update/accepted")] {
        let rule = iot.get_topic_rule().rule_name(rule).send().await.unwrap().rule.unwrap();
        assert!(rule.sql().unwrap().contains(from), "{:?}", rule.sql());
        let action = rule.actions()[0].dynamo_dbv2().unwrap();
        assert_eq!((action.role_arn(), action.put_item().unwrap().table_name()), (ROLE, TABLE));
    }

    // Again: found as made.
    let (_, out) = setup(&moto, &test, &[]);
    assert_eq!(out.matches("already set up").count(), 4, "{out}");
    let rules = iot.list_topic_rules().send().await.unwrap().rules.unwrap_or_default();
    assert_eq!(rules.len(), 2);

    // What the rules write: the message's fields, its topic, a key and an expiry.
    iot.create_thing()
        .thing_name("pump-1")
        .attribute_payload(aws_sdk_iot::types::AttributePayload::builder().attributes("site", "lyon").build())
        .send()
        .await
        .unwrap();
    let shadow = json!({ "state": { "reported": { "rpm": 1200 } } }).to_string();
    let data = moto.data(SOURCE).await;
    data.update_thing_shadow()
        .thing_name("pump-1")
        .payload(aws_sdk_iotdataplane::primitives::Blob::new(shadow))
        .send()
        .await
        .unwrap();
    let s = |v: &str| AttributeValue::S(v.into());
    let n = |v: u64| AttributeValue::N(v.to_string());
    let items = [
        vec![
            ("topic", s("$aws/events/thing/pump-1/created")),
            ("eventType", s("THING_EVENT")),
            ("eventId", s("e-1")),
            ("timestamp", n(1_764_000_000_000)),
            ("operation", s("CREATED")),
            ("accountId", s("123456789012")),
            ("thingName", s("pump-1")),
            ("versionNumber", n(1)),
            ("attributes", AttributeValue::M([("site".to_string(), s("lyon"))].into())),
        ],
        vec![
            ("topic", s("$aws/things/pump-1/shadow/update/accepted")),
            (
                "state",
                AttributeValue::M(
                    [("reported".to_string(), AttributeValue::M([("rpm".to_string(), n(1200))].into()))].into(),
                ),
            ),
            ("version", n(1)),
            ("timestamp", n(1_764_000_001)),
        ],
    ];
    for (i, item) in items.into_iter().enumerate() {
        let mut item: std::collections::HashMap<String, AttributeValue> =
            item.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        item.insert("id".into(), s(&format!("00000000-0000-0000-0000-00000000000{i}")));
        item.insert("expires_at".into(), n(1_764_172_800));
        dynamodb.put_item().table_name(TABLE).set_item(Some(item)).send().await.unwrap();
    }
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["things"]["pump-1"]["attributes"], json!({ "site": "lyon" }));
    assert_eq!(target["things"]["pump-1"]["shadows"]["classic"]["state"]["reported"], json!({ "rpm": 1200 }));
}
