//! The embedded state of a pipeline (SQLite, `<state dir>/state.db`): dead
//! letters, what iotdr knows it created in each target region, the newest
//! shadow version applied, and source checkpoints. One writer per pipeline.

use super::DeadLetter;
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
CREATE TABLE IF NOT EXISTS shadow_versions (
    region TEXT NOT NULL,
    thing TEXT NOT NULL,
    shadow TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (region, thing, shadow)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT PRIMARY KEY,
    position TEXT NOT NULL
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
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| fail(e.to_string()))?;
        conn.execute_batch(SCHEMA).map_err(|e| fail(e.to_string()))?;
        add_fingerprints(&conn).map_err(|e| fail(e.to_string()))?;
        Ok(StateStore { path, conn: Mutex::new(conn) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&conn).map_err(|e| StateError { path: self.path.clone(), message: e.to_string() })
    }

    // ---- dead letters ---------------------------------------------------

    /// Stores a letter; the same event failing at the same place again (a
    /// source read again from its start) updates its letter, keeping its id.
    pub fn add_dead_letter(&self, letter: &DeadLetter) -> Result<i64, StateError> {
        let json = serde_json::to_string(letter).expect("dead letters are JSON");
        let fingerprint = letter.fingerprint();
        self.with(|c| {
            c.execute(
                "INSERT INTO dead_letters (at_ms, stage, reason, letter, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (fingerprint) DO UPDATE
                 SET at_ms = excluded.at_ms, reason = excluded.reason, letter = excluded.letter",
                params![letter.at_ms as i64, letter.stage, letter.reason, json, fingerprint],
            )?;
            c.query_row("SELECT id FROM dead_letters WHERE fingerprint = ?1", [&fingerprint], |row| row.get(0))
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
                let letter = serde_json::from_str(&json).map_err(|e| StateError {
                    path: self.path.clone(),
                    message: format!("dead letter {id} is unreadable: {e}"),
                })?;
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

    // ---- shadows --------------------------------------------------------

    /// The newest source version of this shadow applied to `region`. The
    /// classic shadow's name is "".
    pub fn shadow_version(&self, region: &str, thing: &str, shadow: &str) -> Result<Option<u64>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT version FROM shadow_versions WHERE region = ?1 AND thing = ?2 AND shadow = ?3",
                params![region, thing, shadow],
                |row| row.get::<_, i64>(0),
            )
            .optional()
        })
        .map(|v| v.map(|v| v as u64))
    }

    pub fn set_shadow_version(&self, region: &str, thing: &str, shadow: &str, version: u64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO shadow_versions (region, thing, shadow, version) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (region, thing, shadow) DO UPDATE SET version = max(version, excluded.version)",
                params![region, thing, shadow, version as i64],
            )
            .map(drop)
        })
    }

    /// Forgets every shadow version of `thing` in `region` (the thing was deleted there).
    pub fn forget_shadows(&self, region: &str, thing: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute("DELETE FROM shadow_versions WHERE region = ?1 AND thing = ?2", params![region, thing]).map(drop)
        })
    }

    // ---- checkpoints ------------------------------------------------------

    pub fn checkpoint(&self, source: &str) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row("SELECT position FROM checkpoints WHERE source = ?1", [source], |row| row.get(0)).optional()
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

/// Stores made before letters had fingerprints get the column (their old
/// letters keep none, so they are never merged).
fn add_fingerprints(conn: &Connection) -> rusqlite::Result<()> {
    let has_column =
        conn.prepare("SELECT 1 FROM pragma_table_info('dead_letters') WHERE name = 'fingerprint'")?.exists([])?;
    if !has_column {
        conn.execute_batch("ALTER TABLE dead_letters ADD COLUMN fingerprint TEXT")?;
    }
    conn.execute_batch("CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_by_fingerprint ON dead_letters (fingerprint)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Event, Operation};

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
        let first = store.add_dead_letter(&DeadLetter::for_event("apply", "throttled", event.clone())).unwrap();
        let other = store.add_dead_letter(&DeadLetter::for_event("plan", "no type", event.clone())).unwrap();
        let again = store.add_dead_letter(&DeadLetter::for_event("apply", "still throttled", event)).unwrap();
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
                    "apply",
                    "boom",
                    Event::new(Entity::Thing, Operation::Created, "t"),
                ))
                .unwrap();
            store.set_known("eu-west-1", "thing", "t", "1").unwrap();
            store.set_shadow_version("eu-west-1", "t", "", 7).unwrap();
            store.set_shadow_version("eu-west-1", "t", "", 5).unwrap();
            store.set_checkpoint("file:events.jsonl", "1234").unwrap();
        }
        let store = StateStore::open(dir.path()).unwrap();
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].letter.reason, "boom");
        assert_eq!(store.known("eu-west-1", "thing", "t").unwrap().as_deref(), Some("1"));
        assert_eq!(store.known("eu-central-1", "thing", "t").unwrap(), None);
        assert_eq!(store.shadow_version("eu-west-1", "t", "").unwrap(), Some(7), "versions never go back");
        assert_eq!(store.checkpoint("file:events.jsonl").unwrap().as_deref(), Some("1234"));
        assert_eq!(store.remove_dead_letters(Some(&[letters[0].id])).unwrap(), 1);
        assert!(store.dead_letters().unwrap().is_empty());
        store.forget_shadows("eu-west-1", "t").unwrap();
        assert_eq!(store.shadow_version("eu-west-1", "t", "").unwrap(), None);
    }
}
