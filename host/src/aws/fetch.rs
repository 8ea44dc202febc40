//! Completes events from the source region when they are ingested: registry
//! events carry no certificate PEMs, policy documents or attachments, so they
//! are fetched here and travel with the event. Applying then never needs the
//! source region.

use super::clients::RegionClients;
use super::errors::{AwsError, ErrorKind};
use super::rate::Limiter;
use crate::event::{Entity, Event, Operation, related};
use crate::state::{DeadLetter, Step};
use futures_util::StreamExt;
use serde_json::json;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

pub struct SourceFetcher {
    clients: RegionClients,
    limiter: Arc<Limiter>,
    /// Policies attached to every certificate that arrives through JITR.
    jitr_policies: Vec<String>,
    /// Certificates and policies already carried in this run: sent once.
    carried: Mutex<HashSet<(Entity, String)>>,
}

macro_rules! fetch {
    ($self:ident, $operation:literal, $request:expr) => {{
        let request = $request;
        $self
            .limiter
            .send(&$self.clients.region, $operation, || {
                let request = request.clone();
                async move { request.send().await.map_err(AwsError::from_sdk) }
            })
            .await
    }};
}

impl SourceFetcher {
    pub fn new(clients: RegionClients, limiter: Arc<Limiter>, jitr_policies: Vec<String>) -> SourceFetcher {
        SourceFetcher { clients, limiter, jitr_policies, carried: Mutex::new(HashSet::new()) }
    }

    /// Connects to the pipeline's source region; `limiter` is the run's one limiter.
    pub async fn connect(pipeline: &crate::config::Pipeline, limiter: Arc<Limiter>) -> Result<SourceFetcher, AwsError> {
        let settings = pipeline.regions.get(&pipeline.source_region).cloned().unwrap_or_default();
        let clients = RegionClients::connect(&pipeline.source_region, &settings, false).await?;
        Ok(SourceFetcher::new(clients, limiter, pipeline.apply.jitr_policies.clone()))
    }

    /// The source-region calls made so far.
    pub fn stats(&self) -> super::CallStats {
        self.limiter.stats(std::slice::from_ref(&self.clients.region), &[])
    }

    /// Reads a thing or a certificate from the source again, as the events
    /// that make a target hold what the source holds now: a thing with its
    /// attributes, type and principals (and the certificates new to this
    /// run), or a certificate with its PEM, status and policies. They take
    /// the time, account and targets of `cause`, the event that asked for the
    /// re-read. Nothing when the entity is gone (its deletion has an event).
    pub async fn reread(&self, kind: &str, name: &str, cause: &Event) -> Result<Vec<Event>, Box<DeadLetter>> {
        let fail = |what: &str, e: AwsError| {
            Box::new(DeadLetter::for_event(
                Step::Fetch,
                format!("{what} from {}: {e}", cause.source_region),
                cause.clone(),
            ))
        };
        match kind {
            "certificate" => match self.certificate(name, cause).await {
                Ok(Some(mut events)) => {
                    if let Some(certificate) = events.last_mut() {
                        certificate.id = format!("recheck-{}", certificate.id);
                    }
                    Ok(events)
                }
                Ok(None) => Ok(Vec::new()),
                Err(e) => Err(fail("re-reading the certificate", e)),
            },
            _ => {
                let described = match fetch!(self, "DescribeThing", self.clients.iot.describe_thing().thing_name(name))
                {
                    Ok(described) => described,
                    Err(e) if e.is(ErrorKind::NotFound) => return Ok(Vec::new()),
                    Err(e) => return Err(fail("re-reading the thing", e)),
                };
                let mut thing = Event::new(Entity::Thing, Operation::Updated, name);
                thing.id = format!("recheck-thing-{name}-{}", cause.timestamp_ms);
                thing.source_region = cause.source_region.clone();
                thing.account_id = cause.account_id.clone();
                thing.timestamp_ms = cause.timestamp_ms;
                thing.version = (described.version > 0).then_some(described.version as u64);
                thing.targets = cause.targets.clone();
                thing.attributes = described.attributes.unwrap_or_default().into_iter().collect();
                thing.set_related(related::THING_TYPE, described.thing_type_name);
                let (events, mut dead) = self.complete(vec![thing]).await;
                match dead.pop() {
                    Some(letter) => Err(Box::new(letter)),
                    None => Ok(events),
                }
            }
        }
    }

