//! What a run keeps between restarts: dead letters, what exists in the
//! targets, the ledger of what was applied, and checkpoints (SQLite, `store`).

mod dead_letters;
pub mod ledger;
mod store;

pub use dead_letters::{DeadLetter, Step, redacted};
pub use store::{StateError, StateStore, StoredDeadLetter};
