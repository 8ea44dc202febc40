//! What a run keeps between restarts, in one SQLite store (`store`): dead
//! letters, what exists in the targets, the ledger of what was applied, the
//! ingest queue with the re-reads it scheduled, the changes waiting for
//! something they need in a target, and source checkpoints.

mod dead_letters;
pub mod ledger;
pub mod queue;
mod store;
mod waiting;

pub use dead_letters::{DeadLetter, Step, redacted};
pub use store::{FolderLock, InFlight, SHADOW_VERSION, StateError, StateStore, StoredDeadLetter};
