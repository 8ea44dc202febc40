//! A generated fleet: seeded into a moto source region through the SDK, and
//! the registry, shadow and JITR events AWS IoT would have published for it.

use super::moto::Moto;
use serde_json::{Value, json};

pub const TYPES: [&str; 3] = ["sensor-v1", "sensor-v2", "gateway"];
/// (group, parent): a three-level hierarchy.
pub const GROUPS: [(&str, Option<&str>); 7] = [
    ("world", None),
    ("europe", Some("world")),
    ("americas", Some("world")),
    ("berlin", Some("europe")),
    ("lyon", Some("europe")),
    ("texas", Some("americas")),
    ("ohio", Some("americas")),
];
const LEAVES: [&str; 4] = ["berlin", "lyon", "texas", "ohio"];
const ACCOUNT: &str = "123456789012";

pub struct Fleet {
    /// The records, in the order AWS published them.
    pub events: Vec<String>,
    pub things: usize,
}

fn record(topic: String, payload: Value) -> String {
    json!({ "topic": topic, "payload": payload }).to_string()
}

fn policy_document(region: &str) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Effect": "Allow", "Action": "iot:Connect",
              "Resource": format!("arn:aws:iot:{region}:{ACCOUNT}:client/${{iot:Connection.Thing.ThingName}}") },
            { "Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
              "Resource": format!("arn:aws:iot:{region}:{ACCOUNT}:topic/fleet/*") }
        ]
    })
    .to_string()
}

