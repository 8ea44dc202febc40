//! Hot swap, a part of the run loop: the pipeline file and every plug-in
//! file are watched (`notify`), and SIGHUP asks too. A change is loaded,
//! its changed stages built and started off to the side (an unchanged
//! stage keeps its running instance), the file's own `[[tests]]` run
//! against it, and the new version is swapped in between batches: a batch
//! runs whole under the version that was in effect when it started. A
//! version that does not load, start or pass its tests is refused, and
//! what cannot change while running (source, regions, targets, apply and
//! ingest settings, state folder) is refused too: the running version goes
//! on, and the reason is logged and kept ([`Reload::last`]).

use super::RunError;
use crate::config;
use crate::pipeline::{NextStage, Pipeline};
use crate::plugin::PluginEngine;
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long after a file event the change is read: an editor's save is
/// several events (truncate, write, rename).
const SETTLE: Duration = Duration::from_millis(50);

/// What the last reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Version `version` is ready and serves from the next batch on.
    Ready { version: u64, rebuilt: Vec<String> },
    /// The change was refused; the running version goes on.
    Refused { reason: String },
}

/// A version built off to the side, waiting for the next batch.
struct Prepared {
    version: u64,
    config: config::Pipeline,
    stages: Vec<NextStage>,
    digests: HashMap<PathBuf, String>,
}

pub struct Reload {
    file: PathBuf,
    engine: PluginEngine,
    /// The version in effect (the last one swapped in).
    running: RefCell<config::Pipeline>,
    /// Its plug-in files' digests.
    digests: RefCell<HashMap<PathBuf, String>>,
    pending: RefCell<Option<Prepared>>,
    versions: Cell<u64>,
    serving: Cell<u64>,
    last: RefCell<Option<Outcome>>,
}

impl Reload {
    /// Hot swap for a run of `config` (as loaded from its file), building
    /// with `engine`.
    pub fn new(config: config::Pipeline, engine: PluginEngine) -> Reload {
        let digests = config.stages.iter().map(|s| (s.plugin.clone(), digest(&s.plugin))).collect();
        Reload {
            file: config.file.clone(),
            engine,
            running: RefCell::new(config),
            digests: RefCell::new(digests),
            pending: RefCell::new(None),
            versions: Cell::new(1),
            serving: Cell::new(1),
            last: RefCell::new(None),
        }
    }

    /// The version serving batches (1 is the one the run started with).
    pub fn serving(&self) -> u64 {
        self.serving.get()
    }

    /// A whole new instance of the serving version (a reconcile's own).
    pub fn build_serving(&self) -> Result<Pipeline, crate::pipeline::BuildError> {
        Pipeline::build(&self.running.borrow(), &self.engine)
    }

    /// The serving version's stages: name, plug-in file, its SHA-256.
    pub fn stages(&self) -> Vec<(String, PathBuf, String)> {
        let digests = self.digests.borrow();
        let running = self.running.borrow();
        running
            .stages
            .iter()
            .map(|s| (s.name.clone(), s.plugin.clone(), digests.get(&s.plugin).cloned().unwrap_or_default()))
            .collect()
    }

    /// What the last reload did, if any.
    pub fn last(&self) -> Option<Outcome> {
        self.last.borrow().clone()
    }

    /// Between batches: swaps a prepared version in.
    pub fn swap_into(&self, pipeline: &mut Pipeline) {
        let Some(prepared) = self.pending.borrow_mut().take() else { return };
        pipeline.swap(prepared.stages);
        *self.running.borrow_mut() = prepared.config;
        *self.digests.borrow_mut() = prepared.digests;
        self.serving.set(prepared.version);
        tracing::info!(version = prepared.version, "pipeline version {} serves from this batch on", prepared.version);
    }

    /// Reads the file again and prepares what changed; the outcome is kept
    /// and logged. Returns it (`None`: nothing changed).
    pub fn reload(&self) -> Option<Outcome> {
        let outcome = match self.prepare() {
            Ok(None) => return None,
            Ok(Some(prepared)) => {
                let outcome = Outcome::Ready { version: prepared.version, rebuilt: rebuilt(&prepared) };
                tracing::info!(
                    version = prepared.version,
                    "pipeline version {} ready (stages rebuilt: {}); it serves from the next batch",
                    prepared.version,
                    rebuilt(&prepared).join(", ")
                );
                *self.pending.borrow_mut() = Some(prepared);
                outcome
            }
            Err(reason) => {
                tracing::warn!(
                    "pipeline change refused, version {} goes on: {reason}",
                    self.pending.borrow().as_ref().map_or(self.serving.get(), |p| p.version)
                );
                Outcome::Refused { reason }
            }
        };
        *self.last.borrow_mut() = Some(outcome.clone());
        Some(outcome)
    }

