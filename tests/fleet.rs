//! A generated fleet (types, nested groups, 200+ things, certificates with
//! policies, shadows) replicated from one moto region to another, compared
//! field by field; also through injected faults, replayed, and by JITR.

mod common;

use aws_sdk_iot::types::CertificateStatus;
use common::faults::FaultProxy;
use common::fleet::seed;
use common::moto::Moto;
use common::region_state::{assert_same, region_state, without_shadow_versions};
use common::runner::Run;
use serde_json::{Value, json};

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";
const THINGS: usize = 200;

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
    let again = test.rerun(&moto);
    assert_eq!(again["run"]["dead_letters"], 0, "{again}");
    assert_eq!(region_state(&moto, TARGET).await, target, "a replay changes nothing");
    let shadow_updates = fleet.events.iter().filter(|e| e.contains("/shadow/")).count();
    // Stale: every shadow update (already applied), and every change older
    // than its entity's newest (a thing's creation before its update, ...).
    assert!(again["run"]["stale"].as_u64().unwrap() > shadow_updates as u64, "{again}");
    assert!(summary["calls_per_change"].as_f64().unwrap() <= 1.2, "{summary}");
    // What the ledger settles is not read from the source again: of the
    // replay, only the JITR certificates are (their events lack the PEM an
    // equal, re-applied change needs).
    let reads = |s: &Value| s["source_requests"]["calls"].as_u64().unwrap();
    assert!(reads(&again) * 4 <= reads(&summary), "a replay reads the source again: {again} after {summary}");
}

/// Faults include answers lost after the change was made (`drop_after`): a
/// shadow write repeated then must not count twice, so the target's shadow
/// versions equal the source's.
#[tokio::test]
async fn thirty_percent_of_calls_failing_loses_nothing_and_writes_no_shadow_twice() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, THINGS).await;
    let proxy = FaultProxy::start(&moto.url, 0.3);
    let test = Run::new(SOURCE, &moto.url, TARGET, &proxy.url, &fleet.events, "");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let failures = summary["requests"]["throttled"].as_u64().unwrap()
        + summary["requests"]["transient_failures"].as_u64().unwrap();
    assert!(failures > 100, "the proxy did inject faults: {summary}");

    assert!(proxy.counts()["drop_after"].as_u64().unwrap() > 10, "answers were lost: {}", proxy.counts());
    let source = region_state(&moto, SOURCE).await;
    let target = region_state(&moto, TARGET).await;
    assert_same(&source, &target);
}

/// The source's `jitr-policy`, which the JITR tests name in `jitr_policies`.
async fn jitr_policy(moto: &Moto) -> aws_sdk_iot::Client {
    let iot = moto.iot(SOURCE).await;
    let document = r#"{"Version":"2012-10-17","Statement":[]}"#;
    iot.create_policy().policy_name("jitr-policy").policy_document(document).send().await.unwrap();
    iot
}

/// The record AWS publishes when JITR registers certificate `id` under a CA.
fn jitr_registered(id: &str, at_ms: u64) -> String {
    json!({
        "topic": format!("$aws/events/certificates/registered/{}", "ca0".repeat(21) + "c"),
        "payload": { "certificateId": id, "caCertificateId": "ca0".repeat(21) + "c", "timestamp": at_ms,
                     "certificateStatus": "PENDING_ACTIVATION", "awsAccountId": "123456789012",
                     "certificateRegistrationTimestamp": at_ms.to_string() }
    })
    .to_string()
}

