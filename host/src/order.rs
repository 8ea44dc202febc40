//! In what order the changes of a batch may be applied. Changes with the
//! same ordering key (one thing and everything about it, one group, ...) go
//! in source order; a change also waits for the earlier changes of what it
//! depends on (a thing for its type, a membership for its group, a child
//! group for its parent, a certificate for its policies). Everything else
//! runs concurrently.
//!
//! AWS publishes the events of different topics in no common order: a
//! shadow report can come before its thing's `created` event, a membership
//! before its group's. So a change that needs something first created later
//! in the batch (and not seen earlier in it) goes after that creation.

use crate::event::{Entity, Event, Operation, related};
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

/// The ordering keys of what `event` needs to exist in the target: its
/// dependencies, and its own key when the event is not about what that key
/// names (a shadow or a membership needs `thing/<name>`).
pub fn needs(event: &Event) -> Vec<String> {
    let own = event.ordering_key();
    let mut keys = dependencies(event);
    if maker(&own) != Some(event.entity) {
        keys.push(own);
    }
    keys
}

/// The ordering key `event` creates, when it is a creation.
pub fn creates(event: &Event) -> Option<String> {
    let own = event.ordering_key();
    (event.operation == Operation::Created && maker(&own) == Some(event.entity)).then_some(own)
}

/// A level per change: every change of level n may run once all changes of
/// lower levels are done, concurrently with the rest of level n. `changes`
/// are (region, event) in source order; regions never wait for each other.
///
/// A change writes its own key and reads its dependencies' keys. It waits for
/// the last earlier write of every key it touches, and a write also waits for
/// the reads since the previous write: a type is deprecated only after the
/// things created with it, a group deleted only after its members came and went.
pub fn levels<'a>(changes: impl IntoIterator<Item = (&'a str, &'a Event)>) -> Vec<usize> {
    #[derive(Default)]
    struct Key {
        last_write: Option<usize>,
        reads_since_write: Option<usize>,
    }
    let changes: Vec<(&str, &Event)> = changes.into_iter().collect();
    let mut keys: HashMap<(&str, String), Key> = HashMap::new();
    let mut levels = vec![0; changes.len()];
    for index in creations_first(&changes) {
        let (region, event) = changes[index];
        let own = event.ordering_key();
        let reads = dependencies(event);
        let own_key = keys.get(&(region, own.clone()));
        let after = own_key
            .map(|k| k.last_write.max(k.reads_since_write))
            .into_iter()
            .chain(reads.iter().map(|key| keys.get(&(region, key.clone())).and_then(|k| k.last_write)))
            .flatten()
            .max();
        let level = after.map_or(0, |l| l + 1);
        keys.insert((region, own), Key { last_write: Some(level), reads_since_write: None });
        for key in reads {
            let entry = keys.entry((region, key)).or_default();
            entry.reads_since_write = entry.reads_since_write.max(Some(level));
        }
        levels[index] = level;
    }
    levels
}

/// The entity whose `created` event makes what an ordering key names.
fn maker(key: &str) -> Option<Entity> {
    Some(match key.split_once('/')?.0 {
        "thing" => Entity::Thing,
        "thing-type" => Entity::ThingType,
        "thing-group" => Entity::ThingGroup,
        "billing-group" => Entity::BillingGroup,
        "certificate" => Entity::Certificate,
        "policy" => Entity::Policy,
        _ => return None,
    })
}

