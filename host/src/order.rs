//! In what order the changes of a batch may be applied. Changes with the
//! same ordering key (one thing and everything about it, one group, ...) go
//! in source order; a change also waits for the earlier changes of what it
//! depends on (a thing for its type, a membership for its group, a child
//! group for its parent, a certificate for its policies). Everything else
//! runs concurrently.

use crate::event::{Entity, Event, related};
use std::collections::HashMap;

/// The ordering keys an event depends on, besides its own.
pub fn dependencies(event: &Event) -> Vec<String> {
    let mut keys = Vec::new();
    let mut add = |prefix: &str, name: &str| keys.push(format!("{prefix}/{name}"));
    match event.entity {
        Entity::Thing | Entity::ThingTypeAssociation => {
            if let Some(thing_type) = event.related(related::THING_TYPE) {
                add("thing-type", thing_type);
            }
        }
        Entity::ThingGroup | Entity::ThingGroupHierarchy => {
            if let Some(parent) = event.related(related::PARENT_GROUP) {
                add("thing-group", parent);
            }
        }
        Entity::ThingGroupMembership => {
            if let Some(group) = event.related(related::THING_GROUP) {
                add("thing-group", group);
            }
        }
        Entity::BillingGroupMembership => {
            if let Some(group) = event.related(related::BILLING_GROUP) {
                add("billing-group", group);
            }
        }
        Entity::Certificate => {
            for (kind, policy) in &event.related {
                if kind == related::POLICY {
                    add("policy", policy);
                }
            }
        }
        Entity::ThingType | Entity::BillingGroup | Entity::Policy | Entity::Shadow => {}
    }
    for (kind, principal) in &event.related {
        if kind == related::PRINCIPAL && event.entity != Entity::Certificate {
            add("certificate", principal);
        }
    }
    keys
}

/// A level per change: every change of level n may run once all changes of
/// lower levels are done, concurrently with the rest of level n. `changes`
/// are (region, event) in source order; regions never wait for each other.
pub fn levels<'a>(changes: impl IntoIterator<Item = (&'a str, &'a Event)>) -> Vec<usize> {
    let mut last: HashMap<(&str, String), usize> = HashMap::new();
    changes
        .into_iter()
        .map(|(region, event)| {
            let own = event.ordering_key();
            let level = std::iter::once(own.clone())
                .chain(dependencies(event))
                .filter_map(|key| last.get(&(region, key)).copied())
                .max()
                .map_or(0, |l| l + 1);
            last.insert((region, own), level);
            level
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Operation;

    fn event(entity: Entity, name: &str, related: &[(&str, &str)]) -> Event {
        let mut e = Event::new(entity, Operation::Created, name);
        e.related = related.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        e
    }

    #[test]
    fn same_key_is_sequential_dependencies_wait_the_rest_is_concurrent() {
        let events = [
            event(Entity::ThingType, "sensor", &[]),
            event(Entity::ThingGroup, "europe", &[]),
            event(Entity::ThingGroup, "berlin", &[("parent-group", "europe")]),
            event(Entity::Thing, "pump-1", &[("thing-type", "sensor")]),
            event(Entity::Thing, "pump-2", &[]),
            event(Entity::ThingGroupMembership, "pump-1", &[("thing-group", "berlin")]),
            event(Entity::Shadow, "pump-2", &[]),
        ];
        let levels = levels(events.iter().map(|e| ("eu-west-1", e)));
        assert_eq!(levels, vec![0, 0, 1, 1, 0, 2, 1]);
        // Another region does not wait for this one.
        let mixed = levels_of(&events[..2], &["eu-west-1", "eu-central-1"]);
        assert_eq!(mixed, vec![0, 0]);
    }

    fn levels_of(events: &[Event], regions: &[&'static str]) -> Vec<usize> {
        let mut same = events.to_vec();
        same[1] = same[0].clone();
        levels(same.iter().zip(regions).map(|(e, r)| (*r, e)))
    }
}
