//! Run a stage natively in unit tests, on events built in the test.
//!
//! ```ignore
//! let mut stage = MyStage::new(config).unwrap();
//! let batch = TestBatch::new(vec![TestEvent::thing("pump-1").attribute("env", "test")]);
//! assert_eq!(batch.run(&mut stage), vec![Outcome::Drop("test device".into())]);
//! ```

use crate::{Entity, Level, Operation, Outcome, Stage};
use std::cell::RefCell;

/// One event as a test builds it; mirrors what the host holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TestEvent {
    pub id: String,
    pub entity: Entity,
    pub operation: Operation,
    pub name: String,
    pub source_region: String,
    pub account_id: String,
    pub timestamp_ms: u64,
    pub version: Option<u64>,
    pub targets: Vec<String>,
    pub attributes: Vec<(String, String)>,
    pub related: Vec<(String, String)>,
    pub document: Option<String>,
}

impl TestEvent {
    pub fn new(entity: Entity, operation: Operation, name: &str) -> TestEvent {
        TestEvent {
            id: format!("test-{name}"),
            entity,
            operation,
            name: name.to_string(),
            source_region: "us-east-1".into(),
            account_id: "111122223333".into(),
            timestamp_ms: 1_763_900_000_000,
            version: Some(1),
            targets: vec!["eu-west-1".into()],
            attributes: Vec::new(),
            related: Vec::new(),
            document: None,
        }
    }
    pub fn thing(name: &str) -> TestEvent {
        TestEvent::new(Entity::Thing, Operation::Created, name)
    }
    pub fn policy(name: &str, document: &str) -> TestEvent {
        TestEvent::new(Entity::Policy, Operation::Created, name).document(document)
    }
    pub fn attribute(mut self, key: &str, value: &str) -> TestEvent {
        self.attributes.retain(|(k, _)| k != key);
        self.attributes.push((key.into(), value.into()));
        self.attributes.sort();
        self
    }
    pub fn related(mut self, kind: &str, name: &str) -> TestEvent {
        self.related.push((kind.into(), name.into()));
        self
    }
    pub fn targets(mut self, regions: &[&str]) -> TestEvent {
        self.targets = regions.iter().map(|r| r.to_string()).collect();
        self
    }
    pub fn document(mut self, document: &str) -> TestEvent {
        self.document = Some(document.into());
        self
    }
    pub fn get_attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// An in-memory batch with the same methods the host provides.
#[derive(Debug, Default)]
pub struct TestBatch {
    events: RefCell<Vec<TestEvent>>,
}

impl TestBatch {
    pub fn new(events: Vec<TestEvent>) -> TestBatch {
        TestBatch { events: RefCell::new(events) }
    }

    /// Runs `stage` over the batch, as the host would (entities the stage did not
    /// ask for are not passed to it; they come back as `Keep`).
    pub fn run<S: Stage>(&self, stage: &mut S) -> Vec<Outcome> {
        let wanted = stage.entities();
        if !wanted.is_empty() && self.events.borrow().iter().any(|e| !wanted.contains(&e.entity)) {
            let all = self.events.take();
            let (mine, _): (Vec<_>, Vec<_>) = all.iter().cloned().partition(|e| wanted.contains(&e.entity));
            let sub = TestBatch::new(mine);
            let sub_outcomes = stage.process(&crate::Batch::from_inner(&sub));
            let mut sub_events = sub.events.take().into_iter();
            // Where each event of the sub-batch lands in the whole batch:
            // wanted events in their places, copies made by `duplicate` after all.
            let mut place: Vec<u32> = Vec::new();
            let mut merged = Vec::new();
            let mut from_sub = Vec::new();
            for e in all {
                if wanted.contains(&e.entity) {
                    place.push(merged.len() as u32);
                    merged.push(sub_events.next().expect("one per wanted"));
                    from_sub.push(true);
                } else {
                    merged.push(e);
                    from_sub.push(false);
                }
            }
            for copy in sub_events {
                place.push(merged.len() as u32);
                merged.push(copy);
            }
            let mut sub_outcomes = sub_outcomes.into_iter().map(|outcome| match outcome {
                Outcome::Split(indices) => Outcome::Split(indices.into_iter().map(|i| place[i as usize]).collect()),
                other => other,
            });
            let outcomes =
                from_sub
                    .into_iter()
                    .map(|wanted| {
                        if wanted { sub_outcomes.next().expect("one outcome per wanted event") } else { Outcome::Keep }
                    })
                    .collect();
            self.events.replace(merged);
            return outcomes;
        }
        stage.process(&crate::Batch::from_inner(self))
    }

