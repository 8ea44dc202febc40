//! Drives one pipeline: reads records from the source, decodes them, runs them
//! through the stages, plans the calls per target region and hands them to
//! the sink. Every record ends applied, dropped by a stage, or dead-lettered.

use crate::config;
use crate::event::{Entity, Event, decode_line};
use crate::pipeline::{Halted, Pipeline};
use crate::plan::plan;
use crate::sink::{Job, JobResult, Sink, SinkError};
use crate::source::FileSource;
use crate::state::{DeadLetter, StateStore, Step};
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
    #[error("{0}")]
    State(String),
}

/// Counts of what a run did.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub records: u64,
    /// Events that reached at least one target, per entity.
    pub applied: BTreeMap<String, u64>,
    /// Changes made: applied events counted once per target region.
    pub changes: u64,
    /// Planned calls of the applied changes (what a dry run prints).
    pub calls: u64,
    pub dropped: u64,
    /// Events of entities `apply.replicate` leaves out.
    pub not_replicated: u64,
    pub skipped_stages: u64,
    /// Changes older than what the target already had (the ledger): skipped.
    pub stale: u64,
    pub dead_letters: u64,
}

impl Summary {
    pub fn applied_events(&self) -> u64 {
        self.applied.values().sum()
    }
}

/// Completes decoded events from the source region (see `aws::SourceFetcher`):
/// returns the events, with any it needs before them, and those it could not complete.
pub type Complete<'a> = dyn FnMut(Vec<Event>) -> (Vec<Event>, Vec<DeadLetter>) + 'a;

pub struct Options<'a> {
    /// Stop when the source has nothing more instead of waiting for more.
    pub until_idle: bool,
    pub poll_interval: Duration,
    /// Fetch what events lack from the source region; `None` applies them as they are.
    pub complete: Option<Box<Complete<'a>>>,
}

/// Runs `pipeline` over a file source until it is idle (or forever when following).
pub fn run_file(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    source: &mut FileSource,
    sink: &mut dyn Sink,
    dead_letters: &mut dyn FnMut(&DeadLetter) -> std::io::Result<()>,
    options: &mut Options,
) -> Result<Summary, RunError> {
    let mut summary = Summary::default();
    let mut context = crate::context::ThingContext::default();
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
                Ok(mut event) => {
                    context.enrich(&mut event);
                    events.push(event);
                }
                Err(e) => dead.push(DeadLetter::for_record(e.to_string(), &record.text, record.origin)),
            }
        }
        if let Some(complete) = options.complete.as_mut() {
            let (completed, failed) = complete(events);
            dead.extend(failed);
            events = completed;
        }
        // A halt still keeps the letters the batch made before it (decode, fetch).
        let halted = match apply_events(config, pipeline, sink, 0, events, &mut summary) {
            Ok(more) => {
                dead.extend(more);
                None
            }
            Err(e) => Some(e),
        };
        for letter in &dead {
            dead_letters(letter).map_err(RunError::DeadLetter)?;
        }
        summary.dead_letters += dead.len() as u64;
        if let Some(e) = halted {
            return Err(e);
        }
    }
}

/// Runs decoded events through the stages from `first_stage` on, plans them
/// and applies them; returns the dead letters of the batch.
pub fn apply_events(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    sink: &mut dyn Sink,
    first_stage: usize,
    events: Vec<Event>,
    summary: &mut Summary,
) -> Result<Vec<DeadLetter>, RunError> {
    let mut dead = Vec::new();
    let processed = pipeline.process_from(first_stage, events)?;
    summary.dropped += processed.dropped.len() as u64;
    summary.skipped_stages += processed.skipped as u64;
    dead.extend(processed.dead_letters);
    let mut jobs = Vec::new();
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
        for region in &event.targets {
            // A stage may name any region; only the pipeline's targets are written to.
            if !config.targets.contains(region) {
                let reason =
                    format!("target {region} is not one of the pipeline's targets ({})", config.targets.join(", "));
                dead.push(DeadLetter::for_event(Step::Plan, reason, for_region(&event, region)));
                continue;
            }
            match plan(&event, region) {
                Ok(calls) => jobs.push(Job { event: event.clone(), region: region.clone(), calls }),
                Err(e) => {
                    dead.push(DeadLetter::for_event(Step::Plan, format!("{region}: {e}"), for_region(&event, region)))
                }
            }
        }
    }
    let results = sink.apply(&jobs)?;
    let mut applied_ids = std::collections::HashSet::new();
    for (job, result) in jobs.into_iter().zip(results) {
        match result {
            JobResult::Applied => {
                summary.changes += 1;
                summary.calls += job.calls.len() as u64;
                if applied_ids.insert((job.event.id.clone(), job.event.name.clone(), job.event.entity)) {
                    *summary.applied.entry(entity_key(job.event.entity)).or_default() += 1;
                }
            }
            JobResult::Stale => summary.stale += 1,
            JobResult::Failed(reason) => {
                let mut event = job.event;
                // A replay retries this region only; the others have it.
                event.targets = vec![job.region.clone()];
                dead.push(DeadLetter::for_event(Step::Apply, format!("{}: {reason}", job.region), event));
            }
        }
    }
    Ok(dead)
}

