//! The embedded state of a pipeline (SQLite, `<state dir>/state.db`): dead
//! letters, what iotdr knows it created in each target region, the ledger of
//! what was applied, and source checkpoints. One writer per pipeline.

use super::DeadLetter;
use super::ledger::{self, Entry, Position};
use crate::event::Event;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
#[error("state store {path}: {message}")]
pub struct StateError {
    pub path: PathBuf,
    pub message: String,
}

pub struct StateStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// One process's hold on a state folder: a run or a sync drains its queue,
/// and two at once would apply events twice. Released when dropped, or
/// when the process dies however it dies (the lock is the kernel's).
pub struct FolderLock {
    _file: std::fs::File,
}

impl FolderLock {
    /// Takes `<dir>/lock`, or says which process holds it.
    pub fn take(dir: &Path) -> Result<FolderLock, StateError> {
        let path = dir.join("lock");
        let fail = |message: String| StateError { path: path.clone(), message };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create the folder: {e}")))?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| fail(format!("cannot open it: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(fail(format!(
                    "the state folder is in use by another iotdr run or sync (pid {}): stop it first, or give this pipeline its own [state] dir",
                    holder.trim()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(fail(format!("cannot lock it: {e}"))),
        }
        use std::io::{Seek, Write};
        let written = file
            .set_len(0)
            .and_then(|()| file.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| write!(file, "{}", std::process::id()));
        written.map_err(|e| fail(format!("cannot write it: {e}")))?;
        Ok(FolderLock { _file: file })
    }
}

/// `known` kind of a shadow's version in a target, as its last write by
/// iotdr left it; named by the shadow's ledger key.
pub const SHADOW_VERSION: &str = "shadow-version";

/// A shadow write that was under way (see [`StateStore::mark_in_flight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// The source version of the change being written.
    pub version: u64,
    /// The target version the write was conditional on; `None`: unconditional.
    pub target_version: Option<u64>,
}

/// A dead letter as stored, with the id `replay` and `purge` take.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub letter: DeadLetter,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    letter TEXT NOT NULL,
    fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS known (
    region TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (region, kind, name)
);
CREATE TABLE IF NOT EXISTS ledger (
    region TEXT NOT NULL,
    key TEXT NOT NULL,
    applied_ms INTEGER NOT NULL,
    applied_version INTEGER NOT NULL,
    lifecycle_ms INTEGER,
    lifecycle_version INTEGER,
    PRIMARY KEY (region, key)
);
CREATE TABLE IF NOT EXISTS in_flight (
    region TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    target_version INTEGER,
    PRIMARY KEY (region, key)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT PRIMARY KEY,
    position TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS thing_attributes (
    name TEXT PRIMARY KEY,
    attributes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS waiting (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    since_ms INTEGER NOT NULL,
    letter TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS rechecks (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    cause TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
";

impl StateStore {
    /// Opens (creating if needed) `<dir>/state.db`.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        let path = dir.join("state.db");
        let fail = |message: String| StateError { path: path.clone(), message };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create the folder: {e}")))?;
        // It holds the fleet's certificates and dead-lettered events: created
        // for its owner alone (SQLite gives its -wal and -shm files the same
        // mode). An existing file keeps the mode its operator chose.
        #[cfg(unix)]
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists { Ok(std::fs::File::open(&path)?) } else { Err(e) }
                })
                .map_err(|e| fail(format!("cannot create it: {e}")))?;
        }
        let conn = Connection::open(&path).map_err(|e| fail(e.to_string()))?;
        StateStore::prepare(path, conn)
    }

    /// A store that lives in memory only, for runs that change nothing (dry runs).
    pub fn in_memory() -> Result<StateStore, StateError> {
        let path = PathBuf::from(":memory:");
        let conn =
            Connection::open_in_memory().map_err(|e| StateError { path: path.clone(), message: e.to_string() })?;
        StateStore::prepare(path, conn)
    }

    fn prepare(path: PathBuf, conn: Connection) -> Result<StateStore, StateError> {
        let fail = |message: String| StateError { path: path.clone(), message };
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| fail(e.to_string()))?;
        conn.execute_batch(SCHEMA).map_err(|e| fail(e.to_string()))?;
        add_fingerprints(&conn).map_err(|e| fail(e.to_string()))?;
        add_column(&conn, "in_flight", "target_version", "INTEGER").map_err(|e| fail(e.to_string()))?;
        Ok(StateStore { path, conn: Mutex::new(conn) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&conn).map_err(|e| self.error(e.to_string()))
    }

    pub(super) fn error(&self, message: String) -> StateError {
        StateError { path: self.path.clone(), message }
    }

    // ---- dead letters ---------------------------------------------------

    /// Stores a letter; the same event failing at the same place again (a
    /// source read again from its start) updates its letter, keeping its id.
    pub fn add_dead_letter(&self, letter: &DeadLetter) -> Result<i64, StateError> {
        self.with(|c| insert_dead_letter(c, letter))
    }

    /// Replaces letter `id` by `letters` (what its replay failed with; none
    /// when it went through), in one transaction: a crash keeps one or the other.
    pub fn replace_dead_letter(&self, id: i64, letters: &[DeadLetter]) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
            for letter in letters {
                insert_dead_letter(&tx, letter)?;
            }
            tx.commit()
        })
    }

    /// How many dead letters are kept.
    pub fn dead_letter_count(&self) -> Result<u64, StateError> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get::<_, i64>(0)))
            .map(|n| n as u64)
    }

    /// How many dead letters are kept per step, and per stage for the
    /// `stage` step, for `/metrics` and `/status`.
    pub fn dead_letters_by_step(&self) -> Result<Vec<(String, Option<String>, u64)>, StateError> {
        self.with(|c| {
            // `stage` holds the step as shown (`fetch`, `stage router`); letters
            // written before steps were typed hold the stage's name alone there.
            let mut statement = c.prepare("SELECT stage, COUNT(*) FROM dead_letters GROUP BY stage ORDER BY stage")?;
            let rows = statement.query_map([], |row| {
                let shown: String = row.get(0)?;
                let (step, stage) = match shown.strip_prefix("stage ") {
                    Some(stage) => ("stage".to_string(), Some(stage.to_string())),
                    None if ["decode", "fetch", "plan", "apply"].contains(&shown.as_str()) => (shown, None),
                    None => ("stage".to_string(), Some(shown)),
                };
                Ok((step, stage, row.get::<_, i64>(1)? as u64))
            })?;
            rows.collect()
        })
    }

    pub fn dead_letters(&self) -> Result<Vec<StoredDeadLetter>, StateError> {
        let rows: Vec<(i64, String)> = self.with(|c| {
            let mut statement = c.prepare("SELECT id, letter FROM dead_letters ORDER BY id")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(id, json)| {
                let letter =
                    read_letter(&json).map_err(|e| self.error(format!("dead letter {id} is unreadable: {e}")))?;
                Ok(StoredDeadLetter { id, letter })
            })
            .collect()
    }

    /// Removes the given dead letters (all when `ids` is `None`); returns how many went.
    pub fn remove_dead_letters(&self, ids: Option<&[i64]>) -> Result<usize, StateError> {
        self.with(|c| match ids {
            None => c.execute("DELETE FROM dead_letters", []),
            Some(ids) => {
                let mut removed = 0;
                for id in ids {
                    removed += c.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
                }
                Ok(removed)
            }
        })
    }

    // ---- what exists in the targets ----------------------------------------

    /// What iotdr recorded about `kind`/`name` in `region` (an ARN, a digest).
    pub fn known(&self, region: &str, kind: &str, name: &str) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT value FROM known WHERE region = ?1 AND kind = ?2 AND name = ?3",
                params![region, kind, name],
                |row| row.get(0),
            )
            .optional()
        })
    }

    pub fn set_known(&self, region: &str, kind: &str, name: &str, value: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO known (region, kind, name, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (region, kind, name) DO UPDATE SET value = excluded.value",
                params![region, kind, name, value],
            )
            .map(drop)
        })
    }

    pub fn forget(&self, region: &str, kind: &str, name: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute("DELETE FROM known WHERE region = ?1 AND kind = ?2 AND name = ?3", params![region, kind, name])
                .map(drop)
        })
    }

    /// Forgets every `kind` entry of `region` whose name starts with `prefix`.
    pub fn forget_starting(&self, region: &str, kind: &str, prefix: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM known WHERE region = ?1 AND kind = ?2 AND substr(name, 1, length(?3)) = ?3",
                params![region, kind, prefix],
            )
            .map(drop)
        })
    }

    /// Forgets every `kind` entry of `region` whose name ends with `suffix`.
    pub fn forget_ending(&self, region: &str, kind: &str, suffix: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM known WHERE region = ?1 AND kind = ?2 AND substr(name, -length(?3)) = ?3",
                params![region, kind, suffix],
            )
            .map(drop)
        })
    }

    // ---- the ledger -------------------------------------------------------

    fn ledger_entry(c: &Connection, region: &str, key: &str) -> rusqlite::Result<Entry> {
        c.query_row(
            "SELECT applied_ms, applied_version, lifecycle_ms, lifecycle_version FROM ledger
             WHERE region = ?1 AND key = ?2",
            params![region, key],
            |row| {
                let lifecycle = match (row.get::<_, Option<i64>>(2)?, row.get::<_, Option<i64>>(3)?) {
                    (Some(ms), Some(version)) => Some((ms, version)),
                    _ => None,
                };
                Ok(Entry { applied: Some((row.get(0)?, row.get(1)?)), lifecycle })
            },
        )
        .optional()
        .map(Option::unwrap_or_default)
    }

    /// Why the change at `position` is stale in `region`, or `None` when it is to be applied.
    pub fn stale(&self, region: &str, position: &Position) -> Result<Option<&'static str>, StateError> {
        self.with(|c| {
            let own = Self::ledger_entry(c, region, &position.key)?;
            let within =
                position.within.iter().map(|key| Self::ledger_entry(c, region, key)).collect::<Result<Vec<_>, _>>()?;
            Ok(ledger::stale(position, own, &within))
        })
    }

    /// Whether the ledger of every one of `regions` holds `event`'s change or
    /// a newer one of its entity. With `equal_is_settled`, the same position
    /// counts (it was applied already, perhaps as another event of the same
    /// instant); otherwise only a newer one, which makes the event stale.
    pub fn settled(&self, regions: &[String], event: &Event, equal_is_settled: bool) -> Result<bool, StateError> {
        let Some(position) = Position::of(event) else { return Ok(false) };
        let order = ledger::encode(position.order);
        for region in regions {
            let stale = self.stale(region, &position)?.is_some();
            let equal = equal_is_settled
                && self.with(|c| Self::ledger_entry(c, region, &position.key))?.applied.is_some_and(|a| a >= order);
            if !stale && !equal {
                return Ok(false);
            }
        }
        Ok(!regions.is_empty())
    }

    /// Records that the change at `position` was applied in `region`. The
    /// ledger never goes back.
    pub fn record_applied(&self, region: &str, position: &Position) -> Result<(), StateError> {
        let order = ledger::encode(position.order);
        self.with(|c| {
            // One connection behind one lock: nothing writes between the read and the write.
            let old = Self::ledger_entry(c, region, &position.key)?;
            let applied = old.applied.map_or(order, |applied| applied.max(order));
            let lifecycle = if position.lifecycle { old.lifecycle.max(Some(order)) } else { old.lifecycle };
            c.execute("DELETE FROM in_flight WHERE region = ?1 AND key = ?2", params![region, position.key])?;
            c.execute(
                "INSERT INTO ledger (region, key, applied_ms, applied_version, lifecycle_ms, lifecycle_version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (region, key) DO UPDATE SET
                   applied_ms = excluded.applied_ms, applied_version = excluded.applied_version,
                   lifecycle_ms = excluded.lifecycle_ms, lifecycle_version = excluded.lifecycle_version",
                params![region, position.key, applied.0, applied.1, lifecycle.map(|l| l.0), lifecycle.map(|l| l.1)],
            )
            .map(drop)
        })
    }

    /// Notes that a shadow change of `version` is being written to `region`,
    /// on condition that the target's shadow is at `target_version` (or
    /// unconditionally). Its ledger entry follows once the write succeeded;
    /// found again after a crash, it means the write may have been made, and
    /// against which version.
    pub fn mark_in_flight(
        &self,
        region: &str,
        key: &str,
        version: u64,
        target_version: Option<u64>,
    ) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO in_flight (region, key, version, target_version) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (region, key) DO UPDATE SET
                   version = excluded.version, target_version = excluded.target_version",
                params![region, key, version as i64, target_version.map(|v| v as i64)],
            )
            .map(drop)
        })
    }

    /// Forgets a shadow write noted in flight: it was made, and the change
    /// leaves no ledger entry (it carries no version) to clear it.
    pub fn clear_in_flight(&self, region: &str, key: &str) -> Result<(), StateError> {
        self.with(|c| c.execute("DELETE FROM in_flight WHERE region = ?1 AND key = ?2", params![region, key]).map(drop))
    }

    /// The shadow write noted by [`StateStore::mark_in_flight`] and not recorded since.
    pub fn in_flight(&self, region: &str, key: &str) -> Result<Option<InFlight>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT version, target_version FROM in_flight WHERE region = ?1 AND key = ?2",
                params![region, key],
                |row| {
                    Ok(InFlight {
                        version: row.get::<_, i64>(0)? as u64,
                        target_version: row.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                    })
                },
            )
            .optional()
        })
    }

    /// Forgets the shadows of `thing` in `region`: the thing was deleted
    /// there, and a thing created again under its name starts them anew.
    pub fn forget_shadows(&self, region: &str, thing: &str) -> Result<(), StateError> {
        let prefix = ledger::shadow_key(thing, "");
        self.with(|c| {
            for table in ["ledger", "in_flight"] {
                c.execute(
                    &format!("DELETE FROM {table} WHERE region = ?1 AND substr(key, 1, length(?2)) = ?2"),
                    params![region, prefix],
                )?;
            }
            c.execute(
                "DELETE FROM known WHERE region = ?1 AND kind = ?2 AND substr(name, 1, length(?3)) = ?3",
                params![region, SHADOW_VERSION, prefix],
            )
            .map(drop)
        })
    }

    // ---- checkpoints ------------------------------------------------------

    pub fn checkpoint(&self, source: &str) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row("SELECT position FROM checkpoints WHERE source = ?1", [source], |row| row.get(0)).optional()
        })
    }

    /// Forgets where the sources whose keys start with `prefix` were: they
    /// start from their beginning (`--from-start`).
    pub fn remove_checkpoints(&self, prefix: &str) -> Result<(), StateError> {
        self.with(|c| c.execute("DELETE FROM checkpoints WHERE substr(source, 1, length(?1)) = ?1", [prefix]).map(drop))
    }

    /// Every checkpoint whose key starts with `prefix` (the shards of one stream).
    pub fn checkpoints(&self, prefix: &str) -> Result<std::collections::HashMap<String, String>, StateError> {
        self.with(|c| {
            let mut statement =
                c.prepare("SELECT source, position FROM checkpoints WHERE substr(source, 1, length(?1)) = ?1")?;
            let rows = statement.query_map([prefix], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }

    pub fn set_checkpoint(&self, source: &str, position: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO checkpoints (source, position) VALUES (?1, ?2)
                 ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                params![source, position],
            )
            .map(drop)
        })
    }
}

