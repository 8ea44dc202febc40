//! Reads a whole region back through the SDK, for field-by-field comparisons.

use super::moto::Moto;
use serde_json::{Value, json};
use std::collections::HashMap;

/// Everything the tests compare about a region, read through the SDK:
/// things (type, attributes, groups, billing group, shadows, certificates),
/// types, groups, policies, certificates and billing groups. ARNs and ids that
/// differ between regions by nature are left out.
pub async fn region_state(moto: &Moto, region: &str) -> Value {
    let iot = moto.iot(region).await;
    let data = moto.data(region).await;
    let mut things = serde_json::Map::new();
    let mut listed = Vec::new();
    let mut token = None;
    loop {
        let page = iot.list_things().set_next_token(token).send().await.unwrap();
        listed.extend(page.things.unwrap_or_default());
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    for thing in listed {
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
        let mut certificates: Vec<String> = iot
            .list_thing_principals()
            .thing_name(&name)
            .send()
            .await
            .unwrap()
            .principals
            .unwrap_or_default()
            .into_iter()
            .map(|arn| arn.rsplit('/').next().unwrap_or_default().to_string())
            .collect();
        certificates.sort();
        things.insert(
            name,
            json!({
                "type": described.thing_type_name,
                "attributes": attributes,
                "groups": groups,
                "billing_group": described.billing_group_name,
                "shadows": shadows,
                "certificates": certificates,
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
    for g in iot.list_thing_groups().max_results(250).send().await.unwrap().thing_groups.unwrap_or_default() {
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
    let mut certificates = serde_json::Map::new();
    for c in all_certificates(&iot).await {
        let id = c.certificate_id.unwrap();
        let mut policies: Vec<String> = iot
            .list_attached_policies()
            .target(c.certificate_arn.unwrap())
            .send()
            .await
            .unwrap()
            .policies
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.policy_name)
            .collect();
        policies.sort();
        certificates.insert(id, json!({ "status": c.status.map(|s| s.as_str().to_string()), "policies": policies }));
    }
    json!({
        "things": things, "types": types, "groups": groups, "policies": policies,
        "billing_groups": billing, "certificates": certificates,
    })
}

async fn all_certificates(iot: &aws_sdk_iot::Client) -> Vec<aws_sdk_iot::types::Certificate> {
    let mut all = Vec::new();
    let mut marker = None;
    loop {
        let page = iot.list_certificates().set_marker(marker).send().await.unwrap();
        all.extend(page.certificates.unwrap_or_default());
        marker = page.next_marker;
        if marker.is_none() {
            return all;
        }
    }
}

/// Shadow versions count writes: a bulk sync writes a shadow's whole state
/// at once, so its versions differ from the source's. Compare states without them.
pub fn without_shadow_versions(mut state: Value) -> Value {
    for thing in state["things"].as_object_mut().unwrap().values_mut() {
        for shadow in thing["shadows"].as_object_mut().unwrap().values_mut() {
            shadow.as_object_mut().unwrap().remove("version");
        }
    }
    state
}

/// Two region states are equal, part by part and thing by thing (so a
/// failure names what differs).
/// Whether [`assert_same`] would pass.
pub fn same(source: &Value, target: &Value) -> bool {
    ["types", "groups", "policies", "certificates", "billing_groups"].iter().all(|part| source[part] == target[part])
        && source["things"] == target["things"]
}

pub fn assert_same(source: &Value, target: &Value) {
    for part in ["types", "groups", "policies", "certificates", "billing_groups"] {
        assert_eq!(source[part], target[part], "{part} differ");
    }
    let (from, to) = (source["things"].as_object().unwrap(), target["things"].as_object().unwrap());
    assert_eq!(from.len(), to.len(), "thing counts differ");
    for (name, thing) in from {
        assert_eq!(Some(thing), to.get(name), "thing {name} differs");
    }
}
