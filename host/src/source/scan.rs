//! The `scan` source (`iotdr sync`): the source region's whole registry,
//! listed page by page as complete native events, so that a bulk sync goes
//! through the same stages, ledger, limits, dead letters and crash safety as
//! live events.
//!
//! Phases, in the order the target needs them: thing types; thing groups
//! (all of them described, then parents before children); billing groups;
//! policies (default version); certificates (PEM, status, policies); things
//! (attributes, type, principals), each followed by its group and
//! billing-group memberships and its classic and named shadows. The cursor
//! (phase and page token) is checkpointed with each batch: an interrupted
//! sync resumes at the page it stopped at. Events carry the time their page
//! was read (less a margin for clock skew, `CLOCK_MARGIN_MS`): what the
//! source holds now is newer than any event before it.
//!
//! A scan reads in one of two ways ([`Reading`]): to replicate (complete
//! events, a thing with everything it carries: several reads per thing) or
//! to compare (`verify`, `sync --mode smart`): in bulk, memberships listed
//! per group, principals per certificate and policy targets per policy, so
//! that a region's registry costs a few reads per hundred things.

use super::{Batch, Record, Source, SourceError};
use crate::aws::{AwsError, ErrorKind, Limiter, RegionClients, limited};
use crate::event::now_ms;
use crate::event::{Entity, Event, Operation, related};
use crate::progress::Listing;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Things described at once.
const CONCURRENCY: usize = 16;
/// Things per page when each is read whole (ListThings allows up to 250).
const THINGS_PER_PAGE: i32 = 100;
/// Entries per page of a listing read as it comes (the APIs' maximum).
const LISTED_PER_PAGE: i32 = 250;
/// How far before the read a page's events are stamped. Live events carry
/// AWS's clock, these iotdr's: were iotdr's ahead, a change made just after
/// the read would look older than it and be skipped as stale for good.
/// Stamped early, a live event from just before the read is applied after
/// it instead, which only rewrites what the read saw, and every later
/// change follows with its own event.
const CLOCK_MARGIN_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Types,
    Groups,
    BillingGroups,
    Policies,
    Certificates,
    Things,
    Done,
}

const PHASES: [(Phase, &str); 7] = [
    (Phase::Types, "types"),
    (Phase::Groups, "groups"),
    (Phase::BillingGroups, "billing-groups"),
    (Phase::Policies, "policies"),
    (Phase::Certificates, "certificates"),
    (Phase::Things, "things"),
    (Phase::Done, "done"),
];

impl Phase {
    fn name(self) -> &'static str {
        PHASES.iter().find(|(p, _)| *p == self).map(|(_, n)| *n).expect("every phase is named")
    }

    fn next(self) -> Phase {
        let index = PHASES.iter().position(|(p, _)| *p == self).expect("every phase is listed");
        PHASES.get(index + 1).map_or(Phase::Done, |(p, _)| *p)
    }
}

/// How a scan reads its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Complete events to replicate: each thing described with its
    /// principals, memberships and shadows, each certificate with its PEM.
    /// Resumable from any page.
    Replicate,
    /// The region as `verify` compares it, in bulk: group and billing-group
    /// members listed per group, a certificate's things per certificate, a
    /// policy's targets per policy, no PEMs (a certificate's id is the
    /// SHA-256 of its content: the same id is the same certificate), and
    /// the shadows only when `shadows` (otherwise the caller reads the ones
    /// it wants, [`RegistryScan::read_shadows`]). Not resumable: later
    /// phases use what earlier ones learned.
    Compare { shadows: bool },
}

/// What a comparing scan's policy and certificate phases learned for later phases.
#[derive(Default)]
struct Learned {
    /// Certificate id → the policies attached to it.
    policies_of: HashMap<String, Vec<String>>,
    /// Thing → the certificate ids attached to it.
    principals_of: HashMap<String, Vec<String>>,
}

pub struct RegistryScan {
    clients: RegionClients,
    reading: Reading,
    learned: std::sync::Mutex<Learned>,
    limiter: Arc<Limiter>,
    phase: Phase,
    token: Option<String>,
    idle: bool,
    progress: Option<Arc<Listing>>,
    /// Things only where fleet indexing matches this query (`SearchIndex`).
    query: Option<String>,
}