#[tokio::test]
async fn a_jitr_certificate_activated_since_its_event_arrives_active_with_the_named_policy() {
    let moto = Moto::start();
    let iot = jitr_policy(&moto).await;
    // JITR: the device's certificate was registered under a CA; AWS publishes
    // this event with PENDING_ACTIVATION, and none when the certificate is
    // activated a moment later (by a Lambda, as JITR setups do).
    let created = iot.create_keys_and_certificate().send().await.unwrap();
    let id = created.certificate_id.unwrap();
    iot.update_certificate().certificate_id(&id).new_status(CertificateStatus::Active).send().await.unwrap();
    let event = jitr_registered(&id, 1_764_000_000_000);
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[event], r#"jitr_policies = ["jitr-policy"]"#);
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let target = region_state(&moto, TARGET).await;
    // What the source says when it is read is newer than the event.
    assert_eq!(target["certificates"][&id], json!({ "status": "ACTIVE", "policies": ["jitr-policy"] }));
    assert_eq!(target["policies"]["jitr-policy"]["versions"], 1);
}

#[tokio::test]
async fn bursts_of_throttling_in_the_source_and_5xx_in_the_target_make_no_dead_letter() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, THINGS).await;
    // What AWS IoT answers while an account is over its quota: every request
    // in a row, not a random few.
    let source = FaultProxy::burst(&moto.url, "throttle", 223);
    let target = FaultProxy::burst(&moto.url, "error503", 80);
    // The buckets slow down to a tenth of their rate at most: at AWS's
    // default read rates (20/s) 223 answers in a row would take minutes to
    // ride out, which is right against AWS and too long for a test.
    let test = Run::new(SOURCE, &source.url, TARGET, &target.url, &fleet.events, r#"rate_limits = { "*" = 200 }"#);
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    assert_eq!(source.counts()["throttle"], 223, "the source burst was served whole");
    assert_eq!(target.counts()["error503"], 80, "the target burst was served whole");
    // 5xx answers may come after the change was made: shadows are still written once.
    assert_same(&region_state(&moto, SOURCE).await, &region_state(&moto, TARGET).await);
}

#[tokio::test]
async fn certificate_status_changes_and_a_new_policy_version_arrive() {
    let moto = Moto::start();
    let iot = moto.iot(SOURCE).await;
    let first = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#;
    let second = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["iot:Connect","iot:Publish"],"Resource":"*"}]}"#;
    iot.create_policy().policy_name("device").policy_document(first).send().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let created = iot.create_keys_and_certificate().set_as_active(true).send().await.unwrap();
        iot.attach_policy().policy_name("device").target(created.certificate_arn.unwrap()).send().await.unwrap();
        ids.push(created.certificate_id.unwrap());
    }
    let native = |event: Value| json!({ "event": event }).to_string();
    let created: Vec<String> = ids
        .iter()
        .map(|id| {
            native(json!({ "entity": "certificate", "operation": "created", "name": id,
                           "related": [["certificate-status", "ACTIVE"]] }))
        })
        .collect();
    let arrived = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &created, "");
    arrived.run(&moto);
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&ids[0]], json!({ "status": "ACTIVE", "policies": ["device"] }));
    assert_eq!(target["policies"]["device"]["versions"], 1);

    // Then the operator deactivates one certificate, revokes the other and
    // publishes a new default version of the policy.
    iot.update_certificate().certificate_id(&ids[0]).new_status(CertificateStatus::Inactive).send().await.unwrap();
    iot.update_certificate().certificate_id(&ids[1]).new_status(CertificateStatus::Revoked).send().await.unwrap();
    iot.create_policy_version()
        .policy_name("device")
        .policy_document(second)
        .set_as_default(true)
        .send()
        .await
        .unwrap();
    let status = |id: &str, status: &str| {
        native(json!({ "entity": "certificate", "operation": "updated", "name": id,
                       "related": [["certificate-status", status]] }))
    };
    let changes = vec![
        status(&ids[0], "INACTIVE"),
        status(&ids[1], "REVOKED"),
        native(json!({ "entity": "policy", "operation": "updated", "name": "device", "document": second })),
    ];
    let changed = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &changes, "");
    let summary = changed.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", changed.dead_letters(&moto));
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&ids[0]], json!({ "status": "INACTIVE", "policies": ["device"] }));
    assert_eq!(target["certificates"][&ids[1]], json!({ "status": "REVOKED", "policies": ["device"] }));
    assert_eq!(target["policies"]["device"]["document"], serde_json::from_str::<Value>(second).unwrap());
    assert_eq!(target["policies"]["device"]["versions"], 2);
    assert_same(&without_shadow_versions(region_state(&moto, SOURCE).await), &without_shadow_versions(target.clone()));

    // Replayed, the changes add nothing: no third policy version.
    changed.rerun(&moto);
    assert_eq!(region_state(&moto, TARGET).await, target);
}

