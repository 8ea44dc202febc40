//! The ingest queue and the re-reads scheduled at ingest, in the state store.
//!
//! A batch read from a source is decoded, completed from the source region
//! and written here, with its dead letters and the source's new position, in
//! one transaction; only then is the source acknowledged. Applying drains the
//! queue in order, and removes what it finished in the same transaction as
//! the batch's dead letters. A crash anywhere loses nothing: what was stored
//! is applied after the restart, what was not is read from the source again.

use super::DeadLetter;
use super::store::{StateError, StateStore, insert_dead_letter};
use super::waiting::insert_waiting;
use crate::event::Event;
use rusqlite::{OptionalExtension, params};
use std::collections::BTreeMap;

/// What one source batch leaves in the store.
#[derive(Debug, Default)]
pub struct Ingested<'a> {
    pub events: &'a [Event],
    pub dead_letters: &'a [DeadLetter],
    /// (source key, position) to store: where the source resumes.
    pub checkpoints: &'a [(String, String)],
    pub rechecks: &'a [Recheck],
    /// What the batch taught the thing context: a thing's attributes as last
    /// seen, or `None` when it was deleted (see `context::ThingContext`).
    pub thing_attributes: &'a [(String, Option<BTreeMap<String, String>>)],
}

/// A second read of an entity from the source, some time after an event
/// about it: AWS publishes no event when a certificate is activated or a
/// principal is attached to a thing.
#[derive(Debug, Clone, PartialEq)]
pub struct Recheck {
    /// `thing` or `certificate`, or `deferred`: the completion of the
    /// cause itself, which ingest left for later (`name` is then unique to it).
    pub kind: String,
    pub name: String,
    pub due_ms: u64,
    /// The event that asked for it; the re-read takes its time, targets and account.
    pub cause: Event,
}