impl RegistryScan {
    /// Scans the region `clients` reach (their data plane too, for shadows),
    /// from `checkpoint` (a position this source stored) or the start. A
    /// finished scan's checkpoint starts a new one.
    pub fn new(clients: RegionClients, limiter: Arc<Limiter>, checkpoint: Option<&str>) -> RegistryScan {
        let (phase, token) = checkpoint
            .and_then(|position| {
                let (phase, token) = position.split_once(' ').unwrap_or((position, ""));
                let phase = PHASES.iter().find(|(_, name)| *name == phase)?.0;
                Some((phase, (!token.is_empty()).then(|| token.to_string())))
            })
            .filter(|(phase, _)| *phase != Phase::Done)
            .unwrap_or((Phase::Types, None));
        RegistryScan {
            clients,
            reading: Reading::Replicate,
            learned: Default::default(),
            limiter,
            phase,
            token,
            idle: false,
            progress: None,
            query: None,
        }
    }

    /// Reads the region to compare it (from the start: see [`Reading::Compare`]).
    pub fn comparing(clients: RegionClients, limiter: Arc<Limiter>, shadows: bool) -> RegistryScan {
        let mut scan = RegistryScan::new(clients, limiter, None);
        scan.reading = Reading::Compare { shadows };
        scan
    }

    fn comparing_mode(&self) -> bool {
        matches!(self.reading, Reading::Compare { .. })
    }

    fn things_per_page(&self) -> i32 {
        if self.comparing_mode() { LISTED_PER_PAGE } else { THINGS_PER_PAGE }
    }

    /// Lists only the things fleet indexing finds for `query` (with their
    /// memberships, principals and shadows); the other phases stay whole.
    pub fn with_query(mut self, query: Option<String>) -> RegistryScan {
        self.query = query;
        self
    }

    /// Counts what it lists on `progress`.
    pub fn with_progress(mut self, progress: Arc<Listing>) -> RegistryScan {
        self.progress = Some(progress);
        self
    }

    /// The key its checkpoint is stored under: a scan with a query resumes
    /// only a scan with the same query (its page tokens are SearchIndex's).
    pub fn checkpoint_key(region: &str, query: Option<&str>) -> String {
        match query {
            Some(query) => format!("scan:{region}?{query}"),
            None => format!("scan:{region}"),
        }
    }

    fn error(&self, what: &str, e: AwsError) -> SourceError {
        SourceError { source_name: format!("scan of {}", self.clients.region), message: format!("{what}: {e}") }
    }

    fn event(&self, entity: Entity, name: &str, read_at_ms: u64) -> Event {
        let mut event = Event::new(entity, Operation::Created, name);
        event.id = format!("scan-{}-{name}-{read_at_ms}", entity_name(entity));
        event.source_region = self.clients.region.clone();
        event.timestamp_ms = read_at_ms;
        event
    }

    async fn types(&self, now: u64) -> Result<(Vec<Event>, Option<String>), SourceError> {
        let page =
            limited!(self, "ListThingTypes", self.clients.iot.list_thing_types().set_next_token(self.token.clone()))
                .map_err(|e| self.error("listing thing types", e))?;
        let mut events = Vec::new();
        for listed in page.thing_types.unwrap_or_default() {
            let Some(name) = listed.thing_type_name else { continue };
            let mut event = self.event(Entity::ThingType, &name, now);
            let mut document = Map::new();
            if let Some(properties) = listed.thing_type_properties {
                if let Some(description) = properties.thing_type_description {
                    document.insert("description".into(), description.into());
                }
                if let Some(searchable) = properties.searchable_attributes {
                    document.insert("searchableAttributes".into(), searchable.into());
                }
            }
            let deprecated = listed.thing_type_metadata.is_some_and(|m| m.deprecated);
            document.insert("deprecated".into(), deprecated.into());
            event.document = Some(Value::Object(document).to_string());
            events.push(event);
        }
        Ok((events, page.next_token))
    }

