//! Shadow writes, made once in effect. A shadow update is not idempotent:
//! every write makes a version. A write whose answer was lost (a dropped
//! connection, a timeout, a 5xx, a crash of iotdr) may have been made, and
//! may still be made later (a request on its way when the run died).
//!
//! So every write iotdr makes to a shadow it has written before is
//! conditional on the target's version (the shadow service refuses one made
//! against another version with 409): repeated, it meets the conflict instead
//! of counting twice, and a late copy of it meets the version the repeat
//! made. The version the write expects is noted before it is sent (the state
//! store's `in_flight`), so a restart repeats it against the same version.
//! The first write to a shadow has no version to expect: after a lost
//! answer the target is read before writing again. docs/architecture.md#shadow-writes.

use super::{Applier, ApplyError, RegionClients, invalid, is, optional_text, text};
use crate::aws::errors::{AwsError, ErrorKind};
use crate::event::Event;
use crate::plan::Call;
use crate::state::ledger::{Order, Position, shadow_key};
use crate::state::{InFlight, SHADOW_VERSION};
use aws_sdk_iotdataplane::primitives::Blob;
use serde_json::Value;
use std::sync::Mutex;
use std::time::Duration;

/// How long an unconditional write whose answer was lost (or found in flight
/// after a restart) is given to land before it is made again: the service
/// may still be processing it.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(2);

/// Conflicts with other writers of the target's shadow (a device in the
/// secondary) tolerated before the change is given up as a conflict.
const MAX_CONFLICTS: u32 = 8;

/// The target's shadow, as read.
enum Target {
    Missing,
    At { version: u64, holds: bool },
}

/// What one write attempt knows: the version it expects, and whether an
/// earlier attempt may have been made without its answer.
struct Attempt {
    expected: Option<u64>,
    uncertain: bool,
    /// Whether the wait for an unconditional write to land was spent (once per change).
    waited: bool,
}

enum Wrote {
    /// Written: the target's new version.
    Written(Option<u64>),
    /// The target held the change already (an earlier attempt made it).
    Found(u64),
}

