//! Sets, renames and removes attributes, and renames things by rule.
//!
//! ```toml
//! [[stage]]
//! name = "mark-replicas"
//! plugin = "../plugins/dist/attribute-transform.wasm"
//! config = { set = { replica = "true" }, rename = { fw = "firmware" }, remove = ["secret"],
//!            name_rules = [{ match = "pump-*", prefix = "dr-" }] }
//! ```
//!
//! Attribute changes apply to `entities` (default: things and thing groups).
//! Name rules apply to every event that names a thing (the thing itself, its
//! type association, group memberships and shadows), so a renamed thing keeps
//! its memberships and shadows; the first rule whose `match` pattern fits wins:
//! `strip_prefix` is removed, then `prefix` and `suffix` are added.

use iotdr_plugin::{Batch, Entity, Event, Outcome, Stage, glob_match};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default = "default_entities")]
    entities: Vec<Entity>,
    #[serde(default)]
    name_rules: Vec<NameRule>,
}

fn default_entities() -> Vec<Entity> {
    vec![Entity::Thing, Entity::ThingGroup]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameRule {
    #[serde(rename = "match", default = "match_all")]
    pattern: String,
    strip_prefix: Option<String>,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    suffix: String,
}

fn match_all() -> String {
    "*".into()
}

/// Entities whose `name` is a thing's name.
const NAMES_A_THING: [Entity; 5] = [
    Entity::Thing,
    Entity::ThingTypeAssociation,
    Entity::ThingGroupMembership,
    Entity::BillingGroupMembership,
    Entity::Shadow,
];

#[derive(Debug)]
pub struct AttributeTransform(Config);

impl Stage for AttributeTransform {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if let Some(key) = config.set.keys().chain(config.rename.values()).find(|k| k.is_empty()) {
            return Err(format!("attribute names cannot be empty (got {key:?})"));
        }
        if let Some(rule) =
            config.name_rules.iter().find(|r| r.prefix.is_empty() && r.suffix.is_empty() && r.strip_prefix.is_none())
        {
            return Err(format!(
                "name rule for {:?} changes nothing: give prefix, suffix or strip_prefix",
                rule.pattern
            ));
        }
        Ok(AttributeTransform(config))
    }

    fn entities(&self) -> Vec<Entity> {
        let mut entities = self.0.entities.clone();
        if !self.0.name_rules.is_empty() {
            entities.extend(NAMES_A_THING);
        }
        entities.sort();
        entities.dedup();
        entities
    }

    fn process(&mut self, batch: &Batch) -> Vec<Outcome> {
        let config = &self.0;
        let len = batch.len();
        // Without name rules the host passes exactly `entities` (unless that is
        // empty, which registers for every entity): no need to read them.
        let need_entities = !config.name_rules.is_empty() || config.entities.is_empty();
        let entities = if need_entities { batch.entities() } else { Vec::new() };
        let changed: Vec<u32> = if need_entities {
            (0..len).filter(|&i| config.entities.contains(&entities[i as usize])).collect()
        } else {
            (0..len).collect()
        };
        // Per event the order is the same as one event at a time: renames, removals, then sets.
        for (from, to) in &config.rename {
            batch.rename_attribute_of(&changed, from, to);
        }
        for key in &config.remove {
            batch.remove_attribute_of(&changed, key);
        }
        for (key, value) in &config.set {
            batch.set_attribute_of(&changed, key, value);
        }
        (0..len)
            .map(|index| match entities.get(index as usize) {
                Some(entity) if NAMES_A_THING.contains(entity) => self.rename_thing(&batch.event(index)),
                _ => Outcome::Keep,
            })
            .collect()
    }
}

impl AttributeTransform {
    /// Applies the first name rule that matches the thing's name.
    fn rename_thing(&self, event: &Event) -> Outcome {
        let config = &self.0;
        if !config.name_rules.is_empty() {
            let name = event.name();
            if let Some(rule) = config.name_rules.iter().find(|r| glob_match(&r.pattern, &name)) {
                let base = rule.strip_prefix.as_deref().and_then(|p| name.strip_prefix(p)).unwrap_or(&name);
                let renamed = format!("{}{base}{}", rule.prefix, rule.suffix);
                if renamed.is_empty() {
                    return Outcome::Fail {
                        message: format!("name rule leaves {name} with an empty name"),
                        retryable: false,
                    };
                }
                if renamed != name {
                    event.set_name(&renamed);
                }
            }
        }
        Outcome::Keep
    }
}

iotdr_plugin::export_stage!(AttributeTransform);

#[cfg(test)]
mod tests {
    use super::*;
    use iotdr_plugin::Operation;
    use iotdr_plugin::testing::{TestBatch, TestEvent, stage_from_json};

    #[test]
    fn sets_renames_and_removes_attributes() {
        let mut stage: AttributeTransform =
            stage_from_json(r#"{"set":{"replica":"true"},"rename":{"fw":"firmware"},"remove":["secret"]}"#).unwrap();
        let batch = TestBatch::new(vec![
            TestEvent::thing("a").attribute("fw", "1.0").attribute("secret", "x").attribute("site", "b"),
        ]);
        assert_eq!(batch.run(&mut stage), vec![Outcome::Keep]);
        assert_eq!(
            batch.event(0).attributes,
            vec![("firmware".into(), "1.0".into()), ("replica".into(), "true".into()), ("site".into(), "b".into())]
        );
    }

    #[test]
    fn renames_things_everywhere_they_are_named() {
        let mut stage: AttributeTransform = stage_from_json(
            r#"{"name_rules":[{"match":"legacy-*","strip_prefix":"legacy-","prefix":"dr-"},{"prefix":"x-"}]}"#,
        )
        .unwrap();
        let batch = TestBatch::new(vec![
            TestEvent::thing("legacy-pump"),
            TestEvent::new(Entity::Shadow, Operation::Updated, "legacy-pump"),
            TestEvent::new(Entity::ThingGroupMembership, Operation::Added, "valve").related("thing-group", "g"),
            TestEvent::new(Entity::ThingGroup, Operation::Created, "legacy-group"),
        ]);
        batch.run(&mut stage);
        let names: Vec<String> = batch.events().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["dr-pump", "dr-pump", "x-valve", "legacy-group"]);
    }

    #[test]
    fn attribute_changes_only_for_configured_entities() {
        let mut stage: AttributeTransform = stage_from_json(r#"{"set":{"a":"1"},"entities":["thing-group"]}"#).unwrap();
        let batch =
            TestBatch::new(vec![TestEvent::thing("t"), TestEvent::new(Entity::ThingGroup, Operation::Created, "g")]);
        batch.run(&mut stage);
        assert_eq!(batch.event(0).get_attribute("a"), None);
        assert_eq!(batch.event(1).get_attribute("a"), Some("1"));
    }

    #[test]
    fn rejects_rules_that_do_nothing() {
        let error = stage_from_json::<AttributeTransform>(r#"{"name_rules":[{"match":"a*"}]}"#).unwrap_err();
        assert!(error.contains("changes nothing"), "{error}");
    }
}