    /// Completes a batch: each event comes back with what it was missing, after
    /// the certificates and policies it needs (new to this run; the event
    /// itself comes last in what `complete_one` returns). Events that
    /// cannot be completed become dead letters.
    pub async fn complete(&self, events: Vec<Event>) -> (Vec<Event>, Vec<DeadLetter>) {
        let mut done =
            futures_util::stream::iter(events.into_iter().map(|event| self.complete_one(event))).buffered(16);
        let mut out = Vec::new();
        let mut dead = Vec::new();
        // Events complete concurrently; which one carries a shared certificate
        // or policy is decided here, in source order, so it always comes
        // before the first event that needs it.
        while let Some(result) = done.next().await {
            match result {
                Ok(events) => {
                    let count = events.len();
                    for (index, event) in events.into_iter().enumerate() {
                        let fetched = index + 1 < count;
                        // A JITR certificate carries itself: later events need not.
                        let carried = self.first_time(event.entity, &event.name);
                        if !fetched || carried {
                            out.push(event);
                        }
                    }
                }
                Err(letter) => dead.push(*letter),
            }
        }
        (out, dead)
    }

    fn first_time(&self, entity: Entity, name: &str) -> bool {
        self.carried.lock().expect("carried lock").insert((entity, name.to_string()))
    }

    /// Whether an earlier batch already carried it (this batch decides in `complete`).
    fn carried(&self, entity: Entity, name: &str) -> bool {
        self.carried.lock().expect("carried lock").contains(&(entity, name.to_string()))
    }

    async fn complete_one(&self, mut event: Event) -> Result<Vec<Event>, Box<DeadLetter>> {
        let fail = |event: Event, what: &str, e: AwsError| {
            Box::new(DeadLetter::for_event(Step::Fetch, format!("{what} from {}: {e}", event.source_region), event))
        };
        match (event.entity, event.operation) {
            (Entity::Certificate, Operation::Created) if !carries_pem(&event) => {
                let id = event.name.clone();
                match self.certificate(&id, &event).await {
                    Ok(Some(mut events)) => {
                        let mut certificate = events.pop().expect("the certificate comes last");
                        // The status just read wins over the event's: a JITR
                        // event says PENDING_ACTIVATION, and AWS publishes no
                        // event when the certificate is activated after it.
                        // JITR certificates also get the policies the pipeline names.
                        for policy in &self.jitr_policies {
                            if !certificate.related.iter().any(|(k, v)| k == related::POLICY && v == policy) {
                                certificate.related.push((related::POLICY.into(), policy.clone()));
                            }
                            if !self.carried(Entity::Policy, policy) {
                                match self.policy(policy, &event).await {
                                    Ok(found) => events.splice(0..0, found),
                                    Err(e) => return Err(fail(event, "fetching a JITR policy", e)),
                                };
                            }
                        }
                        // Still a JITR certificate: the run reads it again later.
                        certificate.set_related(
                            related::CA_CERTIFICATE,
                            event.related(related::CA_CERTIFICATE).map(str::to_string),
                        );
                        certificate.id = event.id;
                        events.push(certificate);
                        Ok(events)
                    }
                    Ok(None) => Err(Box::new(DeadLetter::for_event(
                        Step::Fetch,
                        format!("certificate {id} is no longer in {}: nothing to replicate", event.source_region),
                        event,
                    ))),
                    Err(e) => Err(fail(event, "fetching the certificate", e)),
                }
            }
            (Entity::Thing, Operation::Created | Operation::Updated) => {
                let listed = fetch!(
                    self,
                    "ListThingPrincipals",
                    self.clients.iot.list_thing_principals().thing_name(&event.name)
                );
                let principals = match listed {
                    Ok(out) => out.principals.unwrap_or_default(),
                    // Deleted in the source since: apply what the event says.
                    Err(e) if e.is(ErrorKind::NotFound) => Vec::new(),
                    Err(e) => return Err(fail(event, "listing the thing's principals", e)),
                };
                let mut before = Vec::new();
                // Added to the event only once every certificate is fetched: a
                // failed fetch dead-letters the event as it came.
                let mut attached = Vec::new();
                for principal in principals {
                    let Some((_, id)) = principal.rsplit_once(":cert/") else { continue };
                    attached.push((related::PRINCIPAL.to_string(), id.to_string()));
                    if !self.carried(Entity::Certificate, id) {
                        match self.certificate(id, &event).await {
                            Ok(Some(events)) => before.extend(events),
                            Ok(None) => {}
                            Err(e) => return Err(fail(event, "fetching its certificate", e)),
                        }
                    }
                }
                event.related.extend(attached);
                before.push(event);
                Ok(before)
            }
            _ => Ok(vec![event]),
        }
    }

