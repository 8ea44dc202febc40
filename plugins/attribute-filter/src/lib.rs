//! Keeps or drops events by entity kind, name pattern and attribute value.
//!
//! ```toml
//! [[stage]]
//! name = "skip-test-devices"
//! plugin = "../plugins/dist/attribute-filter.wasm"
//! config = { attribute = "env", drop_values = ["test"], drop_names = ["tmp-*"] }
//! ```
//!
//! An event is dropped when any rule drops it. Rules:
//! - `keep_entities` / `drop_entities`: entity kinds (`thing`, `shadow`, ...);
//! - `keep_names` / `drop_names`: `*`/`?` patterns on the event's name;
//! - `attribute` with `keep_values` and/or `drop_values`; `missing` (`keep`,
//!   the default, or `drop`) decides for events without the attribute —
//!   memberships, shadows and certificates carry no attributes.

use iotdr_plugin::{Batch, Entity, Outcome, Stage, glob_match};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    keep_entities: Vec<Entity>,
    #[serde(default)]
    drop_entities: Vec<Entity>,
    #[serde(default)]
    keep_names: Vec<String>,
    #[serde(default)]
    drop_names: Vec<String>,
    attribute: Option<String>,
    #[serde(default)]
    keep_values: Vec<String>,
    #[serde(default)]
    drop_values: Vec<String>,
    #[serde(default)]
    missing: Missing,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Missing {
    #[default]
    Keep,
    Drop,
}

#[derive(Debug)]
pub struct AttributeFilter(Config);

impl AttributeFilter {
    /// Why an event whose `attribute` is `value` is dropped, if it is.
    fn drops_value(&self, attribute: &str, value: &String) -> Option<String> {
        let config = &self.0;
        if config.drop_values.contains(value) {
            Some(format!("{attribute}={value}"))
        } else if !config.keep_values.is_empty() && !config.keep_values.contains(value) {
            Some(format!("{attribute}={value} is not kept"))
        } else {
            None
        }
    }
}

impl Stage for AttributeFilter {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.attribute.is_none() && !(config.keep_values.is_empty() && config.drop_values.is_empty()) {
            return Err("`keep_values`/`drop_values` need `attribute`".into());
        }
        if config.attribute.is_some() && config.keep_values.is_empty() && config.drop_values.is_empty() {
            return Err("`attribute` needs `keep_values` or `drop_values`".into());
        }
        Ok(AttributeFilter(config))
    }

    fn process(&mut self, batch: &Batch) -> Vec<Outcome> {
        let config = &self.0;
        let len = batch.len() as usize;
        let entity_rules = !config.keep_entities.is_empty() || !config.drop_entities.is_empty();
        let entities = if entity_rules { batch.entities() } else { Vec::new() };
        // Decided once per distinct value; `None` keeps.
        let (column, drops_by_value): (_, Vec<Option<String>>) = match &config.attribute {
            Some(attribute) => {
                let column = batch.attribute_codes(attribute);
                let drops = column.values.iter().map(|value| self.drops_value(attribute, value)).collect();
                (Some(column), drops)
            }
            None => (None, Vec::new()),
        };
        let name_rules = !config.keep_names.is_empty() || !config.drop_names.is_empty();
        (0..len)
            .map(|i| {
                if entity_rules {
                    let entity = entities[i];
                    if !config.keep_entities.is_empty() && !config.keep_entities.contains(&entity) {
                        return Outcome::Drop(format!("entity {} is not kept", entity.as_str()));
                    }
                    if config.drop_entities.contains(&entity) {
                        return Outcome::Drop(format!("entity {} is dropped", entity.as_str()));
                    }
                }
                if name_rules {
                    let name = batch.event(i as u32).name();
                    if !config.keep_names.is_empty() && !config.keep_names.iter().any(|p| glob_match(p, &name)) {
                        return Outcome::Drop(format!("name {name} matches no keep_names pattern"));
                    }
                    if let Some(pattern) = config.drop_names.iter().find(|p| glob_match(p, &name)) {
                        return Outcome::Drop(format!("name {name} matches {pattern}"));
                    }
                }
                if let (Some(attribute), Some(column)) = (&config.attribute, &column) {
                    match column.code(i as u32) {
                        Some(code) => {
                            if let Some(reason) = &drops_by_value[code] {
                                return Outcome::Drop(reason.clone());
                            }
                        }
                        None if config.missing == Missing::Drop => {
                            return Outcome::Drop(format!("no attribute {attribute}"));
                        }
                        None => {}
                    }
                }
                Outcome::Keep
            })
            .collect()
    }
}

iotdr_plugin::export_stage!(AttributeFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use iotdr_plugin::Operation;
    use iotdr_plugin::testing::{TestBatch, TestEvent, stage_from_json};

    fn run(config: &str, events: Vec<TestEvent>) -> Vec<Outcome> {
        let mut stage: AttributeFilter = stage_from_json(config).unwrap();
        TestBatch::new(events).run(&mut stage)
    }

    #[test]
    fn drops_by_attribute_value_and_keeps_the_rest() {
        let outcomes = run(
            r#"{"attribute":"env","drop_values":["test"]}"#,
            vec![
                TestEvent::thing("a").attribute("env", "test"),
                TestEvent::thing("b").attribute("env", "prod"),
                TestEvent::thing("c"),
            ],
        );
        assert_eq!(outcomes, vec![Outcome::Drop("env=test".into()), Outcome::Keep, Outcome::Keep]);
    }

    #[test]
    fn keep_values_and_missing_policy() {
        let outcomes = run(
            r#"{"attribute":"customer","keep_values":["acme"],"missing":"drop"}"#,
            vec![
                TestEvent::thing("a").attribute("customer", "acme"),
                TestEvent::thing("b").attribute("customer", "globex"),
                TestEvent::thing("c"),
            ],
        );
        assert_eq!(outcomes[0], Outcome::Keep);
        assert!(matches!(outcomes[1], Outcome::Drop(_)));
        assert_eq!(outcomes[2], Outcome::Drop("no attribute customer".into()));
    }

    #[test]
    fn entity_and_name_rules() {
        let shadow = TestEvent::new(Entity::Shadow, Operation::Updated, "pump-1");
        let outcomes = run(
            r#"{"drop_entities":["shadow"],"drop_names":["tmp-*"],"keep_names":["pump-*","tmp-*"]}"#,
            vec![shadow, TestEvent::thing("tmp-1"), TestEvent::thing("pump-2"), TestEvent::thing("valve-1")],
        );
        assert_eq!(outcomes[0], Outcome::Drop("entity shadow is dropped".into()));
        assert_eq!(outcomes[1], Outcome::Drop("name tmp-1 matches tmp-*".into()));
        assert_eq!(outcomes[2], Outcome::Keep);
        assert!(matches!(outcomes[3], Outcome::Drop(_)));
    }

    #[test]
    fn rejects_bad_config_with_the_field_named() {
        assert!(stage_from_json::<AttributeFilter>(r#"{"drop_values":["x"]}"#).unwrap_err().contains("attribute"));
        assert!(stage_from_json::<AttributeFilter>(r#"{"atribute":"x"}"#).unwrap_err().contains("atribute"));
        assert!(stage_from_json::<AttributeFilter>(r#"{"keep_entities":["gadget"]}"#).unwrap_err().contains("gadget"));
    }
}
