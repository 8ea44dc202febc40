//! The loop of `iotdr run`. Four parts run concurrently on the one runtime:
//!
//! - **ingest** reads a batch from the source, decodes it, completes it from
//!   the source region, and stores it in the state store's queue with the
//!   source's new position and the batch's dead letters, in one transaction;
//!   only then is the source acknowledged.
//! - **second reads** re-read, once they are due, the things and
//!   certificates ingest asked to look at again, and queue what they found.
//!   They run beside ingest, so a wave of them coming due never holds the
//!   live stream back.
//! - **apply** drains the queue in order: stages, plan, sink; what it
//!   finished leaves the queue together with its dead letters.
//! - **reconcile** (`[reconcile] every`, following runs only) compares the
//!   targets with the source now and then and queues the drift
//!   (`reconcile.rs`).
//!
//! The queue is the back-pressure: ingest waits while it holds
//! `queue_limit` events, so memory stays flat however long the backlog, and
//! a backlog read before a source outage is still applied during it.

use super::reconcile::Reconcile;
use super::reload::Reload;
use super::waiting::{Round, Waiting};
use super::{RunError, Summary, apply_events};
use crate::aws::{ReadPlan, SourceFetcher};
use crate::config;
use crate::context::ThingContext;
use crate::event::now_ms;
use crate::event::{Entity, Event, Operation, decode_line, related};
use crate::order;
use crate::pipeline::Pipeline;
use crate::sink::Sink;
use crate::source::Source;
use crate::state::queue::{Ingested, Recheck};
use crate::state::{DeadLetter, StateStore};
use std::cell::Cell;
use std::time::Duration;
use tokio::sync::Notify;

pub struct Options {
    /// Stop once the source has nothing more (and every re-read is done)
    /// instead of waiting for more.
    pub until_idle: bool,
    /// How long to wait before reading an idle source again.
    pub poll_interval: Duration,
    /// Re-read things and JITR certificates from the source this long after an
    /// event about them: AWS publishes no event when a certificate is
    /// activated or a principal attached. `None`: never.
    pub recheck_after: Option<Duration>,
    /// Ingest waits while the queue holds this many events.
    pub queue_limit: u64,
    /// An ingest read the source does not answer this long is left to a
    /// second read, so ingest keeps up during a source outage (with
    /// `recheck_after` only). `None`: it retries until the retry deadline.
    pub defer_reads_after: Option<Duration>,
    /// Compare the targets with the source now and then and queue the drift
    /// (a run that follows its source only).
    pub reconcile: Option<Reconcile>,
    /// Swap in changes of the pipeline file and its plug-ins while running.
    pub reload: Option<Reload>,
    /// Answers the admin endpoint's requests.
    pub admin: Option<AdminPart>,
}

/// The run loop's side of the admin endpoint: what the server asks, and
/// the limiter whose counts `/metrics` shows.
pub struct AdminPart {
    pub requests: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<crate::admin::Request>>,
    pub limiter: std::sync::Arc<crate::aws::Limiter>,
}

/// What the three parts tell each other.
#[derive(Default)]
struct Signals {
    /// Events were queued (apply waits for it).
    queued: Notify,
    /// Events left the queue (ingest waits for it at the queue limit).
    drained: Notify,
    /// Second reads were asked for, or ingest ended.
    asked: Notify,
    ingest_done: Cell<bool>,
    rechecks_done: Cell<bool>,
    /// Changes applied and dead letters made so far (the status line).
    changes: Cell<u64>,
    dead_letters: Cell<u64>,
    /// The plug-ins' counters after the last batch (`/metrics`).
    counters: std::cell::RefCell<Vec<(String, std::collections::BTreeMap<String, u64>)>>,
    /// The stages' event counts after the last batch (`/metrics`).
    stage_counts: std::cell::RefCell<Vec<(String, crate::pipeline::StageCounts)>>,
    /// Seconds from each event's source time to its batch leaving the queue.
    lag: crate::admin::LagHistogram,
    /// The largest lag of the last batch, in ms (`/status`).
    last_lag_ms: Cell<Option<u64>>,
}

