//! The `dynamodb-stream` source on moto: the event table an IoT rule fills
//! (moto never fires rules, so the test writes the items the rule would),
//! read through its stream, resumed after restarts and SIGKILLs, through a
//! source outage.

mod common;

use aws_sdk_dynamodb::types::AttributeValue;
use common::faults::FaultProxy;
use common::fleet::seed;
use common::moto::Moto;
use common::region_state::{assert_same, region_state};
use common::runner::Run;
use iotdr::into_table::attribute;
use serde_json::{Value, json};
use std::collections::HashMap;

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";
const TABLE: &str = "iotdr-events";

/// The event table with a NEW_IMAGE stream, as `iotdr setup` will make it.
async fn event_table(moto: &Moto) -> aws_sdk_dynamodb::Client {
    moto.event_table(SOURCE, TABLE).await
}

/// Writes records (`{"topic", "payload"}` JSON) as the rule's items, in order.
async fn put_records(dynamodb: &aws_sdk_dynamodb::Client, first_id: usize, records: &[String]) {
    for (i, record) in records.iter().enumerate() {
        let record: Value = serde_json::from_str(record).unwrap();
        let mut item: HashMap<String, AttributeValue> = match record.get("topic") {
            Some(topic) => {
                [("topic".into(), attribute(topic)), ("payload".into(), attribute(&record["payload"]))].into()
            }
            None => record.as_object().unwrap().iter().map(|(k, v)| (k.clone(), attribute(v))).collect(),
        };
        item.insert("id".into(), AttributeValue::S(format!("{:08}", first_id + i)));
        dynamodb.put_item().table_name(TABLE).set_item(Some(item)).send().await.unwrap();
    }
}

fn stream_run(source_url: &str, target_url: &str, extra: &str) -> Run {
    let test = Run::new(SOURCE, source_url, TARGET, target_url, &[], extra);
    test.read_stream(TABLE);
    test
}

#[tokio::test]
async fn a_fleet_arrives_through_the_event_tables_stream_and_a_restart_reads_only_what_is_new() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 200).await;
    let dynamodb = event_table(&moto).await;
    put_records(&dynamodb, 0, &fleet.events).await;
    let test = stream_run(&moto.url, &moto.url, "");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["records"], fleet.events.len(), "{summary}");
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    assert_same(&region_state(&moto, SOURCE).await, &region_state(&moto, TARGET).await);

    // More arrives, with a record that does not decode and an item the rule
    // did not write: read once, each a dead letter naming where it came from.
    let iot = moto.iot(SOURCE).await;
    let payload = aws_sdk_iot::types::AttributePayload::builder().attributes("firmware", "3.0").build();
    iot.update_thing().thing_name("dev-0001").attribute_payload(payload).send().await.unwrap();
    let now = iot.describe_thing().thing_name("dev-0001").send().await.unwrap();
    let update = json!({
        "topic": "$aws/events/thing/dev-0001/updated",
        "payload": { "eventType": "THING_EVENT", "operation": "UPDATED", "accountId": "123456789012",
                     "thingName": "dev-0001", "timestamp": 1_764_100_000_000u64, "eventId": "late-update",
                     "attributes": now.attributes, "thingTypeName": now.thing_type_name }
    });
    let poison = [json!({ "topic": "$aws/events/spaceship/x/created", "payload": {} }), json!({ "note": "no topic" })];
    let more = [update.to_string(), poison[0].to_string(), poison[1].to_string()];
    put_records(&dynamodb, fleet.events.len(), &more).await;
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["records"], 3, "only what is new is read: {summary}");
    assert_eq!(summary["run"]["dead_letters"], 2, "{summary}");
    let letters = test.dead_letters(&moto);
    for letter in &letters {
        assert_eq!(letter["step"], "decode", "{letter}");
        let origin = letter["origin"].as_str().unwrap();
        assert!(origin.starts_with(&format!("{TABLE} shardId-")), "the shard and sequence number: {origin}");
    }
    assert_same(&region_state(&moto, SOURCE).await, &region_state(&moto, TARGET).await);
    let again = test.run(&moto);
    assert_eq!(again["run"]["records"], 0, "poison records were acknowledged, not read again: {again}");
}

