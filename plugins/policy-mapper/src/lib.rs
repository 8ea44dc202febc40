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
//!
//! Certificates name the policies attached to them (`policy` related entries):
//! those names are mapped by the same template, so a renamed policy is still
//! the one attached. With `{region}` in the template a certificate bound for
//! several regions is split too, one event per region.

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
    /// Splits a policy per target region and rewrites each copy for its
    /// region. Targets are written by the caller, in one call per region
    /// (`targets_of`), once every event is decided.
    fn map_policy(&self, event: Event, targets_of: &mut Vec<(String, Vec<u32>)>) -> Outcome {
        let targets = event.targets();
        if targets.is_empty() {
            return Outcome::Keep;
        }
        let name = event.name();
        let source_region = event.source_region();
        let text = event.document();
        // Everything that can fail comes before the first change.
        let documents: Vec<Option<String>> = match text.as_deref().map(PolicyDocument::parse) {
            None => targets.iter().map(|_| None).collect(),
            Some(Err(e)) => {
                let message = format!("policy document of {name} is not JSON: {e}");
                return Outcome::Fail { message, retryable: false };
            }
            Some(Ok(document)) => {
                let account_map = &self.0.account_map;
                let mapped: Result<Vec<Option<String>>, String> = targets
                    .iter()
                    .map(|region| document.rewrite_arns(|arn| map_arn(arn, &source_region, region, account_map)))
                    .collect();
                match mapped {
                    Ok(mapped) => mapped,
                    Err(e) => {
                        return Outcome::Fail { message: format!("policy document of {name}: {e}"), retryable: false };
                    }
                }
            }
        };
        // Copies first, while the original still holds the source document.
        let copies: Vec<Event> = targets[1..].iter().map(|_| event.duplicate()).collect();
        let mut indices = Vec::with_capacity(targets.len());
        for ((each, region), document) in std::iter::once(event).chain(copies).zip(&targets).zip(documents) {
            if let Some(mapped) = map_name(&self.0.name_template, &name, region, &source_region) {
                each.set_name(&mapped);
            }
            if let Some(document) = document {
                each.set_document(Some(&document));
            }
            match targets_of.iter_mut().find(|(r, _)| r == region) {
                Some((_, indices)) => indices.push(each.index()),
                None => targets_of.push((region.clone(), vec![each.index()])),
            }
            indices.push(each.index());
        }
        if indices.len() == 1 { Outcome::Keep } else { Outcome::Split(indices) }
    }

    /// Maps the names of the policies a certificate attaches.
    fn map_certificate(&self, event: Event) -> Outcome {
        if self.0.name_template == "{name}" {
            return Outcome::Keep;
        }
        let related = event.related_all();
        let policies: Vec<&str> = related.iter().filter(|(k, _)| k == "policy").map(|(_, v)| v.as_str()).collect();
        let targets = event.targets();
        if policies.is_empty() || targets.is_empty() {
            return Outcome::Keep;
        }
        let source_region = event.source_region();
        let attach = |event: &Event, region: &str| {
            event.set_related("policy", None);
            for policy in &policies {
                let mapped = map_name(&self.0.name_template, policy, region, &source_region);
                event.add_related("policy", mapped.as_deref().unwrap_or(policy));
            }
        };
        if !self.0.name_template.contains("{region}") {
            // The same names in every region: no need to split.
            attach(&event, &targets[0]);
            return Outcome::Keep;
        }
        let copies: Vec<Event> = targets[1..].iter().map(|_| event.duplicate()).collect();
        let mut indices = Vec::with_capacity(targets.len());
        for (each, region) in std::iter::once(event).chain(copies).zip(&targets) {
            each.set_targets(&[region]);
            attach(&each, region);
            indices.push(each.index());
        }
        if indices.len() == 1 { Outcome::Keep } else { Outcome::Split(indices) }
    }
}