/// A port nothing listens on: a region that is down.
const DOWN: &str = "http://127.0.0.1:9";

/// Points the pipeline's source and target regions at new endpoints.
fn repoint(test: &Run, source_url: &str, target_url: &str) {
    let text = std::fs::read_to_string(&test.pipeline).unwrap();
    let mut sections: Vec<String> = text.split("\n[").map(str::to_string).collect();
    for section in &mut sections {
        let url = if section.starts_with(&format!("regions.{SOURCE}]")) {
            source_url
        } else if section.starts_with(&format!("regions.{TARGET}]")) {
            target_url
        } else {
            continue;
        };
        let header = section.lines().next().unwrap().to_string();
        *section = format!("{header}\nendpoint_url = \"{url}\"\n");
    }
    std::fs::write(&test.pipeline, sections.join("\n[")).unwrap();
}

async fn certificate_with_policy(moto: &Moto) -> String {
    let iot = moto.iot(SOURCE).await;
    iot.create_policy()
        .policy_name("device")
        .policy_document(r#"{"Version":"2012-10-17","Statement":[]}"#)
        .send()
        .await
        .unwrap();
    let created = iot.create_keys_and_certificate().set_as_active(true).send().await.unwrap();
    iot.attach_policy().policy_name("device").target(created.certificate_arn.unwrap()).send().await.unwrap();
    created.certificate_id.unwrap()
}

fn certificate_created(id: &str) -> String {
    json!({ "event": { "entity": "certificate", "operation": "created", "name": id,
                       "related": [["certificate-status", "ACTIVE"]] } })
    .to_string()
}

#[tokio::test]
async fn dead_letters_replay_during_a_source_outage() {
    let moto = Moto::start();
    let id = certificate_with_policy(&moto).await;
    // The target is down: the certificate and its policy, completed from the
    // source at ingest, become dead letters at apply.
    let test = Run::new(SOURCE, &moto.url, TARGET, DOWN, &[certificate_created(&id)], "retry_deadline_ms = 300");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 2, "{summary}");
    let letters = test.dead_letters(&moto);
    assert!(letters.iter().all(|l| l["step"] == "apply"), "{letters:?}");
    assert!(!format!("{letters:?}").contains("-----BEGIN"), "dead-letters list never shows a PEM");

    // Now the source is down and the target back: the letters alone suffice.
    repoint(&test, DOWN, &moto.url);
    let out =
        common::runner::iotdr(&moto, test.dir.path(), &["dead-letters", "replay", test.pipeline.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["replayed"].as_u64(), report["still_failing"].as_u64()), (Some(2), Some(0)), "{report}");
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&id], json!({ "status": "ACTIVE", "policies": ["device"] }));
    assert!(test.dead_letters(&moto).is_empty());
}

#[tokio::test]
async fn letters_that_never_reached_the_source_fetch_it_on_replay() {
    let moto = Moto::start();
    let id = certificate_with_policy(&moto).await;
    let test = Run::new(SOURCE, DOWN, TARGET, &moto.url, &[certificate_created(&id)], "retry_deadline_ms = 300");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 1, "{summary}");
    assert_eq!(test.dead_letters(&moto)[0]["step"], "fetch");

    // Still down: the letter stays, and replay says so (exit 3).
    let replay =
        || common::runner::iotdr(&moto, test.dir.path(), &["dead-letters", "replay", test.pipeline.to_str().unwrap()]);
    assert_eq!(replay().status.code(), Some(3));
    assert_eq!(test.dead_letters(&moto).len(), 1);

    repoint(&test, &moto.url, &moto.url);
    let out = replay();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&id], json!({ "status": "ACTIVE", "policies": ["device"] }));
    assert_eq!(target["policies"]["device"]["versions"], 1);
}

