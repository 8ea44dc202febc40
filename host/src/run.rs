//! Drives one pipeline: reads records from the source, decodes them, runs them
//! through the stages, plans the calls per target region and hands them to
//! the sink. Every record ends applied, dropped by a stage, or dead-lettered.

use crate::config;
use crate::event::{Entity, decode_line};
use crate::pipeline::{Halted, Pipeline};
use crate::plan::plan;
use crate::sink::{Sink, SinkError};
use crate::source::FileSource;
use crate::state::DeadLetter;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("reading {path}: {source}")]
    Source { path: String, source: std::io::Error },
    #[error(transparent)]
    Halted(#[from] Halted),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("storing a dead letter: {0}")]
    DeadLetter(std::io::Error),
}

/// Counts of what a run did.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub records: u64,
    /// Events that reached the targets, per entity.
    pub applied: BTreeMap<String, u64>,
    pub calls: u64,
    pub dropped: u64,
    /// Events of entities `apply.replicate` leaves out.
    pub not_replicated: u64,
    pub skipped_stages: u64,
    pub dead_letters: u64,
}

impl Summary {
    pub fn applied_events(&self) -> u64 {
        self.applied.values().sum()
    }
}

pub struct Options {
    /// Stop when the source has nothing more instead of waiting for more.
    pub until_idle: bool,
    pub poll_interval: Duration,
}

/// Runs `pipeline` over a file source until it is idle (or forever when following).
pub fn run_file(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    source: &mut FileSource,
    sink: &mut dyn Sink,
    dead_letters: &mut dyn FnMut(&DeadLetter) -> std::io::Result<()>,
    options: &Options,
) -> Result<Summary, RunError> {
    let mut summary = Summary::default();
    loop {
        let records = source
            .next_batch(config.batch_size, options.until_idle)
            .map_err(|e| RunError::Source { path: source.path().display().to_string(), source: e })?;
        if records.is_empty() {
            if options.until_idle {
                return Ok(summary);
            }
            std::thread::sleep(options.poll_interval);
            continue;
        }
        summary.records += records.len() as u64;
        let mut events = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        for record in records {
            match decode_line(&record.text, &config.source_region) {
                Ok(event) => events.push(event),
                Err(e) => dead.push(DeadLetter::for_record(e.to_string(), &record.text, record.origin)),
            }
        }
        let processed = pipeline.process(events)?;
        summary.dropped += processed.dropped.len() as u64;
        summary.skipped_stages += processed.skipped as u64;
        dead.extend(processed.dead_letters);
        for event in processed.events {
            if !config.apply.replicate.contains(&event.entity) {
                summary.not_replicated += 1;
                continue;
            }
            if event.targets.is_empty() {
                // A router chose no region: as good as dropped.
                tracing::debug!(event = %event.id, "no target region left; not applied");
                summary.dropped += 1;
                continue;
            }
            let mut applied = false;
            for region in &event.targets {
                match plan(&event, region) {
                    Ok(calls) => {
                        sink.apply(&event, &calls)?;
                        summary.calls += calls.len() as u64;
                        applied = true;
                    }
                    Err(e) => {
                        dead.push(DeadLetter::for_event("plan", format!("{region}: {e}"), event.clone()));
                    }
                }
            }
            if applied {
                *summary.applied.entry(entity_key(event.entity)).or_default() += 1;
            }
        }
        for letter in &dead {
            dead_letters(letter).map_err(RunError::DeadLetter)?;
        }
        summary.dead_letters += dead.len() as u64;
    }
}

fn entity_key(entity: Entity) -> String {
    entity.as_str().to_string()
}