    /// The events after the run, with the stage's changes.
    pub fn events(&self) -> Vec<TestEvent> {
        self.events.borrow().clone()
    }

    pub fn event(&self, index: u32) -> TestEvent {
        self.events.borrow()[index as usize].clone()
    }

    fn with<R>(&self, index: u32, f: impl FnOnce(&TestEvent) -> R) -> R {
        let events = self.events.borrow();
        let event = events.get(index as usize).unwrap_or_else(|| panic!("event index {index} out of range"));
        f(event)
    }

    fn with_mut<R>(&self, index: u32, f: impl FnOnce(&mut TestEvent) -> R) -> R {
        let mut events = self.events.borrow_mut();
        let event = events.get_mut(index as usize).unwrap_or_else(|| panic!("event index {index} out of range"));
        f(event)
    }

    pub(crate) fn len(&self) -> u32 {
        self.events.borrow().len() as u32
    }
    pub(crate) fn entity(&self, index: u32) -> Entity {
        self.with(index, |e| e.entity)
    }
    pub(crate) fn operation(&self, index: u32) -> Operation {
        self.with(index, |e| e.operation)
    }
    pub(crate) fn id(&self, index: u32) -> String {
        self.with(index, |e| e.id.clone())
    }
    pub(crate) fn name(&self, index: u32) -> String {
        self.with(index, |e| e.name.clone())
    }
    pub(crate) fn set_name(&self, index: u32, name: &str) {
        assert!(!name.is_empty(), "set-name: a name cannot be empty");
        self.with_mut(index, |e| e.name = name.into())
    }
    pub(crate) fn source_region(&self, index: u32) -> String {
        self.with(index, |e| e.source_region.clone())
    }
    pub(crate) fn account_id(&self, index: u32) -> String {
        self.with(index, |e| e.account_id.clone())
    }
    pub(crate) fn timestamp_ms(&self, index: u32) -> u64 {
        self.with(index, |e| e.timestamp_ms)
    }
    pub(crate) fn version(&self, index: u32) -> Option<u64> {
        self.with(index, |e| e.version)
    }
    pub(crate) fn targets(&self, index: u32) -> Vec<String> {
        self.with(index, |e| e.targets.clone())
    }
    pub(crate) fn set_targets(&self, index: u32, regions: &[String]) {
        self.with_mut(index, |e| e.targets = regions.to_vec())
    }
    pub(crate) fn attribute(&self, index: u32, key: &str) -> Option<String> {
        self.with(index, |e| e.get_attribute(key).map(str::to_string))
    }
    pub(crate) fn attributes(&self, index: u32) -> Vec<(String, String)> {
        self.with(index, |e| e.attributes.clone())
    }
    pub(crate) fn set_attribute(&self, index: u32, key: &str, value: &str) {
        assert!(!key.is_empty(), "set-attribute: an attribute key cannot be empty");
        self.with_mut(index, |e| {
            e.attributes.retain(|(k, _)| k != key);
            e.attributes.push((key.into(), value.into()));
            e.attributes.sort();
        })
    }
    pub(crate) fn remove_attribute(&self, index: u32, key: &str) -> bool {
        self.with_mut(index, |e| {
            let before = e.attributes.len();
            e.attributes.retain(|(k, _)| k != key);
            e.attributes.len() != before
        })
    }
    pub(crate) fn related(&self, index: u32, kind: &str) -> Option<String> {
        self.with(index, |e| e.related.iter().find(|(k, _)| k == kind).map(|(_, v)| v.clone()))
    }
    pub(crate) fn related_all(&self, index: u32) -> Vec<(String, String)> {
        self.with(index, |e| e.related.clone())
    }
    pub(crate) fn set_related(&self, index: u32, kind: &str, name: Option<&str>) {
        self.with_mut(index, |e| {
            e.related.retain(|(k, _)| k != kind);
            if let Some(name) = name {
                e.related.push((kind.into(), name.into()));
            }
        })
    }
    pub(crate) fn add_related(&self, index: u32, kind: &str, name: &str) {
        assert!(!kind.is_empty() && !name.is_empty(), "add-related: kind and name cannot be empty");
        self.with_mut(index, |e| e.related.push((kind.into(), name.into())))
    }
    pub(crate) fn document(&self, index: u32) -> Option<String> {
        self.with(index, |e| e.document.clone())
    }
    pub(crate) fn set_document(&self, index: u32, document: Option<&str>) {
        self.with_mut(index, |e| e.document = document.map(str::to_string))
    }
    pub(crate) fn duplicate(&self, index: u32) -> u32 {
        let copy = self.with(index, TestEvent::clone);
        let mut events = self.events.borrow_mut();
        events.push(copy);
        (events.len() - 1) as u32
    }
    pub(crate) fn entities(&self) -> Vec<Entity> {
        self.events.borrow().iter().map(|e| e.entity).collect()
    }
    pub(crate) fn attribute_codes(&self, key: &str) -> (Vec<String>, Vec<u32>) {
        let mut values: Vec<String> = Vec::new();
        let codes = self
            .attribute_column(key)
            .into_iter()
            .map(|value| match value {
                None => 0,
                Some(value) => match values.iter().position(|v| *v == value) {
                    Some(at) => at as u32 + 1,
                    None => {
                        values.push(value);
                        values.len() as u32
                    }
                },
            })
            .collect();
        (values, codes)
    }
    pub(crate) fn set_targets_of(&self, indices: &[u32], regions: &[String]) {
        indices.iter().for_each(|&i| self.set_targets(i, regions));
    }
    pub(crate) fn set_attribute_of(&self, indices: &[u32], key: &str, value: &str) {
        indices.iter().for_each(|&i| self.set_attribute(i, key, value));
    }
    pub(crate) fn remove_attribute_of(&self, indices: &[u32], key: &str) {
        indices.iter().for_each(|&i| {
            self.remove_attribute(i, key);
        });
    }
    pub(crate) fn rename_attribute_of(&self, indices: &[u32], key: &str, new_key: &str) {
        assert!(!new_key.is_empty(), "rename-attribute-of: an attribute key cannot be empty");
        for &i in indices {
            if let Some(value) = self.attribute(i, key) {
                self.remove_attribute(i, key);
                self.set_attribute(i, new_key, &value);
            }
        }
    }
    pub(crate) fn attribute_column(&self, key: &str) -> Vec<Option<String>> {
        self.events.borrow().iter().map(|e| e.get_attribute(key).map(str::to_string)).collect()
    }
}

thread_local! {
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    static COUNTS: RefCell<Vec<(String, u64)>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|logs| logs.borrow_mut().push((level, message.to_string())));
}

pub(crate) fn record_count(metric: &str, delta: u64) {
    COUNTS.with(|counts| counts.borrow_mut().push((metric.to_string(), delta)));
}

/// Log lines the stage wrote on this thread since the last call.
pub fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|logs| logs.take())
}

/// The total of counter `metric` on this thread since the last call, then resets all counters.
pub fn take_count(metric: &str) -> u64 {
    COUNTS.with(|counts| counts.take().into_iter().filter(|(m, _)| m == metric).map(|(_, d)| d).sum())
}

/// Builds a stage from a JSON config, as the host's `init` does.
pub fn stage_from_json<S: Stage>(config: &str) -> Result<S, String> {
    crate::__private::init::<S>(config).map(|(stage, _)| stage)
}
