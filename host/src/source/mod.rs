//! Where raw records come from. Each yields records with their origin; the
//! decoder turns them into events.

mod file;

pub use file::FileSource;

/// One raw record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub text: String,
    /// Human-readable origin, e.g. `events.jsonl:12`.
    pub origin: String,
}