/// How often a following run logs its status line (at `info`).
const STATUS_EVERY: Duration = Duration::from_secs(60);

/// Runs `pipeline` from `source` until the source is idle (or forever when following).
#[allow(clippy::too_many_arguments)]
pub async fn run<S: Source, K: Sink>(
    config: &config::Pipeline,
    store: &StateStore,
    source: &mut S,
    fetcher: Option<&SourceFetcher>,
    pipeline: &mut Pipeline,
    sink: &mut K,
    options: &Options,
    report: &dyn Fn(&DeadLetter),
) -> Result<Summary, RunError> {
    let signals = Signals::default();
    let ingest = Ingest { config, store, fetcher, options, signals: &signals, report };
    let apply = Apply { config, store, signals: &signals, report };
    let reconcile = async {
        match (&options.reconcile, options.until_idle) {
            (Some(reconcile), false) => {
                reconcile.run(config, store, &signals.queued, options.poll_interval, options.reload.as_ref()).await
            }
            _ => Ok(()),
        }
    };
    let parts = futures_util::future::try_join4(
        ingest.run(source),
        ingest.second_reads(),
        apply.run(pipeline, sink, options.reload.as_ref()),
        reconcile,
    );
    // Hot swap watches for as long as the other parts run.
    let watch = async {
        match &options.reload {
            Some(reload) => reload.watch().await,
            None => std::future::pending().await,
        }
    };
    let status = async {
        loop {
            tokio::time::sleep(STATUS_EVERY).await;
            tracing::info!(
                queued = store.queue_len().unwrap_or(0),
                changes = signals.changes.get(),
                dead_letters = signals.dead_letters.get(),
                waiting = store.waiting_count().unwrap_or(0),
                version = options.reload.as_ref().map_or(1, Reload::serving),
                "status"
            );
        }
    };
    let admin = async {
        match &options.admin {
            Some(admin) => answer_admin(admin, config, store, &signals, options.reload.as_ref()).await,
            None => std::future::pending().await,
        }
    };
    let (mut ingested, reread, applied, ()) = tokio::select! {
        parts = parts => parts?,
        () = admin => unreachable!("the admin part loops"),
        failed = watch => return Err(failed.err().unwrap_or_else(|| RunError::Reload("the watch ended".into()))),
        () = status => unreachable!("the status line loops"),
    };
    ingested.add(reread);
    ingested.add(applied);
    Ok(ingested)
}

/// `/status`'s dead letters per step: `{"fetch": 2, "stage router": 1}`.
fn dead_letters_by_step(store: &StateStore) -> serde_json::Map<String, serde_json::Value> {
    let counts = store.dead_letters_by_step().unwrap_or_default();
    counts
        .into_iter()
        .map(|(step, stage, count)| {
            (stage.map_or_else(|| step.clone(), |stage| format!("{step} {stage}")), count.into())
        })
        .collect()
}

