//! Events that could not be processed, kept with the reason so an operator
//! can read, fix and replay them. A letter keeps its event whole, certificate
//! PEMs included (public certificates, which a replay needs to register them
//! without the source region); what is shown of it is [`DeadLetter::redacted`].

use crate::event::{Entity, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub at_ms: u64,
    /// Where it failed: `decode`, `plan`, or the name of a pipeline stage.
    pub stage: String,
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
    pub fn for_event(stage: &str, reason: impl Into<String>, event: Event) -> DeadLetter {
        DeadLetter {
            at_ms: now_ms(),
            stage: stage.to_string(),
            reason: reason.into(),
            event: Some(event),
            record: None,
            origin: None,
        }
    }

    /// What makes two letters the same failure: the same step, and the same
    /// event (with the same targets) or the same record from the same place.
    pub fn fingerprint(&self) -> String {
        const SEPARATOR: char = '\u{1f}';
        let mut key = self.stage.clone();
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

    pub fn for_record(reason: impl Into<String>, record: &str, origin: String) -> DeadLetter {
        // A record that did not decode may still hold a PEM in any field.
        let record = if record.contains("-----BEGIN") {
            "(record withheld: it holds a PEM block)".to_string()
        } else {
            record.to_string()
        };
        DeadLetter {
            at_ms: now_ms(),
            stage: "decode".into(),
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

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
            DeadLetter::for_event("plan", "no", cert),
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
}
