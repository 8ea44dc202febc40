//! Completes events from the source region when they are ingested: registry
//! events carry no certificate PEMs, policy documents or attachments, so they
//! are fetched here and travel with the event. Applying then never needs the
//! source region.

use super::clients::RegionClients;
use super::errors::{AwsError, ErrorKind};
use super::rate::Limiter;
use crate::event::{Entity, Event, Operation, related};
use crate::state::{DeadLetter, StateStore, Step};
use futures_util::StreamExt;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The re-read kind of an event whose completion ingest left for later.
pub const DEFERRED: &str = "deferred";

/// Source reads in flight at once.
const READ_CONCURRENCY: usize = 16;

pub struct SourceFetcher {
    clients: RegionClients,
    limiter: Arc<Limiter>,
    /// Policies attached to every certificate that arrives through JITR.
    jitr_policies: Vec<String>,
    /// Certificates and policies this run has queued (see [`carry`](Self::carry)): sent once.
    carried: Mutex<HashSet<(Entity, String)>>,
    /// Set when an ingest read gave up on the source (see
    /// [`ReadPlan::defer_after`]) and nothing has answered since: ingest
    /// reads are then not sent, but for one every [`PROBE_EVERY`] (the last
    /// one let through is the time held), so that the source answering
    /// again is seen even while every second read is busy retrying.
    source_down: Mutex<Option<Instant>>,
}

/// While the source does not answer, one ingest read is let through this often.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Sends one source read through the run's limiter, retrying until the
/// limiter's deadline, or for at most `$within` (`ZERO`: none is sent), and
/// notes whether the source answered.
macro_rules! read {
    ($self:ident, $within:expr, $operation:literal, $request:expr) => {{
        let request = $request;
        let within: Option<Duration> = $within;
        let send = $self.limiter.send_within(&$self.clients.region, $operation, within, || {
            let request = request.clone();
            async move { request.send().await.map_err(AwsError::from_sdk) }
        });
        let result = match within {
            Some(Duration::ZERO) => Err(not_sent($operation)),
            _ => send.await,
        };
        $self.answered(&result, within);
        result
    }};
}

/// The retryable error of a read not sent: the source did not answer an earlier one.
fn not_sent(operation: &str) -> AwsError {
    AwsError {
        kind: ErrorKind::Transient,
        code: "NotSent".into(),
        message: format!("{operation} left for a second read: the source did not answer an earlier read"),
        status: None,
        resource_id: None,
    }
}

/// What completing a batch gave.
#[derive(Debug, Default)]
pub struct Completed {
    /// The events to queue, in source order, each after what it needs.
    pub events: Vec<Event>,
    pub dead_letters: Vec<DeadLetter>,
    /// Events whose reads gave up on the source for now (see
    /// [`ReadPlan::defer_after`]): each must be read again by a second read.
    /// A thing among them is in `events` too, as it came.
    pub deferred: Vec<Event>,
}

/// Why an event was not completed.
enum Incomplete {
    Dead(Box<DeadLetter>),
    /// The source did not answer within the ingest's patience.
    Later(Box<Event>),
}