impl Applier {
    /// Writes `call` (an `UpdateThingShadow` for `event`) to the target once in effect.
    pub(super) async fn update_shadow(&self, c: &RegionClients, event: &Event, call: &Call) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let thing = text(call, "thingName")?;
        let shadow = optional_text(call, "shadowName");
        let key = shadow_key(thing, shadow.unwrap_or(""));
        let payload = call.input.get("payload").ok_or_else(|| invalid(call.operation, "input lacks `payload`"))?;
        let change = match Position::of(event).map(|p| p.order) {
            Some(Order::ShadowVersion(version) | Order::ShadowRepair(version)) => Some(version),
            _ => None,
        };
        let known = self.state.known(region, SHADOW_VERSION, &key)?.and_then(|v| v.parse().ok());
        let attempt = Mutex::new(match self.state.in_flight(region, &key)? {
            // A write the stopped run was making: repeated against the same version.
            Some(InFlight { target_version, .. }) => {
                Attempt { expected: target_version, uncertain: true, waited: false }
            }
            None => Attempt { expected: known, uncertain: false, waited: false },
        });
        let mut conflicts = 0;
        let made = loop {
            let expected = attempt.lock().expect("attempt").expected;
            self.state.mark_in_flight(region, &key, change.unwrap_or(0), expected)?;
            let result = self
                .limiter
                .send(region, "UpdateThingShadow", || self.write_attempt(c, thing, shadow, payload, &attempt))
                .await
                .map_err(|error| ApplyError::Aws { operation: "UpdateThingShadow".into(), error });
            match result {
                Ok(Wrote::Written(version)) => break version,
                Ok(Wrote::Found(version)) => break Some(version),
                Err(e) if is(&e, ErrorKind::Conflict) && conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    // The target's version moved: this write made earlier
                    // (its answer lost), or another writer's.
                    let target = self.read_target(c, thing, shadow, payload).await;
                    let target =
                        target.map_err(|error| ApplyError::Aws { operation: "GetThingShadow".into(), error })?;
                    let mut attempt = attempt.lock().expect("attempt");
                    attempt.uncertain = false;
                    match target {
                        Target::At { version, holds: true } if attempt.expected.is_some_and(|e| version == e + 1) => {
                            break Some(version);
                        }
                        Target::At { version, .. } => attempt.expected = Some(version),
                        Target::Missing => attempt.expected = None,
                    }
                }
                Err(e) => {
                    // Refused (the thing missing, a bad request): not made. Left
                    // in flight, its next try would wait for it to land.
                    if (is(&e, ErrorKind::NotFound) || is(&e, ErrorKind::Permanent))
                        && !attempt.lock().expect("attempt").uncertain
                    {
                        self.state.clear_in_flight(region, &key)?;
                    }
                    return Err(e);
                }
            }
        };
        self.note_version(region, &key, made)?;
        // A change with a version stays in flight until its ledger entry is
        // recorded (Applier::apply), which clears it.
        if change.is_none() {
            self.state.clear_in_flight(region, &key)?;
        }
        Ok(())
    }

    /// One attempt: after an attempt whose answer was lost, looks at the
    /// target first, then writes against the version expected.
    async fn write_attempt(
        &self,
        c: &RegionClients,
        thing: &str,
        shadow: Option<&str>,
        payload: &Value,
        attempt: &Mutex<Attempt>,
    ) -> Result<Wrote, AwsError> {
        let (mut expected, uncertain, mut waited) = {
            let a = attempt.lock().expect("attempt");
            (a.expected, a.uncertain, a.waited)
        };
        if uncertain {
            let mut target = self.read_target(c, thing, shadow, payload).await?;
            if expected.is_none() && !waited && !matches!(target, Target::At { holds: true, .. }) {
                waited = true;
                tokio::time::sleep(IN_FLIGHT_GRACE).await;
                target = self.read_target(c, thing, shadow, payload).await?;
            }
            match (target, expected) {
                // Not made: write it against the same version.
                (Target::At { version, .. }, Some(e)) if version == e => {}
                (Target::At { version, holds: true }, Some(e)) if version == e + 1 => return Ok(Wrote::Found(version)),
                (Target::At { version, holds: true }, None) => return Ok(Wrote::Found(version)),
                (Target::At { version, .. }, _) => expected = Some(version),
                (Target::Missing, _) => expected = None,
            }
            *attempt.lock().expect("attempt") = Attempt { expected, uncertain: false, waited };
        }
        let mut body = payload.clone();
        if let (Some(version), Some(fields)) = (expected, body.as_object_mut()) {
            fields.insert("version".into(), version.into());
        }
        let request = c
            .data
            .update_thing_shadow()
            .thing_name(thing)
            .set_shadow_name(shadow.map(str::to_string))
            .payload(Blob::new(serde_json::to_vec(&body).expect("JSON")));
        match request.send().await.map_err(AwsError::from_sdk) {
            Ok(out) => {
                let document = out.payload.and_then(|p| serde_json::from_slice::<Value>(p.as_ref()).ok());
                Ok(Wrote::Written(document.and_then(|d| d.get("version").and_then(Value::as_u64))))
            }
            Err(e) => {
                // Throttled requests were not made; any other retryable
                // failure may have been.
                if e.is(ErrorKind::Transient) {
                    attempt.lock().expect("attempt").uncertain = true;
                }
                Err(e)
            }
        }
    }

    /// The target shadow's version, and whether it holds `payload`'s state.
    async fn read_target(
        &self,
        c: &RegionClients,
        thing: &str,
        shadow: Option<&str>,
        payload: &Value,
    ) -> Result<Target, AwsError> {
        let got = self
            .limiter
            .send(&c.region, "GetThingShadow", || {
                let request = c.data.get_thing_shadow().thing_name(thing).set_shadow_name(shadow.map(str::to_string));
                async move { request.send().await.map_err(AwsError::from_sdk) }
            })
            .await;
        let document = match got {
            Ok(out) => out.payload.and_then(|p| serde_json::from_slice::<Value>(p.as_ref()).ok()).unwrap_or_default(),
            Err(e) if e.is(ErrorKind::NotFound) => return Ok(Target::Missing),
            Err(e) => return Err(e),
        };
        let Some(version) = document.get("version").and_then(Value::as_u64) else { return Ok(Target::Missing) };
        Ok(Target::At { version, holds: holds(&payload["state"], &document["state"]) })
    }

    fn note_version(&self, region: &str, key: &str, version: Option<u64>) -> Result<(), ApplyError> {
        match version {
            Some(version) => self.state.set_known(region, SHADOW_VERSION, key, &version.to_string())?,
            None => self.state.forget(region, SHADOW_VERSION, key)?,
        }
        Ok(())
    }

    /// A deleted shadow's next write starts unconditionally (AWS numbers a
    /// shadow made again within 48 h after the deleted one, later from 0).
    pub(super) fn forget_shadow_version(
        &self,
        region: &str,
        thing: &str,
        shadow: Option<&str>,
    ) -> Result<(), ApplyError> {
        self.note_version(region, &shadow_key(thing, shadow.unwrap_or("")), None)
    }
}

/// Whether `document` already reflects the merge patch `patch` (shadow
/// semantics: objects merge, null removes, anything else replaces).
fn holds(patch: &Value, document: &Value) -> bool {
    match patch {
        Value::Object(fields) => fields.iter().all(|(key, value)| match (value, document.get(key)) {
            (Value::Null, found) => found.is_none_or(Value::is_null),
            (_, None) => false,
            (value, Some(found)) => holds(value, found),
        }),
        other => other == document,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_shadow_holds_a_patch_when_every_value_is_there_and_every_removal_done() {
        let document = json!({ "reported": { "temp": 21, "mode": { "fan": "on" } }, "desired": { "temp": 20 } });
        assert!(holds(&json!({ "reported": { "temp": 21 } }), &document));
        assert!(holds(&json!({ "reported": { "mode": { "fan": "on" } }, "desired": { "gone": null } }), &document));
        assert!(!holds(&json!({ "reported": { "temp": 22 } }), &document));
        assert!(!holds(&json!({ "desired": { "temp": null } }), &document));
        assert!(!holds(&json!({ "reported": { "new": 1 } }), &document));
    }
}