impl StateStore {
    /// Stores one source batch in one transaction (see the module comment).
    pub fn ingest(&self, batch: &Ingested) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut push = tx.prepare_cached("INSERT INTO queue (event) VALUES (?1)")?;
                for event in batch.events {
                    push.execute([serde_json::to_string(event).expect("events are JSON")])?;
                }
            }
            for letter in batch.dead_letters {
                insert_dead_letter(&tx, letter)?;
            }
            for (source, position) in batch.checkpoints {
                tx.execute(
                    "INSERT INTO checkpoints (source, position) VALUES (?1, ?2)
                     ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                    params![source, position],
                )?;
            }
            for (name, attributes) in batch.thing_attributes {
                match attributes {
                    Some(attributes) => tx.execute(
                        "INSERT INTO thing_attributes (name, attributes) VALUES (?1, ?2)
                         ON CONFLICT (name) DO UPDATE SET attributes = excluded.attributes",
                        params![name, serde_json::to_string(attributes).expect("attributes are JSON")],
                    )?,
                    None => tx.execute("DELETE FROM thing_attributes WHERE name = ?1", [name])?,
                };
            }
            for recheck in batch.rechecks {
                // One pending re-read per entity, due when the earliest ask
                // is: an entity changing every few seconds is still read
                // again every `recheck_after`, never put off for good. The
                // latest cause is kept; `rechecked` asks again for it.
                tx.execute(
                    "INSERT INTO rechecks (kind, name, due_ms, cause) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (kind, name) DO UPDATE SET
                       due_ms = min(rechecks.due_ms, excluded.due_ms), cause = excluded.cause",
                    params![
                        recheck.kind,
                        recheck.name,
                        recheck.due_ms as i64,
                        serde_json::to_string(&recheck.cause).expect("events are JSON")
                    ],
                )?;
            }
            tx.commit()
        })
    }

    /// A thing's attributes as the thing context last stored them.
    pub fn thing_attributes(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, StateError> {
        let stored: Option<String> = self.with(|c| {
            c.query_row("SELECT attributes FROM thing_attributes WHERE name = ?1", [name], |row| row.get(0)).optional()
        })?;
        stored
            .map(|text| serde_json::from_str(&text).map_err(|e| self.error(format!("attributes of thing {name}: {e}"))))
            .transpose()
    }

    /// Up to `max` queued events after `after` (a sequence number), oldest first.
    pub fn queued(&self, after: i64, max: usize) -> Result<Vec<(i64, Event)>, StateError> {
        let rows: Vec<(i64, String)> = self.with(|c| {
            let mut statement =
                c.prepare_cached("SELECT seq, event FROM queue WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
            let rows = statement.query_map(params![after, max as i64], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(seq, json)| {
                let event = serde_json::from_str(&json).map_err(|e| self.error(format!("queued event {seq}: {e}")))?;
                Ok((seq, event))
            })
            .collect()
    }

    pub fn queue_len(&self) -> Result<u64, StateError> {
        self.with(|c| c.query_row("SELECT count(*) FROM queue", [], |row| row.get::<_, i64>(0))).map(|n| n as u64)
    }

    /// The queued events up to `through` are done: removes them and stores
    /// their dead letters and their changes that wait for something they
    /// need (see `waiting.rs`), in one transaction.
    pub fn applied(&self, through: i64, dead_letters: &[DeadLetter], waiting: &[DeadLetter]) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            for letter in dead_letters {
                insert_dead_letter(&tx, letter)?;
            }
            for letter in waiting {
                insert_waiting(&tx, letter)?;
            }
            tx.execute("DELETE FROM queue WHERE seq <= ?1", [through])?;
            tx.commit()
        })
    }

    /// Re-reads due at `now_ms`, at most `max`, soonest first.
    pub fn due_rechecks(&self, now_ms: u64, max: usize) -> Result<Vec<Recheck>, StateError> {
        let rows: Vec<(String, String, i64, String)> = self.with(|c| {
            let mut statement = c.prepare_cached(
                "SELECT kind, name, due_ms, cause FROM rechecks WHERE due_ms <= ?1 ORDER BY due_ms, rowid LIMIT ?2",
            )?;
            let rows = statement.query_map(params![now_ms as i64, max as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(kind, name, due_ms, cause)| {
                let cause =
                    serde_json::from_str(&cause).map_err(|e| self.error(format!("recheck {kind} {name}: {e}")))?;
                Ok(Recheck { kind, name, due_ms: due_ms as u64, cause })
            })
            .collect()
    }

    /// When the next re-read is due, if any is pending.
    pub fn next_recheck_ms(&self) -> Result<Option<u64>, StateError> {
        self.with(|c| {
            c.query_row("SELECT min(due_ms) FROM rechecks", [], |row| row.get::<_, Option<i64>>(0))
                .optional()
                .map(|v| v.flatten().map(|ms| ms as u64))
        })
    }

    /// Stores the events a batch of re-reads produced and removes those
    /// re-reads, in one transaction. A re-read asked for again since (by a
    /// newer cause) stays, due `after_ms` after that cause.
    pub fn rechecked(
        &self,
        done: &[Recheck],
        events: &[Event],
        dead_letters: &[DeadLetter],
        after_ms: u64,
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut push = tx.prepare_cached("INSERT INTO queue (event) VALUES (?1)")?;
                for event in events {
                    push.execute([serde_json::to_string(event).expect("events are JSON")])?;
                }
            }
            for letter in dead_letters {
                insert_dead_letter(&tx, letter)?;
            }
            for recheck in done {
                let stored: Option<String> = tx
                    .query_row(
                        "SELECT cause FROM rechecks WHERE kind = ?1 AND name = ?2",
                        params![recheck.kind, recheck.name],
                        |row| row.get(0),
                    )
                    .optional()?;
                let Some(stored) = stored else { continue };
                let newer = serde_json::from_str::<Event>(&stored)
                    .ok()
                    .filter(|cause| cause.id != recheck.cause.id || cause.timestamp_ms != recheck.cause.timestamp_ms);
                match newer {
                    Some(cause) => tx.execute(
                        "UPDATE rechecks SET due_ms = ?3 WHERE kind = ?1 AND name = ?2",
                        params![recheck.kind, recheck.name, cause.timestamp_ms.saturating_add(after_ms) as i64],
                    )?,
                    None => tx.execute(
                        "DELETE FROM rechecks WHERE kind = ?1 AND name = ?2",
                        params![recheck.kind, recheck.name],
                    )?,
                };
            }
            tx.commit()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Operation};
    use crate::state::Step;

    #[test]
    fn a_batch_is_stored_with_its_position_and_drained_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let events: Vec<Event> =
            (0..5).map(|i| Event::new(Entity::Thing, Operation::Created, format!("t{i}"))).collect();
        let letter = DeadLetter::for_record("bad JSON", "{", "events.jsonl:9".into());
        let checkpoints = [("file:events.jsonl".to_string(), "120:9".to_string())];
        store
            .ingest(&Ingested {
                events: &events,
                dead_letters: &[letter],
                checkpoints: &checkpoints,
                rechecks: &[],
                thing_attributes: &[],
            })
            .unwrap();
        assert_eq!(store.checkpoint("file:events.jsonl").unwrap().as_deref(), Some("120:9"));
        assert_eq!(store.dead_letters().unwrap().len(), 1);
        assert_eq!(store.queue_len().unwrap(), 5);
        let first = store.queued(0, 3).unwrap();
        assert_eq!(first.iter().map(|(_, e)| e.name.as_str()).collect::<Vec<_>>(), ["t0", "t1", "t2"]);
        let failed = DeadLetter::for_event(Step::Apply, "refused", events[1].clone());
        store.applied(first[2].0, &[failed], &[]).unwrap();
        assert_eq!(store.queue_len().unwrap(), 2);
        assert_eq!(store.dead_letters().unwrap().len(), 2);
        let rest = store.queued(0, 10).unwrap();
        assert_eq!(rest.iter().map(|(_, e)| e.name.as_str()).collect::<Vec<_>>(), ["t3", "t4"]);
        drop(store);
        let reopened = StateStore::open(dir.path()).unwrap();
        assert_eq!(reopened.queue_len().unwrap(), 2, "the queue survives a restart");
    }

    #[test]
    fn a_recheck_is_kept_once_per_entity_due_at_its_earliest_ask_and_asked_again_by_a_newer_cause() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let caused = |id: &str, at_ms| {
            let mut cause = Event::new(Entity::Thing, Operation::Updated, "t");
            cause.id = id.into();
            cause.timestamp_ms = at_ms;
            cause
        };
        let ask =
            |cause: &Event, due_ms| Recheck { kind: "thing".into(), name: "t".into(), due_ms, cause: cause.clone() };
        let (first, second) = (caused("e1", 0), caused("e2", 200));
        store.ingest(&Ingested { rechecks: &[ask(&first, 100)], ..Default::default() }).unwrap();
        store.ingest(&Ingested { rechecks: &[ask(&second, 300)], ..Default::default() }).unwrap();
        assert_eq!(store.next_recheck_ms().unwrap(), Some(100), "asked again: never put off");
        assert!(store.due_rechecks(50, 10).unwrap().is_empty());
        let due = store.due_rechecks(100, 10).unwrap();
        assert_eq!(due, [ask(&second, 100)], "the latest cause");
        store.rechecked(&due, std::slice::from_ref(&second), &[], 100).unwrap();
        assert_eq!(store.next_recheck_ms().unwrap(), None, "done: its cause is the latest");
        assert_eq!(store.queue_len().unwrap(), 1);

        // A newer cause arriving while the re-read runs asks for one more, after it.
        store.ingest(&Ingested { rechecks: &[ask(&first, 100)], ..Default::default() }).unwrap();
        let due = store.due_rechecks(100, 10).unwrap();
        store.ingest(&Ingested { rechecks: &[ask(&second, 300)], ..Default::default() }).unwrap();
        store.rechecked(&due, &[], &[], 100).unwrap();
        assert_eq!(store.next_recheck_ms().unwrap(), Some(300));
    }
}
