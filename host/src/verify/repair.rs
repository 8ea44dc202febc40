//! `iotdr verify --repair`: the drift a verification found, sent to each
//! target as events. Missing and different entities get the events the
//! source made of them through the pipeline (so they arrive filtered,
//! renamed and mapped as replicated), plus removals of what the target has
//! on a thing and the source does not (groups, a billing group,
//! certificates); extras get deletions, in their region only. What iotdr
//! recorded about a drifted entity (attachments, a certificate's status, a
//! policy's digest) is forgotten first: the target was changed behind its
//! back, and the records would skip the very calls that repair it.

use super::image::{Image, shadow_of};
use super::{KINDS, RegionReport, Verification};
use crate::aws::forget_known;
use crate::config;
use crate::event::now_ms;
use crate::event::{Entity, Event, Operation, related};
use crate::pipeline::Pipeline;
use crate::run::{RunError, Summary, apply_events};
use crate::sink::Sink;
use crate::state::StateStore;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// What a repair sent and what became of it.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Repaired {
    /// Events sent, per target region.
    pub events: BTreeMap<String, usize>,
    /// The apply's counts (dead letters are kept in the state folder, as a run's).
    pub summary: Summary,
}

/// Sends the drift of `verification` to the targets through `sink`.
pub async fn repair<S: Sink>(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    sink: &mut S,
    state: &StateStore,
    verification: &Verification,
) -> Result<Repaired, RunError> {
    let mut repaired = Repaired::default();
    let now = now_ms();
    let mut events = Vec::new();
    let none = BTreeMap::new();
    for (report, actual) in verification.reports.iter().zip(&verification.actual) {
        let expected = verification.expected.events.get(&report.region).unwrap_or(&none);
        let region_events = events_for(report, expected, actual, now);
        for (kind, names) in drifted(report) {
            for name in names {
                if let Some(entity) = entity_of(kind) {
                    forget_known(state, &report.region, entity, name)?;
                }
            }
        }
        repaired.events.insert(report.region.clone(), region_events.len());
        events.extend(region_events);
    }
    // Past the last stage: these went through the stages already, or are the target's own.
    let past_stages = pipeline.stage_names().count();
    let dead = apply_events(config, pipeline, sink, past_stages, events, &mut repaired.summary, None).await?;
    for letter in &dead {
        state.add_dead_letter(letter)?;
    }
    repaired.summary.dead_letters = dead.len() as u64;
    Ok(repaired)
}

/// `iotdr sync --mode smart`: the source's events of what `verification`
/// found missing or different (see [`to_queue`]), through the stages to the
/// targets in batches, in the scan's order; what is equal is not written.
pub async fn sync_drift<S: Sink>(
    config: &config::Pipeline,
    pipeline: &mut Pipeline,
    sink: &mut S,
    state: &StateStore,
    verification: &Verification,
) -> Result<Summary, RunError> {
    let mut summary = Summary::default();
    let events = to_queue(verification);
    summary.records = events.len() as u64;
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let batch: Vec<Event> = events.by_ref().take(config.batch_size).collect();
        let dead = apply_events(config, pipeline, sink, 0, batch, &mut summary, None).await?;
        for letter in &dead {
            state.add_dead_letter(letter)?;
        }
        summary.dead_letters += dead.len() as u64;
    }
    Ok(summary)
}

/// The drift of `verification` as source events for a run's queue (a
/// reconcile): the scan's events of what is missing or different, as they
/// entered the stages, which the run passes through them again; removals of
/// memberships and certificates only a target has. Extras are not deleted:
/// a live run only ever writes what the source says.
pub fn to_queue(verification: &Verification) -> Vec<Event> {
    let now = now_ms();
    let none = BTreeMap::new();
    let mut chosen: BTreeMap<usize, Event> = BTreeMap::new();
    let mut removals_first = Vec::new();
    for (report, actual) in verification.reports.iter().zip(&verification.actual) {
        let expected = verification.expected.events.get(&report.region).unwrap_or(&none);
        for (kind, names) in drifted(report) {
            for name in names {
                let Some(replicated) = expected.get(&(kind, name.clone())) else { continue };
                let mut origins: Vec<Event> = replicated
                    .iter()
                    .filter_map(|e| verification.expected.origins.get(&e.id))
                    .map(|(place, event)| chosen.get(place).cloned().unwrap_or_else(|| event.clone()))
                    .collect();
                let mut removed = mend(kind, name, &mut origins, actual, &report.region, now);
                // The run's stages route them again.
                for event in origins.iter_mut().chain(&mut removed) {
                    event.targets.clear();
                }
                removals_first.extend(removed);
                for event in origins {
                    if let Some((place, _)) = verification.expected.origins.get(&event.id) {
                        chosen.insert(*place, event);
                    }
                }
            }
        }
    }
    // In the order a sync writes (a comparing scan lists memberships with
    // their groups, before the things), then in the scan's order.
    let mut chosen: Vec<(usize, Event)> = chosen.into_iter().collect();
    chosen.sort_by_key(|(place, event)| (write_rank(event.entity), *place));
    removals_first.extend(chosen.into_iter().map(|(_, event)| event));
    removals_first
}

