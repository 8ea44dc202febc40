//! Where planned calls go: the AWS APIs of the target regions, or (dry run) standard output.

mod dry_run;

pub use dry_run::DryRun;

use crate::event::Event;
use crate::plan::Call;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing the dry-run output: {0}")]
    Output(#[from] std::io::Error),
}

pub trait Sink {
    /// Applies the calls that carry out `event` in one region, in order.
    fn apply(&mut self, event: &Event, calls: &[Call]) -> Result<(), SinkError>;
}