fn for_region(event: &crate::event::Event, region: &str) -> crate::event::Event {
    let mut event = event.clone();
    event.targets = vec![region.to_string()];
    event
}

/// What `dead-letters replay` did.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Letters whose change went through this time; they are removed.
    pub replayed: u64,
    /// Letters that failed again; they are kept, with the new reason.
    pub still_failing: u64,
    pub summary: Summary,
}

/// Replays stored dead letters (those in `ids`, or all): each re-enters the
/// pipeline where it left it (a stage, planning or applying; an undecodable
/// record is decoded again).
pub fn replay(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    sink: &mut dyn Sink,
    store: &StateStore,
    ids: Option<&[i64]>,
    complete: &mut Complete,
) -> Result<ReplayReport, RunError> {
    let mut report = ReplayReport::default();
    let state = |e: crate::state::StateError| RunError::State(e.to_string());
    for stored in store.dead_letters().map_err(state)? {
        if ids.is_some_and(|ids| !ids.contains(&stored.id)) {
            continue;
        }
        let letter = &stored.letter;
        // (first stage, event, whether it still needs what the source adds at ingest)
        let entry = match (&letter.step, &letter.event, &letter.record) {
            (Step::Decode, _, Some(record)) => match decode_line(record, &config.source_region) {
                Ok(event) => Ok((0, event, true)),
                Err(e) => Err(e.to_string()),
            },
            (Step::Fetch, Some(event), _) => Ok((0, event.clone(), true)),
            (Step::Plan | Step::Apply, Some(event), _) => Ok((usize::MAX, event.clone(), false)),
            (Step::Stage(stage), Some(event), _) => match pipeline.stage_index(stage) {
                Some(index) => Ok((index, event.clone(), false)),
                None => Err(format!("stage `{stage}` is no longer in the pipeline")),
            },
            _ => Err("nothing to replay: the letter holds neither an event nor a record".to_string()),
        };
        let dead = match entry {
            Ok((first_stage, event, incomplete)) => {
                let (events, mut dead) = if incomplete {
                    complete(vec![event])
                } else if event.entity == Entity::Certificate
                    && event.operation == crate::event::Operation::Created
                    && !crate::aws::carries_pem(&event)
                {
                    // Stored without its PEM (letters from before PEMs were
                    // kept): fetch the PEM, and only that, since the event
                    // re-enters past the stages that saw what came with it.
                    let (name, id) = (event.name.clone(), event.id.clone());
                    let (completed, failed) = complete(vec![event]);
                    let certificate = completed
                        .into_iter()
                        .filter(|e| e.entity == Entity::Certificate && e.name == name && e.id == id);
                    (certificate.collect(), failed)
                } else {
                    (vec![event], Vec::new())
                };
                dead.extend(apply_events(config, pipeline, sink, first_stage, events, &mut report.summary)?);
                dead
            }
            Err(reason) => {
                tracing::warn!(id = stored.id, "dead letter not replayable: {reason}");
                report.still_failing += 1;
                continue;
            }
        };
        store.remove_dead_letters(Some(&[stored.id])).map_err(state)?;
        if dead.is_empty() {
            report.replayed += 1;
        } else {
            report.still_failing += 1;
            for letter in &dead {
                store.add_dead_letter(letter).map_err(state)?;
            }
        }
    }
    Ok(report)
}

fn entity_key(entity: Entity) -> String {
    entity.as_str().to_string()
}