#[tokio::test]
async fn renamed_policies_stay_attached_to_their_certificates() {
    let moto = Moto::start();
    let id = certificate_with_policy(&moto).await;
    let stage = common::runner::stage(
        "policies-for-target",
        &common::root().join("plugins/dist/policy-mapper.wasm"),
        r#"{ name_template = "{name}-{region}" }"#,
        "dead-letter",
    );
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[certificate_created(&id)], &stage);
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&id], json!({ "status": "ACTIVE", "policies": ["device-eu-west-1"] }));
    assert_eq!(target["policies"].as_object().unwrap().keys().collect::<Vec<_>>(), ["device-eu-west-1"]);
}

/// A membership event carries no attributes: its thing lends them (the thing
/// context). A restart must not forget them, or a router sends the
/// membership of a thing it kept out of a region to that region.
#[tokio::test]
async fn a_restart_routes_a_membership_by_its_things_attributes_seen_before() {
    let moto = Moto::start();
    let at = 1_764_000_000_000u64;
    let first = vec![
        registry(
            "$aws/events/thingGroup/fleet/created",
            json!({ "eventType": "THING_GROUP_EVENT", "operation": "CREATED", "accountId": "123456789012",
                    "thingGroupName": "fleet", "timestamp": at, "eventId": "fleet-created" }),
        ),
        thing_record("created", "acme-1", json!({ "customer": "acme" }), at + 1),
        thing_record("created", "globex-1", json!({ "customer": "globex" }), at + 2),
    ];
    // acme's things replicate to the target, globex's nowhere, the rest (the group) by default.
    let stage = common::runner::stage(
        "per-customer",
        &common::root().join("plugins/dist/region-router.wasm"),
        &format!(
            r#"{{ by_attribute = "customer", routes = {{ acme = ["{TARGET}"], globex = [] }}, default = ["{TARGET}"] }}"#
        ),
        "dead-letter",
    );
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &first, &stage);
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));

    // The memberships arrive after a restart (the file grows, the run resumes).
    let later = [
        membership_record("added", "acme-1", "fleet", at + 3),
        membership_record("added", "globex-1", "fleet", at + 4),
    ];
    let mut file = std::fs::OpenOptions::new().append(true).open(test.dir.path().join("events.jsonl")).unwrap();
    std::io::Write::write_all(&mut file, (later.join("\n") + "\n").as_bytes()).unwrap();
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["records"], 2, "{summary}");
    assert_eq!(
        summary["run"]["dead_letters"],
        0,
        "globex-1's membership went to the target: {:?}",
        test.dead_letters(&moto)
    );
    assert_eq!(summary["run"]["dropped"], 1, "{summary}");
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["things"].as_object().unwrap().keys().collect::<Vec<_>>(), ["acme-1"]);
    assert_eq!(target["things"]["acme-1"]["groups"], json!(["fleet"]));
}

fn registry(topic: &str, payload: Value) -> String {
    json!({ "topic": topic, "payload": payload }).to_string()
}

fn thing_record(operation: &str, name: &str, attributes: Value, at: u64) -> String {
    registry(
        &format!("$aws/events/thing/{name}/{operation}"),
        json!({ "eventType": "THING_EVENT", "operation": operation.to_uppercase(), "accountId": "123456789012",
                "thingName": name, "attributes": attributes, "timestamp": at,
                "eventId": format!("{name}-{operation}-{at}") }),
    )
}

