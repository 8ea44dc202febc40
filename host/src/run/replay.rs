//! `iotdr dead-letters replay`: each stored letter re-enters where it left
//! (a stage, planning or applying; an undecodable record is decoded again,
//! an incomplete event completed again). The ledger keeps this safe: a letter
//! older than what its entity has since become is stale, and goes.

use super::{RunError, Summary, apply_events};
use crate::config;
use crate::context::ThingContext;
use crate::event::{Entity, Event, Operation, decode_line};
use crate::pipeline::Pipeline;
use crate::sink::Sink;
use crate::state::{DeadLetter, StateStore, Step};
use serde::Serialize;

/// What `dead-letters replay` did.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Letters whose change went through this time (applied, stale or dropped); they are removed.
    pub replayed: u64,
    /// Letters that failed again; they are kept, with the new reason.
    pub still_failing: u64,
    pub summary: Summary,
}

/// Replays stored dead letters (those in `ids`, or all), in the order they
/// were stored. `complete` completes events from the source region.
pub async fn replay<S: Sink>(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    sink: &mut S,
    store: &StateStore,
    ids: Option<&[i64]>,
    complete: &mut impl AsyncFnMut(Vec<Event>) -> (Vec<Event>, Vec<DeadLetter>),
) -> Result<ReplayReport, RunError> {
    let mut report = ReplayReport::default();
    for stored in store.dead_letters()? {
        if ids.is_some_and(|ids| !ids.contains(&stored.id)) {
            continue;
        }
        let letter = &stored.letter;
        // (first stage, event, whether it still needs what the source adds at ingest)
        let entry = match (&letter.step, &letter.event, &letter.record) {
            (Step::Decode, _, Some(record)) => match decode_line(record, &config.source_region) {
                Ok(mut event) => {
                    // Attributes lent by its thing, as a run would; what a
                    // replayed, older event says is not learned.
                    ThingContext::new(store).enrich(&mut event)?;
                    Ok((0, event, true))
                }
                Err(e) => Err(e.to_string()),
            },
            (Step::Fetch, Some(event), _) => Ok((0, event.clone(), true)),
            (Step::Plan | Step::Apply, Some(event), _) => Ok((usize::MAX, event.clone(), false)),
            (Step::Stage(stage), Some(event), _) => match pipeline.stage_index(stage) {
                Some(index) => Ok((index, event.clone(), false)),
                None => Err(format!("stage `{stage}` is no longer in the pipeline")),
            },
            _ => Err("nothing to replay: the letter holds neither an event nor a record".to_string()),
        };
        let (first_stage, event, incomplete) = match entry {
            Ok(entry) => entry,
            Err(reason) => {
                tracing::warn!(id = stored.id, "dead letter not replayable: {reason}");
                report.still_failing += 1;
                continue;
            }
        };
        let (events, mut dead) = if incomplete {
            complete(vec![event]).await
        } else if event.entity == Entity::Certificate
            && event.operation == Operation::Created
            && !crate::aws::carries_pem(&event)
        {
            // Stored without its PEM (letters from before PEMs were kept):
            // fetch the PEM, and only that, since the event re-enters past
            // the stages that saw what came with it.
            let (name, id) = (event.name.clone(), event.id.clone());
            let (completed, failed) = complete(vec![event]).await;
            let certificate =
                completed.into_iter().filter(|e| e.entity == Entity::Certificate && e.name == name && e.id == id);
            (certificate.collect(), failed)
        } else {
            (vec![event], Vec::new())
        };
        dead.extend(apply_events(config, pipeline, sink, first_stage, events, &mut report.summary, None).await?);
        store.replace_dead_letter(stored.id, &dead)?;
        if dead.is_empty() {
            report.replayed += 1;
        } else {
            report.still_failing += 1;
        }
    }
    Ok(report)
}
