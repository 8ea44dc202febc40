//! The host side of the `batch` resource: the events one `process` call sees,
//! with an undo journal so a call that fails leaves every event as it was.

use crate::event::Event;
use std::collections::HashMap;

/// An attribute key, stored once per call (a write to many events shares it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId(u32);

/// One change a stage made, with what it replaced.
enum Undo {
    Name(u32, String),
    Targets(u32, Vec<String>),
    Attribute(u32, KeyId, Option<String>),
    /// `key` was renamed to `new_key`, which held the `Option` before.
    Renamed(u32, KeyId, KeyId, Option<String>),
    Related(u32, Vec<(String, String)>),
    Document(u32, Option<String>),
}

impl Undo {
    fn index(&self) -> u32 {
        match self {
            Undo::Name(i, _)
            | Undo::Targets(i, _)
            | Undo::Attribute(i, _, _)
            | Undo::Renamed(i, _, _, _)
            | Undo::Related(i, _)
            | Undo::Document(i, _) => *i,
        }
    }
}

/// Why a stage's call on the batch was refused (it becomes a trap in the guest).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("event index {index} is out of range (the batch has {len} events)")]
    OutOfRange { index: u32, len: usize },
    #[error("the stage grew the batch past {limit} events")]
    TooManyEvents { limit: usize },
    #[error("the stage stored more than {limit} bytes in events during one call")]
    TooManyBytes { limit: usize },
}

pub struct Batch {
    pub events: Vec<Event>,
    journal: Vec<Undo>,
    /// The attribute keys the journal names.
    keys: Vec<String>,
    /// Events in the batch when the call began; the rest are copies.
    original_len: usize,
    max_events: usize,
    bytes_left: usize,
    bytes_limit: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new(Vec::new(), 0)
    }
}

impl Batch {
    /// `byte_budget` bounds what a stage may add to host memory in one call.
    pub fn new(events: Vec<Event>, byte_budget: usize) -> Batch {
        let original_len = events.len();
        Batch {
            events,
            // Room for a couple of changes per event without regrowing.
            journal: Vec::with_capacity(original_len * 2),
            keys: Vec::new(),
            original_len,
            // Splits beyond this are a runaway plug-in, not a real fan-out.
            max_events: original_len.saturating_mul(64).max(1024),
            bytes_left: byte_budget,
            bytes_limit: byte_budget,
        }
    }

    pub fn original_len(&self) -> usize {
        self.original_len
    }

    pub fn get(&self, index: u32) -> Result<&Event, BatchError> {
        self.events.get(index as usize).ok_or(BatchError::OutOfRange { index, len: self.events.len() })
    }

    fn get_mut(&mut self, index: u32) -> Result<&mut Event, BatchError> {
        let len = self.events.len();
        self.events.get_mut(index as usize).ok_or(BatchError::OutOfRange { index, len })
    }

    /// Charges a change: what it stores, plus its journal entry.
    fn charge(&mut self, bytes: usize) -> Result<(), BatchError> {
        let bytes = bytes + std::mem::size_of::<Undo>();
        self.bytes_left =
            self.bytes_left.checked_sub(bytes).ok_or(BatchError::TooManyBytes { limit: self.bytes_limit })?;
        Ok(())
    }

    pub fn set_name(&mut self, index: u32, name: String) -> Result<(), BatchError> {
        self.charge(name.len())?;
        let old = std::mem::replace(&mut self.get_mut(index)?.name, name);
        self.journal.push(Undo::Name(index, old));
        Ok(())
    }

    pub fn set_targets(&mut self, index: u32, targets: Vec<String>) -> Result<(), BatchError> {
        self.charge(targets.iter().map(|t| t.len() + 24).sum())?;
        let old = std::mem::replace(&mut self.get_mut(index)?.targets, targets);
        self.journal.push(Undo::Targets(index, old));
        Ok(())
    }

    /// Stores an attribute key for the writes that follow (charged too).
    pub fn key(&mut self, key: String) -> Result<KeyId, BatchError> {
        self.charge(key.len())?;
        self.keys.push(key);
        Ok(KeyId(self.keys.len() as u32 - 1))
    }