fn membership_record(operation: &str, thing: &str, group: &str, at: u64) -> String {
    registry(
        &format!("$aws/events/thingGroupMembership/thingGroup/{group}/thing/{thing}/{operation}"),
        json!({ "eventType": "THING_GROUP_MEMBERSHIP_EVENT", "operation": operation.to_uppercase(),
                "accountId": "123456789012", "timestamp": at,
                "groupArn": format!("arn:aws:iot:us-east-1:123456789012:thinggroup/{group}"),
                "thingArn": format!("arn:aws:iot:us-east-1:123456789012:thing/{thing}"),
                "membershipId": format!("{thing}-{group}"), "eventId": format!("{thing}-{group}-{operation}-{at}") }),
    )
}

/// A burst of permanent errors dead-letters a fleet's first changes; the
/// later changes of the same things are applied; then the letters are
/// replayed. Source order per entity must hold: nothing deleted comes back,
/// no removed attribute or membership returns.
#[tokio::test]
async fn replayed_dead_letters_never_roll_an_entity_back() {
    let moto = Moto::start();
    let at = 1_764_000_000_000u64;
    let mut first = vec![registry(
        "$aws/events/thingGroup/fleet/created",
        json!({ "eventType": "THING_GROUP_EVENT", "operation": "CREATED", "accountId": "123456789012",
                "thingGroupName": "fleet", "timestamp": at, "eventId": "fleet-created" }),
    )];
    let mut later = Vec::new();
    for i in 0..12u64 {
        let name = format!("dev-{i:02}");
        first.push(thing_record("created", &name, json!({ "v": "1", "gone": "soon" }), at + 10 + i));
        first.push(membership_record("added", &name, "fleet", at + 30 + i));
        if i % 2 == 0 {
            later.push(thing_record("updated", &name, json!({ "v": "2" }), at + 100 + i));
            later.push(membership_record("removed", &name, "fleet", at + 120 + i));
        } else {
            later.push(thing_record("deleted", &name, json!({}), at + 140 + i));
        }
    }
    let target = FaultProxy::start(&moto.url, 0.0);
    target.set(json!({ "mode": "permanent" }));
    let test = Run::new(SOURCE, &moto.url, TARGET, &target.url, &first, "");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], first.len(), "{summary}");

    // The target recovers; the same things change again in the source.
    target.set(json!({ "mode": null }));
    test.read_next("later.jsonl", &later);
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let expected = region_state(&moto, TARGET).await;
    let things = expected["things"].as_object().unwrap();
    assert_eq!(things.len(), 6, "the even things were updated, the odd ones deleted: {expected}");
    assert_eq!(things["dev-00"]["attributes"], json!({ "v": "2" }));

    // Now the old letters: all go (the group's creation is still news), and
    // none of the older changes overwrites a newer one.
    let report = test.replay(&moto, 0);
    assert_eq!(report["still_failing"], 0, "{report}");
    assert_eq!(report["replayed"], first.len(), "{report}");
    assert_eq!(report["summary"]["stale"], first.len() - 1, "every change but the group's is older: {report}");
    let after = region_state(&moto, TARGET).await;
    assert!(after["groups"].get("fleet").is_some(), "{after}");
    assert_eq!(after["things"], expected["things"], "no entity went back in its history");
    for thing in after["things"].as_object().unwrap().values() {
        assert_eq!(thing["groups"], json!([]), "memberships removed later stay removed: {thing}");
    }
    assert!(test.dead_letters(&moto).is_empty());
}

