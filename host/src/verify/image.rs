//! What one region holds, entity by entity, in the form `verify` compares:
//! folded from the native events the registry scan lists. The source's
//! image is folded from those events after the pipeline's stages (so
//! filtered, renamed and re-routed entities compare as replicated), a
//! target's straight from its own scan.

use crate::event::{Entity, Event, related};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// The kinds compared, in the order they are reported.
pub const KINDS: [&str; 7] =
    ["thing-types", "thing-groups", "billing-groups", "policies", "certificates", "things", "shadows"];

/// Per kind, per name: the entity's compared fields.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Image {
    pub kinds: BTreeMap<&'static str, BTreeMap<String, Value>>,
}

/// The entry a scan event folds into: its kind and name (a membership's is its thing's).
pub fn entry_of(event: &Event) -> Option<(&'static str, String)> {
    let name = event.name.clone();
    Some(match event.entity {
        Entity::ThingType => ("thing-types", name),
        Entity::ThingGroup => ("thing-groups", name),
        Entity::BillingGroup => ("billing-groups", name),
        Entity::Policy => ("policies", name),
        Entity::Certificate => ("certificates", name),
        Entity::Thing | Entity::ThingGroupMembership | Entity::BillingGroupMembership => ("things", name),
        Entity::Shadow => ("shadows", shadow_entry(&name, event.related(related::SHADOW_NAME))),
        Entity::ThingTypeAssociation | Entity::ThingGroupHierarchy => return None,
    })
}

/// A shadow's entry name: `pump-1 (classic)`, `pump-1/maintenance`.
pub fn shadow_entry(thing: &str, shadow: Option<&str>) -> String {
    match shadow {
        Some(shadow) => format!("{thing}/{shadow}"),
        None => format!("{thing} (classic)"),
    }
}

/// The thing and shadow an entry name of [`shadow_entry`] names (thing names hold no `/`).
pub fn shadow_of(entry: &str) -> (&str, Option<&str>) {
    match entry.strip_suffix(" (classic)") {
        Some(thing) => (thing, None),
        None => entry.split_once('/').map_or((entry, None), |(thing, shadow)| (thing, Some(shadow))),
    }
}

impl Image {
    /// Adds what a scan event says (memberships add to their thing).
    pub fn fold(&mut self, event: &Event) {
        let name = event.name.clone();
        let document =
            || -> Value { event.document.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or(Value::Null) };
        match event.entity {
            Entity::ThingType => {
                let mut fields = document();
                if let Some(searchable) = fields.get_mut("searchableAttributes").and_then(Value::as_array_mut) {
                    searchable.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
                }
                self.put("thing-types", name, fields);
            }
            Entity::ThingGroup => {
                let fields = document();
                self.put(
                    "thing-groups",
                    name,
                    json!({
                        "description": fields.get("description"),
                        "dynamic": fields.get("dynamic").and_then(Value::as_bool).unwrap_or(false),
                        "query": fields.get("queryString"),
                        "parent": event.related(related::PARENT_GROUP),
                        "attributes": event.attributes,
                    }),
                );
            }
            Entity::BillingGroup => {
                self.put("billing-groups", name, json!({ "description": document().get("description") }))
            }
            Entity::Policy => {
                // Compared as JSON: the target may have it with other whitespace.
                let text = event.document.as_deref().unwrap_or_default();
                let document = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()));
                self.put("policies", name, json!({ "document": document }));
            }
            // The content is not compared: a certificate's id is the SHA-256
            // of its content in AWS (and moto), so the same id is the same PEM.
            Entity::Certificate => self.put(
                "certificates",
                name,
                json!({
                    "status": event.related(related::CERTIFICATE_STATUS),
                    "policies": sorted(event.related.iter().filter(|(k, _)| k == related::POLICY).map(|(_, v)| v)),
                }),
            ),
            Entity::Thing => {
                let thing = self.thing(name);
                thing.insert("attributes".into(), json!(event.attributes));
                thing.insert("type".into(), json!(event.related(related::THING_TYPE)));
                let principals = event.related.iter().filter(|(k, _)| k == related::PRINCIPAL).map(|(_, v)| v);
                thing.insert("certificates".into(), json!(sorted(principals)));
            }
            Entity::ThingGroupMembership => {
                if let Some(group) = event.related(related::THING_GROUP) {
                    let thing = self.thing(name);
                    let groups = thing.get_mut("groups").and_then(Value::as_array_mut).expect("a list");
                    groups.push(group.into());
                    groups.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
                }
            }
            Entity::BillingGroupMembership => {
                let group = event.related(related::BILLING_GROUP).map(str::to_string);
                self.thing(name).insert("billing_group".into(), json!(group));
            }
            Entity::Shadow => {
                let key = shadow_entry(&name, event.related(related::SHADOW_NAME));
                // An emptied part is no part (AWS drops it; moto keeps `{}`).
                let mut state = document().get("state").cloned().unwrap_or(Value::Null);
                if let Some(parts) = state.as_object_mut() {
                    parts.retain(|_, part| part.as_object().is_none_or(|fields| !fields.is_empty()));
                }
                self.put("shadows", key, json!({ "state": state }));
            }
            // The scan lists none of these: they are parts of the entities above.
            Entity::ThingTypeAssociation | Entity::ThingGroupHierarchy => {}
        }
    }

    /// Once everything is folded: memberships of dynamic groups are left
    /// out (their members follow the group's query in each region, and a
    /// comparing scan does not list them).
    pub fn settle(&mut self) {
        let dynamic: Vec<String> = self
            .of("thing-groups")
            .filter(|(_, fields)| fields["dynamic"].as_bool() == Some(true))
            .map(|(name, _)| name.clone())
            .collect();
        if dynamic.is_empty() {
            return;
        }
        for thing in self.kinds.get_mut("things").into_iter().flat_map(|things| things.values_mut()) {
            if let Some(groups) = thing.get_mut("groups").and_then(Value::as_array_mut) {
                groups.retain(|group| !group.as_str().is_some_and(|g| dynamic.iter().any(|d| d == g)));
            }
        }
    }

    /// Keeps only the things in `names`, and their shadows.
    pub fn keep_things(&mut self, names: &std::collections::BTreeSet<String>) {
        if let Some(things) = self.kinds.get_mut("things") {
            things.retain(|name, _| names.contains(name));
        }
        if let Some(shadows) = self.kinds.get_mut("shadows") {
            shadows.retain(|entry, _| names.contains(shadow_of(entry).0));
        }
    }

    fn put(&mut self, kind: &'static str, name: String, fields: Value) {
        self.kinds.entry(kind).or_default().insert(name, fields);
    }

    /// A thing's entry, with the fields a membership may come before.
    fn thing(&mut self, name: String) -> &mut Map<String, Value> {
        let entry = self.kinds.entry("things").or_default().entry(name).or_insert_with(
            || json!({ "attributes": {}, "type": null, "certificates": [], "groups": [], "billing_group": null }),
        );
        entry.as_object_mut().expect("an object")
    }

    /// The entries of `kind` (none when the region has none).
    pub fn of(&self, kind: &str) -> impl Iterator<Item = (&String, &Value)> {
        self.kinds.get(kind).into_iter().flatten()
    }

    pub fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.kinds.get(kind).and_then(|entries| entries.get(name))
    }
}

