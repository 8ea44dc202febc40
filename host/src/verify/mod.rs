//! `iotdr verify`: what each target region should hold (the source region's
//! registry and shadows, listed by the registry scan and passed through the
//! pipeline's stages, so filtered, renamed and re-routed entities compare as
//! they were replicated) against what it holds (its own scan), entity by
//! entity. Reads only; the regions are scanned side by side. `repair`
//! sends the drift found to the targets (see `repair.rs`).

mod diff;
mod image;
mod repair;

pub use diff::{Difference, KindReport, RegionReport, compare, render};
pub use image::{Image, KINDS};
pub use repair::{Repaired, repair, sync_drift, to_queue};

use crate::aws::{Limiter, RegionClients};
use crate::config;
use crate::context::ThingContext;
use crate::event::{Event, decode_line};
use crate::pipeline::{Halted, Pipeline};
use crate::progress::Progress;
use crate::source::{RegistryScan, Source, SourceError};
use crate::state::{StateError, StateStore};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("connecting to {region}: {message}")]
    Connect { region: String, message: String },
    #[error(transparent)]
    Scan(#[from] SourceError),
    #[error(transparent)]
    Halted(#[from] Halted),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What the source looked like through the pipeline: per target region,
/// the image it should hold and the events that make each of its entries.
#[derive(Debug, Default)]
pub struct Expected {
    pub regions: BTreeMap<String, Image>,
    pub events: BTreeMap<String, BTreeMap<(&'static str, String), Vec<Event>>>,
    /// The scan's events as they entered the stages, by id (stages keep
    /// ids), with their place in the scan: what a reconcile queues.
    pub origins: HashMap<String, (usize, Event)>,
    /// Events a stage failed on (dead letters in a run): missing in every target.
    pub failed: usize,
}

/// One verification: a report per target region (in the pipeline's order),
/// with what was compared.
#[derive(Debug)]
pub struct Verification {
    pub reports: Vec<RegionReport>,
    pub expected: Expected,
    /// Each target as listed, in the same order.
    pub actual: Vec<Image>,
}

impl Verification {
    pub fn drift(&self) -> usize {
        self.reports.iter().map(RegionReport::drift).sum()
    }
}

/// Which shadows of a target `verify` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowReads {
    /// Every shadow of every thing (a listing and a read per thing, and a
    /// read per named shadow): shadows only the target has are found.
    All,
    /// Only the shadows the source has, one read each: all a smart sync
    /// needs, which writes what is missing or different and deletes nothing.
    Expected,
}

/// What a verification reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reads {
    pub shadows: ShadowReads,
    /// Only the things fleet indexing finds for this query in the source
    /// (`sync --mode smart --query`): the targets' other things are not
    /// compared, so none of them is reported extra.
    pub query: Option<String>,
}

impl Reads {
    /// Everything, every shadow of every thing: `iotdr verify`.
    pub fn all() -> Reads {
        Reads { shadows: ShadowReads::All, query: None }
    }

    /// What a smart sync or a reconcile needs: the shadows the source has.
    pub fn expected() -> Reads {
        Reads { shadows: ShadowReads::Expected, query: None }
    }
}

/// Verifies every target of `config`. The source is read as a sync reads
/// it (its events are what a repair sends), the targets in bulk.
/// Each region's listing is counted on `progress`, when given.
pub async fn verify(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    limiter: Arc<Limiter>,
    progress: Option<&Progress>,
    reads: &Reads,
) -> Result<Verification, VerifyError> {
    let shadows = reads.shadows;
    let counted = |scan: RegistryScan, label: String| match progress {
        Some(progress) => scan.with_progress(progress.listing(&label)),
        None => scan,
    };
    let source = connect(config, &config.source_region).await?;
    let label = format!("source {}", source.region);
    let source = counted(RegistryScan::new(source, limiter.clone(), None).with_query(reads.query.clone()), label);
    let mut targets = Vec::new();
    for region in &config.targets {
        let label = format!("target {region}");
        let scan =
            RegistryScan::comparing(connect(config, region).await?, limiter.clone(), shadows == ShadowReads::All);
        targets.push(counted(scan, label));
    }
    let expected = expected(config, pipeline, source);
    let actual = futures_util::future::try_join_all(targets.into_iter().map(image_of));
    let (mut expected, scanned) = futures_util::future::try_join(expected, actual).await?;
    let mut actual = Vec::new();
    for (region, (mut image, scan)) in config.targets.iter().zip(scanned) {
        if shadows == ShadowReads::Expected {
            let wanted = expected.regions.get(region).into_iter().flat_map(|image| image.of("shadows"));
            let wanted = wanted
                .map(|(entry, _)| image::shadow_of(entry))
                .map(|(thing, shadow)| (thing.to_string(), shadow.map(str::to_string)));
            for event in scan.read_shadows(wanted.collect()).await? {
                image.fold(&event);
            }
        }
        if reads.query.is_some() {
            let found = expected.regions.get(region).into_iter().flat_map(|image| image.of("things"));
            image.keep_things(&found.map(|(name, _)| name.clone()).collect());
        }
        image.settle();
        actual.push(image);
    }
    for image in expected.regions.values_mut() {
        image.settle();
    }
    if expected.failed > 0 {
        tracing::warn!("{} source entities failed a stage: they are missing in every target", expected.failed);
    }
    let empty = Image::default();
    let reports = config
        .targets
        .iter()
        .zip(&actual)
        .map(|(region, actual)| compare(region, expected.regions.get(region).unwrap_or(&empty), actual))
        .collect();
    Ok(Verification { reports, expected, actual })
}

async fn connect(config: &config::Pipeline, region: &str) -> Result<RegionClients, VerifyError> {
    let settings = config.regions.get(region).cloned().unwrap_or_default();
    // Shadows are compared: the data plane too.
    RegionClients::connect(region, &settings, true)
        .await
        .map_err(|e| VerifyError::Connect { region: region.to_string(), message: e.to_string() })
}

/// The source, page by page, through the stages, folded per target region.
async fn expected(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    mut scan: RegistryScan,
) -> Result<Expected, VerifyError> {
    // The thing context lends a thing's attributes to its memberships and
    // shadows, as in a run; it lives in memory for this one pass.
    let store = StateStore::in_memory()?;
    let mut context = ThingContext::new(&store);
    let mut expected = Expected::default();
    while !scan.idle() {
        let batch = scan.read(0).await?;
        let mut events = Vec::with_capacity(batch.records.len());
        for record in batch.records {
            // The scan writes its own events: one that does not decode is a bug.
            let mut event = decode_line(&record.text, &config.source_region).expect("a scan event decodes");
            context.enrich(&mut event)?;
            let place = expected.origins.len();
            expected.origins.insert(event.id.clone(), (place, event.clone()));
            events.push(event);
        }
        let processed = pipeline.process(events)?;
        expected.failed += processed.dead_letters.len();
        for event in processed.events {
            if !config.apply.replicate.contains(&event.entity) {
                continue;
            }
            let Some(entry) = image::entry_of(&event) else { continue };
            for region in event.targets.iter().filter(|r| config.targets.contains(r)) {
                expected.regions.entry(region.clone()).or_default().fold(&event);
                let events = expected.events.entry(region.clone()).or_default();
                events.entry(entry.clone()).or_default().push(event.clone());
            }
        }
    }
    Ok(expected)
}

/// A region as its own scan lists it (and the scan, for further reads).
async fn image_of(mut scan: RegistryScan) -> Result<(Image, RegistryScan), VerifyError> {
    let mut image = Image::default();
    while !scan.idle() {
        for record in scan.read(0).await?.records {
            image.fold(&decode_line(&record.text, "").expect("a scan event decodes"));
        }
    }
    Ok((image, scan))
}