    /// The policy as an event with its default document (none when it is gone).
    async fn policy(&self, name: &str, cause: &Event) -> Result<Option<Event>, AwsError> {
        let got = match fetch!(self, "GetPolicy", self.clients.iot.get_policy().policy_name(name)) {
            Ok(got) => got,
            Err(e) if e.is(ErrorKind::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut event = Event::new(Entity::Policy, Operation::Created, name);
        event.id = format!("policy-{name}");
        event.source_region = cause.source_region.clone();
        event.account_id = cause.account_id.clone();
        event.timestamp_ms = cause.timestamp_ms;
        event.targets = cause.targets.clone();
        event.document = got.policy_document;
        Ok(Some(event))
    }

    /// The certificate as an event (PEM, status, attached policies), after
    /// events for its policies new to this run. `None` when it is gone.
    async fn certificate(&self, id: &str, cause: &Event) -> Result<Option<Vec<Event>>, AwsError> {
        let described =
            match fetch!(self, "DescribeCertificate", self.clients.iot.describe_certificate().certificate_id(id)) {
                Ok(out) => out
                    .certificate_description
                    .unwrap_or_else(|| aws_sdk_iot::types::CertificateDescription::builder().build()),
                Err(e) if e.is(ErrorKind::NotFound) => return Ok(None),
                Err(e) => return Err(e),
            };
        let Some(pem) = described.certificate_pem else { return Ok(None) };
        let arn = described.certificate_arn.unwrap_or_default();
        let attached = fetch!(self, "ListAttachedPolicies", self.clients.iot.list_attached_policies().target(&arn))?;
        let mut events = Vec::new();
        let mut certificate = Event::new(Entity::Certificate, Operation::Created, id);
        certificate.id = format!("certificate-{id}");
        certificate.source_region = cause.source_region.clone();
        certificate.account_id = cause.account_id.clone();
        certificate.timestamp_ms = cause.timestamp_ms;
        certificate.targets = cause.targets.clone();
        let status = described.status.map(|s| s.as_str().to_string()).unwrap_or_else(|| "ACTIVE".into());
        certificate.set_related(related::CERTIFICATE_STATUS, Some(status));
        certificate.document = Some(json!({ "certificatePem": pem }).to_string());
        for policy in attached.policies.unwrap_or_default().into_iter().filter_map(|p| p.policy_name) {
            certificate.related.push((related::POLICY.into(), policy.clone()));
            if !self.carried(Entity::Policy, &policy) {
                events.extend(self.policy(&policy, cause).await?);
            }
        }
        events.push(certificate);
        Ok(Some(events))
    }
}

/// Whether a certificate event holds its PEM (`certificatePem` in its document).
pub fn carries_pem(event: &Event) -> bool {
    event
        .document
        .as_deref()
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .is_some_and(|d| d.get("certificatePem").and_then(serde_json::Value::as_str).is_some_and(|p| !p.is_empty()))
}