/// SIGKILL at ten random moments while more than 2,000 changes (things,
/// groups, memberships, certificates, shadows) replicate from the stream, a
/// restart after each: the target equals the source field by field, shadow
/// versions (which count every write) included.
#[tokio::test]
async fn a_stream_run_killed_at_ten_random_moments_loses_nothing_and_writes_nothing_twice() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 620).await;
    assert!(fleet.events.len() >= 2000, "{} changes", fleet.events.len());
    let dynamodb = event_table(&moto).await;
    put_records(&dynamodb, 0, &fleet.events).await;
    let test = stream_run(&moto.url, &moto.url, r#"rate_limits = { "*" = 60 }"#);
    let text = std::fs::read_to_string(&test.pipeline).unwrap();
    std::fs::write(&test.pipeline, text.replace("targets = [", "batch_size = 64\ntargets = [")).unwrap();
    let seed = fastrand::u64(..);
    let mut random = fastrand::Rng::with_seed(seed);
    let mut midway = 0;
    for kill in 0..10 {
        let mut child = test.spawn(&moto);
        tokio::time::sleep(std::time::Duration::from_millis(random.u64(400..2500))).await;
        let running = child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        child.wait().unwrap();
        let listed = moto.iot(TARGET).await.list_things().max_results(250).send().await.unwrap();
        let things = listed.things.unwrap_or_default().len();
        eprintln!("kill {kill}: {things} things (of the first 250) in the target so far, running: {running}");
        midway += usize::from(things > 0 && running);
    }
    assert!(midway > 0, "no kill landed while things were being applied (seed {seed})");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "seed {seed}: {summary}");
    assert!(test.dead_letters(&moto).is_empty(), "seed {seed}");
    assert_same(&region_state(&moto, SOURCE).await, &region_state(&moto, TARGET).await);
}

/// Waits until the run has applied some things (midway: not all yet).
async fn until_things_arrive(moto: &Moto, test: &Run) {
    let target = moto.iot(TARGET).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let listed = target.list_things().max_results(250).send().await.unwrap();
        if !listed.things.unwrap_or_default().is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "nothing arrived: {}", test.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The source region (its stream and its reads) and the target stop
/// answering for 30 s mid-run: iotdr waits, retries, resumes; nothing is
/// lost and nothing becomes a dead letter. moto keeps its data only while it
/// runs, so the outage is a proxy that drops every connection.
#[tokio::test]
async fn thirty_seconds_without_the_source_or_the_target_lose_nothing() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 200).await;
    let dynamodb = event_table(&moto).await;
    put_records(&dynamodb, 0, &fleet.events).await;
    let region = FaultProxy::start(&moto.url, 0.0);
    let test = stream_run(&region.url, &region.url, r#"rate_limits = { "*" = 40 }"#);
    let mut child = test.spawn(&moto);
    until_things_arrive(&moto, &test).await;
    region.set(json!({ "mode": "drop_before" }));
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    let dropped = region.counts()["drop_before"].as_u64().unwrap_or(0);
    region.set(json!({ "mode": null }));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{}", test.log());
    assert!(dropped > 10, "the outage was felt: {dropped} requests refused");
    assert!(test.dead_letters(&moto).is_empty(), "{:?}", test.dead_letters(&moto));
    assert_same(&region_state(&moto, SOURCE).await, &region_state(&moto, TARGET).await);
}

/// moto itself stopped (SIGSTOP) for 30 s mid-run, holding its data:
/// requests hang until they time out, and those it had taken are made when
/// it goes on, after iotdr gave up on their answers. Nothing is lost, nothing
/// becomes a dead letter, and no shadow write counts twice (the target's
/// shadow versions equal the source's).
#[tokio::test]
async fn moto_stopped_for_thirty_seconds_loses_nothing_and_writes_nothing_twice() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 200).await;
    let dynamodb = event_table(&moto).await;
    put_records(&dynamodb, 0, &fleet.events).await;
    let test = stream_run(&moto.url, &moto.url, r#"rate_limits = { "*" = 40 }"#);
    let mut child = test.spawn(&moto);
    until_things_arrive(&moto, &test).await;
    moto.freeze(true);
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    moto.freeze(false);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{}", test.log());
    assert!(test.dead_letters(&moto).is_empty(), "{:?}", test.dead_letters(&moto));
    assert_same(&region_state(&moto, SOURCE).await, &region_state(&moto, TARGET).await);
}
