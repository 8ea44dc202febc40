//! A pipeline file's own `[[tests]]`: records in, what must come out of the
//! whole pipeline (or of a named stage), checked with the real plug-ins.
//! `iotdr test` prints each result; `iotdr validate` refuses a pipeline
//! whose tests fail. Each test gets its own instances of the stages, so no
//! plug-in state leaks from one test into the next.

use crate::config::{self, EventExpect, Outcome, PipelineTest};
use crate::event::{Event, decode_line};
use crate::pipeline::{BuildError, Pipeline};
use crate::plugin::PluginEngine;
use serde_json::Value;

/// One test's result: what did not hold (empty when it passed).
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    pub name: String,
    pub place: String,
    pub failures: Vec<String>,
}

impl TestResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs every test of `config`.
pub fn run_all(config: &config::Pipeline, engine: &PluginEngine) -> Result<Vec<TestResult>, BuildError> {
    config.tests.iter().map(|test| run_one(config, engine, test)).collect()
}

fn run_one(config: &config::Pipeline, engine: &PluginEngine, test: &PipelineTest) -> Result<TestResult, BuildError> {
    let mut result = TestResult { name: test.name.clone(), place: test.place.clone(), failures: Vec::new() };
    let events = match inputs(test, &config.source_region) {
        Ok(events) => events,
        Err(problem) => {
            result.failures.push(problem);
            return Ok(result);
        }
    };
    let inputs = events.len();
    let mut pipeline = Pipeline::build(config, engine)?;
    let end = match &test.after {
        // The config checked the name.
        Some(stage) => pipeline.stage_index(stage).map_or(usize::MAX, |index| index + 1),
        None => usize::MAX,
    };
    let (out, dropped, failed) = match pipeline.process_stages(0..end, events) {
        Ok(processed) => {
            let failed: Vec<String> = processed.dead_letters.iter().map(|letter| letter.reason.clone()).collect();
            (processed.events, processed.dropped.len(), failed)
        }
        Err(halted) => (Vec::new(), 0, vec![halted.to_string()]),
    };
    let expect = &test.expect;
    match expect.outcome {
        Outcome::Kept => {
            if !failed.is_empty() {
                result.failures.push(format!("expected kept, but a stage failed: {}", failed.join("; ")));
            } else if out.is_empty() {
                result.failures.push(format!("expected kept, but all {inputs} input(s) were dropped"));
            }
        }
        Outcome::Dropped => {
            if !failed.is_empty() {
                result.failures.push(format!("expected dropped, but a stage failed: {}", failed.join("; ")));
            } else if !out.is_empty() || dropped == 0 {
                result.failures.push(format!("expected dropped, but {} event(s) came out", out.len()));
            }
        }
        Outcome::Failed => {
            if failed.is_empty() {
                result.failures.push(format!("expected a stage to fail, but {} event(s) came out", out.len()));
            }
        }
    }
    let count = expect.count.or((!expect.each.is_empty()).then_some(expect.each.len()));
    if let Some(count) = count
        && out.len() != count
    {
        result.failures.push(format!("count: expected {count} event(s), got {}", out.len()));
    }
    for (index, event) in out.iter().enumerate() {
        let label = if out.len() > 1 { format!("event {} ", index + 1) } else { String::new() };
        let mut failures = check_event(&expect.every, event);
        if let Some(own) = expect.each.get(index) {
            failures.extend(check_event(own, event));
        }
        result.failures.extend(failures.into_iter().map(|f| format!("{label}{f}")));
    }
    Ok(result)
}

/// The test's records, decoded; a record that does not decode fails the test.
fn inputs(test: &PipelineTest, source_region: &str) -> Result<Vec<Event>, String> {
    let mut records: Vec<(String, String)> =
        test.input.iter().enumerate().map(|(i, text)| (format!("input {}", i + 1), text.clone())).collect();
    if let Some(path) = &test.input_file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
                records.push((format!("{}:{}", path.display(), number + 1), line.to_string()));
            }
        }
    }
    records
        .into_iter()
        .map(|(origin, text)| decode_line(&text, source_region).map_err(|e| format!("{origin} does not decode: {e}")))
        .collect()
}

/// What `event` does not have of what `expect` asks, one line each.
fn check_event(expect: &EventExpect, event: &Event) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some(targets) = &expect.targets {
        let mut wanted = targets.clone();
        wanted.sort();
        let mut got = event.targets.clone();
        got.sort();
        if wanted != got {
            failures.push(format!("targets: expected {wanted:?}, got {got:?}"));
        }
    }
    if let Some(name) = &expect.event_name
        && &event.name != name
    {
        failures.push(format!("name: expected {name:?}, got {:?}", event.name));
    }
    for (key, value) in &expect.attributes {
        match event.attributes.get(key) {
            Some(got) if got == value => {}
            Some(got) => failures.push(format!("attributes.{key}: expected {value:?}, got {got:?}")),
            None => failures.push(format!("attributes.{key}: expected {value:?}, but it is absent")),
        }
    }
    for key in &expect.absent_attributes {
        if let Some(got) = event.attributes.get(key) {
            failures.push(format!("attributes.{key}: expected absent, got {got:?}"));
        }
    }
    if let Some(document) = &expect.document {
        let got: Option<Value> = event.document.as_deref().map(|d| serde_json::from_str(d).unwrap_or(d.into()));
        if got.as_ref() != Some(document) {
            let got = got.map_or_else(|| "none".to_string(), |g| g.to_string());
            failures.push(format!("document:\n    expected {document}\n    got      {got}"));
        }
    }
    for (key, value) in &expect.related {
        let all: Vec<&str> = event.related.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect();
        if !all.contains(&value.as_str()) {
            failures.push(format!("related {key}: expected {value:?}, got {all:?}"));
        }
    }
    failures
}

/// The results as an operator reads them: a line per test, what failed under it.
pub fn render(results: &[TestResult]) -> String {
    let mut out = String::new();
    for result in results {
        if result.passed() {
            out.push_str(&format!("ok    {}\n", result.name));
        } else {
            out.push_str(&format!("FAIL  {} (at {})\n", result.name, result.place));
            for failure in &result.failures {
                out.push_str(&format!("      {}\n", failure.replace('\n', "\n      ")));
            }
        }
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    out.push_str(&format!("{} passed, {failed} failed\n", results.len() - failed));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Operation};

    #[test]
    fn each_expectation_names_what_differs() {
        let mut event = Event::new(Entity::Thing, Operation::Created, "pump-1");
        event.targets = vec!["eu-west-1".into()];
        event.attributes.insert("site".into(), "lyon".into());
        event.attributes.insert("serial".into(), "S1".into());
        let expect = EventExpect {
            targets: Some(vec!["eu-central-1".into()]),
            event_name: Some("pump-1".into()),
            attributes: [("site".to_string(), "berlin".to_string())].into(),
            absent_attributes: vec!["serial".into()],
            ..EventExpect::default()
        };
        let failures = check_event(&expect, &event);
        assert_eq!(
            failures,
            [
                r#"targets: expected ["eu-central-1"], got ["eu-west-1"]"#,
                r#"attributes.site: expected "berlin", got "lyon""#,
                r#"attributes.serial: expected absent, got "S1""#,
            ]
        );
        let passing = EventExpect { targets: Some(vec!["eu-west-1".into()]), ..EventExpect::default() };
        assert!(check_event(&passing, &event).is_empty());
    }
}