    /// Every group, described, parents before children (one batch: a
    /// child's page may come before its parent's).
    async fn groups(&self, now: u64) -> Result<Vec<Event>, SourceError> {
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let page = limited!(self, "ListThingGroups", self.clients.iot.list_thing_groups().set_next_token(token))
                .map_err(|e| self.error("listing thing groups", e))?;
            names.extend(page.thing_groups.unwrap_or_default().into_iter().filter_map(|g| g.group_name));
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        let described = futures_util::stream::iter(names.iter().map(|name| async move {
            limited!(self, "DescribeThingGroup", self.clients.iot.describe_thing_group().thing_group_name(name))
                .map_err(|e| self.error(&format!("describing thing group {name}"), e))
        }))
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut events = BTreeMap::new();
        let mut parents = HashMap::new();
        for group in described {
            let group = group?;
            let Some(name) = group.thing_group_name else { continue };
            let mut event = self.event(Entity::ThingGroup, &name, now);
            event.version = (group.version > 0).then_some(group.version as u64);
            let mut document = Map::new();
            if let Some(properties) = group.thing_group_properties {
                if let Some(description) = properties.thing_group_description {
                    document.insert("description".into(), description.into());
                }
                event.attributes =
                    properties.attribute_payload.and_then(|p| p.attributes).unwrap_or_default().into_iter().collect();
            }
            if let Some(query) = group.query_string {
                document.insert("dynamic".into(), true.into());
                document.insert("queryString".into(), query.into());
                document.insert("indexName".into(), group.index_name.into());
                document.insert("queryVersion".into(), group.query_version.into());
            }
            event.document = Some(Value::Object(document).to_string());
            let parent = group.thing_group_metadata.and_then(|m| m.parent_group_name);
            event.set_related(related::PARENT_GROUP, parent.clone());
            parents.insert(name.clone(), parent);
            events.insert(name, event);
        }
        // Parents first: a group's depth is its chain of parents (at most 7 in AWS).
        let depth = |name: &str| {
            let mut depth = 0;
            let mut at = parents.get(name).cloned().flatten();
            while let Some(parent) = at {
                depth += 1;
                if depth > parents.len() {
                    break;
                }
                at = parents.get(&parent).cloned().flatten();
            }
            depth
        };
        let mut ordered: Vec<Event> = events.into_values().collect();
        ordered.sort_by_key(|event| depth(&event.name));
        if self.comparing_mode() {
            // A dynamic group's members follow its query, in each region: not compared.
            let listed: Vec<&str> = ordered
                .iter()
                .filter(|group| !group.document.as_deref().is_some_and(|d| d.contains("\"dynamic\":true")))
                .map(|group| group.name.as_str())
                .collect();
            let memberships = self.members_of(listed, Entity::ThingGroupMembership, now).await?;
            ordered.extend(memberships);
        }
        Ok(ordered)
    }

    /// Comparing: the members of each group in `groups`, as membership events of
    /// `entity` (thing-group or billing-group memberships), one listing per group.
    async fn members_of(&self, groups: Vec<&str>, entity: Entity, now: u64) -> Result<Vec<Event>, SourceError> {
        let listed = futures_util::stream::iter(groups.into_iter().map(|group| async move {
            let mut things = Vec::new();
            let mut token = None;
            loop {
                let (page, next) = if entity == Entity::BillingGroupMembership {
                    let page = limited!(
                        self,
                        "ListThingsInBillingGroup",
                        self.clients
                            .iot
                            .list_things_in_billing_group()
                            .billing_group_name(group)
                            .max_results(LISTED_PER_PAGE)
                            .set_next_token(token)
                    );
                    page.map(|p| (p.things.unwrap_or_default(), p.next_token))
                } else {
                    let page = limited!(
                        self,
                        "ListThingsInThingGroup",
                        self.clients
                            .iot
                            .list_things_in_thing_group()
                            .thing_group_name(group)
                            .max_results(LISTED_PER_PAGE)
                            .set_next_token(token)
                    );
                    page.map(|p| (p.things.unwrap_or_default(), p.next_token))
                }
                .map_err(|e| self.error(&format!("listing the things of group {group}"), e))?;
                things.extend(page);
                token = next;
                if token.is_none() {
                    break;
                }
            }
            Ok::<_, SourceError>((group, things))
        }))
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut events = Vec::new();
        for listed in listed {
            let (group, things) = listed?;
            for thing in things {
                events.push(self.membership(entity, &thing, group, "", now));
            }
        }
        Ok(events)
    }