/// Waits for `condition` (checked every 100 ms) for up to `seconds`.
async fn wait_for<F: std::future::Future<Output = bool>>(seconds: u64, what: &str, mut condition: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !condition().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// AWS publishes no event when a principal is attached to a thing or a
/// certificate is activated. A thing's `created` event usually arrives before
/// its certificate is attached, and a JITR certificate is activated after its
/// event: the run reads both again a while later, and ends with what the
/// source holds.
#[tokio::test]
async fn what_changes_in_the_source_without_an_event_arrives_by_a_second_read() {
    let moto = Moto::start();
    let (iot, target) = (moto.iot(SOURCE).await, moto.iot(TARGET).await);
    let site = aws_sdk_iot::types::AttributePayload::builder().attributes("site", "lyon").build();
    iot.create_thing().thing_name("late-1").attribute_payload(site).send().await.unwrap();
    let jitr = iot.create_keys_and_certificate().send().await.unwrap().certificate_id.unwrap();
    // Events of now: a second read is due a while after each.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let events =
        vec![thing_record("created", "late-1", json!({ "site": "lyon" }), now), jitr_registered(&jitr, now + 1)];
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &events, "\n[ingest]\nrecheck_after_ms = 4000");
    let mut child = test.spawn(&moto);
    wait_for(60, "the first read applied", || async {
        let thing = target.describe_thing().thing_name("late-1").send().await.is_ok();
        thing && target.describe_certificate().certificate_id(&jitr).send().await.is_ok()
    })
    .await;
    let principals = target.list_thing_principals().thing_name("late-1").send().await.unwrap();
    assert_eq!(principals.principals.unwrap_or_default().len(), 0, "nothing was attached when the event was read");

    // Seconds after the events: the device's certificate is attached, the JITR one activated.
    let device = iot.create_keys_and_certificate().set_as_active(true).send().await.unwrap();
    let device_id = device.certificate_id.unwrap();
    iot.attach_thing_principal().thing_name("late-1").principal(device.certificate_arn.unwrap()).send().await.unwrap();
    iot.update_certificate().certificate_id(&jitr).new_status(CertificateStatus::Active).send().await.unwrap();

    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{}", test.log());
    let state = region_state(&moto, TARGET).await;
    assert_eq!(state["things"]["late-1"]["certificates"], json!([device_id]), "{state}");
    assert_eq!(state["certificates"][&device_id]["status"], "ACTIVE");
    assert_eq!(state["certificates"][&jitr]["status"], "ACTIVE", "{state}");
    assert_eq!(state["things"]["late-1"]["attributes"], json!({ "site": "lyon" }));
}

/// The source region stops answering its reads while its events still
/// arrive (they were read before, or come from a broker that is up): ingest
/// does not wait on it. What the events carry (things with their attributes,
/// types and groups, hierarchy, shadows) reaches the target while the source
/// is down; what only the source holds (certificates, with the JITR policy,
/// and their attachments) arrives by second reads once it answers again.
#[tokio::test]
async fn a_source_that_does_not_answer_holds_back_nothing_its_events_carry() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 40).await;
    let iot = jitr_policy(&moto).await;
    let jitr = iot.create_keys_and_certificate().set_as_active(true).send().await.unwrap().certificate_id.unwrap();
    let mut events = fleet.events.clone();
    events.push(jitr_registered(&jitr, 1_764_000_100_000));
    let source = FaultProxy::start(&moto.url, 0.0);
    source.set(json!({ "mode": "drop_before" }));
    let extra = "jitr_policies = [\"jitr-policy\"]\n[ingest]\ndefer_reads_after_ms = 1000";
    let test = Run::new(SOURCE, &source.url, TARGET, &moto.url, &events, extra);
    let mut child = test.spawn(&moto);

    // Without the source: every thing as its events have it, no certificate yet.
    let expected = region_state(&moto, SOURCE).await;
    let carried = |state: &Value| {
        let mut things = state["things"].clone();
        for thing in things.as_object_mut().unwrap().values_mut() {
            thing["certificates"] = json!([]);
        }
        json!({ "things": things, "types": state["types"], "groups": state["groups"] })
    };
    wait_for(120, "the events applied without the source", || async {
        carried(&region_state(&moto, TARGET).await) == carried(&expected)
    })
    .await;
    let during = region_state(&moto, TARGET).await;
    assert!(during["certificates"].as_object().unwrap().is_empty(), "{during}");
    assert!(source.counts()["drop_before"].as_u64().unwrap_or(0) > 0, "the source was asked");

    source.set(json!({ "mode": null }));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{}", test.log());
    assert!(test.dead_letters(&moto).is_empty(), "{:?}", test.dead_letters(&moto));
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&jitr], json!({ "status": "ACTIVE", "policies": ["jitr-policy"] }));
    let mut source_state = region_state(&moto, SOURCE).await;
    source_state["certificates"].as_object_mut().unwrap().remove(&jitr);
    let mut target_state = target.clone();
    target_state["certificates"].as_object_mut().unwrap().remove(&jitr);
    assert_same(&source_state, &target_state);
}

