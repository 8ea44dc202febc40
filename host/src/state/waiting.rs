//! Changes waiting for something they need in a target region (a thing, a
//! type, a group, a policy, a certificate) that their batch did not create.
//! AWS publishes events of different topics in no common order, so what a
//! change needs may still be on its way: the change waits here, stored in
//! the same transaction that takes its batch off the queue, and the run
//! tries it again until it goes through or its wait is over (then it is a
//! dead letter). Each is kept as the letter it would become: the event past
//! its stages, for the one region it waits in.

use super::store::{StateError, StateStore, read_letter};
use super::{DeadLetter, StoredDeadLetter, store::insert_dead_letter};
use rusqlite::{Connection, params};

/// Stores a waiting change; the same change waiting again (its batch
/// applied again after a restart) keeps its place and its first time.
pub(super) fn insert_waiting(c: &Connection, letter: &DeadLetter) -> rusqlite::Result<()> {
    let json = serde_json::to_string(letter).expect("letters are JSON");
    c.prepare_cached(
        "INSERT INTO waiting (since_ms, letter, fingerprint) VALUES (?1, ?2, ?3)
         ON CONFLICT (fingerprint) DO UPDATE SET letter = excluded.letter",
    )?
    .execute(params![letter.at_ms as i64, json, letter.fingerprint()])
    .map(drop)
}

impl StateStore {
    /// The waiting changes, in the order they started to wait; each letter's
    /// `at_ms` is when it first did.
    pub fn waiting(&self) -> Result<Vec<StoredDeadLetter>, StateError> {
        let rows: Vec<(i64, i64, String)> = self.with(|c| {
            let mut statement = c.prepare_cached("SELECT id, since_ms, letter FROM waiting ORDER BY id")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(id, since_ms, json)| {
                let mut letter = read_letter(&json).map_err(|e| self.error(format!("waiting change {id}: {e}")))?;
                letter.at_ms = since_ms as u64;
                Ok(StoredDeadLetter { id, letter })
            })
            .collect()
    }

    pub fn waiting_count(&self) -> Result<u64, StateError> {
        self.with(|c| c.query_row("SELECT count(*) FROM waiting", [], |row| row.get::<_, i64>(0))).map(|n| n as u64)
    }

    /// A waiting change was tried again: it is done (`waits` none and
    /// `dead` empty), still waits (`waits`, with the reason of this try), or
    /// failed otherwise (its dead letters), in one transaction.
    pub fn settle_waiting(&self, id: i64, waits: Option<&DeadLetter>, dead: &[DeadLetter]) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            match waits {
                None => tx.execute("DELETE FROM waiting WHERE id = ?1", [id])?,
                Some(letter) => {
                    let json = serde_json::to_string(letter).expect("letters are JSON");
                    tx.execute("UPDATE waiting SET letter = ?2 WHERE id = ?1", params![id, json])?
                }
            };
            for letter in dead {
                insert_dead_letter(&tx, letter)?;
            }
            tx.commit()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Event, Operation};
    use crate::state::Step;

    #[test]
    fn a_change_waits_once_keeps_its_first_time_and_leaves_as_done_or_dead() {
        let store = StateStore::in_memory().unwrap();
        let mut event = Event::new(Entity::Shadow, Operation::Updated, "pump-1");
        event.targets = vec!["eu-west-1".into()];
        let mut first = DeadLetter::for_event(Step::Apply, "thing missing", event.clone());
        first.at_ms = 1_000;
        store.applied(0, &[], &[first.clone()]).unwrap();
        // Its batch applied again after a restart: the same change, still one, still from 1 000.
        let mut again = first.clone();
        again.at_ms = 5_000;
        store.applied(0, &[], &[again]).unwrap();
        let waiting = store.waiting().unwrap();
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].letter.at_ms, 1_000);
        let mut later = first.clone();
        later.reason = "still missing".into();
        store.settle_waiting(waiting[0].id, Some(&later), &[]).unwrap();
        assert_eq!(store.waiting().unwrap()[0].letter.reason, "still missing");
        assert_eq!(store.waiting().unwrap()[0].letter.at_ms, 1_000);
        store.settle_waiting(waiting[0].id, None, &[first]).unwrap();
        assert_eq!((store.waiting_count().unwrap(), store.dead_letter_count().unwrap()), (0, 1));
    }
}
