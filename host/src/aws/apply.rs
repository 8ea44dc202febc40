//! Applies planned calls to one target region. Every operation converges:
//! when the target already has (part of) the change, the applier finishes it
//! instead of failing, so replaying a stream is harmless.

use super::clients::RegionClients;
use super::errors::{AwsError, ErrorKind};
use super::rate::Limiter;
use crate::event::{Entity, Event, related};
use crate::plan::Call;
use crate::state::ledger::Position;
use crate::state::{StateError, StateStore};
use aws_sdk_iot::types::{
    AttributePayload, BillingGroupProperties, CertificateStatus, ThingGroupProperties, ThingTypeProperties,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// `known` kinds in the state store.
pub(crate) mod known {
    pub const THING: &str = "thing";
    pub const THING_GROUP: &str = "thing-group";
    /// Value: `{"arn": ..., "status": ...}`.
    pub const CERTIFICATE: &str = "certificate";
    /// Value: SHA-256 of the default version's document.
    pub const POLICY: &str = "policy";
    /// A thing–principal attachment, named `<thing> <certificate ARN>`.
    pub const ATTACHMENT: &str = "thing-principal";
    /// A policy–certificate attachment, named `<policy> <certificate ARN>`.
    pub const POLICY_ATTACHMENT: &str = "policy-attachment";
}

/// Forgets what iotdr recorded of `entity` `name` in `region` (attachments it
/// made, a certificate's status, a policy's digest), so that its next change
/// is made whatever the record says: `verify --repair` found the target
/// changed behind iotdr's back.
pub fn forget_known(state: &StateStore, region: &str, entity: Entity, name: &str) -> Result<(), StateError> {
    match entity {
        Entity::Thing => state.forget_starting(region, known::ATTACHMENT, &format!("{name} ")),
        Entity::Certificate => {
            state.forget(region, known::CERTIFICATE, name)?;
            state.forget_ending(region, known::POLICY_ATTACHMENT, &format!(":cert/{name}"))
        }
        Entity::Policy => state.forget(region, known::POLICY, name),
        _ => Ok(()),
    }
}

#[derive(Debug, Default)]
struct KnownCertificate {
    arn: Option<String>,
    status: Option<String>,
}

/// Why an event could not be applied to a region.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApplyError {
    #[error("{operation}: {error}")]
    Aws { operation: String, error: AwsError },
    #[error("{operation}: {message}")]
    Invalid { operation: String, message: String },
    #[error(transparent)]
    State(#[from] StateErrorText),
}

impl ApplyError {
    /// Something the change needs (a thing, a type, a group, a policy, a
    /// certificate) is not in the target region: it may yet arrive.
    pub fn is_missing_dependency(&self) -> bool {
        is(self, ErrorKind::NotFound)
    }
}

/// A state-store failure, as text so the error stays `Clone`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct StateErrorText(pub String);

impl From<StateError> for ApplyError {
    fn from(e: StateError) -> Self {
        ApplyError::State(StateErrorText(e.to_string()))
    }
}

/// What became of an event in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// Older than a change of the same entity already applied (the ledger): skipped.
    Stale,
}

/// How long a call whose dependency is missing waits for it in place
/// before its change is given up (to wait in the run's store, or, outside a
/// run, to become a dead letter).
#[derive(Debug, Clone, PartialEq)]
pub struct DependencyWait {
    pub attempts: u32,
    pub pause: Duration,
}

impl Default for DependencyWait {
    fn default() -> Self {
        DependencyWait { attempts: 0, pause: Duration::from_millis(250) }
    }
}

pub struct Applier {
    regions: HashMap<String, RegionClients>,
    limiter: Arc<Limiter>,
    state: Arc<StateStore>,
    wait: DependencyWait,
}

/// Sends a fluent request through the limiter (token bucket, retries). The
/// request is built once, outside the retry loop, and cloned per attempt.
macro_rules! send {
    ($self:ident, $region:expr, $operation:literal, $request:expr) => {{
        let request = $request;
        $self
            .limiter
            .send($region, $operation, || {
                let request = request.clone();
                async move { request.send().await.map_err(AwsError::from_sdk) }
            })
            .await
            .map_err(|error| ApplyError::Aws { operation: $operation.to_string(), error })
    }};
}

