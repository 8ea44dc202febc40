//! Prints each planned call as one JSON line instead of sending it.

use super::{Job, JobResult, Sink, SinkError};
use std::io::Write;

pub struct DryRun<W: Write> {
    out: W,
}

impl<W: Write> DryRun<W> {
    pub fn new(out: W) -> DryRun<W> {
        DryRun { out }
    }
}

impl<W: Write> Sink for DryRun<W> {
    async fn apply(&mut self, jobs: &[Job]) -> Result<Vec<JobResult>, SinkError> {
        for call in jobs.iter().flat_map(|job| &job.calls) {
            writeln!(self.out, "{}", call.to_redacted_json())?;
        }
        self.out.flush()?;
        Ok(vec![JobResult::Applied; jobs.len()])
    }
}