fn sorted<'a>(values: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut values: Vec<&String> = values.collect();
    values.sort();
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Operation;

    #[test]
    fn a_thing_gathers_its_memberships_and_shadows_stand_apart() {
        let mut image = Image::default();
        let mut membership = Event::new(Entity::ThingGroupMembership, Operation::Added, "pump-1");
        membership.set_related(related::THING_GROUP, Some("lyon".into()));
        image.fold(&membership);
        let mut thing = Event::new(Entity::Thing, Operation::Created, "pump-1");
        thing.attributes.insert("site".into(), "lyon".into());
        thing.related.push((related::PRINCIPAL.into(), "b".into()));
        thing.related.push((related::PRINCIPAL.into(), "a".into()));
        image.fold(&thing);
        let mut shadow = Event::new(Entity::Shadow, Operation::Updated, "pump-1");
        shadow.document = Some(r#"{"state":{"reported":{"on":true}}}"#.into());
        image.fold(&shadow);
        assert_eq!(
            image.get("things", "pump-1"),
            Some(&json!({ "attributes": { "site": "lyon" }, "type": null, "certificates": ["a", "b"],
                          "groups": ["lyon"], "billing_group": null }))
        );
        assert_eq!(image.get("shadows", "pump-1 (classic)"), Some(&json!({ "state": { "reported": { "on": true } } })));
        assert_eq!(shadow_of("pump-1 (classic)"), ("pump-1", None));
        assert_eq!(shadow_of("pump-1/maintenance"), ("pump-1", Some("maintenance")));
    }

    #[test]
    fn policies_compare_as_json_and_certificates_by_id() {
        let mut a = Image::default();
        let mut b = Image::default();
        let mut policy = Event::new(Entity::Policy, Operation::Created, "p");
        policy.document = Some(r#"{"Version": "2012-10-17"}"#.into());
        a.fold(&policy);
        policy.document = Some(r#"{"Version":"2012-10-17"}"#.into());
        b.fold(&policy);
        let mut certificate = Event::new(Entity::Certificate, Operation::Created, "c");
        certificate.document = Some(json!({ "certificatePem": "-----BEGIN\nAB\n-----END\n" }).to_string());
        a.fold(&certificate);
        // As a comparing scan lists it: no PEM.
        certificate.document = None;
        b.fold(&certificate);
        assert_eq!(a, b);
    }

    #[test]
    fn memberships_of_dynamic_groups_are_not_compared() {
        let mut image = Image::default();
        for (group, dynamic) in [("lyon", false), ("low-battery", true)] {
            let mut event = Event::new(Entity::ThingGroup, Operation::Created, group);
            event.document = Some(json!({ "dynamic": dynamic }).to_string());
            image.fold(&event);
            let mut membership = Event::new(Entity::ThingGroupMembership, Operation::Added, "pump-1");
            membership.set_related(related::THING_GROUP, Some(group.into()));
            image.fold(&membership);
        }
        image.settle();
        assert_eq!(image.get("things", "pump-1").unwrap()["groups"], json!(["lyon"]));
    }
}