mod shadow;

fn is(result: &ApplyError, kind: ErrorKind) -> bool {
    matches!(result, ApplyError::Aws { error, .. } if error.kind == kind)
}

fn invalid(operation: &str, message: impl Into<String>) -> ApplyError {
    ApplyError::Invalid { operation: operation.to_string(), message: message.into() }
}

fn text<'a>(call: &'a Call, key: &str) -> Result<&'a str, ApplyError> {
    call.input.get(key).and_then(Value::as_str).ok_or_else(|| invalid(call.operation, format!("input lacks `{key}`")))
}

fn optional_text<'a>(call: &'a Call, key: &str) -> Option<&'a str> {
    call.input.get(key).and_then(Value::as_str)
}

fn attribute_payload(call: &Call, value: Option<&Value>) -> Option<AttributePayload> {
    let payload = value?;
    let attributes: HashMap<String, String> = payload
        .get("attributes")
        .and_then(Value::as_object)
        .map(|map| map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let _ = call;
    let mut builder = AttributePayload::builder().set_attributes(Some(attributes));
    if let Some(merge) = payload.get("merge").and_then(Value::as_bool) {
        builder = builder.merge(merge);
    }
    Some(builder.build())
}

fn group_properties(call: &Call) -> ThingGroupProperties {
    let properties = call.input.get("thingGroupProperties");
    ThingGroupProperties::builder()
        .set_thing_group_description(
            properties.and_then(|p| p.get("thingGroupDescription")).and_then(Value::as_str).map(str::to_string),
        )
        .set_attribute_payload(attribute_payload(call, properties.and_then(|p| p.get("attributePayload"))))
        .build()
}

fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Applier {
    pub fn new(
        regions: HashMap<String, RegionClients>,
        limiter: Arc<Limiter>,
        state: Arc<StateStore>,
        wait: DependencyWait,
    ) -> Applier {
        Applier { regions, limiter, state, wait }
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Applies `calls` (the plan of `event` for `region`) in order.
    pub async fn apply(&self, event: &Event, region: &str, calls: &[Call]) -> Result<Applied, ApplyError> {
        let clients =
            self.regions.get(region).ok_or_else(|| invalid("connect", format!("no clients for region {region}")))?;
        // Source order per entity, whatever order the changes come in
        // (replays, restarts, dead letters): older than what was applied is stale.
        let position = Position::of(event);
        if let Some(position) = &position
            && let Some(why) = self.state.stale(region, position)?
        {
            tracing::debug!(region, key = %position.key, event = %event.id, "stale change skipped: {why}");
            return Ok(Applied::Stale);
        }
        for call in calls {
            self.await_dependencies(clients, event, call).await?;
        }
        if let Some(position) = &position {
            self.state.record_applied(region, position)?;
        }
        Ok(Applied::Done)
    }

    /// Runs one call; a dependency that is missing in the target (a type, a
    /// group, a thing, a policy) is waited for a while before giving up.
    async fn await_dependencies(&self, c: &RegionClients, event: &Event, call: &Call) -> Result<(), ApplyError> {
        let mut waited = 0;
        loop {
            match self.call(c, event, call).await {
                Err(e) if is(&e, ErrorKind::NotFound) && waited < self.wait.attempts => {
                    waited += 1;
                    tracing::debug!(region = %c.region, operation = call.operation, "waiting for a dependency: {e}");
                    tokio::time::sleep(self.wait.pause * waited).await;
                }
                Err(ApplyError::Aws { operation, error }) if error.kind == ErrorKind::NotFound => {
                    return Err(ApplyError::Aws {
                        operation,
                        error: AwsError {
                            message: format!(
                                "{} (a resource this change depends on is missing in {})",
                                error.message, c.region
                            ),
                            ..error
                        },
                    });
                }
                other => return other,
            }
        }
    }

    async fn call(&self, c: &RegionClients, event: &Event, call: &Call) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        match call.operation {
            "CreateThing" => self.put_thing(c, call, true).await,
            "UpdateThing" if call.input.get("attributePayload").is_some() => self.put_thing(c, call, false).await,
            "UpdateThing" => {
                let thing = text(call, "thingName")?;
                send!(
                    self,
                    region,
                    "UpdateThing",
                    c.iot
                        .update_thing()
                        .thing_name(thing)
                        .set_thing_type_name(optional_text(call, "thingTypeName").map(str::to_string))
                        .set_remove_thing_type(call.input.get("removeThingType").and_then(Value::as_bool))
                )
                .map(drop)
            }
            "DeleteThing" => self.delete_thing(c, text(call, "thingName")?).await,
            "DetachThingPrincipal" => {
                let thing = text(call, "thingName")?;
                // The certificate's ARN in the target; gone from it, there is nothing to detach.
                let arn = match self.principal_in_target(c, text(call, "principal")?).await {
                    Ok(arn) => arn,
                    Err(e) if is(&e, ErrorKind::NotFound) => return Ok(()),
                    Err(e) => return Err(e),
                };
                self.state.forget(region, known::ATTACHMENT, &format!("{thing} {arn}"))?;
                let result = send!(
                    self,
                    region,
                    "DetachThingPrincipal",
                    c.iot.detach_thing_principal().thing_name(thing).principal(&arn)
                );
                ok_if_not_found(result.map(drop))
            }
            "AttachThingPrincipal" => {
                let thing = text(call, "thingName")?;
                let arn = self.principal_in_target(c, text(call, "principal")?).await?;
                let attachment = format!("{thing} {arn}");
                if self.state.known(region, known::ATTACHMENT, &attachment)?.is_some() {
                    return Ok(());
                }
                send!(
                    self,
                    region,
                    "AttachThingPrincipal",
                    c.iot.attach_thing_principal().thing_name(thing).principal(&arn)
                )?;
                self.state.set_known(region, known::ATTACHMENT, &attachment, "1")?;
                Ok(())
            }
            "CreateThingType" => {
                let properties = call.input.get("thingTypeProperties");
                let searchable: Option<Vec<String>> = properties
                    .and_then(|p| p.get("searchableAttributes"))
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect());
                let type_properties = ThingTypeProperties::builder()
                    .set_thing_type_description(
                        properties
                            .and_then(|p| p.get("thingTypeDescription"))
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    )
                    .set_searchable_attributes(searchable)
                    .build();
                let result = send!(
                    self,
                    region,
                    "CreateThingType",
                    c.iot
                        .create_thing_type()
                        .thing_type_name(text(call, "thingTypeName")?)
                        .thing_type_properties(type_properties.clone())
                );
                // A type's properties cannot change after creation; one that
                // exists is as good as created.
                ok_if(result.map(drop), ErrorKind::AlreadyExists)
            }
            "DeprecateThingType" => {
                let undo = call.input.get("undoDeprecate").and_then(Value::as_bool).unwrap_or(false);
                send!(
                    self,
                    region,
                    "DeprecateThingType",
                    c.iot.deprecate_thing_type().thing_type_name(text(call, "thingTypeName")?).undo_deprecate(undo)
                )
                .map(drop)
            }
            "DeleteThingType" => ok_if_not_found(
                send!(
                    self,
                    region,
                    "DeleteThingType",
                    c.iot.delete_thing_type().thing_type_name(text(call, "thingTypeName")?)
                )
                .map(drop),
            ),
            "CreateThingGroup" => self.create_thing_group(c, event, call).await,
            "UpdateThingGroup" => {
                let group = text(call, "thingGroupName")?;
                let result = send!(
                    self,
                    region,
                    "UpdateThingGroup",
                    c.iot.update_thing_group().thing_group_name(group).thing_group_properties(group_properties(call))
                );
                match result {
                    Err(e) if is(&e, ErrorKind::NotFound) => {
                        // Missing in the target: create it whole, under its parent.
                        let mut create = call.clone();
                        create.operation = "CreateThingGroup";
                        if let Some(parent) = event.related(related::PARENT_GROUP) {
                            create.input["parentGroupName"] = parent.into();
                        }
                        Box::pin(self.create_thing_group(c, event, &create)).await
                    }
                    other => other.map(drop),
                }
            }
            "CreateDynamicThingGroup" => {
                let group = text(call, "thingGroupName")?;
                let query = text(call, "queryString")?;
                let index = optional_text(call, "indexName").map(str::to_string);
                let version = optional_text(call, "queryVersion").map(str::to_string);
                let properties = group_properties(call);
                let created = send!(
                    self,
                    region,
                    "CreateDynamicThingGroup",
                    c.iot
                        .create_dynamic_thing_group()
                        .thing_group_name(group)
                        .query_string(query)
                        .set_index_name(index.clone())
                        .set_query_version(version.clone())
                        .thing_group_properties(properties.clone())
                );
                match created {
                    // There already: its query and properties become the source's.
                    Err(e) if is(&e, ErrorKind::AlreadyExists) => send!(
                        self,
                        region,
                        "UpdateDynamicThingGroup",
                        c.iot
                            .update_dynamic_thing_group()
                            .thing_group_name(group)
                            .query_string(query)
                            .set_index_name(index)
                            .set_query_version(version)
                            .thing_group_properties(properties)
                    )
                    .map(drop),
                    other => other.map(drop),
                }?;
                self.state.set_known(region, known::THING_GROUP, group, "1")?;
                Ok(())
            }
            "DeleteDynamicThingGroup" => {
                let group = text(call, "thingGroupName")?;
                ok_if_not_found(
                    send!(
                        self,
                        region,
                        "DeleteDynamicThingGroup",
                        c.iot.delete_dynamic_thing_group().thing_group_name(group)
                    )
                    .map(drop),
                )?;
                self.state.forget(region, known::THING_GROUP, group)?;
                Ok(())
            }
            "DeleteThingGroup" => {
                let group = text(call, "thingGroupName")?;
                ok_if_not_found(
                    send!(self, region, "DeleteThingGroup", c.iot.delete_thing_group().thing_group_name(group))
                        .map(drop),
                )?;
                self.state.forget(region, known::THING_GROUP, group)?;
                Ok(())
            }
            "AddThingToThingGroup" => send!(
                self,
                region,
                "AddThingToThingGroup",
                c.iot
                    .add_thing_to_thing_group()
                    .thing_group_name(text(call, "thingGroupName")?)
                    .thing_name(text(call, "thingName")?)
            )
            .map(drop),
            "RemoveThingFromThingGroup" => ok_if_not_found(
                send!(
                    self,
                    region,
                    "RemoveThingFromThingGroup",
                    c.iot
                        .remove_thing_from_thing_group()
                        .thing_group_name(text(call, "thingGroupName")?)
                        .thing_name(text(call, "thingName")?)
                )
                .map(drop),
            ),
            "CreateBillingGroup" | "UpdateBillingGroup" => {
                let group = text(call, "billingGroupName")?;
                let properties = BillingGroupProperties::builder()
                    .set_billing_group_description(
                        call.input
                            .pointer("/billingGroupProperties/billingGroupDescription")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    )
                    .build();
                if call.operation == "CreateBillingGroup" {
                    let created = send!(
                        self,
                        region,
                        "CreateBillingGroup",
                        c.iot
                            .create_billing_group()
                            .billing_group_name(group)
                            .billing_group_properties(properties.clone())
                    );
                    match created {
                        Err(e) if is(&e, ErrorKind::AlreadyExists) => {}
                        other => return other.map(drop),
                    }
                }
                let updated = send!(
                    self,
                    region,
                    "UpdateBillingGroup",
                    c.iot.update_billing_group().billing_group_name(group).billing_group_properties(properties.clone())
                );
                match updated {
                    Err(e) if is(&e, ErrorKind::NotFound) => send!(
                        self,
                        region,
                        "CreateBillingGroup",
                        c.iot
                            .create_billing_group()
                            .billing_group_name(group)
                            .billing_group_properties(properties.clone())
                    )
                    .map(drop),
                    other => other.map(drop),
                }
            }
            "DeleteBillingGroup" => ok_if_not_found(
                send!(
                    self,
                    region,
                    "DeleteBillingGroup",
                    c.iot.delete_billing_group().billing_group_name(text(call, "billingGroupName")?)
                )
                .map(drop),
            ),
            "AddThingToBillingGroup" => send!(
                self,
                region,
                "AddThingToBillingGroup",
                c.iot
                    .add_thing_to_billing_group()
                    .billing_group_name(text(call, "billingGroupName")?)
                    .thing_name(text(call, "thingName")?)
            )
            .map(drop),
            "RemoveThingFromBillingGroup" => ok_if_not_found(
                send!(
                    self,
                    region,
                    "RemoveThingFromBillingGroup",
                    c.iot
                        .remove_thing_from_billing_group()
                        .billing_group_name(text(call, "billingGroupName")?)
                        .thing_name(text(call, "thingName")?)
                )
                .map(drop),
            ),
            "RegisterCertificateWithoutCA" => self.register_certificate(c, event, call).await,
            "UpdateCertificate" => {
                let id = text(call, "certificateId")?;
                let status = text(call, "newStatus")?;
                send!(
                    self,
                    region,
                    "UpdateCertificate",
                    c.iot.update_certificate().certificate_id(id).new_status(CertificateStatus::from(status))
                )?;
                self.remember_certificate(region, id, None, Some(status))
            }
            "DeleteCertificate" => self.delete_certificate(c, text(call, "certificateId")?).await,
            "AttachPolicy" => {
                let policy = text(call, "policyName")?;
                let target = self.principal_in_target(c, text(call, "target")?).await?;
                let attachment = format!("{policy} {target}");
                if self.state.known(region, known::POLICY_ATTACHMENT, &attachment)?.is_some() {
                    return Ok(());
                }
                send!(self, region, "AttachPolicy", c.iot.attach_policy().policy_name(policy).target(&target))?;
                self.state.set_known(region, known::POLICY_ATTACHMENT, &attachment, "1")?;
                Ok(())
            }
            "CreatePolicy" | "CreatePolicyVersion" => self.put_policy(c, call).await,
            "DeletePolicy" => self.delete_policy(c, text(call, "policyName")?).await,
            "UpdateThingShadow" => self.update_shadow(c, event, call).await,
            "DeleteThingShadow" => {
                let (thing, shadow) = (text(call, "thingName")?, optional_text(call, "shadowName"));
                ok_if_not_found(
                    send!(
                        self,
                        region,
                        "DeleteThingShadow",
                        c.data.delete_thing_shadow().thing_name(thing).set_shadow_name(shadow.map(str::to_string))
                    )
                    .map(drop),
                )?;
                self.forget_shadow_version(region, thing, shadow)
            }
            other => Err(invalid(other, "iotdr does not apply this operation")),
        }
    }

    /// Creates or updates a thing to exactly the attributes and type of the
    /// call. A thing iotdr knows it created is updated, never re-created:
    /// re-creating would drop its shadows on some implementations.
    async fn put_thing(&self, c: &RegionClients, call: &Call, creating: bool) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let thing = text(call, "thingName")?;
        let thing_type = optional_text(call, "thingTypeName").map(str::to_string);
        let mut payload = attribute_payload(call, call.input.get("attributePayload"));
        let exists = self.state.known(region, known::THING, thing)?.is_some();
        let update = |payload: Option<AttributePayload>| {
            // Replace, never merge: the event carries every attribute the thing has.
            let payload =
                payload.map(|p| AttributePayload::builder().set_attributes(p.attributes).merge(false).build());
            c.iot
                .update_thing()
                .thing_name(thing)
                .set_thing_type_name(thing_type.clone())
                .set_remove_thing_type(thing_type.is_none().then_some(true))
                .set_attribute_payload(payload)
        };
        let create = |payload: Option<AttributePayload>| {
            let payload = payload.map(|p| AttributePayload::builder().set_attributes(p.attributes).build());
            c.iot
                .create_thing()
                .thing_name(thing)
                .set_thing_type_name(thing_type.clone())
                .set_attribute_payload(payload)
        };
        if creating && !exists {
            match send!(self, region, "CreateThing", create(payload.clone())) {
                Ok(_) => {}
                // Real AWS refuses a create that differs from what is there.
                Err(e) if is(&e, ErrorKind::AlreadyExists) => {
                    send!(self, region, "UpdateThing", update(payload.take()))?;
                }
                Err(e) => return Err(e),
            }
        } else {
            match send!(self, region, "UpdateThing", update(payload.clone())) {
                Ok(_) => {}
                Err(e) if is(&e, ErrorKind::NotFound) => {
                    send!(self, region, "CreateThing", create(payload.take()))?;
                }
                Err(e) => return Err(e),
            }
        }
        self.state.set_known(region, known::THING, thing, "1")?;
        Ok(())
    }

    /// Detaches every principal and deletes every shadow of the thing in the
    /// target, then the thing. A thing already gone is deleted.
    async fn delete_thing(&self, c: &RegionClients, thing: &str) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let principals = send!(self, region, "ListThingPrincipals", c.iot.list_thing_principals().thing_name(thing));
        match principals {
            Ok(listed) => {
                for principal in listed.principals.unwrap_or_default() {
                    self.state.forget(region, known::ATTACHMENT, &format!("{thing} {principal}"))?;
                    ok_if_not_found(
                        send!(
                            self,
                            region,
                            "DetachThingPrincipal",
                            c.iot.detach_thing_principal().thing_name(thing).principal(&principal)
                        )
                        .map(drop),
                    )?;
                }
            }
            Err(e) if is(&e, ErrorKind::NotFound) => {
                self.forget_thing(region, thing)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        // Shadows outlive their thing in AWS: delete them with it.
        let named =
            send!(self, region, "ListNamedShadowsForThing", c.data.list_named_shadows_for_thing().thing_name(thing));
        let mut shadows: Vec<Option<String>> = vec![None];
        match named {
            Ok(listed) => shadows.extend(listed.results.unwrap_or_default().into_iter().map(Some)),
            Err(e) if is(&e, ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        for shadow in shadows {
            ok_if_not_found(
                send!(
                    self,
                    region,
                    "DeleteThingShadow",
                    c.data.delete_thing_shadow().thing_name(thing).set_shadow_name(shadow.clone())
                )
                .map(drop),
            )?;
        }
        ok_if_not_found(send!(self, region, "DeleteThing", c.iot.delete_thing().thing_name(thing)).map(drop))?;
        self.forget_thing(region, thing)
    }

    fn forget_thing(&self, region: &str, thing: &str) -> Result<(), ApplyError> {
        self.state.forget(region, known::THING, thing)?;
        self.state.forget_shadows(region, thing)?;
        Ok(())
    }

    async fn create_thing_group(&self, c: &RegionClients, event: &Event, call: &Call) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let group = text(call, "thingGroupName")?;
        let full = call.input.get("thingGroupProperties").is_some();
        // A hierarchy link names a group that its own event already created.
        if !full && self.state.known(region, known::THING_GROUP, group)?.is_some() {
            return Ok(());
        }
        let properties = group_properties(call);
        let result = send!(
            self,
            region,
            "CreateThingGroup",
            c.iot
                .create_thing_group()
                .thing_group_name(group)
                .set_parent_group_name(optional_text(call, "parentGroupName").map(str::to_string))
                .thing_group_properties(properties.clone())
        );
        match result {
            Ok(_) => {}
            // The group is there with other properties: make them the event's.
            Err(e) if is(&e, ErrorKind::AlreadyExists) && full => {
                let replacing = ThingGroupProperties::builder()
                    .set_thing_group_description(properties.thing_group_description.clone())
                    .set_attribute_payload(
                        properties
                            .attribute_payload
                            .clone()
                            .map(|p| AttributePayload::builder().set_attributes(p.attributes).merge(false).build()),
                    )
                    .build();
                send!(
                    self,
                    region,
                    "UpdateThingGroup",
                    c.iot.update_thing_group().thing_group_name(group).thing_group_properties(replacing.clone())
                )?;
            }
            Err(e) if is(&e, ErrorKind::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
        let _ = event;
        self.state.set_known(region, known::THING_GROUP, group, "1")?;
        Ok(())
    }

    async fn register_certificate(&self, c: &RegionClients, event: &Event, call: &Call) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let status = text(call, "status")?;
        let pem = optional_text(call, "certificatePem").filter(|p| p.starts_with("-----BEGIN")).ok_or_else(|| {
            invalid(call.operation, "the event carries no certificate PEM (it is fetched from the source at ingest)")
        })?;
        if let Some(known) = self.known_certificate(region, &event.name)?
            && known.status.as_deref() == Some(status)
        {
            return Ok(());
        }
        let registered = send!(
            self,
            region,
            "RegisterCertificateWithoutCA",
            c.iot.register_certificate_without_ca().certificate_pem(pem).status(CertificateStatus::from(status))
        );
        match registered {
            Ok(out) => {
                let id = out.certificate_id.unwrap_or_else(|| event.name.clone());
                self.remember_certificate(region, &id, out.certificate_arn.as_deref(), Some(status))
            }
            Err(ApplyError::Aws { error, .. }) if error.kind == ErrorKind::AlreadyExists => {
                let id = error.resource_id.clone().unwrap_or_else(|| event.name.clone());
                send!(
                    self,
                    region,
                    "UpdateCertificate",
                    c.iot.update_certificate().certificate_id(&id).new_status(CertificateStatus::from(status))
                )?;
                self.remember_certificate(region, &id, None, Some(status))
            }
            Err(e) => Err(e),
        }
    }

    /// What iotdr recorded about a certificate in `region`.
    fn known_certificate(&self, region: &str, id: &str) -> Result<Option<KnownCertificate>, ApplyError> {
        Ok(self.state.known(region, known::CERTIFICATE, id)?.map(|json| {
            let value: Value = serde_json::from_str(&json).unwrap_or_default();
            let field = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
            KnownCertificate { arn: field("arn"), status: field("status") }
        }))
    }

    fn remember_certificate(
        &self,
        region: &str,
        id: &str,
        arn: Option<&str>,
        status: Option<&str>,
    ) -> Result<(), ApplyError> {
        let KnownCertificate { arn: old_arn, status: old_status } =
            self.known_certificate(region, id)?.unwrap_or_default();
        let value = serde_json::json!({
            "arn": arn.map(str::to_string).or(old_arn),
            "status": status.map(str::to_string).or(old_status),
        });
        self.state.set_known(region, known::CERTIFICATE, id, &value.to_string())?;
        Ok(())
    }

    /// A principal named in a plan (a certificate ARN of the source's account,
    /// or a bare certificate id) as the ARN it has in the target region.
    async fn principal_in_target(&self, c: &RegionClients, principal: &str) -> Result<String, ApplyError> {
        match principal.rsplit_once(":cert/") {
            Some((_, id)) => self.certificate_arn(c, id).await,
            None if principal.starts_with("arn:") => Ok(principal.to_string()),
            None => self.certificate_arn(c, principal).await,
        }
    }

    /// The certificate's ARN in the target (its account may differ from the source's).
    async fn certificate_arn(&self, c: &RegionClients, id: &str) -> Result<String, ApplyError> {
        if let Some(KnownCertificate { arn: Some(arn), .. }) = self.known_certificate(&c.region, id)? {
            return Ok(arn);
        }
        let described =
            send!(self, c.region.as_str(), "DescribeCertificate", c.iot.describe_certificate().certificate_id(id))?;
        let arn = described
            .certificate_description
            .and_then(|d| d.certificate_arn)
            .ok_or_else(|| invalid("DescribeCertificate", format!("certificate {id} has no ARN")))?;
        self.remember_certificate(&c.region, id, Some(&arn), None)?;
        Ok(arn)
    }

    async fn delete_certificate(&self, c: &RegionClients, id: &str) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let arn = match self.certificate_arn(c, id).await {
            Ok(arn) => arn,
            Err(e) if is(&e, ErrorKind::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        };
        let things = send!(self, region, "ListPrincipalThings", c.iot.list_principal_things().principal(&arn))?;
        for thing in things.things.unwrap_or_default() {
            self.state.forget(region, known::ATTACHMENT, &format!("{thing} {arn}"))?;
            ok_if_not_found(
                send!(
                    self,
                    region,
                    "DetachThingPrincipal",
                    c.iot.detach_thing_principal().thing_name(&thing).principal(&arn)
                )
                .map(drop),
            )?;
        }
        // Only certificates that are not ACTIVE can be deleted.
        ok_if_not_found(
            send!(
                self,
                region,
                "UpdateCertificate",
                c.iot.update_certificate().certificate_id(id).new_status(CertificateStatus::Inactive)
            )
            .map(drop),
        )?;
        ok_if_not_found(
            send!(self, region, "DeleteCertificate", c.iot.delete_certificate().certificate_id(id).force_delete(true))
                .map(drop),
        )?;
        self.state.forget(region, known::CERTIFICATE, id)?;
        self.state.forget_ending(region, known::POLICY_ATTACHMENT, &format!(" {arn}"))?;
        Ok(())
    }

    /// Makes `policyDocument` the policy's default version, creating the
    /// policy or a new version as needed, never a version identical to the default.
    async fn put_policy(&self, c: &RegionClients, call: &Call) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let name = text(call, "policyName")?;
        let document = text(call, "policyDocument")?;
        let wanted = digest(document);
        if self.state.known(region, known::POLICY, name)?.as_deref() == Some(wanted.as_str()) {
            return Ok(());
        }
        let created =
            send!(self, region, "CreatePolicy", c.iot.create_policy().policy_name(name).policy_document(document));
        match created {
            Ok(_) => {}
            Err(e) if is(&e, ErrorKind::AlreadyExists) => {
                let current = send!(self, region, "GetPolicy", c.iot.get_policy().policy_name(name))?;
                if current.policy_document.as_deref().map(digest).as_deref() != Some(wanted.as_str()) {
                    self.add_policy_version(c, name, document).await?;
                }
            }
            Err(e) => return Err(e),
        }
        self.state.set_known(region, known::POLICY, name, &wanted)?;
        Ok(())
    }

    /// A new default version; the oldest non-default version goes when the policy has the maximum (5).
    async fn add_policy_version(&self, c: &RegionClients, name: &str, document: &str) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        for _ in 0..2 {
            let created = send!(
                self,
                region,
                "CreatePolicyVersion",
                c.iot.create_policy_version().policy_name(name).policy_document(document).set_as_default(true)
            );
            match created {
                Err(ApplyError::Aws { error, .. }) if error.code == "VersionsLimitExceededException" => {
                    let versions =
                        send!(self, region, "ListPolicyVersions", c.iot.list_policy_versions().policy_name(name))?;
                    let oldest = versions
                        .policy_versions
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|v| !v.is_default_version)
                        .filter_map(|v| v.version_id)
                        .min_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
                    let Some(oldest) = oldest else { break };
                    send!(
                        self,
                        region,
                        "DeletePolicyVersion",
                        c.iot.delete_policy_version().policy_name(name).policy_version_id(&oldest)
                    )?;
                }
                other => return other.map(drop),
            }
        }
        Err(invalid("CreatePolicyVersion", format!("policy {name} has the maximum number of versions, none deletable")))
    }

    async fn delete_policy(&self, c: &RegionClients, name: &str) -> Result<(), ApplyError> {
        let region = c.region.as_str();
        let targets =
            match send!(self, region, "ListTargetsForPolicy", c.iot.list_targets_for_policy().policy_name(name)) {
                Ok(out) => out.targets.unwrap_or_default(),
                Err(e) if is(&e, ErrorKind::NotFound) => return Ok(()),
                Err(e) => return Err(e),
            };
        for target in targets {
            self.state.forget(region, known::POLICY_ATTACHMENT, &format!("{name} {target}"))?;
            ok_if_not_found(
                send!(self, region, "DetachPolicy", c.iot.detach_policy().policy_name(name).target(&target)).map(drop),
            )?;
        }
        let versions = send!(self, region, "ListPolicyVersions", c.iot.list_policy_versions().policy_name(name))?;
        for version in versions.policy_versions.unwrap_or_default() {
            if let (false, Some(id)) = (version.is_default_version, version.version_id) {
                ok_if_not_found(
                    send!(
                        self,
                        region,
                        "DeletePolicyVersion",
                        c.iot.delete_policy_version().policy_name(name).policy_version_id(&id)
                    )
                    .map(drop),
                )?;
            }
        }
        ok_if_not_found(send!(self, region, "DeletePolicy", c.iot.delete_policy().policy_name(name)).map(drop))?;
        self.state.forget(region, known::POLICY, name)?;
        Ok(())
    }
}

fn ok_if(result: Result<(), ApplyError>, kind: ErrorKind) -> Result<(), ApplyError> {
    match result {
        Err(e) if is(&e, kind) => Ok(()),
        other => other,
    }
}

/// Deleting or detaching what is not there is done.
fn ok_if_not_found(result: Result<(), ApplyError>) -> Result<(), ApplyError> {
    ok_if(result, ErrorKind::NotFound)
}
