//! What a run keeps between restarts: dead letters, what exists in the
//! targets, shadow versions and checkpoints (SQLite, `store`).

mod dead_letters;
mod store;

pub use dead_letters::{DeadLetter, redacted};
pub use store::{StateError, StateStore, StoredDeadLetter};
