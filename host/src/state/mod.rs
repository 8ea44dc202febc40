//! What a run keeps between restarts: dead letters (and, with apply, checkpoints).

mod dead_letters;

pub use dead_letters::{DeadLetter, DeadLetterStore};
