//! Events that could not be processed, kept with the reason so an operator
//! can read, fix and replay them. Never holds certificate PEMs.

use crate::event::{Entity, Event};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

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
            event: Some(redacted(event)),
            record: None,
            origin: None,
        }
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

/// Certificate documents lose their PEM (replay fetches it again).
fn redacted(mut event: Event) -> Event {
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

/// Dead letters as JSON lines in `<state dir>/dead-letters.jsonl`, appended
/// and flushed one by one so a crash loses none that were reported.
pub struct DeadLetterStore {
    path: PathBuf,
    file: File,
}

impl DeadLetterStore {
    pub fn open(state_dir: &Path) -> std::io::Result<DeadLetterStore> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join("dead-letters.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(DeadLetterStore { path, file })
    }

    pub fn append(&mut self, letter: &DeadLetter) -> std::io::Result<()> {
        let mut line = serde_json::to_string(letter).expect("dead letters are JSON");
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()
    }

    pub fn list(&self) -> std::io::Result<Vec<DeadLetter>> {
        let reader = BufReader::new(File::open(&self.path)?);
        let mut letters = Vec::new();
        for (number, line) in reader.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let letter = serde_json::from_str(&line).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: {e}", self.path.display(), number + 1),
                )
            })?;
            letters.push(letter);
        }
        Ok(letters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Operation;

    #[test]
    fn appends_and_lists_without_pems() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DeadLetterStore::open(dir.path()).unwrap();
        let mut cert = Event::new(Entity::Certificate, Operation::Created, "abc");
        cert.document = Some(r#"{"certificatePem":"-----BEGIN CERTIFICATE-----x","status":"ACTIVE"}"#.into());
        store.append(&DeadLetter::for_event("plan", "no", cert)).unwrap();
        store.append(&DeadLetter::for_record("bad", "-----BEGIN PRIVATE KEY-----", "f:1".into())).unwrap();
        let letters = DeadLetterStore::open(dir.path()).unwrap().list().unwrap();
        assert_eq!(letters.len(), 2);
        let text = std::fs::read_to_string(dir.path().join("dead-letters.jsonl")).unwrap();
        assert!(!text.contains("-----BEGIN"), "{text}");
        assert_eq!(letters[0].event.as_ref().unwrap().document.as_deref(), Some(r#"{"status":"ACTIVE"}"#));
    }
}