/// Seeds `things` things into `region` with types, nested groups, certificates
/// with policies (every 4th thing), shadows (every 2nd, a named one every
/// 10th) and attribute updates that remove an attribute (every 5th).
pub async fn seed(moto: &Moto, region: &str, things: usize) -> Fleet {
    let iot = moto.iot(region).await;
    let data = moto.data(region).await;
    let mut events = Vec::new();
    let mut at = 1_764_000_000_000u64;
    let mut next = || {
        at += 1;
        at
    };
    for (i, name) in TYPES.iter().enumerate() {
        let searchable = vec!["site".to_string(), "customer".to_string()];
        iot.create_thing_type()
            .thing_type_name(*name)
            .thing_type_properties(
                aws_sdk_iot::types::ThingTypeProperties::builder()
                    .thing_type_description(format!("{name} devices"))
                    .set_searchable_attributes(Some(searchable.clone()))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        events.push(record(
            format!("$aws/events/thingType/{name}/created"),
            json!({ "eventType": "THING_TYPE_EVENT", "eventId": format!("type-{i}"), "timestamp": next(),
                    "operation": "CREATED", "accountId": ACCOUNT, "thingTypeName": name, "isDeprecated": false,
                    "searchableAttributes": searchable, "description": format!("{name} devices") }),
        ));
    }
    for (i, (group, parent)) in GROUPS.iter().enumerate() {
        let attributes = json!({ "level": if parent.is_none() { "root" } else { "site" } });
        let payload = aws_sdk_iot::types::AttributePayload::builder()
            .attributes("level", attributes["level"].as_str().unwrap())
            .build();
        iot.create_thing_group()
            .thing_group_name(*group)
            .set_parent_group_name(parent.map(str::to_string))
            .thing_group_properties(
                aws_sdk_iot::types::ThingGroupProperties::builder()
                    .thing_group_description(format!("{group} sites"))
                    .attribute_payload(payload)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        events.push(record(
            format!("$aws/events/thingGroup/{group}/created"),
            json!({ "eventType": "THING_GROUP_EVENT", "eventId": format!("group-{i}"), "timestamp": next(),
                    "operation": "CREATED", "accountId": ACCOUNT, "thingGroupName": group, "versionNumber": 1,
                    "parentGroupName": parent, "description": format!("{group} sites"), "attributes": attributes }),
        ));
        if let Some(parent) = parent {
            events.push(record(
                format!("$aws/events/thingGroupHierarchy/thingGroup/{parent}/childThingGroup/{group}/added"),
                json!({ "eventType": "THING_GROUP_HIERARCHY_EVENT", "eventId": format!("hierarchy-{i}"),
                        "timestamp": next(), "operation": "ADDED", "accountId": ACCOUNT,
                        "thingGroupName": parent, "childGroupName": group }),
            ));
        }
    }
    iot.create_policy().policy_name("device-policy").policy_document(policy_document(region)).send().await.unwrap();

    for i in 0..things {
        let name = format!("dev-{i:04}");
        let thing_type = TYPES[i % TYPES.len()];
        let site = LEAVES[i % LEAVES.len()];
        let customer = if i % 3 == 0 { "acme" } else { "globex" };
        let mut attributes = json!({ "site": site, "customer": customer, "serial": format!("SN-{i:06}") });
        let payload = |attributes: &Value| {
            let mut builder = aws_sdk_iot::types::AttributePayload::builder();
            for (k, v) in attributes.as_object().unwrap() {
                builder = builder.attributes(k, v.as_str().unwrap());
            }
            builder.build()
        };
        iot.create_thing()
            .thing_name(&name)
            .thing_type_name(thing_type)
            .attribute_payload(payload(&attributes))
            .send()
            .await
            .unwrap();
        let thing_event = |operation: &str, attributes: &Value, at: u64| {
            record(
                format!("$aws/events/thing/{name}/{}", operation.to_lowercase()),
                json!({ "eventType": "THING_EVENT", "eventId": format!("{name}-{operation}-{at}"), "timestamp": at,
                        "operation": operation, "accountId": ACCOUNT, "thingName": name, "versionNumber": 1,
                        "thingTypeName": thing_type, "attributes": attributes }),
            )
        };
        events.push(thing_event("CREATED", &attributes, next()));
        iot.add_thing_to_thing_group().thing_group_name(site).thing_name(&name).send().await.unwrap();
        events.push(record(
            format!("$aws/events/thingGroupMembership/thingGroup/{site}/thing/{name}/added"),
            json!({ "eventType": "THING_GROUP_MEMBERSHIP_EVENT", "eventId": format!("{name}-member"),
                    "timestamp": next(), "operation": "ADDED", "accountId": ACCOUNT,
                    "thingArn": format!("arn:aws:iot:{region}:{ACCOUNT}:thing/{name}"),
                    "groupArn": format!("arn:aws:iot:{region}:{ACCOUNT}:thinggroup/{site}") }),
        ));
        if i % 5 == 0 {
            // The serial is removed and a firmware version set: UPDATED carries the new whole set.
            attributes = json!({ "site": site, "customer": customer, "firmware": "2.1" });
            iot.update_thing()
                .thing_name(&name)
                .attribute_payload(
                    aws_sdk_iot::types::AttributePayload::builder()
                        .attributes("serial", "")
                        .attributes("firmware", "2.1")
                        .merge(true)
                        .build(),
                )
                .send()
                .await
                .unwrap();
            events.push(thing_event("UPDATED", &attributes, next()));
        }
        if i % 4 == 0 {
            // A device certificate with the device policy, attached to the thing.
            // AWS publishes no event for these: ingest fetches them.
            let created = iot.create_keys_and_certificate().set_as_active(true).send().await.unwrap();
            let arn = created.certificate_arn.unwrap();
            iot.attach_policy().policy_name("device-policy").target(&arn).send().await.unwrap();
            iot.attach_thing_principal().thing_name(&name).principal(&arn).send().await.unwrap();
        }
        if i % 2 == 0 {
            for (version, state) in [
                json!({ "reported": { "temperature": 20 + (i % 7), "online": true } }),
                json!({ "reported": { "rpm": 1000 + i }, "desired": { "mode": "eco" } }),
            ]
            .into_iter()
            .enumerate()
            {
                let body = json!({ "state": state });
                data.update_thing_shadow()
                    .thing_name(&name)
                    .payload(aws_sdk_iotdataplane::primitives::Blob::new(body.to_string()))
                    .send()
                    .await
                    .unwrap();
                events.push(record(
                    format!("$aws/things/{name}/shadow/update/accepted"),
                    json!({ "state": state, "version": version + 1, "timestamp": next() / 1000 }),
                ));
            }
        }
        if i % 10 == 0 {
            let state = json!({ "desired": { "window": format!("0{}:00-0{}:00", i % 5, i % 5 + 2) } });
            data.update_thing_shadow()
                .thing_name(&name)
                .shadow_name("maintenance")
                .payload(aws_sdk_iotdataplane::primitives::Blob::new(json!({ "state": state }).to_string()))
                .send()
                .await
                .unwrap();
            events.push(record(
                format!("$aws/things/{name}/shadow/name/maintenance/update/accepted"),
                json!({ "state": state, "version": 1, "timestamp": next() / 1000 }),
            ));
        }
    }
    Fleet { events, things }
}