/// The changes' indices in the order they are leveled: source order, except
/// that a change needing something (its own key's entity, or a dependency)
/// whose first change in the batch comes later and is its creation goes
/// right after that creation, and so do the later changes of its key: the
/// changes of one key keep their order.
fn creations_first(changes: &[(&str, &Event)]) -> Vec<usize> {
    let makes = |event: &Event, key: &str| maker(key) == Some(event.entity);
    // Where each (region, key) is first changed by what makes it.
    let mut first_made: HashMap<(&str, String), usize> = HashMap::new();
    for (index, (region, event)) in changes.iter().enumerate() {
        let own = event.ordering_key();
        if makes(event, &own) {
            first_made.entry((region, own)).or_insert(index);
        }
    }
    // Changes held back, by the creation they follow.
    let mut waiting: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut order = Vec::with_capacity(changes.len());
    let emit = |index: usize, order: &mut Vec<usize>, waiting: &mut HashMap<usize, Vec<usize>>| {
        let mut stack = vec![index];
        while let Some(index) = stack.pop() {
            order.push(index);
            // Pushed in reverse, so they come out in source order.
            stack.extend(waiting.remove(&index).unwrap_or_default().into_iter().rev());
        }
    };
    // Per (region, own key), the creation its held changes follow: the
    // later changes of that key follow it too, so that none overtakes them
    // (a thing's type association does not need its thing's type, but must
    // not pass the thing's held update).
    let mut held: HashMap<(&str, String), usize> = HashMap::new();
    for (index, (region, event)) in changes.iter().enumerate() {
        let own = (*region, event.ordering_key());
        let after = needs(event)
            .into_iter()
            .filter_map(|key| first_made.get(&(*region, key)).copied())
            .filter(|&made| changes[made].1.operation == Operation::Created)
            .chain(held.get(&own).copied())
            .filter(|&made| made > index)
            .max();
        match after {
            Some(made) => {
                held.insert(own, made);
                waiting.entry(made).or_default().push(index);
            }
            None => emit(index, &mut order, &mut waiting),
        }
    }
    order
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
        // Things of one type do not wait for each other; deprecating the type waits for them.
        let mut deprecated = event(Entity::ThingType, "sensor", &[]);
        deprecated.operation = Operation::Updated;
        let typed = [
            event(Entity::ThingType, "sensor", &[]),
            event(Entity::Thing, "a", &[("thing-type", "sensor")]),
            event(Entity::Thing, "b", &[("thing-type", "sensor")]),
            deprecated,
            event(Entity::Thing, "c", &[("thing-type", "sensor")]),
        ];
        assert_eq!(super::levels(typed.iter().map(|e| ("eu-west-1", e))), vec![0, 1, 1, 2, 3]);
        // Another region does not wait for this one.
        let mixed = levels_of(&events[..2], &["eu-west-1", "eu-central-1"]);
        assert_eq!(mixed, vec![0, 0]);
    }

    #[test]
    fn a_change_that_comes_before_the_creation_it_needs_goes_after_it() {
        let mut updated = event(Entity::Thing, "pump-1", &[]);
        updated.operation = Operation::Updated;
        let mut deleted = event(Entity::Thing, "pump-3", &[]);
        deleted.operation = Operation::Deleted;
        let events = [
            // Shadow reports and a membership ahead of the thing and group they need.
            event(Entity::Shadow, "pump-1", &[]),
            event(Entity::ThingGroupMembership, "pump-2", &[("thing-group", "berlin")]),
            event(Entity::Shadow, "pump-1", &[]),
            event(Entity::Thing, "pump-1", &[]),
            event(Entity::ThingGroup, "berlin", &[("parent-group", "europe")]),
            event(Entity::ThingGroup, "europe", &[]),
            updated,
            // The thing existed before the batch: its report keeps its place before the delete.
            event(Entity::Shadow, "pump-3", &[]),
            deleted,
            event(Entity::Thing, "pump-3", &[]),
        ];
        let levels = levels(events.iter().map(|e| ("eu-west-1", e)));
        // pump-1: created 0, reports 1 and 2, updated 3. berlin waits for europe (0), the membership for berlin.
        // pump-3: report 0, deleted 1, created again 2.
        assert_eq!(levels, vec![1, 2, 2, 0, 1, 0, 3, 0, 1, 2]);
    }

    #[test]
    fn the_later_changes_of_a_held_key_follow_the_same_creation() {
        let events = [
            event(Entity::Thing, "pump-1", &[("thing-type", "sensor")]),
            // Needs pump-1, created before it: but pump-1's creation is held behind its type.
            event(Entity::Shadow, "pump-1", &[]),
            event(Entity::ThingType, "sensor", &[]),
        ];
        assert_eq!(levels(events.iter().map(|e| ("eu-west-1", e))), vec![1, 2, 0]);
    }

    #[test]
    fn what_a_change_needs_and_what_a_creation_makes() {
        let shadow = event(Entity::Shadow, "pump-1", &[]);
        let member = event(Entity::ThingGroupMembership, "pump-1", &[("thing-group", "berlin")]);
        let thing = event(Entity::Thing, "pump-1", &[("thing-type", "sensor")]);
        assert_eq!(needs(&shadow), ["thing/pump-1"]);
        assert_eq!(needs(&member), ["thing-group/berlin", "thing/pump-1"]);
        assert_eq!(needs(&thing), ["thing-type/sensor"]);
        assert_eq!(creates(&thing).as_deref(), Some("thing/pump-1"));
        assert_eq!(creates(&shadow), None, "a shadow is not its thing");
        let mut updated = thing.clone();
        updated.operation = Operation::Updated;
        assert_eq!(creates(&updated), None);
    }

    fn levels_of(events: &[Event], regions: &[&'static str]) -> Vec<usize> {
        let mut same = events.to_vec();
        same[1] = same[0].clone();
        levels(same.iter().zip(regions).map(|(e, r)| (*r, e)))
    }
}