    pub fn set_attribute(&mut self, index: u32, key: KeyId, value: String) -> Result<(), BatchError> {
        let name = self.keys[key.0 as usize].as_str();
        let cost = name.len() + value.len();
        self.charge(cost)?;
        let name = self.keys[key.0 as usize].as_str();
        let event = event_mut(&mut self.events, index)?;
        let old = match event.attributes.get_mut(name) {
            Some(slot) => Some(std::mem::replace(slot, value)),
            None => event.attributes.insert(name.to_string(), value),
        };
        self.journal.push(Undo::Attribute(index, key, old));
        Ok(())
    }

    pub fn remove_attribute(&mut self, index: u32, key: KeyId) -> Result<bool, BatchError> {
        self.charge(0)?;
        let name = self.keys[key.0 as usize].as_str();
        let old = event_mut(&mut self.events, index)?.attributes.remove(name);
        let existed = old.is_some();
        if existed {
            self.journal.push(Undo::Attribute(index, key, old));
        }
        Ok(existed)
    }

    /// Moves attribute `key` to `new_key` when the event has `key`.
    pub fn rename_attribute(&mut self, index: u32, key: KeyId, new_key: KeyId) -> Result<(), BatchError> {
        let cost = self.keys[new_key.0 as usize].len();
        self.charge(cost)?;
        let (name, new_name) = (self.keys[key.0 as usize].as_str(), self.keys[new_key.0 as usize].as_str());
        let event = event_mut(&mut self.events, index)?;
        let Some(value) = event.attributes.remove(name) else { return Ok(()) };
        let replaced = event.attributes.insert(new_name.to_string(), value);
        self.journal.push(Undo::Renamed(index, key, new_key, replaced));
        Ok(())
    }

    /// Attribute `key` of every event: its distinct values, and per event 0
    /// (absent) or 1 + the index of its value.
    pub fn attribute_codes(&self, key: &str) -> (Vec<String>, Vec<u32>) {
        let (distinct, codes) = dictionary_codes(self.events.iter().map(|event| event.attributes.get(key)));
        (distinct.into_iter().cloned().collect(), codes)
    }

    pub fn set_related(&mut self, index: u32, kind: String, name: Option<String>) -> Result<(), BatchError> {
        self.charge(kind.len() + name.as_ref().map_or(0, String::len))?;
        let event = self.get_mut(index)?;
        let old = event.related.clone();
        event.set_related(&kind, name);
        self.journal.push(Undo::Related(index, old));
        Ok(())
    }

    pub fn add_related(&mut self, index: u32, kind: String, name: String) -> Result<(), BatchError> {
        self.charge(kind.len() + name.len())?;
        let event = self.get_mut(index)?;
        let old = event.related.clone();
        event.related.push((kind, name));
        self.journal.push(Undo::Related(index, old));
        Ok(())
    }

    pub fn set_document(&mut self, index: u32, document: Option<String>) -> Result<(), BatchError> {
        self.charge(document.as_ref().map_or(0, String::len))?;
        let old = std::mem::replace(&mut self.get_mut(index)?.document, document);
        self.journal.push(Undo::Document(index, old));
        Ok(())
    }

    pub fn duplicate(&mut self, index: u32) -> Result<u32, BatchError> {
        if self.events.len() >= self.max_events {
            return Err(BatchError::TooManyEvents { limit: self.max_events });
        }
        let copy = self.get(index)?.clone();
        self.charge(approximate_size(&copy))?;
        self.events.push(copy);
        Ok((self.events.len() - 1) as u32)
    }

    /// Accepts the stage's changes except those to the events at `failed`,
    /// which are handed back as they came in.
    pub fn commit_except(mut self, failed: &[u32]) -> Vec<Event> {
        if !failed.is_empty() {
            let journal = std::mem::take(&mut self.journal);
            self.undo(journal.into_iter().filter(|u| failed.contains(&u.index())).collect());
        }
        self.events
    }

    /// Undoes every change of the call and hands back the events as they came in.
    pub fn roll_back(mut self) -> Vec<Event> {
        let journal = std::mem::take(&mut self.journal);
        self.undo(journal);
        self.events.truncate(self.original_len);
        self.events
    }