    fn prepare(&self) -> Result<Option<Prepared>, String> {
        let config = config::Pipeline::load(&self.file).map_err(|e| e.to_string())?;
        let running = self.running.borrow();
        let fixed = fixed_changes(&running, &config);
        if !fixed.is_empty() {
            return Err(format!(
                "{} changed, which a running pipeline cannot change: restart `iotdr run` to apply it",
                fixed.join(", ")
            ));
        }
        let digests: HashMap<PathBuf, String> =
            config.stages.iter().map(|s| (s.plugin.clone(), digest(&s.plugin))).collect();
        let old_digests = self.digests.borrow();
        let unchanged = |stage: &config::Stage| {
            running.stages.iter().any(|s| s == stage) && old_digests.get(&stage.plugin) == digests.get(&stage.plugin)
        };
        // Nothing new next to the latest version (the one waiting, or the one serving).
        let same = match &*self.pending.borrow() {
            Some(pending) => pending.config == config && pending.digests == digests,
            None => *running == config && *old_digests == digests,
        };
        if same {
            return Ok(None);
        }
        let mut stages = Vec::new();
        for stage in &config.stages {
            if unchanged(stage) {
                stages.push(NextStage::Kept(stage.name.clone()));
            } else {
                stages.push(NextStage::Built(
                    Pipeline::build_stage(&config, stage, &self.engine).map_err(|e| e.to_string())?,
                ));
            }
        }
        let results = crate::pipeline_tests::run_all(&config, &self.engine).map_err(|e| e.to_string())?;
        if let Some(failed) = results.iter().find(|r| !r.passed()) {
            return Err(format!(
                "its test `{}` fails: {}",
                failed.name,
                failed.failures.first().map(String::as_str).unwrap_or_default()
            ));
        }
        let version = self.versions.get() + 1;
        self.versions.set(version);
        Ok(Some(Prepared { version, config, stages, digests }))
    }

    /// Watches the pipeline file and the plug-in files (their folders: an
    /// editor may replace a file rather than write it) and SIGHUP, and
    /// reloads on each. Runs until the run ends.
    pub async fn watch(&self) -> Result<(), RunError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
        let mut watched: Vec<PathBuf> = Vec::new();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                let _ = tx.send(event.paths);
            }
        })
        .map_err(|e| tracing::warn!("cannot watch the pipeline's files (SIGHUP still reloads): {e}"))
        .ok();
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| RunError::Reload(format!("listening for SIGHUP: {e}")))?;
        loop {
            // The files in effect (a reload may add plug-ins), and their folders.
            let files: Vec<PathBuf> = std::iter::once(self.file.clone())
                .chain(self.running.borrow().stages.iter().map(|s| s.plugin.clone()))
                .chain(self.pending.borrow().iter().flat_map(|p| p.config.stages.iter().map(|s| s.plugin.clone())))
                .map(|f| absolute(&f))
                .collect();
            let mut folders: Vec<PathBuf> = files.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
            folders.sort();
            folders.dedup();
            folders.retain(|f| !watched.contains(f));
            for folder in &folders {
                use notify::Watcher;
                let Some(watcher) = watcher.as_mut() else { break };
                if let Err(e) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!("cannot watch {} for changes (SIGHUP still reloads): {e}", folder.display());
                }
                watched.push(folder.clone());
            }
            // Other files in those folders (logs, the source file) change too: not a reason.
            let ours = |paths: &[PathBuf]| paths.iter().any(|p| files.contains(&absolute(p)));
            tokio::select! {
                Some(paths) = rx.recv() => if !ours(&paths) { continue },
                _ = hangups.recv() => {}
            }
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            self.reload();
        }
    }
}

/// `path` from the root (as the watcher names files), without `.` parts.
fn absolute(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

fn rebuilt(prepared: &Prepared) -> Vec<String> {
    prepared
        .config
        .stages
        .iter()
        .zip(&prepared.stages)
        .filter(|(_, stage)| matches!(stage, NextStage::Built(_)))
        .map(|(stage, _)| stage.name.clone())
        .collect()
}

/// What differs between `running` and `next` that a running pipeline
/// cannot take: everything but the stages and the tests.
fn fixed_changes(running: &config::Pipeline, next: &config::Pipeline) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut differs = |what: &'static str, same: bool| {
        if !same {
            changed.push(what);
        }
    };
    differs("[pipeline] name", running.name == next.name);
    differs("[pipeline] source_region", running.source_region == next.source_region);
    differs("[pipeline] targets", running.targets == next.targets);
    differs("[pipeline] batch_size", running.batch_size == next.batch_size);
    differs("[regions]", running.regions == next.regions);
    differs("[source]", running.source == next.source);
    differs("[apply]", running.apply == next.apply);
    differs("[ingest]", running.ingest == next.ingest);
    differs("[reconcile]", running.reconcile_every == next.reconcile_every);
    differs("[state]", running.state_dir == next.state_dir);
    differs("[admin]", running.admin == next.admin);
    changed
}

/// A plug-in file's SHA-256 (empty when it cannot be read: the build says why).
fn digest(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default()
}
