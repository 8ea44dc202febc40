//! The four bundled plug-ins, run through the real host: compiled by wasmtime,
//! fed batches through the host-owned batch resource, limits in force.

mod common;

use common::{kept_one, plugin, stage, thing};
use iotdr::config::Pipeline as PipelineConfig;
use iotdr::event::{Entity, Event, Operation, related};
use iotdr::pipeline::Pipeline;
use iotdr::plugin::{Fate, StageLimits};
use serde_json::{Value, json};

fn policy(name: &str, document: Value, targets: &[&str]) -> Event {
    let mut event = Event::new(Entity::Policy, Operation::Created, name);
    event.id = format!("policy-{name}");
    event.source_region = "us-east-1".into();
    event.account_id = "111122223333".into();
    event.targets = targets.iter().map(|t| t.to_string()).collect();
    event.document = Some(document.to_string());
    event
}

#[test]
fn attribute_filter_keeps_and_drops_by_value_entity_and_name() {
    let mut filter = stage(
        &plugin("attribute-filter"),
        json!({ "attribute": "env", "drop_values": ["test"], "drop_names": ["tmp-*"], "drop_entities": ["shadow"] }),
        StageLimits::default(),
    );
    let mut shadow = thing("pump-3", &[]);
    shadow.entity = Entity::Shadow;
    let fates = filter.process(vec![
        thing("pump-1", &[("env", "prod")]),
        thing("pump-2", &[("env", "test")]),
        thing("tmp-7", &[("env", "prod")]),
        shadow,
        thing("pump-4", &[]),
    ]);
    assert_eq!(kept_one(&fates[0]).name, "pump-1");
    assert!(
        matches!(&fates[1], Fate::Dropped(e, reason) if e.name == "pump-2" && reason == "env=test"),
        "{:?}",
        fates[1]
    );
    assert!(matches!(&fates[2], Fate::Dropped(_, reason) if reason.contains("tmp-*")), "{:?}", fates[2]);
    assert!(matches!(&fates[3], Fate::Dropped(_, reason) if reason.contains("shadow")), "{:?}", fates[3]);
    assert_eq!(kept_one(&fates[4]).name, "pump-4", "a missing attribute is kept by default");
}

#[test]
fn attribute_transform_changes_attributes_and_renames_things_consistently() {
    let mut transform = stage(
        &plugin("attribute-transform"),
        json!({
            "set": { "replica": "true" }, "rename": { "fw": "firmware" }, "remove": ["secret"],
            "name_rules": [{ "match": "pump-*", "prefix": "dr-" }]
        }),
        StageLimits::default(),
    );
    let mut membership = Event::new(Entity::ThingGroupMembership, Operation::Added, "pump-1");
    membership.set_related(related::THING_GROUP, Some("berlin".into()));
    let fates = transform.process(vec![
        thing("pump-1", &[("fw", "1.2"), ("secret", "s3cr3t"), ("site", "berlin")]),
        membership,
        thing("valve-1", &[]),
    ]);
    let changed = kept_one(&fates[0]);
    assert_eq!(changed.name, "dr-pump-1");
    let attributes: Vec<(&str, &str)> = changed.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(attributes, vec![("firmware", "1.2"), ("replica", "true"), ("site", "berlin")]);
    let membership = kept_one(&fates[1]);
    assert_eq!(membership.name, "dr-pump-1", "memberships follow the renamed thing");
    assert_eq!(membership.related(related::THING_GROUP), Some("berlin"));
    assert_eq!(kept_one(&fates[2]).name, "valve-1", "names no rule matches stay");
}

#[test]
fn region_router_routes_by_attribute_then_group_then_default() {
    let mut router = stage(
        &plugin("region-router"),
        json!({
            "by_attribute": "customer",
            "routes": { "acme": ["eu-west-1", "ap-southeast-2"] },
            "groups": { "berlin-plant": ["eu-central-1"] },
            "default": ["us-west-2"]
        }),
        StageLimits::default(),
    );
    let mut member = Event::new(Entity::ThingGroupMembership, Operation::Added, "pump-9");
    member.set_related(related::THING_GROUP, Some("berlin-plant".into()));
    let fates = router.process(vec![thing("pump-1", &[("customer", "acme")]), member, thing("pump-2", &[])]);
    assert_eq!(kept_one(&fates[0]).targets, vec!["eu-west-1", "ap-southeast-2"]);
    assert_eq!(kept_one(&fates[1]).targets, vec!["eu-central-1"]);
    assert_eq!(kept_one(&fates[2]).targets, vec!["us-west-2"]);
}

