//! Prints each planned call as one JSON line instead of sending it.

use super::{Sink, SinkError};
use crate::event::Event;
use crate::plan::Call;
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
    fn apply(&mut self, _event: &Event, calls: &[Call]) -> Result<(), SinkError> {
        for call in calls {
            writeln!(self.out, "{}", call.to_redacted_json())?;
        }
        self.out.flush()?;
        Ok(())
    }
}
