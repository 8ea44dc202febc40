//! The one typed event every source produces and every stage, planner and sink consumes.

mod decode;

pub use decode::{DecodeError, decode_dynamodb_image, decode_line, decode_record};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// What an event is about. Mirrors `iotdr:plugin/types.entity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    Thing,
    ThingType,
    ThingTypeAssociation,
    ThingGroup,
    ThingGroupMembership,
    ThingGroupHierarchy,
    BillingGroup,
    BillingGroupMembership,
    Certificate,
    Policy,
    Shadow,
}

impl Entity {
    pub const ALL: [Entity; 11] = [
        Entity::Thing,
        Entity::ThingType,
        Entity::ThingTypeAssociation,
        Entity::ThingGroup,
        Entity::ThingGroupMembership,
        Entity::ThingGroupHierarchy,
        Entity::BillingGroup,
        Entity::BillingGroupMembership,
        Entity::Certificate,
        Entity::Policy,
        Entity::Shadow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Thing => "thing",
            Entity::ThingType => "thing-type",
            Entity::ThingTypeAssociation => "thing-type-association",
            Entity::ThingGroup => "thing-group",
            Entity::ThingGroupMembership => "thing-group-membership",
            Entity::ThingGroupHierarchy => "thing-group-hierarchy",
            Entity::BillingGroup => "billing-group",
            Entity::BillingGroupMembership => "billing-group-membership",
            Entity::Certificate => "certificate",
            Entity::Policy => "policy",
            Entity::Shadow => "shadow",
        }
    }

    pub fn parse(s: &str) -> Option<Entity> {
        Entity::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened. Mirrors `iotdr:plugin/types.operation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    Created,
    Updated,
    Deleted,
    Added,
    Removed,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Created => "created",
            Operation::Updated => "updated",
            Operation::Deleted => "deleted",
            Operation::Added => "added",
            Operation::Removed => "removed",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the epoch, by this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Kinds of `related` entries the decoders produce (see docs/events.md).
pub mod related {
    pub const THING: &str = "thing";
    pub const THING_TYPE: &str = "thing-type";
    pub const THING_GROUP: &str = "thing-group";
    pub const PARENT_GROUP: &str = "parent-group";
    pub const BILLING_GROUP: &str = "billing-group";
    pub const PRINCIPAL: &str = "principal";
    pub const CA_CERTIFICATE: &str = "ca-certificate";
    pub const CERTIFICATE_STATUS: &str = "certificate-status";
    pub const SHADOW_NAME: &str = "shadow-name";
    pub const POLICY: &str = "policy";
    /// A certificate to detach from the thing (`verify --repair`: attached
    /// in the target, not in the source).
    pub const DETACHED_PRINCIPAL: &str = "detached-principal";
    /// Marks a change that repairs drift (`verify --repair`, a reconcile):
    /// the source's state read now, to be written again even where the
    /// ledger holds its version (the target was changed behind iotdr's back).
    pub const REPAIR: &str = "repair";
}

/// One change in the source region, carrying the full state needed to apply it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The source's event id (AWS `eventId`, or one derived from the record when AWS gives none).
    #[serde(default)]
    pub id: String,
    pub entity: Entity,
    pub operation: Operation,
    pub name: String,
    #[serde(default)]
    pub source_region: String,
    #[serde(default)]
    pub account_id: String,
    #[serde(default)]
    pub timestamp_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Regions to apply the event to. Empty until the pipeline sets its default targets.
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub related: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
}

impl Event {
    pub fn new(entity: Entity, operation: Operation, name: impl Into<String>) -> Event {
        Event {
            id: String::new(),
            entity,
            operation,
            name: name.into(),
            source_region: String::new(),
            account_id: String::new(),
            timestamp_ms: 0,
            version: None,
            targets: Vec::new(),
            attributes: BTreeMap::new(),
            related: Vec::new(),
            document: None,
        }
    }

    /// The first related entry of `kind`.
    pub fn related(&self, kind: &str) -> Option<&str> {
        self.related.iter().find(|(k, _)| k == kind).map(|(_, v)| v.as_str())
    }

    /// Replaces every entry of `kind` by `name` (or removes them when `None`).
    pub fn set_related(&mut self, kind: &str, name: Option<String>) {
        self.related.retain(|(k, _)| k != kind);
        if let Some(name) = name {
            self.related.push((kind.to_string(), name));
        }
    }

    /// The ordering key: events with the same key are applied in source order.
    /// Everything that changes one thing (its registry entry, type association,
    /// memberships, shadows) shares the thing's key.
    pub fn ordering_key(&self) -> String {
        let prefix = match self.entity {
            Entity::Thing
            | Entity::ThingTypeAssociation
            | Entity::ThingGroupMembership
            | Entity::BillingGroupMembership
            | Entity::Shadow => "thing",
            Entity::ThingType => "thing-type",
            Entity::ThingGroup | Entity::ThingGroupHierarchy => "thing-group",
            Entity::BillingGroup => "billing-group",
            Entity::Certificate => "certificate",
            Entity::Policy => "policy",
        };
        format!("{prefix}/{}", self.name)
    }
}