#[test]
fn region_router_rejects_a_bad_region_at_start() {
    let loaded = std::sync::Arc::new(common::engine().load(&plugin("region-router")).unwrap());
    let error = iotdr::plugin::StageRunner::start(
        "bad",
        loaded,
        json!({ "default": ["Europe"] }).to_string(),
        StageLimits::default(),
    )
    .err()
    .expect("a bad region is refused");
    assert!(error.to_string().contains("\"Europe\" is not an AWS region name"), "{error}");
}

#[test]
fn policy_mapper_rewrites_arns_per_target_region_and_splits() {
    let mut mapper = stage(
        &plugin("policy-mapper"),
        json!({ "account_map": { "111122223333": "444455556666" }, "name_template": "{name}-{region}" }),
        StageLimits::default(),
    );
    let document = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": ["iot:Connect", "iot:Publish"],
            "Resource": [
                "arn:aws:iot:us-east-1:111122223333:client/${iot:Connection.Thing.ThingName}",
                "arn:aws:iot:*:111122223333:topic/telemetry/*",
                "arn:aws:iot:ap-south-1:999999999999:topic/other"
            ]
        }]
    });
    let fates = mapper.process(vec![policy("device-policy", document, &["eu-west-1", "eu-central-1"])]);
    let Fate::Split(split) = &fates[0] else { panic!("{:?}", fates[0]) };
    assert_eq!(split.len(), 2, "one policy event per target region");
    for (event, region) in split.iter().zip(["eu-west-1", "eu-central-1"]) {
        assert_eq!(event.targets, vec![region]);
        assert_eq!(event.name, format!("device-policy-{region}"));
        let mapped: Value = serde_json::from_str(event.document.as_deref().unwrap()).unwrap();
        assert_eq!(
            mapped["Statement"][0]["Resource"],
            json!([
                format!("arn:aws:iot:{region}:444455556666:client/${{iot:Connection.Thing.ThingName}}"),
                "arn:aws:iot:*:444455556666:topic/telemetry/*",
                "arn:aws:iot:ap-south-1:999999999999:topic/other"
            ])
        );
    }
}

#[test]
fn policy_mapper_fails_only_the_policy_with_a_broken_document() {
    let mut mapper = stage(&plugin("policy-mapper"), json!({}), StageLimits::default());
    let mut broken = policy("broken", json!({}), &["eu-west-1"]);
    broken.document = Some("{not json".into());
    let fates = mapper.process(vec![broken, policy("fine", json!({ "Statement": [] }), &["eu-west-1"])]);
    assert!(
        matches!(&fates[0], Fate::Failed(e, reason) if e.name == "broken" && reason.contains("not JSON")),
        "{:?}",
        fates[0]
    );
    assert_eq!(kept_one(&fates[1]).name, "fine");
}

#[test]
fn the_demo_pipeline_runs_all_four_plug_ins_in_order() {
    let file = common::root().join("pipelines/demo.toml");
    let config = PipelineConfig::load(&file).expect("the demo pipeline is valid");
    let engine = iotdr::plugin::PluginEngine::new(Some(common::cache_dir())).unwrap();
    let mut pipeline = Pipeline::build(&config, &engine).expect("the demo pipeline builds");
    assert_eq!(
        pipeline.stage_names().collect::<Vec<_>>(),
        vec!["skip-test-devices", "tidy-attributes", "per-customer-route", "policies-for-target"]
    );
    let processed = pipeline
        .process(vec![
            thing("pump-1", &[("customer", "acme"), ("fw", "2.0")]),
            thing("bench-1", &[("env", "test")]),
            thing("pump-2", &[("customer", "globex")]),
        ])
        .expect("no stage halts");
    assert_eq!(processed.dropped.len(), 1);
    assert_eq!(processed.dropped[0].stage, "skip-test-devices");
    assert_eq!(processed.events.len(), 2);
    let acme = &processed.events[0];
    assert_eq!(acme.targets, vec!["eu-west-1", "eu-central-1"]);
    assert_eq!(acme.attributes.get("firmware").map(String::as_str), Some("2.0"));
    assert_eq!(acme.attributes.get("replicated-from").map(String::as_str), Some("us-east-1"));
    assert_eq!(processed.events[1].targets, vec!["eu-west-1"], "unrouted events keep the pipeline's targets");
}
