//! Gives events about a thing (its type association, group and billing-group
//! memberships, shadows) the thing's attributes as last seen, so that filters
//! and routers treat everything about one thing alike: a membership of a
//! customer's thing goes where the thing goes. AWS publishes those events
//! without attributes; planners ignore them there.

use crate::event::{Entity, Event, Operation};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default)]
pub struct ThingContext {
    attributes: HashMap<String, BTreeMap<String, String>>,
}

impl ThingContext {
    /// Learns from thing events and fills the attributes of events about a thing.
    pub fn enrich(&mut self, event: &mut Event) {
        match event.entity {
            Entity::Thing => match event.operation {
                Operation::Deleted => {
                    if event.attributes.is_empty()
                        && let Some(last) = self.attributes.remove(&event.name)
                    {
                        event.attributes = last;
                    }
                }
                _ => {
                    self.attributes.insert(event.name.clone(), event.attributes.clone());
                }
            },
            Entity::ThingTypeAssociation
            | Entity::ThingGroupMembership
            | Entity::BillingGroupMembership
            | Entity::Shadow => {
                if event.attributes.is_empty()
                    && let Some(known) = self.attributes.get(&event.name)
                {
                    event.attributes = known.clone();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn things_lend_their_attributes_to_what_is_about_them() {
        let mut context = ThingContext::default();
        let mut thing = Event::new(Entity::Thing, Operation::Created, "pump-1");
        thing.attributes.insert("customer".into(), "acme".into());
        context.enrich(&mut thing);
        let mut shadow = Event::new(Entity::Shadow, Operation::Updated, "pump-1");
        context.enrich(&mut shadow);
        assert_eq!(shadow.attributes.get("customer").map(String::as_str), Some("acme"));
        let mut other = Event::new(Entity::ThingGroupMembership, Operation::Added, "pump-2");
        context.enrich(&mut other);
        assert!(other.attributes.is_empty());
        let mut deleted = Event::new(Entity::Thing, Operation::Deleted, "pump-1");
        context.enrich(&mut deleted);
        assert_eq!(deleted.attributes.get("customer").map(String::as_str), Some("acme"));
        let mut late = Event::new(Entity::Shadow, Operation::Deleted, "pump-1");
        context.enrich(&mut late);
        assert!(late.attributes.is_empty(), "forgotten with the thing");
    }
}