/// Where an entity comes in a sync: what others need goes first (types,
/// groups, billing groups, policies, certificates, things), then what needs
/// things (memberships, shadows).
fn write_rank(entity: Entity) -> u8 {
    match entity {
        Entity::ThingType => 0,
        Entity::ThingGroup | Entity::ThingGroupHierarchy => 1,
        Entity::BillingGroup => 2,
        Entity::Policy => 3,
        Entity::Certificate => 4,
        Entity::Thing | Entity::ThingTypeAssociation => 5,
        Entity::ThingGroupMembership | Entity::BillingGroupMembership => 6,
        Entity::Shadow => 7,
    }
}

/// Per kind, the names of entities missing in or different from the target.
fn drifted(report: &RegionReport) -> impl Iterator<Item = (&'static str, Vec<&String>)> {
    report
        .kinds
        .iter()
        .map(|(kind, counts)| (*kind, counts.missing.iter().chain(counts.different.iter().map(|d| &d.name)).collect()))
}

/// The events that bring one region to what the source says.
fn events_for(
    report: &RegionReport,
    expected: &BTreeMap<(&'static str, String), Vec<Event>>,
    actual: &Image,
    now: u64,
) -> Vec<Event> {
    let region = &report.region;
    let mut out = Vec::new();
    for (kind, names) in drifted(report) {
        for name in names {
            let Some(source) = expected.get(&(kind, name.clone())) else { continue };
            let mut events: Vec<Event> = source.iter().cloned().map(|e| only_in(e, region)).collect();
            let removed = mend(kind, name, &mut events, actual, region, now);
            events.splice(0..0, removed);
            out.extend(events);
        }
    }
    for kind in KINDS {
        for name in &report.kinds[kind].extra {
            out.extend(deletion(kind, name, actual.get(kind, name), region, now));
        }
    }
    out
}

/// Readies the source's `events` of drifted entry `kind`/`name` for a target
/// that holds `actual`: shadows are marked as repairs (the target may have
/// drifted from a version the ledger holds: written again unless a newer
/// one was applied) and null what only the target has (an update merges);
/// a thing's memberships and certificates only the target has are removed.
/// Returns the removals, to be applied first.
fn mend(kind: &str, name: &str, events: &mut [Event], actual: &Image, region: &str, now: u64) -> Vec<Event> {
    let have = actual.get(kind, name);
    for event in events.iter_mut().filter(|e| e.entity == Entity::Shadow) {
        if event.related(related::REPAIR).is_none() {
            event.related.push((related::REPAIR.into(), "drift".into()));
        }
        if let Some(have) = have {
            event.document = event.document.take().map(|d| removing_extras(&d, &have["state"]));
        }
    }
    match have {
        Some(have) if kind == "things" => removals(name, events, have, region, now),
        _ => Vec::new(),
    }
}

/// What the target has on thing `name` that the source's `events` do not
/// give it: group and billing-group memberships to remove (first), and
/// certificates to detach (named on the thing's own event).
fn removals(name: &str, events: &mut [Event], have: &Value, region: &str, now: u64) -> Vec<Event> {
    let wanted = |entity: Entity, kind: &str| -> Vec<String> {
        events.iter().filter(|e| e.entity == entity).filter_map(|e| e.related(kind).map(str::to_string)).collect()
    };
    let groups = wanted(Entity::ThingGroupMembership, related::THING_GROUP);
    let billing = wanted(Entity::BillingGroupMembership, related::BILLING_GROUP);
    let texts = |field: &str| -> Vec<String> {
        match &have[field] {
            Value::Array(items) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Value::String(one) => vec![one.clone()],
            _ => Vec::new(),
        }
    };
    let mut out = Vec::new();
    for group in texts("groups").into_iter().filter(|g| !groups.contains(g)) {
        let mut removal = repair_event(Entity::ThingGroupMembership, Operation::Removed, name, region, now);
        removal.set_related(related::THING_GROUP, Some(group));
        out.push(removal);
    }
    for group in texts("billing_group").into_iter().filter(|g| !billing.contains(g)) {
        let mut removal = repair_event(Entity::BillingGroupMembership, Operation::Removed, name, region, now);
        removal.set_related(related::BILLING_GROUP, Some(group));
        out.push(removal);
    }
    if let Some(thing) = events.iter_mut().find(|e| e.entity == Entity::Thing) {
        let attached: Vec<String> =
            thing.related.iter().filter(|(k, _)| k == related::PRINCIPAL).map(|(_, v)| v.clone()).collect();
        for certificate in texts("certificates").into_iter().filter(|c| !attached.contains(c)) {
            thing.related.push((related::DETACHED_PRINCIPAL.into(), certificate));
        }
    }
    out
}

/// A shadow update `document` that also removes (sets to null) every key of
/// `have` (the target's state) that its state lacks.
fn removing_extras(document: &str, have: &Value) -> String {
    fn nulls(want: &mut Value, have: &Value) {
        let (Value::Object(want), Value::Object(have)) = (want, have) else { return };
        for (key, value) in have {
            match want.get_mut(key) {
                Some(nested) => nulls(nested, value),
                None => {
                    want.insert(key.clone(), Value::Null);
                }
            }
        }
    }
    let Ok(mut document) = serde_json::from_str::<Value>(document) else { return document.to_string() };
    if !document["state"].is_object() {
        document["state"] = Value::Object(Default::default());
    }
    // The only parts an update may name.
    for part in ["desired", "reported"] {
        let Some(had) = have.get(part).filter(|v| v.is_object()) else { continue };
        // Key by key, also for a part the source lacks: AWS removes a part
        // set to null, moto ignores it; both remove a key set to null.
        let want = document["state"].as_object_mut().expect("an object").entry(part).or_insert(Value::Null);
        if !want.is_object() {
            *want = Value::Object(Default::default());
        }
        nulls(want, had);
    }
    document.to_string()
}

/// The deletion of an entity the target holds and the source does not.
fn deletion(kind: &str, name: &str, have: Option<&Value>, region: &str, now: u64) -> Option<Event> {
    let entity = match kind {
        "shadows" => {
            let (thing, shadow) = shadow_of(name);
            let mut event = repair_event(Entity::Shadow, Operation::Deleted, thing, region, now);
            event.set_related(related::SHADOW_NAME, shadow.map(str::to_string));
            return Some(event);
        }
        kind => entity_of(kind)?,
    };
    let mut event = repair_event(entity, Operation::Deleted, name, region, now);
    // A dynamic group is deleted with its own call.
    if entity == Entity::ThingGroup && have.is_some_and(|g| g["dynamic"] == Value::Bool(true)) {
        event.document = Some(r#"{"dynamic":true}"#.into());
    }
    Some(event)
}

fn entity_of(kind: &str) -> Option<Entity> {
    Some(match kind {
        "thing-types" => Entity::ThingType,
        "thing-groups" => Entity::ThingGroup,
        "billing-groups" => Entity::BillingGroup,
        "policies" => Entity::Policy,
        "certificates" => Entity::Certificate,
        "things" => Entity::Thing,
        _ => return None,
    })
}

fn repair_event(entity: Entity, operation: Operation, name: &str, region: &str, now: u64) -> Event {
    let mut event = Event::new(entity, operation, name);
    event.id = format!("repair-{}-{}-{name}-{now}", entity.as_str(), operation.as_str());
    event.timestamp_ms = now;
    event.targets = vec![region.to_string()];
    event
}

fn only_in(mut event: Event, region: &str) -> Event {
    event.targets = vec![region.to_string()];
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_shadow_repair_removes_what_only_the_target_has() {
        let document = json!({ "state": { "desired": { "mode": "eco" }, "reported": { "on": true } } }).to_string();
        let have = json!({ "desired": { "mode": "boost", "extra": 1 }, "reported": { "on": true } });
        let repaired: Value = serde_json::from_str(&removing_extras(&document, &have)).unwrap();
        assert_eq!(
            repaired,
            json!({ "state": { "desired": { "mode": "eco", "extra": null }, "reported": { "on": true } } })
        );
        // A part the source's shadow lacks is emptied key by key.
        let document = json!({ "state": { "reported": { "on": true } } }).to_string();
        let repaired: Value = serde_json::from_str(&removing_extras(&document, &have)).unwrap();
        assert_eq!(
            repaired,
            json!({ "state": { "desired": { "mode": null, "extra": null }, "reported": { "on": true } } })
        );
    }
}
