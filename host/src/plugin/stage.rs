//! One running pipeline stage: a plug-in instance with its limits, reused for
//! a bounded number of batches, and the rules for what a failing call means.

use super::batch::Batch;
use super::bindings::{BatchHandle, Outcome, Stage, StoreState};
use super::engine::{EPOCH_TICK, Plugin};
use crate::event::{Entity, Event};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{Store, StoreLimitsBuilder, Trap};
use wasmtime_wasi::WasiCtxBuilder;

#[derive(Debug, Clone, PartialEq)]
pub struct StageLimits {
    /// Linear memory a plug-in instance may use; also bounds what one call may add to events.
    pub memory_bytes: usize,
    /// Wall-clock time one `process` call may take.
    pub timeout: Duration,
    /// After this many batches an instance is replaced by a fresh one, so a
    /// slowly leaking plug-in cannot grow without bound.
    pub batches_per_instance: u32,
    /// Extra attempts for events a stage failed with `retryable: true`.
    pub retries: u32,
}

impl Default for StageLimits {
    fn default() -> Self {
        StageLimits {
            memory_bytes: 64 << 20,
            timeout: Duration::from_millis(500),
            batches_per_instance: 1000,
            retries: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot instantiate the plug-in: {0}")]
    Instantiate(String),
    #[error("the plug-in rejected its config: {0}")]
    Config(String),
    #[error("init failed: {0}")]
    Init(String),
}

/// What became of one event that entered a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Passed on: the event itself, changed or not.
    Kept(Event),
    /// Replaced by the events it was split into (possibly none).
    Split(Vec<Event>),
    /// Dropped by the stage on purpose, with its reason.
    Dropped(Event, String),
    /// The stage failed on it; the event is as it entered the stage.
    Failed(Event, String),
}

pub struct StageRunner {
    name: Arc<str>,
    plugin: Arc<Plugin>,
    config: String,
    limits: StageLimits,
    /// Which entities the plug-in asked for, indexed like [`Entity::ALL`].
    wants: [bool; Entity::ALL.len()],
    live: Option<Live>,
    /// Counters from instances already retired.
    retired_counters: BTreeMap<String, u64>,
}

struct Live {
    store: Store<StoreState>,
    stage: Stage,
    batches: u32,
}

impl StageRunner {
    /// Instantiates the plug-in and runs its `init` with `config` (JSON), so a
    /// bad config is reported before any event flows.
    pub fn start(
        name: &str,
        plugin: Arc<Plugin>,
        config: String,
        limits: StageLimits,
    ) -> Result<StageRunner, StartError> {
        let mut runner = StageRunner {
            name: name.into(),
            plugin,
            config,
            limits,
            wants: [true; Entity::ALL.len()],
            live: None,
            retired_counters: BTreeMap::new(),
        };
        runner.instantiate()?;
        Ok(runner)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// The plug-in's counters so far.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut all = self.retired_counters.clone();
        if let Some(live) = &self.live {
            for (k, v) in &live.store.data().counters {
                *all.entry(k.clone()).or_default() += v;
            }
        }
        all
    }

    fn instantiate(&mut self) -> Result<(), StartError> {
        self.retire();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .instances(8)
            .tables(16)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let wasi = WasiCtxBuilder::new().allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false).build();
        let state = StoreState {
            batch: Batch::default(),
            wasi,
            table: ResourceTable::new(),
            limits,
            stage: self.name.clone(),
            counters: BTreeMap::new(),
            last_error: None,
        };
        let mut store = Store::new(self.plugin.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let stage = self
            .plugin
            .pre
            .instantiate(&mut store)
            .map_err(|e| StartError::Instantiate(describe(&e, &store, &self.limits)))?;
        store.set_epoch_deadline(self.deadline_ticks());
        let registration = match stage.call_init(&mut store, &self.config) {
            Ok(Ok(registration)) => registration,
            Ok(Err(message)) => return Err(StartError::Config(message)),
            Err(e) => return Err(StartError::Init(describe(&e, &store, &self.limits))),
        };
        self.wants = if registration.entities.is_empty() {
            [true; Entity::ALL.len()]
        } else {
            let mut wants = [false; Entity::ALL.len()];
            for entity in registration.entities {
                wants[Entity::from(entity) as usize] = true;
            }
            wants
        };
        self.live = Some(Live { store, stage, batches: 0 });
        Ok(())
    }

    fn retire(&mut self) {
        if let Some(live) = self.live.take() {
            for (k, v) in live.store.into_data().counters {
                *self.retired_counters.entry(k).or_default() += v;
            }
        }
    }

