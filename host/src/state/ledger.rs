//! The ledger: per (target region, entity key), the source order of the last
//! change applied there. A change older than that is stale and skipped, so
//! replays, restarts, dead-letter replays and at-least-once sources never
//! roll an entity's history back. The rule, with its edge cases, is in
//! docs/architecture.md#the-ledger.

use crate::event::{Entity, Event, Operation, related};

/// Where a change stands in its entity's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The entity (or part of an entity) the change writes: `thing/pump-1`,
    /// `thing/pump-1#group/berlin`, `shadow/pump-1/`, ...
    pub key: String,
    /// The change's order within that key (see [`Order`]).
    pub order: Order,
    /// Whether the change creates or deletes the entity: later parts of it
    /// (memberships, a type link) cannot be older than that.
    pub lifecycle: bool,
    /// Entities whose creation or deletion ends every older change to this
    /// one: a membership is stale once its thing or group was deleted or
    /// created again after it.
    pub within: Vec<String>,
}

/// How changes of one key are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Order {
    /// The source's event time in milliseconds, then the registry's
    /// `versionNumber` (0 when absent) for changes of the same millisecond.
    /// An equal (time, version) is not stale: it is the same change again, or
    /// one of several the source made at once, applied in arrival order.
    Time { at_ms: u64, version: u64 },
    /// A shadow's version: the shadow service numbers every change of a
    /// shadow, so an equal version is the same change and stale.
    ShadowVersion(u64),
    /// A repair's shadow state, read from the source at this version: stale
    /// only when a newer version was applied; at an equal one the target may
    /// have drifted since, and it is written again.
    ShadowRepair(u64),
}

impl Position {
    /// The position of `event` (as it leaves the stages), or `None` when it
    /// carries neither a time nor a version: such a change is always applied
    /// and leaves no trace in the ledger.
    pub fn of(event: &Event) -> Option<Position> {
        let name = &event.name;
        let thing = || format!("thing/{name}");
        if event.entity == Entity::Shadow {
            let shadow = event.related(related::SHADOW_NAME).unwrap_or("");
            return Some(Position {
                key: shadow_key(name, shadow),
                order: match event.related(related::REPAIR) {
                    Some(_) => Order::ShadowRepair(event.version?),
                    None => Order::ShadowVersion(event.version?),
                },
                lifecycle: false,
                // Shadow times come from another clock, in whole seconds: they
                // are not compared with registry times.
                within: Vec::new(),
            });
        }
        if event.timestamp_ms == 0 {
            return None;
        }
        let (key, within) = match event.entity {
            // A thing's own events carry its type and principals, so a type
            // association shares the thing's key: whichever is newer wins.
            Entity::Thing => (thing(), Vec::new()),
            Entity::ThingTypeAssociation => (thing(), Vec::new()),
            Entity::ThingGroupMembership => {
                let group = event.related(related::THING_GROUP).unwrap_or("");
                (format!("thing/{name}#group/{group}"), vec![thing(), format!("thing-group/{group}")])
            }
            Entity::BillingGroupMembership => {
                let group = event.related(related::BILLING_GROUP).unwrap_or("");
                (format!("thing/{name}#billing-group/{group}"), vec![thing(), format!("billing-group/{group}")])
            }
            Entity::ThingType => (format!("thing-type/{name}"), Vec::new()),
            Entity::ThingGroup => (format!("thing-group/{name}"), Vec::new()),
            Entity::ThingGroupHierarchy => (format!("thing-group/{name}#parent"), vec![format!("thing-group/{name}")]),
            Entity::BillingGroup => (format!("billing-group/{name}"), Vec::new()),
            Entity::Certificate => (format!("certificate/{name}"), Vec::new()),
            Entity::Policy => (format!("policy/{name}"), Vec::new()),
            Entity::Shadow => unreachable!("handled above"),
        };
        let lifecycle = matches!(event.operation, Operation::Created | Operation::Deleted)
            && !matches!(event.entity, Entity::ThingTypeAssociation | Entity::ThingGroupHierarchy);
        let order = Order::Time { at_ms: event.timestamp_ms, version: event.version.unwrap_or(0) };
        Some(Position { key, order, lifecycle, within })
    }
}

/// The ledger key of a shadow (`""` names the classic shadow).
/// The entity `event` changes in `region`, as (region, ledger key): what
/// a change waiting for a dependency holds, so that no later change of the
/// same entity overtakes it.
pub fn entity_in(event: &Event, region: &str) -> Option<(String, String)> {
    Position::of(event).map(|position| (region.to_string(), position.key))
}

pub fn shadow_key(thing: &str, shadow: &str) -> String {
    format!("shadow/{thing}/{shadow}")
}

