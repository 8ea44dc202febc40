//! Gives events about a thing (its type association, group and billing-group
//! memberships, shadows) the thing's attributes as last seen, so that filters
//! and routers treat everything about one thing alike: a membership of a
//! customer's thing goes where the thing goes. AWS publishes those events
//! without attributes; planners ignore them there.
//!
//! What was last seen lives in the state store (`thing_attributes`), written
//! in the transaction of the batch that taught it: a restart, a crash or a
//! dead-letter replay routes a membership as the run before it would have,
//! and memory does not grow with the fleet.

use crate::event::{Entity, Event, Operation};
use crate::state::{StateError, StateStore};
use std::collections::{BTreeMap, HashMap};

/// The thing context of one batch: the store's, with what this batch
/// taught it on top (stored with the batch, see [`ThingContext::learned`]).
pub struct ThingContext<'a> {
    store: &'a StateStore,
    /// Things this batch saw: their attributes, or `None` once deleted.
    batch: HashMap<String, Option<BTreeMap<String, String>>>,
}

impl<'a> ThingContext<'a> {
    pub fn new(store: &'a StateStore) -> ThingContext<'a> {
        ThingContext { store, batch: HashMap::new() }
    }

    /// Learns from thing events and fills the attributes of events about a thing.
    pub fn enrich(&mut self, event: &mut Event) -> Result<(), StateError> {
        match event.entity {
            Entity::Thing => match event.operation {
                Operation::Deleted => {
                    if event.attributes.is_empty()
                        && let Some(last) = self.last_seen(&event.name)?
                    {
                        event.attributes = last;
                    }
                    self.batch.insert(event.name.clone(), None);
                }
                _ => {
                    self.batch.insert(event.name.clone(), Some(event.attributes.clone()));
                }
            },
            Entity::ThingTypeAssociation
            | Entity::ThingGroupMembership
            | Entity::BillingGroupMembership
            | Entity::Shadow => {
                if event.attributes.is_empty()
                    && let Some(known) = self.last_seen(&event.name)?
                {
                    event.attributes = known;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn last_seen(&self, thing: &str) -> Result<Option<BTreeMap<String, String>>, StateError> {
        match self.batch.get(thing) {
            Some(seen) => Ok(seen.clone()),
            None => self.store.thing_attributes(thing),
        }
    }

    /// What the batch taught, for the store to keep with the batch.
    pub fn learned(self) -> Vec<(String, Option<BTreeMap<String, String>>)> {
        self.batch.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::queue::Ingested;

    #[test]
    fn things_lend_their_attributes_to_what_is_about_them_across_batches() {
        let store = StateStore::in_memory().unwrap();
        let mut context = ThingContext::new(&store);
        let mut thing = Event::new(Entity::Thing, Operation::Created, "pump-1");
        thing.attributes.insert("customer".into(), "acme".into());
        context.enrich(&mut thing).unwrap();
        let mut shadow = Event::new(Entity::Shadow, Operation::Updated, "pump-1");
        context.enrich(&mut shadow).unwrap();
        assert_eq!(shadow.attributes.get("customer").map(String::as_str), Some("acme"));
        let mut other = Event::new(Entity::ThingGroupMembership, Operation::Added, "pump-2");
        context.enrich(&mut other).unwrap();
        assert!(other.attributes.is_empty());
        store.ingest(&Ingested { thing_attributes: &context.learned(), ..Default::default() }).unwrap();

        // The next batch (or the next run) still knows pump-1.
        let mut context = ThingContext::new(&store);
        let mut membership = Event::new(Entity::ThingGroupMembership, Operation::Added, "pump-1");
        context.enrich(&mut membership).unwrap();
        assert_eq!(membership.attributes.get("customer").map(String::as_str), Some("acme"));
        let mut deleted = Event::new(Entity::Thing, Operation::Deleted, "pump-1");
        context.enrich(&mut deleted).unwrap();
        assert_eq!(deleted.attributes.get("customer").map(String::as_str), Some("acme"));
        let mut late = Event::new(Entity::Shadow, Operation::Deleted, "pump-1");
        context.enrich(&mut late).unwrap();
        assert!(late.attributes.is_empty(), "forgotten with the thing");
        store.ingest(&Ingested { thing_attributes: &context.learned(), ..Default::default() }).unwrap();
        assert_eq!(store.thing_attributes("pump-1").unwrap(), None);
    }
}
