//! Rewrites IoT policies for the region they are applied to: the region and
//! account inside every ARN of the document, and the policy's name.
//!
//! ```toml
//! [[stage]]
//! name = "policies-for-target"
//! plugin = "../plugins/dist/policy-mapper.wasm"
//! config = { account_map = { "111122223333" = "444455556666" }, name_template = "{name}-{region}" }
//! ```
//!
//! A policy bound for several regions is split into one event per region, each
//! with its own document. In every ARN (`arn:<partition>:<service>:<region>:<account>:...`)
//! the source region becomes the target region and accounts are mapped by
//! `account_map`; wildcards and other regions are left alone. `name_template`
//! may use `{name}`, `{region}` and `{source_region}` (default `{name}`).

use iotdr_plugin::{Batch, Entity, Event, Outcome, Stage};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    account_map: BTreeMap<String, String>,
    #[serde(default = "keep_name")]
    name_template: String,
}

fn keep_name() -> String {
    "{name}".into()
}

#[derive(Debug)]
pub struct PolicyMapper(Config);

impl PolicyMapper {
    /// Rewrites `event` for `region`; `Err` if its document is not JSON.
    fn map_for_region(&self, event: &Event, name: &str, source_region: &str, region: &str) -> Result<(), String> {
        event.set_targets(&[region]);
        let mapped_name = self
            .0
            .name_template
            .replace("{name}", name)
            .replace("{region}", region)
            .replace("{source_region}", source_region);
        if mapped_name != name {
            event.set_name(&mapped_name);
        }
        if let Some(document) = event.document() {
            let mut json: Value =
                serde_json::from_str(&document).map_err(|e| format!("policy document of {name} is not JSON: {e}"))?;
            if self.rewrite(&mut json, source_region, region) {
                event.set_document(Some(&json.to_string()));
            }
        }
        Ok(())
    }

    /// Rewrites every ARN in `value`; returns whether anything changed.
    fn rewrite(&self, value: &mut Value, source_region: &str, region: &str) -> bool {
        match value {
            Value::String(text) => match self.rewrite_arn(text, source_region, region) {
                Some(new) => {
                    *text = new;
                    true
                }
                None => false,
            },
            Value::Array(items) => {
                items.iter_mut().fold(false, |changed, v| self.rewrite(v, source_region, region) | changed)
            }
            Value::Object(map) => {
                map.values_mut().fold(false, |changed, v| self.rewrite(v, source_region, region) | changed)
            }
            _ => false,
        }
    }

    fn rewrite_arn(&self, arn: &str, source_region: &str, region: &str) -> Option<String> {
        let mut parts: Vec<&str> = arn.splitn(6, ':').collect();
        if parts.len() != 6 || parts[0] != "arn" {
            return None;
        }
        let mut changed = false;
        if parts[3] == source_region && source_region != region {
            parts[3] = region;
            changed = true;
        }
        if let Some(account) = self.0.account_map.get(parts[4]) {
            parts[4] = account;
            changed = true;
        }
        changed.then(|| parts.join(":"))
    }
}

impl Stage for PolicyMapper {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !config.name_template.contains("{name}") {
            return Err("`name_template` must contain {name}, or every policy would get the same name".into());
        }
        if let Some((from, to)) = config.account_map.iter().find(|(f, t)| !is_account(f) || !is_account(t)) {
            return Err(format!("account_map {from:?} = {to:?}: accounts are 12 digits"));
        }
        Ok(PolicyMapper(config))
    }

    fn entities(&self) -> Vec<Entity> {
        vec![Entity::Policy]
    }

    fn process(&mut self, batch: &Batch) -> Vec<Outcome> {
        (0..batch.len())
            .map(|index| {
                let event = batch.event(index);
                let targets = event.targets();
                let name = event.name();
                let source_region = event.source_region();
                let Some((first, rest)) = targets.split_first() else {
                    return Outcome::Keep;
                };
                // Copies first, while the original still holds the source document.
                let copies: Vec<Event> = rest.iter().map(|_| event.duplicate()).collect();
                let mut indices = vec![index];
                let mut result = self.map_for_region(&event, &name, &source_region, first);
                for (copy, region) in copies.iter().zip(rest) {
                    result = result.and(self.map_for_region(copy, &name, &source_region, region));
                    indices.push(copy.index());
                }
                match result {
                    Err(message) => Outcome::Fail { message, retryable: false },
                    Ok(()) if indices.len() == 1 => Outcome::Keep,
                    Ok(()) => Outcome::Split(indices),
                }
            })
            .collect()
    }
}

fn is_account(text: &str) -> bool {
    text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit())
}

iotdr_plugin::export_stage!(PolicyMapper);

#[cfg(test)]
mod tests {
    use super::*;
    use iotdr_plugin::testing::{TestBatch, TestEvent, stage_from_json};

    const DOC: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Publish",
        "Resource":["arn:aws:iot:us-east-1:111122223333:topic/sensors/*","arn:aws:iot:*:111122223333:client/x"]}]}"#;

    #[test]
    fn rewrites_region_and_account_per_target_and_splits() {
        let mut stage: PolicyMapper =
            stage_from_json(r#"{"account_map":{"111122223333":"444455556666"},"name_template":"{name}-{region}"}"#)
                .unwrap();
        let batch = TestBatch::new(vec![TestEvent::policy("pub", DOC).targets(&["eu-west-1", "ap-southeast-2"])]);
        assert_eq!(batch.run(&mut stage), vec![Outcome::Split(vec![0, 1])]);
        let events = batch.events();
        assert_eq!(events[0].name, "pub-eu-west-1");
        assert_eq!(events[0].targets, ["eu-west-1"]);
        let doc: Value = serde_json::from_str(events[0].document.as_deref().unwrap()).unwrap();
        assert_eq!(doc["Statement"][0]["Resource"][0], "arn:aws:iot:eu-west-1:444455556666:topic/sensors/*");
        assert_eq!(doc["Statement"][0]["Resource"][1], "arn:aws:iot:*:444455556666:client/x");
        assert_eq!(events[1].name, "pub-ap-southeast-2");
        assert!(events[1].document.as_deref().unwrap().contains("arn:aws:iot:ap-southeast-2:444455556666:topic"));
    }

    #[test]
    fn leaves_other_entities_and_fails_on_bad_documents() {
        let mut stage: PolicyMapper = stage_from_json("{}").unwrap();
        let batch = TestBatch::new(vec![TestEvent::thing("t"), TestEvent::policy("bad", "{not json")]);
        let outcomes = batch.run(&mut stage);
        assert_eq!(outcomes[0], Outcome::Keep);
        assert!(matches!(&outcomes[1], Outcome::Fail { message, retryable: false } if message.contains("not JSON")));
    }

    #[test]
    fn rejects_templates_without_the_name() {
        assert!(stage_from_json::<PolicyMapper>(r#"{"name_template":"fixed"}"#).unwrap_err().contains("{name}"));
        assert!(stage_from_json::<PolicyMapper>(r#"{"account_map":{"1":"2"}}"#).unwrap_err().contains("12 digits"));
    }
}