/// Answers the admin endpoint from what the run owns, for as long as it runs.
async fn answer_admin(
    admin: &AdminPart,
    config: &config::Pipeline,
    store: &StateStore,
    signals: &Signals,
    reload: Option<&Reload>,
) {
    use crate::admin::Request;
    let mut requests = admin.requests.lock().await;
    while let Some(request) = requests.recv().await {
        match request {
            Request::Status(answer) => {
                let stages: Vec<serde_json::Value> = reload
                    .map(Reload::stages)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(name, plugin, sha256)| serde_json::json!({ "name": name, "plugin": plugin, "sha256": sha256 }))
                    .collect();
                let last = reload.and_then(Reload::last).map(|outcome| match outcome {
                    super::ReloadOutcome::Ready { version, rebuilt } => {
                        serde_json::json!({ "outcome": "ready", "version": version, "rebuilt": rebuilt })
                    }
                    super::ReloadOutcome::Refused { reason } => {
                        serde_json::json!({ "outcome": "refused", "reason": reason })
                    }
                });
                let _ = answer.send(serde_json::json!({
                    "pipeline": config.name,
                    "source_region": config.source_region,
                    "targets": config.targets,
                    "version": reload.map_or(1, Reload::serving),
                    "stages": stages,
                    "last_reload": last,
                    "queue_depth": store.queue_len().unwrap_or(0),
                    "dead_letters": store.dead_letter_count().unwrap_or(0),
                    "dead_letters_by_step": dead_letters_by_step(store),
                    "waiting_for_dependencies": store.waiting_count().unwrap_or(0),
                    "lag_seconds": signals.last_lag_ms.get().map(|ms| ms as f64 / 1000.0),
                    "changes_applied": signals.changes.get(),
                    "source_positions": store.checkpoints("").unwrap_or_default(),
                }));
            }
            Request::Metrics(answer) => {
                let counters = signals.counters.borrow();
                let stage_counts = signals.stage_counts.borrow();
                let gauges = crate::admin::Gauges {
                    stage_counts: &stage_counts,
                    calls: admin.limiter.all_stats(),
                    queue_depth: store.queue_len().unwrap_or(0),
                    waiting: store.waiting_count().unwrap_or(0),
                    dead_letters: store.dead_letter_count().unwrap_or(0),
                    dead_letters_by_step: store.dead_letters_by_step().unwrap_or_default(),
                    lag: &signals.lag,
                    changes: signals.changes.get(),
                    version: reload.map_or(1, Reload::serving),
                    stage_counters: &counters,
                };
                let _ = answer.send(crate::admin::render_metrics(&gauges));
            }
            Request::Reload(answer) => {
                let outcome = match reload.map(Reload::reload) {
                    None => serde_json::json!({ "outcome": "unavailable", "reason": "this run does not reload" }),
                    Some(None) => serde_json::json!({ "outcome": "unchanged" }),
                    Some(Some(super::ReloadOutcome::Ready { version, rebuilt })) => {
                        serde_json::json!({ "outcome": "ready", "version": version, "rebuilt": rebuilt })
                    }
                    Some(Some(super::ReloadOutcome::Refused { reason })) => {
                        serde_json::json!({ "outcome": "refused", "reason": reason })
                    }
                };
                let _ = answer.send(outcome);
            }
        }
    }
    // The server is gone: nothing more to answer.
    std::future::pending::<()>().await;
}

struct Ingest<'a> {
    config: &'a config::Pipeline,
    store: &'a StateStore,
    fetcher: Option<&'a SourceFetcher>,
    options: &'a Options,
    signals: &'a Signals,
    report: &'a dyn Fn(&DeadLetter),
}