/// The ledger row of one key in one region, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// The newest order applied (encoded, see [`encode`]).
    pub applied: Option<(i64, i64)>,
    /// The order of the newest creation or deletion applied.
    pub lifecycle: Option<(i64, i64)>,
}

/// An order as the two integers the ledger stores.
pub fn encode(order: Order) -> (i64, i64) {
    match order {
        Order::Time { at_ms, version } => (at_ms as i64, version as i64),
        Order::ShadowVersion(version) | Order::ShadowRepair(version) => (0, version as i64),
    }
}

/// Why a change is stale, or `None` when it is to be applied.
pub fn stale(position: &Position, own: Entry, within: &[Entry]) -> Option<&'static str> {
    let order = encode(position.order);
    match position.order {
        Order::ShadowVersion(_) if own.applied.is_some_and(|applied| order <= applied) => {
            return Some("a shadow version as new or newer was applied");
        }
        Order::ShadowRepair(_) if own.applied.is_some_and(|applied| order < applied) => {
            return Some("a newer shadow version was applied");
        }
        Order::Time { .. } if own.applied.is_some_and(|applied| order < applied) => {
            return Some("a newer change of the same entity was applied");
        }
        _ => {}
    }
    if within.iter().any(|parent| parent.lifecycle.is_some_and(|epoch| order.0 < epoch.0)) {
        return Some("what it belongs to was created or deleted since");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(entity: Entity, operation: Operation, name: &str, at_ms: u64) -> Event {
        let mut e = Event::new(entity, operation, name);
        e.timestamp_ms = at_ms;
        e
    }

    fn entry(applied: u64, lifecycle: Option<u64>) -> Entry {
        Entry { applied: Some((applied as i64, 0)), lifecycle: lifecycle.map(|l| (l as i64, 0)) }
    }

    #[test]
    fn older_changes_are_stale_equal_ones_are_not() {
        let update = Position::of(&event(Entity::Thing, Operation::Updated, "t", 20)).unwrap();
        assert_eq!(update.key, "thing/t");
        assert!(!update.lifecycle);
        assert!(stale(&update, Entry::default(), &[]).is_none());
        assert!(stale(&update, entry(20, None), &[]).is_none(), "the same change again");
        assert!(stale(&update, entry(30, None), &[]).is_some());
        // Same millisecond: the registry's version decides.
        let mut v2 = event(Entity::Thing, Operation::Updated, "t", 20);
        v2.version = Some(2);
        let stored = Entry { applied: Some((20, 3)), lifecycle: None };
        assert!(stale(&Position::of(&v2).unwrap(), stored, &[]).is_some());
    }

    #[test]
    fn a_membership_older_than_its_things_deletion_or_recreation_is_stale() {
        let mut added = event(Entity::ThingGroupMembership, Operation::Added, "t", 20);
        added.set_related(related::THING_GROUP, Some("g".into()));
        let position = Position::of(&added).unwrap();
        assert_eq!(position.key, "thing/t#group/g");
        assert_eq!(position.within, ["thing/t", "thing-group/g"]);
        let thing_updated_later = entry(30, Some(10));
        assert!(stale(&position, Entry::default(), &[thing_updated_later, Entry::default()]).is_none());
        let thing_deleted_later = entry(30, Some(30));
        assert!(stale(&position, Entry::default(), &[thing_deleted_later, Entry::default()]).is_some());
        let group_recreated_later = entry(25, Some(25));
        assert!(stale(&position, Entry::default(), &[Entry::default(), group_recreated_later]).is_some());
        let deleted = Position::of(&event(Entity::Thing, Operation::Deleted, "t", 30)).unwrap();
        assert!(deleted.lifecycle);
    }

    #[test]
    fn shadows_order_by_version_and_untimed_changes_are_not_tracked() {
        let mut shadow = event(Entity::Shadow, Operation::Updated, "t", 0);
        shadow.version = Some(4);
        shadow.set_related(related::SHADOW_NAME, Some("config".into()));
        let position = Position::of(&shadow).unwrap();
        assert_eq!(position.key, "shadow/t/config");
        let at = |version: i64| Entry { applied: Some((0, version)), lifecycle: None };
        assert!(stale(&position, at(4), &[]).is_some(), "the same version is already there");
        assert!(stale(&position, at(3), &[]).is_none());
        // A repair writes the state of version 4 again, never over version 5.
        shadow.related.push((related::REPAIR.into(), "drift".into()));
        let repair = Position::of(&shadow).unwrap();
        assert!(stale(&repair, at(4), &[]).is_none(), "the target may have drifted since");
        assert!(stale(&repair, at(5), &[]).is_some());
        assert_eq!(Position::of(&event(Entity::Thing, Operation::Created, "t", 0)), None);
        let mut unversioned = event(Entity::Shadow, Operation::Updated, "t", 5000);
        unversioned.version = None;
        assert_eq!(Position::of(&unversioned), None);
    }
}
