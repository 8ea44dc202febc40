//! The contract's types as plain Rust, the same on wasm32 and in native tests.

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

    /// The name used in pipeline files and docs: `thing`, `thing-group-membership`, ...
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

    pub fn parse(name: &str) -> Option<Entity> {
        Entity::ALL.into_iter().find(|e| e.as_str() == name)
    }
}

impl<'de> serde::Deserialize<'de> for Entity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Entity::parse(&name).ok_or_else(|| {
            let known: Vec<&str> = Entity::ALL.iter().map(|e| e.as_str()).collect();
            serde::de::Error::custom(format!("unknown entity `{name}`, expected one of {}", known.join(", ")))
        })
    }
}

/// What happened to the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Created,
    Updated,
    Deleted,
    Added,
    Removed,
}

/// What becomes of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Pass it on, with the changes made in place.
    Keep,
    /// Remove it from the pipeline, saying why.
    Drop(String),
    /// Replace it by these events (indices into the batch).
    Split(Vec<u32>),
    /// This stage cannot handle the event. `retryable` failures are tried again
    /// a few times before the stage's `on_error` policy applies.
    Fail { message: String, retryable: bool },
}

#[cfg(target_arch = "wasm32")]
mod convert {
    use super::{Entity, Operation, Outcome};
    use crate::bindings::iotdr::plugin::types as wit;

    macro_rules! same_enum {
        ($ours:ident, $theirs:ty, [$($variant:ident),*]) => {
            impl From<$theirs> for $ours {
                fn from(value: $theirs) -> $ours {
                    match value { $(<$theirs>::$variant => $ours::$variant,)* }
                }
            }
            impl From<$ours> for $theirs {
                fn from(value: $ours) -> $theirs {
                    match value { $($ours::$variant => <$theirs>::$variant,)* }
                }
            }
        };
    }

    same_enum!(
        Entity,
        wit::Entity,
        [
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
            Shadow
        ]
    );
    same_enum!(Operation, wit::Operation, [Created, Updated, Deleted, Added, Removed]);

    impl From<Outcome> for wit::Outcome {
        fn from(outcome: Outcome) -> wit::Outcome {
            match outcome {
                Outcome::Keep => wit::Outcome::Keep,
                Outcome::Drop(reason) => wit::Outcome::Drop(reason),
                Outcome::Split(indices) => wit::Outcome::Split(indices),
                Outcome::Fail { message, retryable } => wit::Outcome::Fail(wit::PluginError { message, retryable }),
            }
        }
    }
}