    /// `thing`'s membership of `group` (a thing group or a billing group, by `entity`).
    fn membership(&self, entity: Entity, thing: &str, group: &str, account: &str, now: u64) -> Event {
        let mut membership = self.event(entity, thing, now);
        membership.operation = Operation::Added;
        membership.account_id = account.to_string();
        if entity == Entity::BillingGroupMembership {
            membership.id = format!("scan-billing-membership-{thing}-{group}-{now}");
            membership.set_related(related::BILLING_GROUP, Some(group.to_string()));
        } else {
            membership.id = format!("scan-membership-{thing}-{group}-{now}");
            membership.set_related(related::THING_GROUP, Some(group.to_string()));
        }
        membership
    }

    async fn billing_groups(&self, now: u64) -> Result<(Vec<Event>, Option<String>), SourceError> {
        let page = limited!(
            self,
            "ListBillingGroups",
            self.clients.iot.list_billing_groups().set_next_token(self.token.clone())
        )
        .map_err(|e| self.error("listing billing groups", e))?;
        let mut events = Vec::new();
        for listed in page.billing_groups.unwrap_or_default() {
            let Some(name) = listed.group_name else { continue };
            let described = limited!(
                self,
                "DescribeBillingGroup",
                self.clients.iot.describe_billing_group().billing_group_name(&name)
            )
            .map_err(|e| self.error(&format!("describing billing group {name}"), e))?;
            let mut event = self.event(Entity::BillingGroup, &name, now);
            let description = described.billing_group_properties.and_then(|p| p.billing_group_description);
            event.document = Some(json!({ "description": description }).to_string());
            events.push(event);
        }
        if self.comparing_mode() {
            let names: Vec<String> = events.iter().map(|event| event.name.clone()).collect();
            let names = names.iter().map(String::as_str).collect();
            events.extend(self.members_of(names, Entity::BillingGroupMembership, now).await?);
        }
        Ok((events, page.next_token))
    }

    async fn policies(&self, now: u64) -> Result<(Vec<Event>, Option<String>), SourceError> {
        let page = limited!(self, "ListPolicies", self.clients.iot.list_policies().set_marker(self.token.clone()))
            .map_err(|e| self.error("listing policies", e))?;
        let mut events = Vec::new();
        for listed in page.policies.unwrap_or_default() {
            let Some(name) = listed.policy_name else { continue };
            let got = match limited!(self, "GetPolicy", self.clients.iot.get_policy().policy_name(&name)) {
                Ok(got) => got,
                // Deleted since it was listed.
                Err(e) if e.is(ErrorKind::NotFound) => continue,
                Err(e) => return Err(self.error(&format!("reading policy {name}"), e)),
            };
            let mut event = self.event(Entity::Policy, &name, now);
            event.document = got.policy_document;
            events.push(event);
            if self.comparing_mode() {
                self.learn_targets(&name).await?;
            }
        }
        Ok((events, page.next_marker))
    }

    /// Comparing: the certificates `policy` is attached to, learned for the certificate phase.
    async fn learn_targets(&self, policy: &str) -> Result<(), SourceError> {
        let mut marker = None;
        loop {
            let page = match limited!(
                self,
                "ListTargetsForPolicy",
                self.clients
                    .iot
                    .list_targets_for_policy()
                    .policy_name(policy)
                    .page_size(LISTED_PER_PAGE)
                    .set_marker(marker)
            ) {
                Ok(page) => page,
                // Deleted since it was listed.
                Err(e) if e.is(ErrorKind::NotFound) => return Ok(()),
                Err(e) => return Err(self.error(&format!("listing the targets of policy {policy}"), e)),
            };
            let mut learned = self.learned.lock().expect("not poisoned");
            for target in page.targets.unwrap_or_default() {
                if let Some((_, id)) = target.rsplit_once(":cert/") {
                    learned.policies_of.entry(id.to_string()).or_default().push(policy.to_string());
                }
            }
            marker = page.next_marker;
            if marker.is_none() {
                return Ok(());
            }
        }
    }