/// Stores a letter; the same event failing at the same place again (a
/// source read again from its start) updates its letter, keeping its id.
pub(super) fn insert_dead_letter(c: &Connection, letter: &DeadLetter) -> rusqlite::Result<i64> {
    let json = serde_json::to_string(letter).expect("dead letters are JSON");
    let fingerprint = letter.fingerprint();
    c.prepare_cached(
        "INSERT INTO dead_letters (at_ms, stage, reason, letter, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (fingerprint) DO UPDATE
         SET at_ms = excluded.at_ms, reason = excluded.reason, letter = excluded.letter",
    )?
    .execute(params![letter.at_ms as i64, letter.step.to_string(), letter.reason, json, fingerprint])?;
    c.query_row("SELECT id FROM dead_letters WHERE fingerprint = ?1", [&fingerprint], |row| row.get(0))
}

/// A stored letter. Letters written before steps were typed name theirs in
/// `stage` alone: the host's own steps by name, anything else a stage.
pub(super) fn read_letter(json: &str) -> serde_json::Result<DeadLetter> {
    let mut value: serde_json::Value = serde_json::from_str(json)?;
    if let Some(object) = value.as_object_mut()
        && !object.contains_key("step")
        && let Some(stage) = object.get("stage").and_then(|s| s.as_str()).map(str::to_string)
    {
        let step = match stage.as_str() {
            "decode" | "fetch" | "plan" | "apply" => stage.clone(),
            _ => "stage".to_string(),
        };
        if step != "stage" {
            object.remove("stage");
        }
        object.insert("step".into(), step.into());
    }
    serde_json::from_value(value)
}