    fn undo(&mut self, mut journal: Vec<Undo>) {
        while let Some(undo) = journal.pop() {
            let event = &mut self.events[undo.index() as usize];
            let key = |id: KeyId| self.keys[id.0 as usize].as_str();
            match undo {
                Undo::Name(_, old) => event.name = old,
                Undo::Targets(_, old) => event.targets = old,
                Undo::Attribute(_, name, Some(old)) => {
                    event.attributes.insert(key(name).to_string(), old);
                }
                Undo::Attribute(_, name, None) => {
                    event.attributes.remove(key(name));
                }
                Undo::Renamed(_, name, new_name, replaced) => {
                    let value = match replaced {
                        Some(replaced) => event.attributes.insert(key(new_name).to_string(), replaced),
                        None => event.attributes.remove(key(new_name)),
                    };
                    if let Some(value) = value {
                        event.attributes.insert(key(name).to_string(), value);
                    }
                }
                Undo::Related(_, old) => event.related = old,
                Undo::Document(_, old) => event.document = old,
            }
        }
    }
}

fn event_mut(events: &mut [Event], index: u32) -> Result<&mut Event, BatchError> {
    let len = events.len();
    events.get_mut(index as usize).ok_or(BatchError::OutOfRange { index, len })
}

fn approximate_size(event: &Event) -> usize {
    event.name.len()
        + event.id.len()
        + event.document.as_ref().map_or(0, String::len)
        + event.attributes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + event.related.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + 128
}