/// A JITR certificate whose read waited out a moment of source outage is
/// completed once the source answers, and still read again later: it may
/// be activated after that completion, with no event.
#[tokio::test]
async fn a_jitr_certificate_read_late_for_an_outage_is_still_read_again_after_its_activation() {
    let moto = Moto::start();
    let iot = jitr_policy(&moto).await;
    let jitr = iot.create_keys_and_certificate().send().await.unwrap().certificate_id.unwrap();
    let source = FaultProxy::start(&moto.url, 0.0);
    source.set(json!({ "mode": "drop_before" }));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let extra = "jitr_policies = [\"jitr-policy\"]\n[ingest]\nrecheck_after_ms = 8000\ndefer_reads_after_ms = 300";
    let test = Run::new(SOURCE, &source.url, TARGET, &moto.url, &[jitr_registered(&jitr, now)], extra);
    let mut child = test.spawn(&moto);
    wait_for(60, "ingest gave up on the source", || async { test.log().contains("the source does not answer") }).await;
    source.set(json!({ "mode": null }));
    let target = moto.iot(TARGET).await;
    wait_for(60, "the certificate completed", || async {
        target.describe_certificate().certificate_id(&jitr).send().await.is_ok()
    })
    .await;
    iot.update_certificate().certificate_id(&jitr).new_status(CertificateStatus::Active).send().await.unwrap();

    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{}", test.log());
    let state = region_state(&moto, TARGET).await;
    assert_eq!(state["certificates"][&jitr], json!({ "status": "ACTIVE", "policies": ["jitr-policy"] }), "{state}");
}

/// SIGKILL at ten random moments while a fleet replicates, a restart after
/// each: nothing is lost (the target equals the source field by field) and
/// nothing is applied twice in effect (shadow versions, which count every
/// write, equal the source's).
#[tokio::test]
async fn a_run_killed_at_ten_random_moments_loses_nothing_and_writes_nothing_twice() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, THINGS).await;
    // Small batches, so that ingest stores often, and 25 calls/s per
    // operation, so that the run lasts longer than the ten kills.
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &fleet.events, r#"rate_limits = { "*" = 25 }"#);
    let text = std::fs::read_to_string(&test.pipeline).unwrap();
    std::fs::write(&test.pipeline, text.replace("targets = [", "batch_size = 32\ntargets = [")).unwrap();
    let mut midway = 0;
    let seed = fastrand::u64(..);
    let mut random = fastrand::Rng::with_seed(seed);
    for kill in 0..10 {
        let mut child = test.spawn(&moto);
        let after = std::time::Duration::from_millis(random.u64(300..1500));
        tokio::time::sleep(after).await;
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!finished || kill > 0, "the run ended before the first kill (seed {seed}): {}", test.log());
        let listed = moto.iot(TARGET).await.list_things().max_results(250).send().await.unwrap();
        let things = listed.things.unwrap_or_default().len();
        eprintln!("kill {kill} after {after:?}: {things} things in the target so far");
        midway += usize::from(things > 0 && things < fleet.things);
    }
    assert!(midway > 0, "no kill landed while things were being applied (seed {seed})");
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "seed {seed}: {summary}");
    assert!(test.dead_letters(&moto).is_empty(), "seed {seed}");
    let source = region_state(&moto, SOURCE).await;
    let target = region_state(&moto, TARGET).await;
    assert_same(&source, &target);
}
