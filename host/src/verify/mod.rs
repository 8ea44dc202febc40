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
use crate::event::{Entity, Event, decode_line};
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

/// Verifies every target of `config`. Every region is read in bulk (a
/// comparing scan: no certificate PEMs); the source's events are what a
/// repair or a smart sync sends, so the certificates among them that a
/// target lacks or holds differently get their PEMs read afterwards.
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
    // Every shadow of the source: they are what the targets should hold.
    let mut source =
        counted(RegistryScan::comparing(source, limiter.clone(), true).with_query(reads.query.clone()), label);
    let mut targets = Vec::new();
    for region in &config.targets {
        let label = format!("target {region}");
        let scan =
            RegistryScan::comparing(connect(config, region).await?, limiter.clone(), shadows == ShadowReads::All);
        targets.push(counted(scan, label));
    }
    let expected = expected(config, pipeline, &mut source);
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
    let reports: Vec<RegionReport> = config
        .targets
        .iter()
        .zip(&actual)
        .map(|(region, actual)| compare(region, expected.regions.get(region).unwrap_or(&empty), actual))
        .collect();
    complete_certificates(&mut expected, &reports, &source).await?;
    Ok(Verification { reports, expected, actual })
}

/// Gives the source's events of every certificate a target lacks or holds
/// differently its PEM (the comparing scan read none): registering it there
/// needs it. Equal certificates cost no read.
async fn complete_certificates(
    expected: &mut Expected,
    reports: &[RegionReport],
    source: &RegistryScan,
) -> Result<(), VerifyError> {
    let drifted: std::collections::BTreeSet<String> = reports
        .iter()
        .filter_map(|report| report.kinds.get("certificates"))
        .flat_map(|kind| kind.missing.iter().cloned().chain(kind.different.iter().map(|d| d.name.clone())))
        .collect();
    if drifted.is_empty() {
        return Ok(());
    }
    let pems = source.certificate_pems(drifted.into_iter().collect()).await?;
    let fill = |event: &mut Event| {
        if event.entity == crate::event::Entity::Certificate
            && !crate::aws::carries_pem(event)
            && let Some(pem) = pems.get(&event.name)
        {
            event.document = Some(serde_json::json!({ "certificatePem": pem }).to_string());
        }
    };
    for events in expected.events.values_mut().flat_map(BTreeMap::values_mut) {
        events.iter_mut().for_each(fill);
    }
    expected.origins.values_mut().for_each(|(_, event)| fill(event));
    Ok(())
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
    scan: &mut RegistryScan,
) -> Result<Expected, VerifyError> {
    // The thing context lends a thing's attributes to its memberships and
    // shadows, as in a run; it lives in memory for this one pass.
    let store = StateStore::in_memory()?;
    let mut context = ThingContext::new(&store);
    let mut expected = Expected::default();
    // A comparing scan lists memberships with their groups, before the
    // things: they wait for the things (whose attributes route them), and
    // only those of things the scan found count (with a query, the others'
    // are not compared).
    let mut memberships = Vec::new();
    let mut things = std::collections::HashSet::new();
    let mut earliest_membership = u64::MAX;
    while !scan.idle() {
        let batch = scan.read(0).await?;
        let mut events = Vec::with_capacity(batch.records.len());
        for record in batch.records {
            // The scan writes its own events: one that does not decode is a bug.
            let mut event = decode_line(&record.text, &config.source_region).expect("a scan event decodes");
            match event.entity {
                Entity::ThingGroupMembership | Entity::BillingGroupMembership => {
                    earliest_membership = earliest_membership.min(event.timestamp_ms);
                    memberships.push(event);
                }
                Entity::Thing => {
                    // Stamped no later than the memberships (read before it):
                    // a thing newer than its membership would make the ledger
                    // take the membership for one of an older thing of that
                    // name. Earlier is safe: what a later event says wins.
                    event.timestamp_ms = event.timestamp_ms.min(earliest_membership);
                    things.insert(event.name.clone());
                    events.push(event);
                }
                _ => events.push(event),
            }
        }
        take(config, pipeline, &mut context, &mut expected, events)?;
    }
    memberships.retain(|event| things.contains(&event.name));
    for chunk in memberships.chunks(config.batch_size.max(1)) {
        take(config, pipeline, &mut context, &mut expected, chunk.to_vec())?;
    }
    Ok(expected)
}

/// One batch of the source's events through the stages, folded per target region.
fn take(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    context: &mut ThingContext,
    expected: &mut Expected,
    mut events: Vec<Event>,
) -> Result<(), VerifyError> {
    for event in &mut events {
        context.enrich(event)?;
        let place = expected.origins.len();
        expected.origins.insert(event.id.clone(), (place, event.clone()));
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
    Ok(())
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
