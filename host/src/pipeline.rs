//! The stage chain: loads a pipeline's plug-ins, runs batches through them in
//! order and applies each stage's `on_error` policy to the events it fails on.

use crate::config::{self, OnError};
use crate::event::Event;
use crate::plugin::{Fate, LoadError, PluginEngine, StageRunner, StartError};
use crate::state::{DeadLetter, Step};
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Load(#[from] LoadError),
    // Not `source`: the message already carries it, and error chains would print it twice.
    #[error("{file}: stage `{stage}`: {reason}")]
    Start { file: PathBuf, stage: String, reason: StartError },
}

/// A stage whose policy is `halt` failed; the run must stop.
#[derive(Debug, thiserror::Error)]
#[error("stage `{stage}` failed on event {event_id} ({entity} {name}) and its on_error is halt: {reason}")]
pub struct Halted {
    pub stage: String,
    pub event_id: String,
    pub entity: String,
    pub name: String,
    pub reason: String,
}

/// An event a stage dropped on purpose.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub stage: String,
    pub reason: String,
    pub event: Event,
}

/// What came out of one batch.
#[derive(Debug, Default)]
pub struct Processed {
    /// Events that passed every stage, in source order.
    pub events: Vec<Event>,
    pub dropped: Vec<Dropped>,
    pub dead_letters: Vec<DeadLetter>,
    /// Events a stage failed on that went on because its policy is `skip`.
    pub skipped: usize,
}

/// A started stage: its plug-in instance, its error policy, what it saw.
pub struct RunningStage {
    runner: StageRunner,
    on_error: OnError,
    counts: StageCounts,
}

/// Events a stage saw since it started (`/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageCounts {
    pub events_in: u64,
    /// Passed on: kept, each part of a split, and failed ones `skip` passes on.
    pub events_out: u64,
    pub dropped: u64,
    pub failed: u64,
}

/// A stage of the next version of a pipeline (a hot swap): built and
/// started off to the side, or kept running from the current version.
pub enum NextStage {
    Built(RunningStage),
    Kept(String),
}

pub struct Pipeline {
    targets: Vec<String>,
    stages: Vec<RunningStage>,
}

impl Pipeline {
    /// Compiles (or loads from cache) every plug-in and starts every stage.
    pub fn build(config: &config::Pipeline, engine: &PluginEngine) -> Result<Pipeline, BuildError> {
        let mut loaded: HashMap<PathBuf, Arc<crate::plugin::Plugin>> = HashMap::new();
        let mut stages = Vec::new();
        for stage in &config.stages {
            stages.push(Self::start_stage(config, stage, engine, &mut loaded)?);
        }
        Ok(Pipeline { targets: config.targets.clone(), stages })
    }

    /// Compiles (or loads from cache) `stage`'s plug-in and starts it, off
    /// to the side of any running pipeline.
    pub fn build_stage(
        config: &config::Pipeline,
        stage: &config::Stage,
        engine: &PluginEngine,
    ) -> Result<RunningStage, BuildError> {
        Self::start_stage(config, stage, engine, &mut HashMap::new())
    }

    fn start_stage(
        config: &config::Pipeline,
        stage: &config::Stage,
        engine: &PluginEngine,
        loaded: &mut HashMap<PathBuf, Arc<crate::plugin::Plugin>>,
    ) -> Result<RunningStage, BuildError> {
        let plugin = match loaded.get(&stage.plugin) {
            Some(plugin) => plugin.clone(),
            None => {
                let plugin = Arc::new(engine.load(&stage.plugin)?);
                loaded.insert(stage.plugin.clone(), plugin.clone());
                plugin
            }
        };
        let runner = StageRunner::start(&stage.name, plugin, stage.config_json.clone(), stage.limits.clone())
            .map_err(|reason| BuildError::Start { file: config.file.clone(), stage: stage.name.clone(), reason })?;
        Ok(RunningStage { runner, on_error: stage.on_error, counts: StageCounts::default() })
    }