impl Ingest<'_> {
    async fn run<S: Source>(&self, source: &mut S) -> Result<Summary, RunError> {
        let mut summary = Summary::default();
        loop {
            while self.store.queue_len()? >= self.options.queue_limit {
                self.signals.drained.notified().await;
            }
            let batch = source.read(self.config.batch_size).await?;
            if batch.records.is_empty() {
                if self.options.until_idle && source.idle() {
                    break;
                }
                tokio::time::sleep(self.options.poll_interval).await;
                continue;
            }
            summary.records += batch.records.len() as u64;
            let mut events = Vec::with_capacity(batch.records.len());
            let mut dead = Vec::new();
            let mut context = ThingContext::new(self.store);
            for record in batch.records {
                match decode_line(&record.text, &self.config.source_region) {
                    Ok(mut event) => {
                        context.enrich(&mut event)?;
                        events.push(event);
                    }
                    Err(e) => dead.push(DeadLetter::for_record(e.to_string(), &record.text, record.origin)),
                }
            }
            let mut rechecks = Vec::new();
            if let Some(fetcher) = self.fetcher {
                // One "now" for both: an event the fetch leaves to its second
                // read is one `rechecks_for` schedules a second read for.
                let now = now_ms();
                let after_ms = self.options.recheck_after.map(|after| after.as_millis() as u64);
                let plan = ReadPlan {
                    store: self.store,
                    targets: &self.config.targets,
                    second_reads_from_ms: after_ms.map(|after| now.saturating_sub(after)),
                    defer_after: after_ms.and(self.options.defer_reads_after),
                };
                let completed = fetcher.complete(events, Some(&plan)).await;
                dead.extend(completed.dead_letters);
                events = completed.events;
                if let Some(after_ms) = after_ms {
                    rechecks = rechecks_for(&events, now, after_ms);
                    // A deferred JITR certificate is read again later too: it may be activated after its read.
                    rechecks.extend(rechecks_for(&completed.deferred, now, after_ms));
                }
                // Due at once: the second reads retry them until the source answers.
                summary.deferred_reads += completed.deferred.len() as u64;
                let deferred: Vec<Recheck> =
                    completed.deferred.into_iter().filter_map(|event| deferred_read(event, now, &rechecks)).collect();
                rechecks.extend(deferred);
            }
            self.store.ingest(&Ingested {
                events: &events,
                dead_letters: &dead,
                checkpoints: &batch.checkpoints,
                rechecks: &rechecks,
                thing_attributes: &context.learned(),
            })?;
            if let Some(fetcher) = self.fetcher {
                fetcher.carry(&events);
            }
            report_dead(self.report, &dead, &mut summary);
            source.acknowledge().await?;
            self.signals.queued.notify_one();
            if !rechecks.is_empty() {
                self.signals.asked.notify_one();
            }
        }
        self.signals.ingest_done.set(true);
        self.signals.queued.notify_one();
        self.signals.asked.notify_one();
        Ok(summary)
    }
}

/// The second reads, beside ingest: they share its wiring.
impl Ingest<'_> {
    /// Makes the second reads as they come due. Until idle, it ends once
    /// ingest has and none is pending.
    async fn second_reads(&self) -> Result<Summary, RunError> {
        let mut summary = Summary::default();
        if let Some(fetcher) = self.fetcher {
            loop {
                self.due(fetcher, &mut summary).await?;
                // "Done" first: what ingest asked for before saying so is stored then.
                let ingest_done = self.signals.ingest_done.get();
                match self.store.next_recheck_ms()? {
                    None if ingest_done => break,
                    None => self.signals.asked.notified().await,
                    Some(due) => {
                        let wait = Duration::from_millis(due.saturating_sub(now_ms()));
                        // Woken early by a new ask: it may be due sooner.
                        let _ = tokio::time::timeout(wait, self.signals.asked.notified()).await;
                    }
                }
            }
        }
        self.signals.rechecks_done.set(true);
        self.signals.queued.notify_one();
        Ok(summary)
    }

    /// Re-reads what is due from the source and queues what it found.
    async fn due(&self, fetcher: &SourceFetcher, summary: &mut Summary) -> Result<(), RunError> {
        loop {
            let due = self.store.due_rechecks(now_ms(), self.config.batch_size)?;
            if due.is_empty() {
                return Ok(());
            }
            // Concurrently, as at ingest; results in the order they were due.
            let (events, dead) = fetcher.rereads(&due).await;
            let after_ms = self.options.recheck_after.map_or(0, |after| after.as_millis() as u64);
            self.store.rechecked(&due, &events, &dead, after_ms)?;
            fetcher.carry(&events);
            summary.rechecks += due.len() as u64;
            report_dead(self.report, &dead, summary);
            self.signals.queued.notify_one();
        }
    }
}

fn report_dead(report: &dyn Fn(&DeadLetter), dead: &[DeadLetter], summary: &mut Summary) {
    for letter in dead {
        report(letter);
    }
    summary.dead_letters += dead.len() as u64;
}

