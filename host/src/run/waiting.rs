//! The run's side of the changes waiting for something they need in a
//! target region (stored by `state/waiting.rs`). A change is tried again as
//! soon as a batch (or another waiting change) creates what it needs, and
//! otherwise once its pause is over: pauses start at
//! `apply.dependency_pause_ms` and double, up to [`MAX_PAUSE`], for what
//! arrives from elsewhere (made in the target by other means). It waits
//! until it goes through, fails otherwise, or its wait is over:
//! `apply.dependency_deadline_ms` after it began, or when a run that stops
//! once idle has nothing more to apply. Then it is a dead letter.
//!
//! Order per entity holds: a later change of an entity whose change waits
//! waits behind it (in its batch, `AwsSink`; in later batches, `Parking`;
//! among the waiting, a round tries none past an older one still waiting).
//! What overtakes one anyway (after its deadline) is for the ledger.

use super::{Parking, RunError, Summary, apply_events};
use crate::config;
use crate::event::{Event, now_ms};
use crate::order;
use crate::pipeline::Pipeline;
use crate::sink::Sink;
use crate::state::ledger::entity_in;
use crate::state::{DeadLetter, StateStore};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The longest pause between two tries of a waiting change whose need
/// nothing iotdr applied has created.
pub const MAX_PAUSE: Duration = Duration::from_secs(300);

/// A pause never shorter than this, so a zero `dependency_pause_ms` does not spin.
const MIN_PAUSE: Duration = Duration::from_millis(50);

/// A stored waiting change, as the run tracks it.
struct Pending {
    /// The pause before its next try, and when that is due.
    pause: Duration,
    at: Instant,
    /// What it needs in its region (ordering keys, see `order::needs`).
    needs: Vec<String>,
    /// The (region, ledger key) it holds.
    key: Option<(String, String)>,
}

pub(super) struct Waiting<'a> {
    config: &'a config::Pipeline,
    store: &'a StateStore,
    /// Per stored id. Kept in memory: after a restart, every change is tried at once.
    pending: HashMap<i64, Pending>,
    /// (region, ledger key) of the waiting changes: later changes of the same
    /// entity wait behind them (see `Parking`).
    held: HashSet<(String, String)>,
    /// Changes were stored that `pending` does not know yet.
    unseen: bool,
    /// The changes stored by an earlier run are not known yet: due at once.
    restarted: bool,
}

/// Which waiting changes a round tries.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Round {
    /// Those whose time has come.
    Due,
    /// All: nothing more will be applied, so what goes through now is all
    /// there is (rounds repeat while one goes through).
    Ending,
    /// All, and what still waits is a dead letter: it never arrived.
    Last,
}

/// What a round did.
pub(super) struct Tried {
    pub dead: Vec<DeadLetter>,
    /// Changes that went through (applied or found stale).
    pub settled: usize,
}

impl<'a> Waiting<'a> {
    pub fn new(config: &'a config::Pipeline, store: &'a StateStore) -> Result<Self, RunError> {
        let stored = store.waiting()?;
        let held = stored.iter().filter_map(|entry| entry.letter.event.as_ref().and_then(held_key_of)).collect();
        let restarted = !stored.is_empty();
        Ok(Waiting { config, store, pending: HashMap::new(), held, unseen: restarted, restarted })
    }

    /// What the next batch parks its waiting changes with.
    pub fn parking<'p>(&'p self, waits: &'p mut Vec<DeadLetter>) -> Parking<'p> {
        Parking { held: &self.held, waits }
    }

    /// Changes of a batch began to wait (they are stored with it).
    pub fn added(&mut self, waits: &[DeadLetter]) {
        if waits.is_empty() {
            return;
        }
        self.unseen = true;
        self.held.extend(waits.iter().filter_map(|letter| letter.event.as_ref().and_then(held_key_of)));
    }

    /// A batch applied the creations of `created` (ordering keys, see
    /// `order::creates`): a waiting change that needs one (in any region) is
    /// due at once.
    pub fn arrived(&mut self, created: &[String]) {
        if created.is_empty() {
            return;
        }
        let now = Instant::now();
        for pending in self.pending.values_mut() {
            if pending.needs.iter().any(|key| created.contains(key)) {
                pending.at = pending.at.min(now);
            }
        }
    }