    fn deadline_ticks(&self) -> u64 {
        // +1: the tick in progress when the call starts may be nearly over.
        (self.limits.timeout.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64 + 1
    }

    /// Runs `events` through the stage. Returns one [`Fate`] per event, in order.
    /// Events of entities the stage did not ask for pass untouched.
    pub fn process(&mut self, events: Vec<Event>) -> Vec<Fate> {
        if events.iter().all(|e| self.wants[e.entity as usize]) {
            return self.run(events);
        }
        let mut fates: Vec<Option<Fate>> = Vec::with_capacity(events.len());
        let mut wanted = Vec::new();
        for event in events {
            if self.wants[event.entity as usize] {
                wanted.push(event);
                fates.push(None);
            } else {
                fates.push(Some(Fate::Kept(event)));
            }
        }
        let mut results = self.run(wanted).into_iter();
        fates.into_iter().map(|fate| fate.or_else(|| results.next()).expect("one fate per wanted event")).collect()
    }

    /// Like [`StageRunner::process`], for a pipeline whose `next` batch is
    /// still empty. In the common cases (every event kept, or some dropped and
    /// the rest kept) the kept events go straight into `next` and only the
    /// dropped ones come back as fates. Otherwise `next` is left alone and
    /// every fate comes back in order, as `process` gives them: a failed event
    /// a pipeline skips past must keep its place among the others.
    pub fn process_into(&mut self, events: Vec<Event>, next: &mut Vec<Event>) -> Vec<Fate> {
        debug_assert!(next.is_empty(), "the fast path hands the batch on whole");
        if events.is_empty() || !events.iter().all(|e| self.wants[e.entity as usize]) {
            return self.process(events);
        }
        match self.call(events) {
            Ok(Called::AllKept(events)) => {
                *next = events;
                Vec::new()
            }
            Ok(Called::InPlace(events, outcomes, retry))
                if retry.is_empty() && !outcomes.iter().any(|o| matches!(o, Outcome::Fail(_))) =>
            {
                let mut dropped = Vec::new();
                for (event, outcome) in events.into_iter().zip(outcomes) {
                    match outcome {
                        Outcome::Keep => next.push(event),
                        other => dropped.push(fate_of(event, other)),
                    }
                }
                dropped
            }
            Ok(called) => self.retry_retryable(called.into_fates()),
            Err((events, reason)) => self.bisect(events, reason),
        }
    }

    /// Runs a batch; if the call fails as a whole, splits the batch in halves
    /// and runs each, so only the events that make the plug-in fail are failed.
    fn run(&mut self, events: Vec<Event>) -> Vec<Fate> {
        if events.is_empty() {
            return Vec::new();
        }
        match self.call(events) {
            Ok(called) => self.retry_retryable(called.into_fates()),
            Err((events, reason)) => self.bisect(events, reason),
        }
    }

    /// After a call failed as a whole: each half on its own, down to the
    /// single events that make it fail.
    fn bisect(&mut self, mut events: Vec<Event>, reason: String) -> Vec<Fate> {
        if events.len() == 1 {
            return vec![Fate::Failed(events.pop().expect("one event"), reason)];
        }
        let second = events.split_off(events.len() / 2);
        let mut fates = self.run(events);
        fates.extend(self.run(second));
        fates
    }

    fn retry_retryable(&mut self, (mut fates, mut retry): (Vec<Fate>, Vec<usize>)) -> Vec<Fate> {
        for attempt in 0..self.limits.retries {
            if retry.is_empty() {
                break;
            }
            tracing::debug!(
                stage = &*self.name,
                attempt,
                events = retry.len(),
                "retrying events the stage failed as retryable"
            );
            let mut still = Vec::new();
            for index in retry {
                let Fate::Failed(event, _) = &fates[index] else { unreachable!("only failures are retryable") };
                fates[index] = match self.call(vec![event.clone()]) {
                    Ok(called) => {
                        let (mut one, again) = called.into_fates();
                        if !again.is_empty() {
                            still.push(index);
                        }
                        one.pop().expect("one fate")
                    }
                    Err((mut back, reason)) => Fate::Failed(back.pop().expect("one event"), reason),
                };
            }
            retry = still;
        }
        fates
    }

    /// One `process` call. `Err` when the call failed as a whole (trap, timeout,
    /// memory, contract violation): the events come back as they went in.
    /// Each `Ok` fate says whether it is a retryable failure.
    fn call(&mut self, events: Vec<Event>) -> CallResult {
        let stale = self.live.as_ref().is_none_or(|l| l.batches >= self.limits.batches_per_instance);
        if stale && let Err(e) = self.instantiate() {
            return Err((events, e.to_string()));
        }
        let ticks = self.deadline_ticks();
        let live = self.live.as_mut().expect("instantiated above");
        live.batches += 1;
        let state = live.store.data_mut();
        state.batch = Batch::new(events, self.limits.memory_bytes);
        state.last_error = None;
        live.store.set_epoch_deadline(ticks);
        let result = live.stage.call_process(&mut live.store, Resource::<BatchHandle>::new_borrow(0));
        let batch = std::mem::take(&mut live.store.data_mut().batch);
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let reason = describe(&e, &live.store, &self.limits);
                // A trapped instance may be in any state: never reuse it.
                self.retire();
                return Err((batch.roll_back(), reason));
            }
        };
        if outcomes.is_empty() {
            // Every event kept, as they are now.
            let kept = batch.original_len();
            let mut events = batch.commit_except(&[]);
            events.truncate(kept);
            return Ok(Called::AllKept(events));
        }
        if let Err(violation) = check_outcomes(&outcomes, batch.original_len(), batch.events.len()) {
            return Err((batch.roll_back(), format!("the plug-in broke the contract: {violation}")));
        }
        let failed: Vec<u32> =
            outcomes.iter().enumerate().filter(|(_, o)| matches!(o, Outcome::Fail(_))).map(|(i, _)| i as u32).collect();
        let retryable: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Outcome::Fail(e) if e.retryable))
            .map(|(i, _)| i)
            .collect();
        let events = batch.commit_except(&failed);
        if !outcomes.iter().any(|o| matches!(o, Outcome::Split(_))) {
            // Each outcome is its own event's: no need to index (copies nobody
            // named are discarded), and the caller takes them as they are.
            let mut events = events;
            events.truncate(outcomes.len());
            return Ok(Called::InPlace(events, outcomes, retryable));
        }
        let mut events: Vec<Option<Event>> = events.into_iter().map(Some).collect();
        let mut take = |index: u32| events[index as usize].take().expect("outcomes checked: each index once");
        let fates = outcomes
            .into_iter()
            .enumerate()
            .map(|(index, outcome)| match outcome {
                Outcome::Split(indices) => Fate::Split(indices.into_iter().map(&mut take).collect()),
                other => fate_of(take(index as u32), other),
            })
            .collect();
        Ok(Called::Decided(fates, retryable))
    }
}