/// The re-reads a batch asks for: every thing created or updated (its
/// principals may be attached after the event), every certificate a JITR
/// event announced (it is activated after it) and every certificate a thing
/// event named (its status may have changed without an event). Each is due
/// `after_ms` after its event. An event older than that (a backlog) needs
/// none: the read at ingest, made now, already came that long after it; so
/// does an event without a time.
fn rechecks_for(events: &[Event], now_ms: u64, after_ms: u64) -> Vec<Recheck> {
    let mut rechecks: Vec<Recheck> = Vec::new();
    let mut add = |kind: &str, name: &str, cause: &Event| {
        let due_ms = cause.timestamp_ms.saturating_add(after_ms);
        if cause.timestamp_ms == 0 || due_ms <= now_ms {
            return;
        }
        rechecks.retain(|r| !(r.kind == kind && r.name == name));
        rechecks.push(Recheck { kind: kind.into(), name: name.into(), due_ms, cause: cause.clone() });
    };
    for event in events {
        match (event.entity, event.operation) {
            (Entity::Thing, Operation::Created | Operation::Updated) => {
                add("thing", &event.name, event);
                for (kind, principal) in &event.related {
                    if kind == related::PRINCIPAL {
                        add("certificate", principal, event);
                    }
                }
            }
            (Entity::Certificate, Operation::Created) if event.related(related::CA_CERTIFICATE).is_some() => {
                add("certificate", &event.name, event);
            }
            _ => {}
        }
    }
    rechecks
}

/// The second read that completes an event ingest could not: a thing is
/// read again whole (its event was queued as it came), unless `asked`
/// already holds a later one (a read now would take that one's place, and
/// see less); anything else is completed then, as itself, under a key of
/// its own so that no later re-read replaces it.
fn deferred_read(event: Event, now_ms: u64, asked: &[Recheck]) -> Option<Recheck> {
    let (kind, name) = match event.entity {
        Entity::Thing if asked.iter().any(|r| r.kind == "thing" && r.name == event.name) => return None,
        Entity::Thing => ("thing".to_string(), event.name.clone()),
        entity => (
            crate::aws::DEFERRED.to_string(),
            format!("{} {} {} {}", entity.as_str(), event.name, event.timestamp_ms, event.id),
        ),
    };
    Some(Recheck { kind, name, due_ms: now_ms, cause: event })
}

struct Apply<'a> {
    config: &'a config::Pipeline,
    store: &'a StateStore,
    signals: &'a Signals,
    report: &'a dyn Fn(&DeadLetter),
}