/// Stores made before letters had fingerprints get the column (their old
/// letters keep none, so they are never merged).
fn add_fingerprints(conn: &Connection) -> rusqlite::Result<()> {
    add_column(conn, "dead_letters", "fingerprint", "TEXT")?;
    conn.execute_batch("CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_by_fingerprint ON dead_letters (fingerprint)")
}

/// Adds a column that a state folder made by an older iotdr lacks.
fn add_column(conn: &Connection, table: &str, column: &str, kind: &str) -> rusqlite::Result<()> {
    let has_column =
        conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?.exists([column])?;
    if !has_column {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Event, Operation};
    use crate::state::Step;

    fn shadow_at(version: u64) -> Position {
        let mut shadow = Event::new(Entity::Shadow, Operation::Updated, "t");
        shadow.version = Some(version);
        Position::of(&shadow).unwrap()
    }

    #[test]
    fn dead_letters_are_counted_per_step_with_the_stage_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let steps = [Step::Fetch, Step::Stage("router".into()), Step::Fetch, Step::Stage("apply".into()), Step::Apply];
        for (n, step) in steps.into_iter().enumerate() {
            let mut event = Event::new(Entity::Thing, Operation::Created, format!("t-{n}"));
            event.id = format!("e-{n}");
            store.add_dead_letter(&DeadLetter::for_event(step, "no", event)).unwrap();
        }
        store.add_dead_letter(&DeadLetter::for_record("bad json", "{", "events.jsonl:1".into())).unwrap();
        assert_eq!(
            store.dead_letters_by_step().unwrap(),
            [
                ("apply".to_string(), None, 1),
                ("decode".to_string(), None, 1),
                ("fetch".to_string(), None, 2),
                ("stage".to_string(), Some("apply".to_string()), 1),
                ("stage".to_string(), Some("router".to_string()), 1)
            ]
        );
    }

    #[test]
    fn a_state_folder_of_an_older_iotdr_gains_the_shadow_write_condition_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let old = Connection::open(dir.path().join("state.db")).unwrap();
        old.execute_batch(
            "CREATE TABLE in_flight (region TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
                                     PRIMARY KEY (region, key));
             INSERT INTO in_flight VALUES ('eu-west-1', 'shadow/t/', 4);",
        )
        .unwrap();
        drop(old);
        let store = StateStore::open(dir.path()).unwrap();
        // Written before the condition was kept: repeated as an unconditional write would be.
        assert_eq!(
            store.in_flight("eu-west-1", "shadow/t/").unwrap(),
            Some(InFlight { version: 4, target_version: None })
        );
        store.mark_in_flight("eu-west-1", "shadow/t/", 5, Some(9)).unwrap();
        assert_eq!(
            store.in_flight("eu-west-1", "shadow/t/").unwrap(),
            Some(InFlight { version: 5, target_version: Some(9) })
        );
        store.set_known("eu-west-1", SHADOW_VERSION, "shadow/t/", "10").unwrap();
        store.forget_shadows("eu-west-1", "t").unwrap();
        assert_eq!(store.in_flight("eu-west-1", "shadow/t/").unwrap(), None);
        assert_eq!(store.known("eu-west-1", SHADOW_VERSION, "shadow/t/").unwrap(), None);
    }

    #[test]
    fn the_ledger_keeps_the_newest_change_and_the_newest_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let at = |operation: Operation, at_ms: u64| {
            let mut thing = Event::new(Entity::Thing, operation, "t");
            thing.timestamp_ms = at_ms;
            Position::of(&thing).unwrap()
        };
        store.record_applied("r", &at(Operation::Created, 10)).unwrap();
        store.record_applied("r", &at(Operation::Deleted, 30)).unwrap();
        store.record_applied("r", &at(Operation::Updated, 20)).unwrap();
        assert!(store.stale("r", &at(Operation::Updated, 25)).unwrap().is_some());
        assert!(store.stale("r", &at(Operation::Created, 30)).unwrap().is_none());
        assert!(store.stale("other-region", &at(Operation::Updated, 1)).unwrap().is_none());
        let mut member = Event::new(Entity::ThingGroupMembership, Operation::Added, "t");
        member.set_related("thing-group", Some("g".into()));
        member.timestamp_ms = 29;
        let membership = Position::of(&member).unwrap();
        assert!(store.stale("r", &membership).unwrap().is_some(), "older than the thing's deletion");
        member.timestamp_ms = 31;
        assert!(store.stale("r", &Position::of(&member).unwrap()).unwrap().is_none());
    }

    #[test]
    fn letters_stored_before_steps_were_typed_are_read() {
        let old = |stage: &str| format!(r#"{{"at_ms":1,"stage":"{stage}","reason":"r"}}"#);
        assert_eq!(read_letter(&old("apply")).unwrap().step, Step::Apply);
        assert_eq!(read_letter(&old("fetch")).unwrap().step, Step::Fetch);
        assert_eq!(read_letter(&old("router")).unwrap().step, Step::Stage("router".into()));
    }

    #[cfg(unix)]
    #[test]
    fn a_new_store_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mode = std::fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_same_failure_again_updates_its_letter() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let event = Event::new(Entity::Thing, Operation::Created, "t");
        let first = store.add_dead_letter(&DeadLetter::for_event(Step::Apply, "throttled", event.clone())).unwrap();
        let other = store.add_dead_letter(&DeadLetter::for_event(Step::Plan, "no type", event.clone())).unwrap();
        let again = store.add_dead_letter(&DeadLetter::for_event(Step::Apply, "still throttled", event)).unwrap();
        assert_eq!(first, again);
        assert_ne!(first, other);
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[0].letter.reason, "still throttled");
        let bad = |origin: &str| DeadLetter::for_record("not JSON", "{oops", origin.into());
        let a = store.add_dead_letter(&bad("events.jsonl:3")).unwrap();
        assert_eq!(a, store.add_dead_letter(&bad("events.jsonl:3")).unwrap());
        assert_ne!(a, store.add_dead_letter(&bad("events.jsonl:4")).unwrap());
    }

    #[test]
    fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StateStore::open(dir.path()).unwrap();
            store
                .add_dead_letter(&DeadLetter::for_event(
                    Step::Apply,
                    "boom",
                    Event::new(Entity::Thing, Operation::Created, "t"),
                ))
                .unwrap();
            store.set_known("eu-west-1", "thing", "t", "1").unwrap();
            for version in [7, 5] {
                store.record_applied("eu-west-1", &shadow_at(version)).unwrap();
            }
            store.set_checkpoint("file:events.jsonl", "1234").unwrap();
        }
        let store = StateStore::open(dir.path()).unwrap();
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].letter.reason, "boom");
        assert_eq!(store.known("eu-west-1", "thing", "t").unwrap().as_deref(), Some("1"));
        assert_eq!(store.known("eu-central-1", "thing", "t").unwrap(), None);
        assert!(store.stale("eu-west-1", &shadow_at(6)).unwrap().is_some(), "the ledger never goes back");
        assert!(store.stale("eu-west-1", &shadow_at(8)).unwrap().is_none());
        assert_eq!(store.checkpoint("file:events.jsonl").unwrap().as_deref(), Some("1234"));
        assert_eq!(store.remove_dead_letters(Some(&[letters[0].id])).unwrap(), 1);
        assert!(store.dead_letters().unwrap().is_empty());
        store.forget_shadows("eu-west-1", "t").unwrap();
        assert!(store.stale("eu-west-1", &shadow_at(1)).unwrap().is_none());
    }
}