    /// Comparing: a listed certificate with its status and policies, and
    /// the things it is attached to learned for the thing phase.
    async fn listed_certificate(
        &self,
        listed: aws_sdk_iot::types::Certificate,
        now: u64,
    ) -> Result<Option<Event>, SourceError> {
        let (Some(id), Some(arn)) = (listed.certificate_id, listed.certificate_arn) else { return Ok(None) };
        let mut things = Vec::new();
        let mut token = None;
        loop {
            let page = match limited!(
                self,
                "ListPrincipalThings",
                self.clients
                    .iot
                    .list_principal_things()
                    .principal(&arn)
                    .max_results(LISTED_PER_PAGE)
                    .set_next_token(token)
            ) {
                Ok(page) => page,
                Err(e) if e.is(ErrorKind::NotFound) => return Ok(None),
                Err(e) => return Err(self.error(&format!("listing the things of certificate {id}"), e)),
            };
            things.extend(page.things.unwrap_or_default());
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        let mut event = self.event(Entity::Certificate, &id, now);
        event.account_id = account_of(&arn);
        let status = listed.status.map_or_else(|| "ACTIVE".to_string(), |s| s.as_str().to_string());
        event.set_related(related::CERTIFICATE_STATUS, Some(status));
        let mut learned = self.learned.lock().expect("not poisoned");
        for policy in learned.policies_of.get(&id).into_iter().flatten() {
            event.related.push((related::POLICY.into(), policy.clone()));
        }
        for thing in things {
            learned.principals_of.entry(thing).or_default().push(id.clone());
        }
        Ok(Some(event))
    }

    async fn certificates(&self, now: u64) -> Result<(Vec<Event>, Option<String>), SourceError> {
        let page = limited!(
            self,
            "ListCertificates",
            self.clients.iot.list_certificates().page_size(LISTED_PER_PAGE).set_marker(self.token.clone())
        )
        .map_err(|e| self.error("listing certificates", e))?;
        let listed = page.certificates.unwrap_or_default();
        let read = if self.comparing_mode() {
            futures_util::stream::iter(listed.into_iter().map(|listed| self.listed_certificate(listed, now)))
                .buffered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await
        } else {
            let ids: Vec<String> = listed.into_iter().filter_map(|c| c.certificate_id).collect();
            futures_util::stream::iter(ids.iter().map(|id| self.certificate(id, now)))
                .buffered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await
        };
        let mut events = Vec::new();
        for certificate in read {
            events.extend(certificate?);
        }
        Ok((events, page.next_marker))
    }

    async fn certificate(&self, id: &str, now: u64) -> Result<Option<Event>, SourceError> {
        let described =
            match limited!(self, "DescribeCertificate", self.clients.iot.describe_certificate().certificate_id(id)) {
                Ok(out) => out
                    .certificate_description
                    .unwrap_or_else(|| aws_sdk_iot::types::CertificateDescription::builder().build()),
                Err(e) if e.is(ErrorKind::NotFound) => return Ok(None),
                Err(e) => return Err(self.error(&format!("describing certificate {id}"), e)),
            };
        let (Some(pem), Some(arn)) = (described.certificate_pem, described.certificate_arn) else { return Ok(None) };
        let attached = limited!(self, "ListAttachedPolicies", self.clients.iot.list_attached_policies().target(&arn))
            .map_err(|e| self.error(&format!("listing the policies of certificate {id}"), e))?;
        let mut event = self.event(Entity::Certificate, id, now);
        event.account_id = account_of(&arn);
        let status = described.status.map_or_else(|| "ACTIVE".to_string(), |s| s.as_str().to_string());
        event.set_related(related::CERTIFICATE_STATUS, Some(status));
        for policy in attached.policies.unwrap_or_default().into_iter().filter_map(|p| p.policy_name) {
            event.related.push((related::POLICY.into(), policy));
        }
        event.document = Some(json!({ "certificatePem": pem }).to_string());
        Ok(Some(event))
    }

    async fn things(&self, now: u64) -> Result<(Vec<Event>, Option<String>), SourceError> {
        let (listed, next_token) = match &self.query {
            None => {
                let page = limited!(
                    self,
                    "ListThings",
                    self.clients
                        .iot
                        .list_things()
                        .max_results(self.things_per_page())
                        .set_next_token(self.token.clone())
                )
                .map_err(|e| self.error("listing things", e))?;
                (page.things.unwrap_or_default(), page.next_token)
            }
            Some(query) => {
                let page = limited!(
                    self,
                    "SearchIndex",
                    self.clients
                        .iot
                        .search_index()
                        .query_string(query)
                        .max_results(self.things_per_page())
                        .set_next_token(self.token.clone())
                )
                .map_err(|e| self.error(&format!("searching things for `{query}`"), e))?;
                // The index only chooses the things: it may lag the registry,
                // so what they hold is described (`described`).
                let things = page.things.unwrap_or_default().into_iter().filter_map(|t| t.thing_name);
                let listed = things.map(|name| aws_sdk_iot::types::ThingAttribute::builder().thing_name(name).build());
                (listed.collect(), page.next_token)
            }
        };
        let read = futures_util::stream::iter(listed.into_iter().map(|thing| self.thing(thing, now)))
            .buffered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut events = Vec::new();
        for thing in read {
            events.extend(thing?);
        }
        Ok((events, next_token))
    }

    /// A thing, then its memberships and shadows.
    async fn thing(&self, listed: aws_sdk_iot::types::ThingAttribute, now: u64) -> Result<Vec<Event>, SourceError> {
        if let Reading::Compare { shadows } = self.reading {
            return self.listed_thing(listed, shadows, now).await;
        }
        let Some(name) = listed.thing_name else { return Ok(Vec::new()) };
        let fail = |what: &str, e: AwsError| self.error(&format!("{what} of thing {name}"), e);
        let gone = |e: &AwsError| e.is(ErrorKind::NotFound);
        // Deleted since it was listed: its deletion has an event of its own.
        let described = match limited!(self, "DescribeThing", self.clients.iot.describe_thing().thing_name(&name)) {
            Ok(described) => described,
            Err(e) if gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(fail("describing", e)),
        };
        // A search result carries no ARN; the description does.
        let arn = listed.thing_arn.or_else(|| described.thing_arn.clone());
        let account = arn.as_deref().map(account_of).unwrap_or_default();
        let principals =
            match limited!(self, "ListThingPrincipals", self.clients.iot.list_thing_principals().thing_name(&name)) {
                Ok(out) => out.principals.unwrap_or_default(),
                Err(e) if gone(&e) => return Ok(Vec::new()),
                Err(e) => return Err(fail("listing the principals", e)),
            };
        let groups =
            limited!(self, "ListThingGroupsForThing", self.clients.iot.list_thing_groups_for_thing().thing_name(&name))
                .map_err(|e| fail("listing the groups", e))?
                .thing_groups
                .unwrap_or_default();
        let mut thing = self.event(Entity::Thing, &name, now);
        thing.account_id = account.clone();
        thing.version = (described.version > 0).then_some(described.version as u64);
        thing.attributes = described.attributes.unwrap_or_default().into_iter().collect();
        thing.set_related(related::THING_TYPE, described.thing_type_name);
        for principal in principals {
            if let Some((_, id)) = principal.rsplit_once(":cert/") {
                thing.related.push((related::PRINCIPAL.into(), id.to_string()));
            }
        }
        let mut events = Vec::new();
        for group in groups.into_iter().filter_map(|g| g.group_name) {
            events.push(self.membership(Entity::ThingGroupMembership, &name, &group, &account, now));
        }
        if let Some(group) = described.billing_group_name {
            events.push(self.membership(Entity::BillingGroupMembership, &name, &group, &account, now));
        }
        let Some(shadows) = self.shadows(&name, &account, now).await? else { return Ok(Vec::new()) };
        events.extend(shadows);
        events.insert(0, thing);
        Ok(events)
    }

    /// Comparing: a thing as listed (attributes, type), with the principals
    /// the certificate phase learned, and its shadows when asked.
    async fn listed_thing(
        &self,
        listed: aws_sdk_iot::types::ThingAttribute,
        shadows: bool,
        now: u64,
    ) -> Result<Vec<Event>, SourceError> {
        let Some(name) = listed.thing_name.clone() else { return Ok(Vec::new()) };
        // Found by a query: described, as a listing would have shown it.
        let listed = match &self.query {
            None => listed,
            Some(_) => match limited!(self, "DescribeThing", self.clients.iot.describe_thing().thing_name(&name)) {
                Ok(described) => aws_sdk_iot::types::ThingAttribute::builder()
                    .thing_name(&name)
                    .set_thing_type_name(described.thing_type_name)
                    .set_thing_arn(described.thing_arn)
                    .set_attributes(described.attributes)
                    .version(described.version)
                    .build(),
                // Deleted since it was found: its deletion has an event of its own.
                Err(e) if e.is(ErrorKind::NotFound) => return Ok(Vec::new()),
                Err(e) => return Err(self.error(&format!("describing thing {name}"), e)),
            },
        };
        let account = listed.thing_arn.as_deref().map(account_of).unwrap_or_default();
        let mut thing = self.event(Entity::Thing, &name, now);
        thing.account_id = account.clone();
        thing.version = (listed.version > 0).then_some(listed.version as u64);
        thing.attributes = listed.attributes.unwrap_or_default().into_iter().collect();
        thing.set_related(related::THING_TYPE, listed.thing_type_name);
        let principals = self.learned.lock().expect("not poisoned").principals_of.remove(&name).unwrap_or_default();
        thing.related.extend(principals.into_iter().map(|id| (related::PRINCIPAL.to_string(), id)));
        let mut events = vec![thing];
        if shadows {
            events.extend(self.shadows(&name, &account, now).await?.unwrap_or_default());
        }
        Ok(events)
    }

    /// The PEMs of certificates `ids`, one `DescribeCertificate` each: what
    /// a comparing scan leaves out, read only for the certificates to be
    /// written. A certificate gone since is left out.
    pub async fn certificate_pems(&self, ids: Vec<String>) -> Result<HashMap<String, String>, SourceError> {
        let read = futures_util::stream::iter(ids.into_iter().map(|id| async move {
            match limited!(self, "DescribeCertificate", self.clients.iot.describe_certificate().certificate_id(&id)) {
                Ok(out) => Ok(out.certificate_description.and_then(|d| d.certificate_pem).map(|pem| (id, pem))),
                Err(e) if e.is(ErrorKind::NotFound) => Ok(None),
                Err(e) => Err(self.error(&format!("describing certificate {id}"), e)),
            }
        }))
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        read.into_iter().filter_map(Result::transpose).collect()
    }

    /// Comparing: the shadows `wanted` (thing, shadow name; `None` for the
    /// classic one), one read each, as events; the ones missing are left out.
    pub async fn read_shadows(&self, wanted: Vec<(String, Option<String>)>) -> Result<Vec<Event>, SourceError> {
        let now = now_ms().saturating_sub(CLOCK_MARGIN_MS);
        let read = futures_util::stream::iter(
            wanted.into_iter().map(|(thing, shadow)| async move { self.shadow(&thing, shadow, "", now).await }),
        )
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut events = Vec::new();
        for shadow in read {
            events.extend(shadow?);
        }
        Ok(events)
    }

    /// The thing's classic and named shadows, as their last update; `None`
    /// when the thing is gone.
    async fn shadows(&self, thing: &str, account: &str, now: u64) -> Result<Option<Vec<Event>>, SourceError> {
        let fail = |e: AwsError| self.error(&format!("reading the shadows of thing {thing}"), e);
        let mut names = vec![None];
        let mut token = None;
        loop {
            let page = match limited!(
                self,
                "ListNamedShadowsForThing",
                self.clients.data.list_named_shadows_for_thing().thing_name(thing).set_next_token(token)
            ) {
                Ok(page) => page,
                // Deleted since it was described: its deletion has an event.
                Err(e) if e.is(ErrorKind::NotFound) => return Ok(None),
                Err(e) => return Err(fail(e)),
            };
            names.extend(page.results.unwrap_or_default().into_iter().map(Some));
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        let mut events = Vec::new();
        for shadow in names {
            events.extend(self.shadow(thing, shadow, account, now).await?);
        }
        Ok(Some(events))
    }

    /// One shadow of `thing` (`None`: the classic one), as its last update;
    /// `None` when there is no such shadow.
    async fn shadow(
        &self,
        thing: &str,
        shadow: Option<String>,
        account: &str,
        now: u64,
    ) -> Result<Option<Event>, SourceError> {
        let got = match limited!(
            self,
            "GetThingShadow",
            self.clients.data.get_thing_shadow().thing_name(thing).set_shadow_name(shadow.clone())
        ) {
            Ok(got) => got,
            // A thing without a classic shadow, or a shadow deleted since.
            Err(e) if e.is(ErrorKind::NotFound) => return Ok(None),
            Err(e) => return Err(self.error(&format!("reading the shadows of thing {thing}"), e)),
        };
        let document: Value = got.payload.and_then(|p| serde_json::from_slice(p.as_ref()).ok()).unwrap_or(Value::Null);
        let mut state = Map::new();
        for part in ["desired", "reported"] {
            if let Some(value) = document["state"].get(part).filter(|v| !v.is_null()) {
                state.insert(part.into(), value.clone());
            }
        }
        let mut event = self.event(Entity::Shadow, thing, now);
        event.operation = Operation::Updated;
        event.account_id = account.to_string();
        event.version = document["version"].as_u64();
        event.id = format!("scan-shadow-{thing}-{}-{}", shadow.as_deref().unwrap_or(""), event.version.unwrap_or(0));
        event.set_related(related::SHADOW_NAME, shadow);
        event.document = Some(json!({ "state": state }).to_string());
        Ok(Some(event))
    }
}

impl Source for RegistryScan {
    async fn read(&mut self, _max: usize) -> Result<Batch, SourceError> {
        // One page per read: a page is what the cursor can resume after.
        let now = now_ms().saturating_sub(CLOCK_MARGIN_MS);
        let (events, token) = match self.phase {
            Phase::Types => self.types(now).await?,
            Phase::Groups => (self.groups(now).await?, None),
            Phase::BillingGroups => self.billing_groups(now).await?,
            Phase::Policies => self.policies(now).await?,
            Phase::Certificates => self.certificates(now).await?,
            Phase::Things => self.things(now).await?,
            Phase::Done => {
                if !self.idle
                    && let Some(progress) = &self.progress
                {
                    progress.finish();
                }
                self.idle = true;
                return Ok(Batch::default());
            }
        };
        if let Some(progress) = &self.progress {
            progress.add(self.phase.name(), events.len() as u64);
        }
        match token {
            Some(token) => self.token = Some(token),
            None => {
                self.phase = self.phase.next();
                self.token = None;
            }
        }
        let position = match &self.token {
            Some(token) => format!("{} {token}", self.phase.name()),
            None => self.phase.name().to_string(),
        };
        let origin = format!("scan of {} ({})", self.clients.region, self.phase.name());
        let records = events
            .into_iter()
            .map(|event| Record { text: json!({ "event": event }).to_string(), origin: origin.clone() })
            .collect();
        Ok(Batch {
            records,
            checkpoints: vec![(Self::checkpoint_key(&self.clients.region, self.query.as_deref()), position)],
        })
    }

    fn idle(&self) -> bool {
        self.idle
    }
}

/// The account of an ARN (`arn:aws:iot:<region>:<account>:...`).
fn account_of(arn: &str) -> String {
    arn.split(':').nth(4).unwrap_or_default().to_string()
}

fn entity_name(entity: Entity) -> String {
    serde_json::to_value(entity).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_in_order_and_a_finished_scan_starts_again() {
        let order: Vec<&str> = std::iter::successors(Some(Phase::Types), |p| (*p != Phase::Done).then(|| p.next()))
            .map(Phase::name)
            .collect();
        assert_eq!(order, ["types", "groups", "billing-groups", "policies", "certificates", "things", "done"]);
        assert_eq!(account_of("arn:aws:iot:us-east-1:123456789012:thing/pump-1"), "123456789012");
    }
}