/// `template` for a policy named `name` in `region`; `None` when the name stays.
pub fn map_name(template: &str, name: &str, region: &str, source_region: &str) -> Option<String> {
    if template == "{name}" {
        return None;
    }
    let mapped = template.replace("{name}", name).replace("{region}", region).replace("{source_region}", source_region);
    (mapped != name).then_some(mapped)
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
        // Certificates only name policies: with names kept, nothing to do to them.
        if self.0.name_template == "{name}" { vec![Entity::Policy] } else { vec![Entity::Policy, Entity::Certificate] }
    }

    fn process(&mut self, batch: &Batch) -> Vec<Outcome> {
        let entities = batch.entities();
        let mut targets_of = Vec::new();
        let outcomes = (0..batch.len())
            .map(|index| match entities[index as usize] {
                Entity::Policy => self.map_policy(batch.event(index), &mut targets_of),
                Entity::Certificate => self.map_certificate(batch.event(index)),
                _ => Outcome::Keep,
            })
            .collect();
        for (region, indices) in targets_of {
            batch.set_targets_of(&indices, &[region]);
        }
        outcomes
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
    fn certificates_attach_the_mapped_policy_names() {
        let certificate = || {
            let mut event =
                TestEvent::new(iotdr_plugin::Entity::Certificate, iotdr_plugin::Operation::Created, "c0ffee")
                    .related("certificate-status", "ACTIVE")
                    .related("policy", "device")
                    .related("policy", "telemetry");
            event.targets = vec!["eu-west-1".into(), "ap-southeast-2".into()];
            event
        };
        let policies = |event: &TestEvent| -> Vec<String> {
            event.related.iter().filter(|(k, _)| k == "policy").map(|(_, v)| v.clone()).collect()
        };

        let mut per_region: PolicyMapper = stage_from_json(r#"{"name_template":"{name}-{region}"}"#).unwrap();
        let batch = TestBatch::new(vec![certificate()]);
        assert_eq!(batch.run(&mut per_region), vec![Outcome::Split(vec![0, 1])]);
        let events = batch.events();
        assert_eq!(
            (events[0].targets.clone(), policies(&events[0])),
            (vec!["eu-west-1".to_string()], vec!["device-eu-west-1".to_string(), "telemetry-eu-west-1".to_string()])
        );
        assert_eq!(policies(&events[1]), ["device-ap-southeast-2", "telemetry-ap-southeast-2"]);
        assert_eq!(events[1].related[0], ("certificate-status".to_string(), "ACTIVE".to_string()));

        let mut prefixed: PolicyMapper = stage_from_json(r#"{"name_template":"dr-{name}"}"#).unwrap();
        let batch = TestBatch::new(vec![certificate()]);
        assert_eq!(batch.run(&mut prefixed), vec![Outcome::Keep], "the same names everywhere: no split");
        assert_eq!(policies(&batch.event(0)), ["dr-device", "dr-telemetry"]);
        assert_eq!(batch.event(0).targets.len(), 2);

        let mut unchanged: PolicyMapper = stage_from_json("{}").unwrap();
        let batch = TestBatch::new(vec![certificate()]);
        assert_eq!(batch.run(&mut unchanged), vec![Outcome::Keep]);
        assert_eq!(batch.event(0), certificate());
    }

    #[test]
    fn a_document_with_an_undecodable_arn_fails() {
        let mut stage: PolicyMapper = stage_from_json("{}").unwrap();
        let batch = TestBatch::new(vec![TestEvent::policy("odd", r#"{"Resource":"\ud800arn:aws:iot:us-east-1:1:t"}"#)]);
        assert!(
            matches!(&batch.run(&mut stage)[0], Outcome::Fail { message, .. } if message.contains("does not decode"))
        );
    }

    #[test]
    fn rejects_templates_without_the_name() {
        assert!(stage_from_json::<PolicyMapper>(r#"{"name_template":"fixed"}"#).unwrap_err().contains("{name}"));
        assert!(stage_from_json::<PolicyMapper>(r#"{"account_map":{"1":"2"}}"#).unwrap_err().contains("12 digits"));
    }
}