/// The fate an outcome other than a split gives its event.
fn fate_of(event: Event, outcome: Outcome) -> Fate {
    match outcome {
        Outcome::Keep => Fate::Kept(event),
        Outcome::Drop(reason) => Fate::Dropped(event, reason),
        Outcome::Fail(error) => Fate::Failed(event, error.message),
        Outcome::Split(_) => unreachable!("splits are handled apart"),
    }
}

/// What one `process` call decided.
enum Called {
    /// Every event kept (the empty outcome list), as they are now.
    AllKept(Vec<Event>),
    /// One outcome per event, none a split, and which are retryable failures.
    InPlace(Vec<Event>, Vec<Outcome>, Vec<usize>),
    /// Per event its fate, and which of them are retryable failures.
    Decided(Vec<Fate>, Vec<usize>),
}

impl Called {
    /// One fate per event, in order, and the positions of retryable failures.
    fn into_fates(self) -> (Vec<Fate>, Vec<usize>) {
        match self {
            Called::AllKept(events) => (events.into_iter().map(Fate::Kept).collect(), Vec::new()),
            Called::InPlace(events, outcomes, retry) => {
                (events.into_iter().zip(outcomes).map(|(event, outcome)| fate_of(event, outcome)).collect(), retry)
            }
            Called::Decided(fates, retry) => (fates, retry),
        }
    }
}

/// Or, when the call failed as a whole, the events as they went in and why.
type CallResult = Result<Called, (Vec<Event>, String)>;

/// One outcome per original event (an empty list, "all kept", is handled
/// before); split indices in range; no index claimed twice.
fn check_outcomes(outcomes: &[Outcome], original_len: usize, len: usize) -> Result<(), String> {
    if outcomes.len() != original_len {
        return Err(format!("returned {} outcomes for {original_len} events", outcomes.len()));
    }
    let mut claimed = vec![false; len];
    let mut claim = |index: u32| -> Result<(), String> {
        let slot = claimed
            .get_mut(index as usize)
            .ok_or_else(|| format!("split names event {index}, but the batch has {len}"))?;
        if std::mem::replace(slot, true) {
            return Err(format!("event {index} is claimed by two outcomes"));
        }
        Ok(())
    };
    for (index, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Outcome::Split(indices) => indices.iter().try_for_each(|&i| claim(i))?,
            _ => claim(index as u32)?,
        }
    }
    Ok(())
}

/// A failed call, in words an operator can act on.
fn describe(error: &wasmtime::Error, store: &Store<StoreState>, limits: &StageLimits) -> String {
    if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
        return format!("timed out: the call took longer than {} ms", limits.timeout.as_millis());
    }
    let text = format!("{error:#}");
    if text.contains("forcing trap when growing memory") {
        return format!("exceeded its memory limit of {} MiB", limits.memory_bytes >> 20);
    }
    // A trap's own words ("wasm `unreachable` instruction executed") are its
    // root cause; the first line is only "error while executing at wasm backtrace".
    let first_line = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    let first_line = first_line.lines().next().unwrap_or("unknown failure").to_string();
    match &store.data().last_error {
        Some(logged) => format!("trapped: {first_line} (the plug-in reported: {logged})"),
        None => format!("trapped: {first_line}"),
    }
}
