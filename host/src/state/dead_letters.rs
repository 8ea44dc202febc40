//! Events that could not be processed, kept with the reason so an operator
//! can read, fix and replay them. A letter keeps its event whole, certificate
//! PEMs included (public certificates, which a replay needs to register them
//! without the source region); what is shown of it is [`DeadLetter::redacted`].

use crate::event::now_ms;
use crate::event::{Entity, Event};
use serde::{Deserialize, Serialize};

/// The step of the flow where a letter's event failed, and so where a replay
/// sends it back in. A pipeline stage is named by its `stage` (stored as
/// `"step": "stage", "stage": "<name>"`), so no stage name can be taken for a
/// step of the host's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "step", content = "stage", rename_all = "kebab-case")]
pub enum Step {
    /// The record did not decode into an event.
    Decode,
    /// The event could not be completed from the source region.
    Fetch,
    /// A pipeline stage failed the event (its `on_error` is `dead-letter`).
    Stage(String),
    /// No calls could be planned for a target region.
    Plan,
    /// A target region refused the change, or kept failing past the retry deadline.
    Apply,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Decode => f.write_str("decode"),
            Step::Fetch => f.write_str("fetch"),
            Step::Stage(name) => write!(f, "stage {name}"),
            Step::Plan => f.write_str("plan"),
            Step::Apply => f.write_str("apply"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub at_ms: u64,
    /// Where it failed.
    #[serde(flatten)]
    pub step: Step,
    pub reason: String,
    /// The event as it entered the failing step (none when it never decoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    /// The raw record, when it could not be decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// Where the record came from (`events.jsonl:12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl DeadLetter {
    pub fn for_event(step: Step, reason: impl Into<String>, event: Event) -> DeadLetter {
        DeadLetter { at_ms: now_ms(), step, reason: reason.into(), event: Some(event), record: None, origin: None }
    }

    /// What makes two letters the same failure: the same step, and the same
    /// event (with the same targets) or the same record from the same place.
    pub fn fingerprint(&self) -> String {
        const SEPARATOR: char = '\u{1f}';
        let mut key = self.step.to_string();
        if let Some(event) = &self.event {
            for part in [event.id.as_str(), event.entity.as_str(), event.name.as_str(), &event.targets.join(",")] {
                key.push(SEPARATOR);
                key.push_str(part);
            }
        }
        for part in [self.origin.as_deref(), self.record.as_deref()].into_iter().flatten() {
            key.push(SEPARATOR);
            key.push_str(part);
        }
        key
    }

    /// The letter as it may be printed or logged: no certificate PEMs.
    pub fn redacted(&self) -> DeadLetter {
        DeadLetter { event: self.event.clone().map(redacted), ..self.clone() }
    }

    /// A record that did not decode, from `origin` (`events.jsonl:12`, a stream
    /// shard and sequence number, an MQTT topic and message id).
    pub fn for_record(reason: impl Into<String>, record: &str, origin: String) -> DeadLetter {
        // A record that did not decode may still hold a PEM in any field.
        let record = if record.contains("-----BEGIN") {
            "(record withheld: it holds a PEM block)".to_string()
        } else {
            record.to_string()
        };
        DeadLetter {
            at_ms: now_ms(),
            step: Step::Decode,
            reason: reason.into(),
            event: None,
            record: Some(record),
            origin: Some(origin),
        }
    }
}

/// The event without certificate PEMs in its document: what may be printed.
pub fn redacted(mut event: Event) -> Event {
    if event.entity == Entity::Certificate
        && let Some(document) = &event.document
        && let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str(document)
        && map.remove("certificatePem").is_some()
    {
        event.document = Some(serde_json::Value::Object(map).to_string());
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Operation;

    #[test]
    fn letters_keep_certificate_pems_but_never_show_them() {
        let mut cert = Event::new(Entity::Certificate, Operation::Created, "abc");
        cert.document = Some(r#"{"certificatePem":"-----BEGIN CERTIFICATE-----x","status":"ACTIVE"}"#.into());
        let letters = [
            DeadLetter::for_event(Step::Plan, "no", cert),
            DeadLetter::for_record("bad", "-----BEGIN PRIVATE KEY-----", "f:1".into()),
        ];
        assert!(letters[0].event.as_ref().unwrap().document.as_deref().unwrap().contains("-----BEGIN CERTIFICATE"));
        let shown: Vec<DeadLetter> = letters.iter().map(DeadLetter::redacted).collect();
        let text = serde_json::to_string(&shown).unwrap();
        assert!(!text.contains("-----BEGIN"), "{text}");
        assert_eq!(shown[0].event.as_ref().unwrap().document.as_deref(), Some(r#"{"status":"ACTIVE"}"#));
        // A record that did not decode may hold anything (a private key): never kept.
        assert!(!serde_json::to_string(&letters[1]).unwrap().contains("-----BEGIN"));
    }

    #[test]
    fn a_stage_called_apply_is_not_the_apply_step() {
        let event = Event::new(Entity::Thing, Operation::Created, "t");
        let stage = DeadLetter::for_event(Step::Stage("apply".into()), "no", event.clone());
        let apply = DeadLetter::for_event(Step::Apply, "no", event);
        let json = serde_json::to_value(&stage).unwrap();
        assert_eq!((json["step"].as_str(), json["stage"].as_str()), (Some("stage"), Some("apply")));
        assert_eq!(serde_json::to_value(&apply).unwrap()["step"], "apply");
        assert!(serde_json::to_value(&apply).unwrap().get("stage").is_none());
        for letter in [&stage, &apply] {
            let back: DeadLetter = serde_json::from_value(serde_json::to_value(letter).unwrap()).unwrap();
            assert_eq!(&back, letter);
        }
        assert_ne!(stage.fingerprint(), apply.fingerprint());
    }
}
