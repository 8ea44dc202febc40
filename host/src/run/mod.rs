//! Running a pipeline: `driver` is the loop of `iotdr run` (ingest from the
//! source into the state store's queue, apply from the queue, concurrently),
//! `replay` sends dead letters back in. Both hand decoded events to
//! [`apply_events`]: stages, plan, sink. `reconcile` and `reload` (hot
//! swap) are parts of the run loop.

mod driver;
mod reconcile;
mod reload;
mod replay;
mod waiting;

pub use driver::{AdminPart, Options, run};
pub use reconcile::Reconcile;
pub use reload::{Outcome as ReloadOutcome, Reload};
pub use replay::{ReplayReport, replay};

use crate::config;
use crate::event::{Entity, Event};
use crate::pipeline::{Halted, Pipeline};
use crate::plan::plan;
use crate::sink::{Job, JobResult, Sink, SinkError};
use crate::source::SourceError;
use crate::state::ledger::entity_in;
use crate::state::{DeadLetter, StateError, Step};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Halted(#[from] Halted),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("hot swap: {0}")]
    Reload(String),
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
    /// Changes that found something they need missing in a target and
    /// waited for it (each time they did).
    pub waited: u64,
    pub dead_letters: u64,
    /// Second reads of things and certificates from the source (see `Options::recheck_after`).
    pub rechecks: u64,
    /// Events whose ingest reads the source did not answer in time, left to
    /// a second read (see `Options::defer_reads_after`).
    pub deferred_reads: u64,
}

impl Summary {
    pub fn applied_events(&self) -> u64 {
        self.applied.values().sum()
    }

    fn add(&mut self, other: Summary) {
        self.records += other.records;
        for (entity, count) in other.applied {
            *self.applied.entry(entity).or_default() += count;
        }
        self.changes += other.changes;
        self.calls += other.calls;
        self.dropped += other.dropped;
        self.not_replicated += other.not_replicated;
        self.skipped_stages += other.skipped_stages;
        self.stale += other.stale;
        self.waited += other.waited;
        self.dead_letters += other.dead_letters;
        self.rechecks += other.rechecks;
        self.deferred_reads += other.deferred_reads;
    }
}

/// Where a run puts the changes that wait for something they need in a target.
pub struct Parking<'a> {
    /// (region, ledger key) of the changes waiting already: a later change
    /// of the same key waits behind them instead of overtaking them (a
    /// shadow report carries only what changed: the older one, applied
    /// after, would be stale, and what it changed lost).
    pub held: &'a HashSet<(String, String)>,
    /// The changes that began to wait, as the letters they would become.
    pub waits: &'a mut Vec<DeadLetter>,
}

/// Runs decoded events through the stages from `first_stage` on, plans them
/// and applies them; returns the dead letters of the batch. A change that
/// finds something it needs missing in its region goes to `parking` (as the
/// letter it would become), or, without one, is a dead letter too.
pub async fn apply_events<S: Sink>(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    sink: &mut S,
    first_stage: usize,
    events: Vec<Event>,
    summary: &mut Summary,
    mut parking: Option<Parking<'_>>,
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
            if let Some(parking) = parking.as_mut()
                && entity_in(&event, region).is_some_and(|key| parking.held.contains(&key))
            {
                summary.waited += 1;
                let reason = format!("{region}: behind an earlier change of the same entity that waits");
                parking.waits.push(DeadLetter::for_event(Step::Apply, reason, for_region(&event, region)));
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
    let results = sink.apply(&jobs).await?;
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
            JobResult::Failed(reason) => dead.push(apply_letter(reason, job)),
            JobResult::Waiting(reason) => match parking.as_mut() {
                Some(parking) => {
                    summary.waited += 1;
                    parking.waits.push(apply_letter(reason, job));
                }
                None => dead.push(apply_letter(reason, job)),
            },
        }
    }
    Ok(dead)
}

/// The letter of a change its region refused (or that waits there): a
/// replay retries this region only; the others have it.
fn apply_letter(reason: String, job: Job) -> DeadLetter {
    DeadLetter::for_event(Step::Apply, format!("{}: {reason}", job.region), job.into_region())
}

fn for_region(event: &Event, region: &str) -> Event {
    let mut event = event.clone();
    event.targets = vec![region.to_string()];
    event
}

fn entity_key(entity: Entity) -> String {
    entity.as_str().to_string()
}