impl Apply<'_> {
    async fn run<K: Sink>(
        &self,
        pipeline: &mut Pipeline,
        sink: &mut K,
        reload: Option<&Reload>,
    ) -> Result<Summary, RunError> {
        let mut summary = Summary::default();
        let mut waiting = Waiting::new(self.config, self.store)?;
        loop {
            self.signals.changes.set(summary.changes);
            // Between batches: a batch runs whole under one version.
            if let Some(reload) = reload {
                reload.swap_into(pipeline);
            }
            // Read "done" first: what was stored before saying so is in the queue then.
            let done = self.signals.ingest_done.get() && self.signals.rechecks_done.get();
            let queued = self.store.queued(0, self.config.batch_size)?;
            let Some(&(through, _)) = queued.last() else {
                if done {
                    // Nothing more will come: what waits goes through now (one
                    // change may create what another needs), or never will.
                    if waiting.next_due().is_some() {
                        loop {
                            let tried = waiting.retry(pipeline, sink, &mut summary, Round::Ending).await?;
                            self.made_dead_letters(&tried.dead, &mut summary);
                            if tried.settled == 0 {
                                break;
                            }
                        }
                        let tried = waiting.retry(pipeline, sink, &mut summary, Round::Last).await?;
                        self.made_dead_letters(&tried.dead, &mut summary);
                    }
                    return Ok(summary);
                }
                match waiting.next_due() {
                    Some(due) => {
                        tokio::select! {
                            () = self.signals.queued.notified() => {}
                            () = tokio::time::sleep_until(due.into()) => {
                                let tried = waiting.retry(pipeline, sink, &mut summary, Round::Due).await?;
                                self.made_dead_letters(&tried.dead, &mut summary);
                            }
                        }
                    }
                    None => self.signals.queued.notified().await,
                }
                continue;
            };
            let events: Vec<Event> = queued.into_iter().map(|(_, event)| event).collect();
            let source_times: Vec<u64> = events.iter().map(|e| e.timestamp_ms).filter(|&ms| ms > 0).collect();
            // What the batch may create (a stage may drop one: a waiting change is then tried for nothing).
            let creations: Vec<String> = events.iter().filter_map(order::creates).collect();
            // A halt leaves the batch in the queue: the next run applies it first.
            let count = events.len();
            let changes = summary.changes;
            let mut waits = Vec::new();
            let parking = waiting.parking(&mut waits);
            let dead = apply_events(self.config, pipeline, sink, 0, events, &mut summary, Some(parking)).await?;
            self.store.applied(through, &dead, &waits)?;
            waiting.added(&waits);
            let lag_ms = self.signals.lag.observe_since(&source_times, crate::event::now_ms());
            if lag_ms.is_some() {
                self.signals.last_lag_ms.set(lag_ms);
            }
            tracing::debug!(
                events = count,
                changes = summary.changes - changes,
                dead_letters = dead.len(),
                waiting = waits.len(),
                through,
                lag_ms,
                version = reload.map_or(1, Reload::serving),
                "batch applied"
            );
            *self.signals.counters.borrow_mut() = pipeline.counters();
            *self.signals.stage_counts.borrow_mut() = pipeline.stage_counts();
            self.made_dead_letters(&dead, &mut summary);
            self.signals.drained.notify_one();
            // What this batch created may be what a waiting change needs.
            waiting.arrived(&creations);
            if waiting.next_due().is_some_and(|due| due <= std::time::Instant::now()) {
                let tried = waiting.retry(pipeline, sink, &mut summary, Round::Due).await?;
                self.made_dead_letters(&tried.dead, &mut summary);
            }
        }
    }

    fn made_dead_letters(&self, dead: &[DeadLetter], summary: &mut Summary) {
        self.signals.dead_letters.set(self.signals.dead_letters.get() + dead.len() as u64);
        report_dead(self.report, dead, summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn things_and_jitr_certificates_are_looked_at_again_once_each() {
        let at = |entity, operation, name: &str, ms| {
            let mut event = Event::new(entity, operation, name);
            event.timestamp_ms = ms;
            event
        };
        let mut thing = at(Entity::Thing, Operation::Created, "t", 1_000);
        thing.related.push((related::PRINCIPAL.into(), "c1".into()));
        let mut updated = thing.clone();
        updated.operation = Operation::Updated;
        updated.timestamp_ms = 1_500;
        let mut jitr = at(Entity::Certificate, Operation::Created, "c2", 1_000);
        jitr.set_related(related::CA_CERTIFICATE, Some("ca".into()));
        let fetched = at(Entity::Certificate, Operation::Created, "c3", 1_000);
        let shadow = at(Entity::Shadow, Operation::Updated, "t", 1_000);
        let old = at(Entity::Thing, Operation::Created, "backlog", 10);
        let untimed = at(Entity::Thing, Operation::Created, "untimed", 0);
        let rechecks = rechecks_for(&[thing, updated, jitr, fetched, shadow, old, untimed], 1_200, 500);
        let names: Vec<(&str, &str)> = rechecks.iter().map(|r| (r.kind.as_str(), r.name.as_str())).collect();
        assert_eq!(names, [("thing", "t"), ("certificate", "c1"), ("certificate", "c2")]);
        assert_eq!(rechecks[0].cause.operation, Operation::Updated, "the latest event about it is the cause");
        assert_eq!(rechecks[0].due_ms, 2_000, "due a while after its event");
    }
}