    /// Becomes the next version: its stages in order, the kept ones moved
    /// from this version (their instances and counters go on). Called
    /// between batches.
    pub fn swap(&mut self, next: Vec<NextStage>) {
        let mut current: Vec<Option<RunningStage>> = std::mem::take(&mut self.stages).into_iter().map(Some).collect();
        for stage in next {
            match stage {
                NextStage::Built(stage) => self.stages.push(stage),
                NextStage::Kept(name) => {
                    let kept = current.iter_mut().find(|s| s.as_ref().is_some_and(|s| s.runner.name() == name));
                    // The reload checked it runs: a name not running is a bug.
                    self.stages.push(kept.and_then(Option::take).expect("a kept stage is running"));
                }
            }
        }
    }

    pub fn stage_names(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(|s| s.runner.name())
    }

    /// What each stage saw since it started, in order.
    pub fn stage_counts(&self) -> Vec<(String, StageCounts)> {
        self.stages.iter().map(|s| (s.runner.name().to_string(), s.counts)).collect()
    }

    /// Plug-in counters, per stage.
    pub fn counters(&self) -> Vec<(String, std::collections::BTreeMap<String, u64>)> {
        self.stages.iter().map(|s| (s.runner.name().to_string(), s.runner.counters())).collect()
    }

    /// Runs one batch through every stage. Events without targets get the
    /// pipeline's targets first.
    pub fn process(&mut self, events: Vec<Event>) -> Result<Processed, Halted> {
        self.process_from(0, events)
    }

    /// The index of the stage called `name`.
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.runner.name() == name)
    }

    /// Runs a batch through the stages from `first` on (a replayed dead
    /// letter re-enters at the stage that failed it; past the last stage, no
    /// stage runs).
    pub fn process_from(&mut self, first: usize, events: Vec<Event>) -> Result<Processed, Halted> {
        self.process_stages(first..self.stages.len(), events)
    }

    /// Runs a batch through the stages in `stages` only (a pipeline test
    /// that checks what comes out of a named stage).
    pub fn process_stages(&mut self, stages: Range<usize>, mut events: Vec<Event>) -> Result<Processed, Halted> {
        for event in &mut events {
            if event.targets.is_empty() {
                event.targets = self.targets.clone();
            }
        }
        let mut processed = Processed::default();
        let end = stages.end.min(self.stages.len());
        for stage in self.stages.iter_mut().take(end).skip(stages.start) {
            if events.is_empty() {
                break;
            }
            stage.counts.events_in += events.len() as u64;
            let mut next = Vec::new();
            for fate in stage.runner.process_into(events, &mut next) {
                if matches!(fate, Fate::Dropped(..)) {
                    stage.counts.dropped += 1;
                } else if matches!(fate, Fate::Failed(..)) {
                    stage.counts.failed += 1;
                }
                match fate {
                    Fate::Kept(event) => next.push(event),
                    Fate::Split(events) => next.extend(events),
                    Fate::Dropped(event, reason) => {
                        tracing::debug!(stage = stage.runner.name(), event = %event.id, "dropped: {reason}");
                        processed.dropped.push(Dropped { stage: stage.runner.name().to_string(), reason, event });
                    }
                    Fate::Failed(event, reason) => match stage.on_error {
                        OnError::DeadLetter => {
                            tracing::warn!(stage = stage.runner.name(), event = %event.id, "dead-lettered: {reason}");
                            processed.dead_letters.push(DeadLetter::for_event(
                                Step::Stage(stage.runner.name().to_string()),
                                reason,
                                event,
                            ));
                        }
                        OnError::Skip => {
                            tracing::warn!(stage = stage.runner.name(), event = %event.id, "stage skipped for this event: {reason}");
                            processed.skipped += 1;
                            next.push(event);
                        }
                        OnError::Halt => {
                            return Err(Halted {
                                stage: stage.runner.name().to_string(),
                                event_id: event.id,
                                entity: event.entity.to_string(),
                                name: event.name,
                                reason,
                            });
                        }
                    },
                }
            }
            stage.counts.events_out += next.len() as u64;
            events = next;
        }
        processed.events = events;
        Ok(processed)
    }
}