/// Dictionary-codes `values`: the distinct values in order of first
/// appearance, and per value its code (1-based index into them; 0 for none).
/// How a plug-in's `attribute-codes` is answered, so that a stage decides
/// once per distinct value (and the native side of the pipeline benchmark
/// does the same).
pub fn dictionary_codes<'a>(values: impl Iterator<Item = Option<&'a String>>) -> (Vec<&'a String>, Vec<u32>) {
    // Few distinct values is the common case (customers, environments):
    // compare against them; index them once there are many.
    const FEW: usize = 8;
    let mut distinct: Vec<&String> = Vec::new();
    let mut index: HashMap<&str, u32> = HashMap::new();
    let codes = values
        .map(|value| {
            let Some(value) = value else { return 0 };
            let known = if distinct.len() <= FEW {
                distinct.iter().position(|v| *v == value).map(|at| at as u32 + 1)
            } else {
                index.get(value.as_str()).copied()
            };
            known.unwrap_or_else(|| {
                distinct.push(value);
                let code = distinct.len() as u32;
                if distinct.len() > FEW {
                    if index.is_empty() {
                        index.extend(distinct.iter().enumerate().map(|(at, v)| (v.as_str(), at as u32 + 1)));
                    } else {
                        index.insert(value, code);
                    }
                }
                code
            })
        })
        .collect();
    (distinct, codes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Operation};

    fn event(name: &str) -> Event {
        let mut e = Event::new(Entity::Thing, Operation::Created, name);
        e.attributes.insert("env".into(), "prod".into());
        e.targets = vec!["eu-west-1".into()];
        e
    }

    #[test]
    fn roll_back_restores_every_field_and_drops_copies() {
        let before = vec![event("a"), event("b")];
        let mut batch = Batch::new(before.clone(), 1 << 20);
        batch.set_name(0, "renamed".into()).unwrap();
        {
            let k = batch.key("env".into()).unwrap();
            batch.set_attribute(0, k, "test".into())
        }
        .unwrap();
        {
            let k = batch.key("new".into()).unwrap();
            batch.set_attribute(1, k, "x".into())
        }
        .unwrap();
        {
            let k = batch.key("env".into()).unwrap();
            batch.remove_attribute(1, k)
        }
        .unwrap();
        batch.set_targets(1, vec![]).unwrap();
        batch.set_related(0, "thing-type".into(), Some("t".into())).unwrap();
        batch.set_document(0, Some("{}".into())).unwrap();
        batch.duplicate(0).unwrap();
        assert_eq!(batch.roll_back(), before);
    }

    #[test]
    fn commit_except_undoes_only_failed_events() {
        let mut batch = Batch::new(vec![event("a"), event("b")], 1 << 20);
        {
            let k = batch.key("env".into()).unwrap();
            batch.set_attribute(0, k, "test".into())
        }
        .unwrap();
        {
            let k = batch.key("env".into()).unwrap();
            batch.set_attribute(1, k, "test".into())
        }
        .unwrap();
        let events = batch.commit_except(&[1]);
        assert_eq!(events[0].attributes["env"], "test");
        assert_eq!(events[1].attributes["env"], "prod");
    }

    #[test]
    fn a_write_to_many_events_rolls_back_per_event_even_with_repeats() {
        let before = vec![event("a"), event("b")];
        let mut batch = Batch::new(before.clone(), 1 << 20);
        let key = batch.key("env".into()).unwrap();
        for index in [0, 0, 1] {
            batch.set_attribute(index, key, format!("v{index}")).unwrap();
        }
        let gone = batch.key("missing".into()).unwrap();
        batch.remove_attribute(1, gone).unwrap();
        let events = batch.commit_except(&[0]);
        assert_eq!(events[0], before[0], "the failed event is as it came, repeats included");
        assert_eq!(events[1].attributes["env"], "v1");
    }

    #[test]
    fn commit_keeps_changes() {
        let mut batch = Batch::new(vec![event("a")], 1 << 20);
        {
            let k = batch.key("env".into()).unwrap();
            batch.set_attribute(0, k, "test".into())
        }
        .unwrap();
        let copy = batch.duplicate(0).unwrap();
        batch.set_name(copy, "b".into()).unwrap();
        let events = batch.commit_except(&[]);
        assert_eq!(events[0].attributes["env"], "test");
        assert_eq!(events[1].name, "b");
    }

    #[test]
    fn rename_and_codes() {
        let mut a = event("a");
        a.attributes.insert("fw".into(), "1.0".into());
        a.attributes.insert("firmware".into(), "0.9".into());
        let before = vec![a, event("b"), event("c")];
        let mut batch = Batch::new(before.clone(), 1 << 20);
        batch.events[2].attributes.insert("env".into(), "test".into());
        assert_eq!(batch.attribute_codes("env"), (vec!["prod".to_string(), "test".to_string()], vec![1, 1, 2]));
        assert_eq!(batch.attribute_codes("none"), (vec![], vec![0, 0, 0]));
        batch.events[2].attributes.insert("env".into(), "prod".into());
        {
            let (k, n) = (batch.key("fw".into()).unwrap(), batch.key("firmware".into()).unwrap());
            batch.rename_attribute(0, k, n)
        }
        .unwrap();
        {
            let (k, n) = (batch.key("fw".into()).unwrap(), batch.key("firmware".into()).unwrap());
            batch.rename_attribute(1, k, n)
        }
        .unwrap();
        assert_eq!(batch.events[0].attributes.get("firmware").map(String::as_str), Some("1.0"));
        assert!(!batch.events[0].attributes.contains_key("fw"));
        assert!(!batch.events[1].attributes.contains_key("firmware"));
        assert_eq!(batch.roll_back(), before);
    }

    #[test]
    fn codes_stay_right_past_a_few_distinct_values() {
        let events: Vec<Event> = (0..40)
            .map(|i| {
                let mut e = event(&format!("t{i}"));
                e.attributes.insert("serial".into(), format!("s{}", i % 13));
                if i % 7 == 0 {
                    e.attributes.remove("serial");
                }
                e
            })
            .collect();
        let batch = Batch::new(events.clone(), 1 << 20);
        let (values, codes) = batch.attribute_codes("serial");
        for (event, code) in events.iter().zip(codes) {
            let value = (code > 0).then(|| values[code as usize - 1].clone());
            assert_eq!(value.as_ref(), event.attributes.get("serial"));
        }
        let mut sorted = values.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), values.len(), "each value once");
    }

    #[test]
    fn out_of_range_and_budgets_are_errors() {
        let mut batch = Batch::new(vec![event("a")], 10);
        assert!(matches!(batch.get(3), Err(BatchError::OutOfRange { index: 3, len: 1 })));
        assert!(matches!(batch.set_name(0, "x".repeat(11)), Err(BatchError::TooManyBytes { .. })));
        let mut batch = Batch::new(vec![event("a")], usize::MAX);
        for _ in 0..1023 {
            batch.duplicate(0).unwrap();
        }
        assert!(matches!(batch.duplicate(0), Err(BatchError::TooManyEvents { limit: 1024 })));
    }
}