impl SourceFetcher {
    pub fn new(clients: RegionClients, limiter: Arc<Limiter>, jitr_policies: Vec<String>) -> SourceFetcher {
        SourceFetcher {
            clients,
            limiter,
            jitr_policies,
            carried: Mutex::new(HashSet::new()),
            source_down: Mutex::new(None),
        }
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
    /// attributes, type and principals, after its certificates (read again
    /// too) and the policies new to this run; or a certificate with its PEM,
    /// status and policies. They take the time, account and targets of
    /// `cause`, the event that asked for the re-read. Nothing when the entity
    /// is gone (its deletion has an event).
    ///
    /// A `deferred` re-read is the completion ingest left for later: the
    /// cause itself, completed now (every read retried until the deadline).
    ///
    /// Which of the policies found travel is decided in order by
    /// [`rereads`](Self::rereads): a read finishing first is not always the
    /// one queued first.
    async fn reread(&self, kind: &str, name: &str, cause: &Event) -> Result<Vec<Event>, Box<DeadLetter>> {
        let fail = |what: &str, e: AwsError| {
            Box::new(DeadLetter::for_event(
                Step::Fetch,
                format!("{what} from {}: {e}", cause.source_region),
                cause.clone(),
            ))
        };
        match kind {
            DEFERRED if cause.entity != Entity::Thing => {
                match self.complete_one(cause.clone(), &HashMap::new(), None).await {
                    Ok(events) => Ok(events),
                    Err(Incomplete::Dead(letter)) => Err(letter),
                    // Without a plan every read retries until the deadline.
                    Err(Incomplete::Later(_)) => unreachable!("no patience without a plan"),
                }
            }
            "certificate" => match self.certificate(name, cause, None).await {
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
                let described =
                    match read!(self, None, "DescribeThing", self.clients.iot.describe_thing().thing_name(name)) {
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
                let principals =
                    self.principals(name, None).await.map_err(|e| fail("re-reading the thing's principals", e))?;
                let mut events = Vec::new();
                for principal in principals {
                    let Some((_, id)) = principal.rsplit_once(":cert/") else { continue };
                    thing.related.push((related::PRINCIPAL.into(), id.to_string()));
                    // Read again even if carried: its status may have changed
                    // with no event (an activation, a revocation).
                    let found =
                        self.certificate(id, cause, None).await.map_err(|e| fail("re-reading its certificate", e))?;
                    for mut event in found.unwrap_or_default() {
                        if event.entity == Entity::Certificate {
                            event.id = format!("recheck-{}", event.id);
                        }
                        events.push(event);
                    }
                }
                events.push(thing);
                Ok(events)
            }
        }
    }

    /// Makes the re-reads `due` (concurrently) and returns what they found,
    /// in their order, and the dead letters of those that failed.
    pub async fn rereads(&self, due: &[crate::state::queue::Recheck]) -> (Vec<Event>, Vec<DeadLetter>) {
        let reads = due.iter().map(|recheck| self.reread(&recheck.kind, &recheck.name, &recheck.cause));
        let mut done = futures_util::stream::iter(reads).buffered(READ_CONCURRENCY);
        let (mut events, mut dead) = (Vec::new(), Vec::new());
        let mut kept = HashSet::new();
        while let Some(result) = done.next().await {
            match result {
                // A certificate read again travels again: its status is what the read is for.
                Ok(found) => self.keep_first(found, true, &mut kept, &mut events),
                Err(letter) => dead.push(*letter),
            }
        }
        (events, dead)
    }

    /// Moves what one read found to `out`: the event itself (last), and
    /// before it the certificates and policies it needs, unless this run
    /// queued them already or `kept` (this batch) holds them (`refreshed`:
    /// certificates every time). Decided here, in source order, so a
    /// certificate or policy always comes before the first event that needs
    /// it, whichever read finished first. Batches in flight at once (ingest,
    /// second reads) may each carry one: twice is harmless, never is not.
    fn keep_first(
        &self,
        found: Vec<Event>,
        refreshed: bool,
        kept: &mut HashSet<(Entity, String)>,
        out: &mut Vec<Event>,
    ) {
        let count = found.len();
        for (index, event) in found.into_iter().enumerate() {
            let own = index + 1 == count;
            let first = !self.carried(event.entity, &event.name) && kept.insert((event.entity, event.name.clone()));
            if own || first || (refreshed && event.entity == Entity::Certificate) {
                out.push(event);
            }
        }
    }

    /// Notes the certificates and policies of `events` as queued: later
    /// batches need not carry them. Called once `events` are stored, never
    /// before, or an event of another batch stored first could go without
    /// the policy it needs.
    pub fn carry(&self, events: &[Event]) {
        let mut carried = self.carried.lock().expect("carried lock");
        let created = |e: &&Event| e.operation == Operation::Created;
        for event in events.iter().filter(created).filter(|e| matches!(e.entity, Entity::Certificate | Entity::Policy))
        {
            if event.entity == Entity::Policy || carries_pem(event) {
                carried.insert((event.entity, event.name.clone()));
            }
        }
    }

    /// Completes a batch: each event comes back with what it was missing, after
    /// the certificates and policies it needs (new to this run; the event
    /// itself comes last in what `complete_one` returns). Events that
    /// cannot be completed become dead letters, or are deferred (below).
    ///
    /// Reads are spent only where they can change the outcome: an event
    /// `plan` spares, or whose thing the batch deletes later, is passed on as
    /// it came; a thing's principals are read once per batch (every event
    /// of the batch arrived before that read); a certificate every target
    /// holds is not read for the things it is attached to.
    ///
    /// With `plan.defer_after`, a read the source does not answer in time
    /// leaves its event to a second read (`Completed::deferred`) instead of
    /// holding the batch: ingest keeps up with the stream during a source
    /// outage, and what the events carry is applied meanwhile.
    pub async fn complete(&self, events: Vec<Event>, plan: Option<&ReadPlan<'_>>) -> Completed {
        let patience = self.patience(plan);
        let needs = reads_needed(&events, &|event| plan.is_some_and(|p| p.spares(event)));
        let things: Vec<&str> = {
            let mut seen = HashSet::new();
            events
                .iter()
                .zip(&needs)
                .filter(|(event, needed)| **needed && event.entity == Entity::Thing && seen.insert(event.name.as_str()))
                .map(|(event, _)| event.name.as_str())
                .collect()
        };
        let reads = things
            .iter()
            .map(|name| async move { (name.to_string(), self.principals(name, self.within(patience)).await) });
        let principals: HashMap<String, Result<Vec<String>, AwsError>> =
            futures_util::stream::iter(reads).buffer_unordered(READ_CONCURRENCY).collect().await;
        let principals = &principals;
        let completions = events.into_iter().zip(needs).map(|(event, needed)| async move {
            if needed { self.complete_one(event, principals, plan).await } else { Ok(vec![event]) }
        });
        let mut done = futures_util::stream::iter(completions).buffered(READ_CONCURRENCY);
        let mut completed = Completed::default();
        let mut kept = HashSet::new();
        let out = &mut completed.events;
        while let Some(result) = done.next().await {
            match result {
                // A JITR certificate, last of its own, carries itself: later events need not.
                Ok(events) => self.keep_first(events, false, &mut kept, out),
                Err(Incomplete::Dead(letter)) => completed.dead_letters.push(*letter),
                Err(Incomplete::Later(event)) => {
                    let event = *event;
                    // A thing is applied as it came meanwhile: its event
                    // carries its attributes; only its principals need the read.
                    if event.entity == Entity::Thing {
                        out.push(event.clone());
                    }
                    completed.deferred.push(event);
                }
            }
        }
        completed
    }

    /// How long ingest reads wait for the source before leaving their event
    /// for later: `plan.defer_after`, when shorter than the retry deadline
    /// (after the whole deadline, a failed read makes a dead letter).
    fn patience(&self, plan: Option<&ReadPlan<'_>>) -> Option<Duration> {
        plan.and_then(|p| p.defer_after).filter(|p| *p < self.limiter.retry_deadline())
    }

    /// How long an ingest read may take: `patience` while the source
    /// answers; once a read gave up on it, none is sent (`ZERO`) but one
    /// every [`PROBE_EVERY`], until a read gets an answer; the limiter's
    /// deadline without patience.
    fn within(&self, patience: Option<Duration>) -> Option<Duration> {
        let patience = patience?;
        let mut down = self.source_down.lock().expect("source_down lock");
        match *down {
            Some(probed) if probed.elapsed() < PROBE_EVERY => Some(Duration::ZERO),
            Some(_) => {
                *down = Some(Instant::now());
                Some(patience)
            }
            None => Some(patience),
        }
    }

    /// Notes whether the source answered a read (any answer but a retryable
    /// failure is one) or an ingest read gave up on it.
    fn answered<T>(&self, result: &Result<T, AwsError>, within: Option<Duration>) {
        let mut down = self.source_down.lock().expect("source_down lock");
        match result {
            Err(e) if e.retryable() => {
                if within.is_some() && down.is_none() {
                    *down = Some(Instant::now());
                    tracing::warn!(
                        region = %self.clients.region,
                        "the source does not answer ({e}): ingest stores events as they come and leaves their reads for later"
                    );
                }
            }
            _ => {
                if down.take().is_some() {
                    tracing::info!(region = %self.clients.region, "the source answers again");
                }
            }
        }
    }

    /// The thing's principals now (none when it is gone: its deletion has an event).
    async fn principals(&self, thing: &str, within: Option<Duration>) -> Result<Vec<String>, AwsError> {
        match read!(self, within, "ListThingPrincipals", self.clients.iot.list_thing_principals().thing_name(thing)) {
            Ok(out) => Ok(out.principals.unwrap_or_default()),
            Err(e) if e.is(ErrorKind::NotFound) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Whether an earlier batch carried it and was stored (this batch decides in `keep_first`).
    fn carried(&self, entity: Entity, name: &str) -> bool {
        self.carried.lock().expect("carried lock").contains(&(entity, name.to_string()))
    }

    async fn complete_one(
        &self,
        mut event: Event,
        principals: &HashMap<String, Result<Vec<String>, AwsError>>,
        plan: Option<&ReadPlan<'_>>,
    ) -> Result<Vec<Event>, Incomplete> {
        let patience = self.patience(plan);
        let fail = |event: Event, what: &str, e: AwsError| {
            if e.retryable() && patience.is_some() {
                return Incomplete::Later(Box::new(event));
            }
            Incomplete::Dead(Box::new(DeadLetter::for_event(
                Step::Fetch,
                format!("{what} from {}: {e}", event.source_region),
                event,
            )))
        };
        match (event.entity, event.operation) {
            (Entity::Certificate, Operation::Created) if !carries_pem(&event) => {
                let id = event.name.clone();
                match self.certificate(&id, &event, self.within(patience)).await {
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
                                match self.policy(policy, &event, self.within(patience)).await {
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
                    Ok(None) => Err(Incomplete::Dead(Box::new(DeadLetter::for_event(
                        Step::Fetch,
                        format!("certificate {id} is no longer in {}: nothing to replicate", event.source_region),
                        event,
                    )))),
                    Err(e) => Err(fail(event, "fetching the certificate", e)),
                }
            }
            (Entity::Thing, Operation::Created | Operation::Updated) => {
                let principals = match principals.get(&event.name) {
                    Some(Ok(principals)) => principals.clone(),
                    Some(Err(e)) => {
                        let e = e.clone();
                        return Err(fail(event, "listing the thing's principals", e));
                    }
                    None => unreachable!("every thing event that needs reads had its principals read"),
                };
                let mut before = Vec::new();
                // Added to the event only once every certificate is fetched: a
                // failed fetch dead-letters the event as it came.
                let mut attached = Vec::new();
                for principal in principals {
                    let Some((_, id)) = principal.rsplit_once(":cert/") else { continue };
                    attached.push((related::PRINCIPAL.to_string(), id.to_string()));
                    let held = plan.is_some_and(|p| p.certificate_everywhere(id));
                    if !held && !self.carried(Entity::Certificate, id) {
                        match self.certificate(id, &event, self.within(patience)).await {
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
            // A dynamic group's live event carries no query: read it.
            (Entity::ThingGroup, _) => {
                let name = event.name.clone();
                let described = match read!(
                    self,
                    self.within(patience),
                    "DescribeThingGroup",
                    self.clients.iot.describe_thing_group().thing_group_name(&name)
                ) {
                    Ok(described) => described,
                    // Deleted since: its deletion has an event; planned without a query, it waits as a letter.
                    Err(e) if e.is(ErrorKind::NotFound) => return Ok(vec![event]),
                    Err(e) => return Err(fail(event, "reading the dynamic group's query", e)),
                };
                let mut document: serde_json::Map<String, serde_json::Value> =
                    event.document.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
                document.insert("queryString".into(), described.query_string.into());
                document.insert("indexName".into(), described.index_name.into());
                document.insert("queryVersion".into(), described.query_version.into());
                event.document = Some(serde_json::Value::Object(document).to_string());
                Ok(vec![event])
            }
            _ => Ok(vec![event]),
        }
    }

    /// The policy as an event with its default document (none when it is gone).
    async fn policy(&self, name: &str, cause: &Event, within: Option<Duration>) -> Result<Option<Event>, AwsError> {
        let got = match read!(self, within, "GetPolicy", self.clients.iot.get_policy().policy_name(name)) {
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
    async fn certificate(
        &self,
        id: &str,
        cause: &Event,
        within: Option<Duration>,
    ) -> Result<Option<Vec<Event>>, AwsError> {
        let described = match read!(
            self,
            within,
            "DescribeCertificate",
            self.clients.iot.describe_certificate().certificate_id(id)
        ) {
            Ok(out) => out
                .certificate_description
                .unwrap_or_else(|| aws_sdk_iot::types::CertificateDescription::builder().build()),
            Err(e) if e.is(ErrorKind::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(pem) = described.certificate_pem else { return Ok(None) };
        let arn = described.certificate_arn.unwrap_or_default();
        let attached =
            read!(self, within, "ListAttachedPolicies", self.clients.iot.list_attached_policies().target(&arn))?;
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
                events.extend(self.policy(&policy, cause, within).await?);
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

/// What spares source reads at ingest: what the state store knows of the
/// targets, and the second reads that will come anyway.
pub struct ReadPlan<'a> {
    pub store: &'a StateStore,
    /// Every region the pipeline can apply to.
    pub targets: &'a [String],
    /// Thing events after this time (ms since the epoch) get their
    /// principals from their second read (`[ingest] recheck_after_ms` after
    /// them) rather than at ingest; `None` when there are no second reads.
    pub second_reads_from_ms: Option<u64>,
    /// How long an ingest read retries a source that does not answer
    /// (throttled, 5xx, unreachable) before its event is left to a second
    /// read; `None`: until the retry deadline (no second reads to leave it to).
    pub defer_after: Option<Duration>,
}

impl ReadPlan<'_> {
    /// Whether reading the source at ingest for `event` can be left out.
    ///
    /// - Every target's ledger holds a newer change of its entity (it is
    ///   stale), or, for a thing, this very change, applied with principals
    ///   read at or after its time. A certificate event lacking its PEM is
    ///   settled only when stale: applied again, it would need the PEM.
    /// - A thing event recent enough to have a second read: read now, a
    ///   moment after the change, its principals are what the last read saw
    ///   (AWS attaches none in `CreateThing`, and an attachment has no event),
    ///   and the second read sees them at least as new. Reading only then
    ///   makes the source reads of a live stream one per thing per
    ///   `recheck_after` instead of one per event, which the read quotas
    ///   (`ListThingPrincipals` 20/s) would otherwise cap.
    fn spares(&self, event: &Event) -> bool {
        if event.entity == Entity::Thing
            && event.timestamp_ms != 0
            && self.second_reads_from_ms.is_some_and(|from| event.timestamp_ms > from)
        {
            return true;
        }
        let equal_is_settled = event.entity == Entity::Thing;
        self.store.settled(self.targets, event, equal_is_settled).unwrap_or(false)
    }

    /// Whether iotdr registered this certificate in every target: the things
    /// it is attached to need no copy of it. Its status changes are caught by
    /// the second read of the things it is attached to.
    fn certificate_everywhere(&self, id: &str) -> bool {
        self.targets
            .iter()
            .all(|region| matches!(self.store.known(region, super::apply::known::CERTIFICATE, id), Ok(Some(_))))
    }
}

/// Which events of a batch need source reads: thing creations and updates
/// and certificates without their PEM, unless `answered` says the event is
/// settled already, or the batch deletes the thing later (what would be
/// read is gone by the time it is applied).
fn reads_needed(events: &[Event], answered: &(dyn Fn(&Event) -> bool + Sync)) -> Vec<bool> {
    let mut deleted_later: HashSet<&str> = HashSet::new();
    let mut needs = vec![false; events.len()];
    for (index, event) in events.iter().enumerate().rev() {
        needs[index] = match (event.entity, event.operation) {
            (Entity::Thing, Operation::Deleted) => {
                deleted_later.insert(&event.name);
                false
            }
            (Entity::Thing, Operation::Created | Operation::Updated) => {
                !deleted_later.contains(event.name.as_str()) && !answered(event)
            }
            (Entity::Certificate, Operation::Created) => !carries_pem(event) && !answered(event),
            (Entity::ThingGroup, _) => crate::plan::lacks_dynamic_query(event),
            _ => false,
        };
    }
    needs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_skipped_for_settled_events_and_things_deleted_later_in_the_batch() {
        let event = |entity, operation, name: &str| Event::new(entity, operation, name);
        let events = [
            event(Entity::Thing, Operation::Created, "gone"),
            event(Entity::Thing, Operation::Created, "kept"),
            event(Entity::Thing, Operation::Updated, "settled"),
            event(Entity::Certificate, Operation::Created, "c1"),
            event(Entity::Thing, Operation::Deleted, "gone"),
            event(Entity::Thing, Operation::Created, "gone"),
            event(Entity::ThingGroup, Operation::Created, "g"),
        ];
        let needs = reads_needed(&events, &|e| e.name == "settled");
        assert_eq!(needs, [false, true, false, true, false, true, false]);
    }
}
