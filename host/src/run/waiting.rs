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
//! Trying an older change after newer ones of its entity went through is
//! safe: the ledger finds it stale, and it goes.

use super::{RunError, Summary, apply_events};
use crate::config;
use crate::event::now_ms;
use crate::order;
use crate::pipeline::Pipeline;
use crate::sink::Sink;
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
}

pub(super) struct Waiting<'a> {
    config: &'a config::Pipeline,
    store: &'a StateStore,
    /// Per stored id. Kept in memory: after a restart, every change is tried at once.
    pending: HashMap<i64, Pending>,
    /// Changes were stored that `pending` does not know yet.
    unseen: bool,
}

impl<'a> Waiting<'a> {
    pub fn new(config: &'a config::Pipeline, store: &'a StateStore) -> Result<Self, RunError> {
        Ok(Waiting { config, store, pending: HashMap::new(), unseen: store.waiting_count()? > 0 })
    }

    /// Changes of a batch began to wait (they are stored with it).
    pub fn added(&mut self) {
        self.unseen = true;
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

    /// Tries the changes that are due (all of them when `ending`: nothing
    /// more will be applied, so what still waits is a dead letter); returns
    /// the dead letters made.
    pub async fn retry<K: Sink>(
        &mut self,
        pipeline: &mut Pipeline,
        sink: &mut K,
        summary: &mut Summary,
        ending: bool,
    ) -> Result<Vec<DeadLetter>, RunError> {
        let now = Instant::now();
        let first_pause = self.config.apply.dependency_pause.max(MIN_PAUSE);
        let stored = self.store.waiting()?;
        self.unseen = false;
        let ids: HashSet<i64> = stored.iter().map(|s| s.id).collect();
        self.pending.retain(|id, _| ids.contains(id));
        let mut made = Vec::new();
        let mut tries = 0;
        // A change already waiting is tried at its time; one just stored, a pause after now.
        for entry in stored {
            let pending = self.pending.entry(entry.id).or_insert_with(|| Pending {
                pause: first_pause,
                at: now + first_pause,
                needs: entry.letter.event.as_ref().map(order::needs).unwrap_or_default(),
            });
            // A round tries a batch's worth at most: the queue is not held back long.
            if (pending.at > Instant::now() || tries == self.config.batch_size) && !ending {
                continue;
            }
            tries += 1;
            let since_ms = entry.letter.at_ms;
            let Some(event) = entry.letter.event else {
                self.store.settle_waiting(entry.id, None, &[entry.letter])?;
                continue;
            };
            let creates = order::creates(&event);
            let mut tried = Summary::default();
            let mut still = Vec::new();
            // Past the stages and planned for its one region: it re-enters at the sink.
            let mut dead =
                apply_events(self.config, pipeline, sink, usize::MAX, vec![event], &mut tried, Some(&mut still))
                    .await?;
            // Counted once, when the change began to wait.
            tried.waited = 0;
            let went_through = tried.changes > 0;
            summary.add(tried);
            let waits = match still.pop() {
                Some(mut letter) => {
                    letter.at_ms = since_ms;
                    let waited = Duration::from_millis(now_ms().saturating_sub(since_ms));
                    if ending || waited >= self.config.apply.dependency_deadline {
                        letter.reason = if ending {
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
                    let pending = self.pending.get_mut(&entry.id).expect("inserted above");
                    pending.pause = (pending.pause * 2).min(MAX_PAUSE);
                    pending.at = Instant::now() + pending.pause;
                }
                None => {
                    self.pending.remove(&entry.id);
                }
            }
            // What it created may be what a later waiting change needs: that one is tried in this round.
            if went_through && let Some(key) = creates {
                self.arrived(&[key]);
            }
            made.extend(dead);
        }
        Ok(made)
    }
}
