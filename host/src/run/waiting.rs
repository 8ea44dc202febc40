//! The run's side of the changes waiting for something they need in a
//! target region (stored by `state/waiting.rs`): each is tried again once
//! its pause is over (pauses start at `apply.dependency_pause_ms` and
//! double, up to [`MAX_PAUSE`]), until it goes through, fails otherwise,
//! or its wait is over: `apply.dependency_deadline_ms` after it began, or
//! when a run that stops once idle has nothing more to apply. Then it is a
//! dead letter.
//!
//! Trying an older change after newer ones of its entity went through is
//! safe: the ledger finds it stale, and it goes.

use super::{RunError, Summary, apply_events};
use crate::config;
use crate::event::now_ms;
use crate::pipeline::Pipeline;
use crate::sink::Sink;
use crate::state::{DeadLetter, StateStore};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest pause between two tries of a waiting change.
pub const MAX_PAUSE: Duration = Duration::from_secs(30);

/// A pause never shorter than this, so a zero `dependency_pause_ms` does not spin.
const MIN_PAUSE: Duration = Duration::from_millis(50);

pub(super) struct Waiting<'a> {
    config: &'a config::Pipeline,
    store: &'a StateStore,
    /// Per stored change: the pause before its next try, and when that is
    /// due. Kept in memory: after a restart, every change is tried at once.
    due: HashMap<i64, (Duration, Instant)>,
    /// Changes were stored that `due` does not know yet.
    unseen: bool,
}

impl<'a> Waiting<'a> {
    pub fn new(config: &'a config::Pipeline, store: &'a StateStore) -> Result<Self, RunError> {
        Ok(Waiting { config, store, due: HashMap::new(), unseen: store.waiting_count()? > 0 })
    }

    /// Changes of a batch began to wait (they are stored with it).
    pub fn added(&mut self) {
        self.unseen = true;
    }

    /// When a waiting change is due to be tried; `None` when none waits.
    pub fn next_due(&self) -> Option<Instant> {
        let known = self.due.values().map(|&(_, at)| at).min();
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
        let ids: std::collections::HashSet<i64> = stored.iter().map(|s| s.id).collect();
        self.due.retain(|id, _| ids.contains(id));
        let mut made = Vec::new();
        let mut tries = 0;
        // A change already waiting is tried at its time; one just stored, a pause after now.
        for entry in stored {
            let (pause, at) = *self.due.entry(entry.id).or_insert((first_pause, now + first_pause));
            // A round tries a batch's worth at most: the queue is not held back long.
            if (at > now || tries == self.config.batch_size) && !ending {
                continue;
            }
            tries += 1;
            let since_ms = entry.letter.at_ms;
            let Some(event) = entry.letter.event else {
                self.store.settle_waiting(entry.id, None, &[entry.letter])?;
                continue;
            };
            let mut tried = Summary::default();
            let mut still = Vec::new();
            // Past the stages and planned for its one region: it re-enters at the sink.
            let mut dead =
                apply_events(self.config, pipeline, sink, usize::MAX, vec![event], &mut tried, Some(&mut still))
                    .await?;
            // Counted once, when the change began to wait.
            tried.waited = 0;
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
                    let pause = (pause * 2).min(MAX_PAUSE);
                    self.due.insert(entry.id, (pause, Instant::now() + pause));
                }
                None => {
                    self.due.remove(&entry.id);
                }
            }
            made.extend(dead);
        }
        Ok(made)
    }
}
