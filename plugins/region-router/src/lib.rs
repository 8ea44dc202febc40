//! Chooses each event's target regions: by an attribute's value (per customer,
//! per site), by thing group, else a default.
//!
//! ```toml
//! [[stage]]
//! name = "per-customer-route"
//! plugin = "../plugins/dist/region-router.wasm"
//! config = { by_attribute = "customer", routes = { acme = ["eu-west-1", "ap-southeast-2"] },
//!            groups = { berlin-plant = ["eu-central-1"] }, default = ["eu-west-1"] }
//! ```
//!
//! The first rule that matches decides: the attribute route, then the group
//! route (for thing groups, their hierarchy links and memberships, and any event
//! that names its groups), then `default`. Without `default` an unrouted event
//! keeps the pipeline's targets, or is dropped when `unrouted = "drop"`.

use iotdr_plugin::{Batch, Entity, Outcome, Stage};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    by_attribute: Option<String>,
    #[serde(default)]
    routes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    default: Option<Vec<String>>,
    #[serde(default)]
    unrouted: Unrouted,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Unrouted {
    #[default]
    Keep,
    Drop,
}

#[derive(Debug)]
pub struct RegionRouter(Config);

impl RegionRouter {
    fn group_route(&self, batch: &Batch, index: u32, entity: Entity) -> Option<&Vec<String>> {
        if self.0.groups.is_empty() {
            return None;
        }
        let event = batch.event(index);
        let route = |group: &str| self.0.groups.get(group);
        match entity {
            Entity::ThingGroup | Entity::ThingGroupHierarchy => {
                route(&event.name()).or_else(|| event.related("parent-group").and_then(|g| route(&g)))
            }
            _ => event
                .related_all()
                .into_iter()
                .filter(|(kind, _)| kind == "thing-group" || kind == "parent-group")
                .find_map(|(_, group)| route(&group)),
        }
    }
}

impl Stage for RegionRouter {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.by_attribute.is_some() == config.routes.is_empty() {
            return Err("`by_attribute` and `routes` go together".into());
        }
        if config.default.is_some() && config.unrouted == Unrouted::Drop {
            return Err("`default` and `unrouted = \"drop\"` contradict each other".into());
        }
        let default_key = String::from("default");
        let all_routes =
            config.routes.iter().chain(&config.groups).chain(config.default.iter().map(|d| (&default_key, d)));
        for (key, regions) in all_routes {
            if let Some(bad) = regions.iter().find(|r| !looks_like_region(r)) {
                return Err(format!("route {key:?}: {bad:?} is not an AWS region name"));
            }
        }
        Ok(RegionRouter(config))
    }

    fn process(&mut self, batch: &Batch) -> Vec<Outcome> {
        let column = self.0.by_attribute.as_ref().map(|attribute| batch.attribute_codes(attribute));
        // Looked up once per distinct value.
        let value_routes: Vec<Option<&Vec<String>>> =
            column.iter().flat_map(|c| &c.values).map(|value| self.0.routes.get(value)).collect();
        let entities = if self.0.groups.is_empty() { Vec::new() } else { batch.entities() };
        // The events of each distinct route, written in one call per route.
        let mut routed: Vec<(&Vec<String>, Vec<u32>)> = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len() as usize);
        for index in 0..batch.len() {
            let route = column
                .as_ref()
                .and_then(|c| c.code(index))
                .and_then(|code| value_routes[code])
                .or_else(|| entities.get(index as usize).and_then(|&entity| self.group_route(batch, index, entity)))
                .or(self.0.default.as_ref());
            outcomes.push(match route {
                Some(regions) => {
                    match routed.iter_mut().find(|(r, _)| std::ptr::eq(*r, regions)) {
                        Some((_, indices)) => indices.push(index),
                        None => routed.push((regions, vec![index])),
                    }
                    Outcome::Keep
                }
                None if self.0.unrouted == Unrouted::Drop => Outcome::Drop("no route matches".into()),
                None => Outcome::Keep,
            });
        }
        for (regions, indices) in routed {
            batch.set_targets_of(&indices, regions);
        }
        outcomes
    }
}

/// `eu-west-1`, `us-gov-west-1`, `ap-southeast-2`: lowercase words and a number.
fn looks_like_region(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    parts.len() >= 3
        && parts.last().is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        && parts[..parts.len() - 1].iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
}

iotdr_plugin::export_stage!(RegionRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use iotdr_plugin::Operation;
    use iotdr_plugin::testing::{TestBatch, TestEvent, stage_from_json};

    const CONFIG: &str = r#"{"by_attribute":"customer","routes":{"acme":["eu-west-1","ap-southeast-2"]},
        "groups":{"berlin-plant":["eu-central-1"]},"default":["us-west-2"]}"#;

    #[test]
    fn routes_by_attribute_then_group_then_default() {
        let mut stage: RegionRouter = stage_from_json(CONFIG).unwrap();
        let batch = TestBatch::new(vec![
            TestEvent::thing("a").attribute("customer", "acme"),
            TestEvent::new(Entity::ThingGroupMembership, Operation::Added, "b").related("thing-group", "berlin-plant"),
            TestEvent::new(Entity::ThingGroup, Operation::Created, "berlin-plant"),
            TestEvent::thing("c").attribute("customer", "globex"),
        ]);
        assert_eq!(batch.run(&mut stage), vec![Outcome::Keep; 4]);
        let targets: Vec<Vec<String>> = batch.events().into_iter().map(|e| e.targets).collect();
        assert_eq!(targets[0], ["eu-west-1", "ap-southeast-2"]);
        assert_eq!(targets[1], ["eu-central-1"]);
        assert_eq!(targets[2], ["eu-central-1"]);
        assert_eq!(targets[3], ["us-west-2"]);
    }

    #[test]
    fn unrouted_events_keep_pipeline_targets_or_drop() {
        let mut keep: RegionRouter =
            stage_from_json(r#"{"by_attribute":"customer","routes":{"acme":["eu-west-1"]}}"#).unwrap();
        let batch = TestBatch::new(vec![TestEvent::thing("x").targets(&["eu-north-1"])]);
        assert_eq!(batch.run(&mut keep), vec![Outcome::Keep]);
        assert_eq!(batch.event(0).targets, ["eu-north-1"]);

        let mut drop: RegionRouter =
            stage_from_json(r#"{"by_attribute":"customer","routes":{"acme":["eu-west-1"]},"unrouted":"drop"}"#)
                .unwrap();
        assert_eq!(
            TestBatch::new(vec![TestEvent::thing("x")]).run(&mut drop),
            vec![Outcome::Drop("no route matches".into())]
        );
    }

    #[test]
    fn rejects_bad_regions_and_half_rules() {
        let error = stage_from_json::<RegionRouter>(r#"{"by_attribute":"c","routes":{"a":["Europe"]}}"#).unwrap_err();
        assert!(error.contains("Europe"), "{error}");
        assert!(stage_from_json::<RegionRouter>(r#"{"by_attribute":"c"}"#).is_err());
        assert!(looks_like_region("us-gov-west-1") && !looks_like_region("eu-west") && !looks_like_region("EU-west-1"));
    }
}
