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

mod document;

pub use document::{PolicyDocument, map_arn};
use iotdr_plugin::{Batch, Entity, Event, Outcome, Stage};
use serde::Deserialize;
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
    /// Rewrites `event` for `region`; `document` is its source document.
    fn map_for_region(
        &self,
        event: &Event,
        name: &str,
        source_region: &str,
        region: &str,
        document: Option<PolicyDocument>,
    ) {
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
        if let Some(mapped) =
            document.and_then(|d| d.rewrite_arns(|arn| map_arn(arn, source_region, region, &self.0.account_map)))
        {
            event.set_document(Some(&mapped));
        }
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
                let Some((first, rest)) = targets.split_first() else {
                    return Outcome::Keep;
                };
                let name = event.name();
                let text = event.document();
                let document = match text.as_deref().map(PolicyDocument::parse) {
                    None => None,
                    Some(Ok(document)) => Some(document),
                    Some(Err(e)) => {
                        let message = format!("policy document of {name} is not JSON: {e}");
                        return Outcome::Fail { message, retryable: false };
                    }
                };
                let source_region = event.source_region();
                // Copies first, while the original still holds the source document.
                let copies: Vec<Event> = rest.iter().map(|_| event.duplicate()).collect();
                let mut indices = vec![index];
                self.map_for_region(&event, &name, &source_region, first, document);
                for (copy, region) in copies.iter().zip(rest) {
                    self.map_for_region(copy, &name, &source_region, region, document);
                    indices.push(copy.index());
                }
                if indices.len() == 1 { Outcome::Keep } else { Outcome::Split(indices) }
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
    use serde_json::Value;

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