    /// When a waiting change is due to be tried; `None` when none waits.
    pub fn next_due(&self) -> Option<Instant> {
        let known = self.pending.values().map(|p| p.at).min();
        if self.unseen { Some(Instant::now()) } else { known }
    }

    /// Tries the waiting changes of `round`, oldest first; a change of an
    /// entity whose older change still waits is not tried (it would overtake it).
    pub async fn retry<K: Sink>(
        &mut self,
        pipeline: &mut Pipeline,
        sink: &mut K,
        summary: &mut Summary,
        round: Round,
    ) -> Result<Tried, RunError> {
        let now = Instant::now();
        let first_pause = self.config.apply.dependency_pause.max(MIN_PAUSE);
        let stored = self.store.waiting()?;
        self.unseen = false;
        let ids: HashSet<i64> = stored.iter().map(|s| s.id).collect();
        self.pending.retain(|id, _| ids.contains(id));
        let restarted = std::mem::take(&mut self.restarted);
        let mut tried = Tried { dead: Vec::new(), settled: 0 };
        let mut tries = 0;
        // The keys of the changes that still wait after this round.
        let mut held = HashSet::new();
        for entry in stored {
            let key = entry.letter.event.as_ref().and_then(held_key_of);
            let pending = self.pending.entry(entry.id).or_insert_with(|| Pending {
                pause: first_pause,
                // One just stored is tried a pause after now (what it needs is on its way).
                at: if restarted { now } else { now + first_pause },
                needs: entry.letter.event.as_ref().map(order::needs).unwrap_or_default(),
                key: key.clone(),
            });
            let behind = key.as_ref().is_some_and(|key| held.contains(key));
            // A round tries a batch's worth at most: the queue is not held back long.
            let not_yet = pending.at > Instant::now() || tries == self.config.batch_size;
            if behind || (round == Round::Due && not_yet) {
                held.extend(key);
                continue;
            }
            tries += 1;
            let since_ms = entry.letter.at_ms;
            let Some(event) = entry.letter.event else {
                self.store.settle_waiting(entry.id, None, &[entry.letter])?;
                continue;
            };
            let creates = order::creates(&event);
            let mut this = Summary::default();
            let mut still = Vec::new();
            let none = HashSet::new();
            // Past the stages and planned for its one region: it re-enters at the sink.
            let parking = Parking { held: &none, waits: &mut still };
            let mut dead =
                apply_events(self.config, pipeline, sink, usize::MAX, vec![event], &mut this, Some(parking)).await?;
            // Counted once, when the change began to wait.
            this.waited = 0;
            let went_through = this.changes > 0 || this.stale > 0;
            summary.add(this);
            let waits = match still.pop() {
                Some(mut letter) => {
                    letter.at_ms = since_ms;
                    let waited = Duration::from_millis(now_ms().saturating_sub(since_ms));
                    if round == Round::Last || waited >= self.config.apply.dependency_deadline {
                        letter.reason = if round == Round::Last {
                            format!("{}; it never arrived (the run ended with nothing more to apply)", letter.reason)
                        } else {
                            format!("{}; it never arrived (waited {} s)", letter.reason, waited.as_secs())
                        };
                        letter.at_ms = now_ms();
                        dead.push(letter);
                        None
                    } else {
                        Some(letter)
                    }
                }
                None => None,
            };
            self.store.settle_waiting(entry.id, waits.as_ref(), &dead)?;
            match waits {
                Some(_) => {
                    held.extend(key.clone());
                    let pending = self.pending.get_mut(&entry.id).expect("inserted above");
                    pending.pause = (pending.pause * 2).min(MAX_PAUSE);
                    pending.at = Instant::now() + pending.pause;
                }
                None => {
                    self.pending.remove(&entry.id);
                }
            }
            if went_through {
                tried.settled += 1;
                // The changes of its entity that waited behind it are due now, in this round.
                for pending in self.pending.values_mut().filter(|p| p.key.is_some() && p.key == key) {
                    pending.at = pending.at.min(now);
                }
                // What it created may be what a later waiting change needs: that one is tried in this round.
                if let Some(key) = creates {
                    self.arrived(&[key]);
                }
            }
            tried.dead.extend(dead);
        }
        self.held = held;
        Ok(tried)
    }
}

/// The entity a waiting change holds, in the one region it waits in.
fn held_key_of(event: &Event) -> Option<(String, String)> {
    entity_in(event, event.targets.first()?)
}
