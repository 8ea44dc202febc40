//! Where planned calls go: the AWS APIs of the target regions, or (dry run) standard output.

mod aws;
mod dry_run;

pub use aws::{AwsSink, AwsSinkError};
pub use dry_run::DryRun;

use crate::event::Event;
use crate::plan::Call;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing the dry-run output: {0}")]
    Output(#[from] std::io::Error),
    #[error("the state store failed: {0}")]
    State(String),
}

/// One event's calls for one target region.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub event: Event,
    pub region: String,
    pub calls: Vec<Call>,
}

impl Job {
    /// The event for this job's region alone: what a dead letter keeps, since
    /// a replay retries this region only (the others have it).
    pub fn into_region(self) -> Event {
        Event { targets: vec![self.region], ..self.event }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobResult {
    Applied,
    /// Older than what the region already has (see the ledger): nothing to do.
    Stale,
    /// The change could not be made; the reason names the operation and the error.
    Failed(String),
    /// Something the change needs is missing in the region (a thing, type,
    /// group, policy or certificate): it may arrive later. The reason says what.
    Waiting(String),
}

pub trait Sink {
    /// Applies a batch of jobs, in source order where order matters. One result per job.
    fn apply(&mut self, jobs: &[Job]) -> impl Future<Output = Result<Vec<JobResult>, SinkError>>;
}
