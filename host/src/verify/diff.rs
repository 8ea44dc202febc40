//! The comparison of what a target should hold (the source through the
//! pipeline) with what it holds, per kind: equal, missing, different, extra,
//! each difference named by its first differing field.

use super::image::{Image, KINDS};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Differences listed per kind in the table (all of them are in the JSON).
const LISTED: usize = 10;

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct KindReport {
    pub equal: usize,
    /// In the source (after the pipeline), not in the target.
    pub missing: Vec<String>,
    /// In both, not equal: the name and its first difference.
    pub different: Vec<Difference>,
    /// In the target, not in the source (after the pipeline).
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub name: String,
    /// The first differing field (`attributes.site`), empty for the whole entry.
    pub field: String,
    pub source: Value,
    pub target: Value,
}

impl KindReport {
    pub fn drift(&self) -> usize {
        self.missing.len() + self.different.len() + self.extra.len()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionReport {
    pub region: String,
    pub kinds: BTreeMap<&'static str, KindReport>,
}

impl RegionReport {
    pub fn drift(&self) -> usize {
        self.kinds.values().map(KindReport::drift).sum()
    }
}

/// Compares `expected` (the source through the pipeline, for `region`) with `actual`.
pub fn compare(region: &str, expected: &Image, actual: &Image) -> RegionReport {
    let mut kinds = BTreeMap::new();
    for kind in KINDS {
        let mut report = KindReport::default();
        for (name, want) in expected.of(kind) {
            match actual.get(kind, name) {
                None => report.missing.push(name.clone()),
                Some(have) if have == want => report.equal += 1,
                Some(have) => {
                    let (field, source, target) = first_difference(want, have, String::new());
                    report.different.push(Difference { name: name.clone(), field, source, target });
                }
            }
        }
        report.extra =
            actual.of(kind).filter(|(name, _)| expected.get(kind, name).is_none()).map(|(n, _)| n.clone()).collect();
        kinds.insert(kind, report);
    }
    RegionReport { region: region.to_string(), kinds }
}

/// The first field where `a` and `b` differ, with both values there.
fn first_difference(a: &Value, b: &Value, path: String) -> (String, Value, Value) {
    if let (Value::Object(a), Value::Object(b)) = (a, b) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let (x, y) = (a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null));
            if x != y {
                let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                return first_difference(x, y, path);
            }
        }
    }
    (path, a.clone(), b.clone())
}

/// The human table: one per region, then the first differences of each kind.
pub fn render(reports: &[RegionReport]) -> String {
    let mut out = String::new();
    for report in reports {
        let _ =
            writeln!(out, "{:<16} {:>7} {:>8} {:>10} {:>6}", report.region, "equal", "missing", "different", "extra");
        let kinds = || KINDS.iter().filter_map(|kind| report.kinds.get(kind).map(|counts| (kind, counts)));
        for (kind, counts) in kinds() {
            let _ = writeln!(
                out,
                "{:<16} {:>7} {:>8} {:>10} {:>6}",
                kind,
                counts.equal,
                counts.missing.len(),
                counts.different.len(),
                counts.extra.len()
            );
        }
        for (kind, counts) in kinds() {
            let lines = counts
                .missing
                .iter()
                .map(|name| format!("missing    {kind} {name}"))
                .chain(counts.different.iter().map(|d| {
                    let field = if d.field.is_empty() { String::new() } else { format!(" {}", d.field) };
                    format!("different  {kind} {}{field}: source {}, target {}", d.name, d.source, d.target)
                }))
                .chain(counts.extra.iter().map(|name| format!("extra      {kind} {name}")));
            let lines: Vec<String> = lines.collect();
            for line in lines.iter().take(LISTED) {
                let _ = writeln!(out, "  {line}");
            }
            if lines.len() > LISTED {
                let _ = writeln!(out, "  ... and {} more {kind} (see --json)", lines.len() - LISTED);
            }
        }
        let verdict = match report.drift() {
            0 => format!("{}: equal to the source", report.region),
            n => format!("{}: {n} entities drifted", report.region),
        };
        let _ = writeln!(out, "{verdict}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Event, Operation};

    fn thing(name: &str, site: &str) -> Event {
        let mut event = Event::new(Entity::Thing, Operation::Created, name);
        event.attributes.insert("site".into(), site.into());
        event
    }

    #[test]
    fn each_entity_is_equal_missing_different_or_extra() {
        let (mut source, mut target) = (Image::default(), Image::default());
        for (name, site) in [("a", "lyon"), ("b", "lyon"), ("c", "oslo")] {
            source.fold(&thing(name, site));
        }
        for (name, site) in [("a", "lyon"), ("c", "rome"), ("d", "oslo")] {
            target.fold(&thing(name, site));
        }
        let report = compare("eu-west-1", &source, &target);
        let things = &report.kinds["things"];
        assert_eq!(things.equal, 1);
        assert_eq!(things.missing, ["b"]);
        assert_eq!(things.extra, ["d"]);
        assert_eq!(things.different.len(), 1);
        assert_eq!(things.different[0].field, "attributes.site");
        assert_eq!((&things.different[0].source, &things.different[0].target), (&"oslo".into(), &"rome".into()));
        assert_eq!(report.drift(), 3);
        let table = render(&[report]);
        assert!(table.contains("different  things c attributes.site: source \"oslo\", target \"rome\""), "{table}");
        assert!(table.contains("eu-west-1: 3 entities drifted"), "{table}");
    }
}
