//! Throughput of a 4-stage pipeline of the bundled plug-ins (filter, transform,
//! router, policy mapper) against the same four stages written as native Rust,
//! over the same generated events, in the same process (so with the same
//! global allocator, mimalloc).
//!
//! A fair race: the native stages are built as the plug-ins are (the `bench`
//! profile has the `plugin` profile's LTO, one codegen unit and opt-level 3)
//! and run the same algorithms: the filter and the router decide once per
//! distinct attribute value of a batch, coded by the host's own
//! `dictionary_codes`, and the policy mapper is the plug-in's own code.
//!
//! ```sh
//! bash scripts/build-plugins.sh && cargo bench -p iotdr --bench pipeline
//! ```
//!
//! Targets (a report, not a test: a miss does not fail the run): the Wasm
//! pipeline runs at >= 0.5x the native one and >= 250,000 events/s on one core.

use iotdr::config::Pipeline as PipelineConfig;
use iotdr::event::{Entity, Event, Operation, related};
use iotdr::pipeline::{Dropped, Pipeline, Processed};
use iotdr::plugin::{PluginEngine, dictionary_codes};
use policy_mapper::{PolicyDocument, map_arn, map_name};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events per round; both sides process exactly these.
const EVENTS: usize = 60_000;
/// Measured rounds per side, after one warm-up round each.
const ROUNDS: usize = 7;
/// Rounds per side for each stage alone.
const STAGE_ROUNDS: usize = 3;

const TARGET_EVENTS_PER_SECOND: f64 = 250_000.0;
const TARGET_RATIO: f64 = 0.5;

const SOURCE_REGION: &str = "us-east-1";
const SOURCE_ACCOUNT: &str = "111122223333";

/// The pipeline both sides run. The Wasm side loads it as a pipeline file
/// would be; the native side reads the same parsed stage configs.
const PIPELINE: &str = r#"
[pipeline]
name = "bench"
source_region = "us-east-1"
targets = ["eu-west-1", "eu-central-1"]
batch_size = 512

[source]
kind = "scan"

[[stage]]
name = "skip-test-devices"
plugin = "../plugins/dist/attribute-filter.wasm"
config = { attribute = "env", drop_values = ["test"] }
limits = { memory_mb = 64, timeout_ms = 5000 }
on_error = "dead-letter"

[[stage]]
name = "tidy-attributes"
plugin = "../plugins/dist/attribute-transform.wasm"
config = { rename = { fw = "firmware" }, set = { "replicated-from" = "us-east-1" } }
limits = { memory_mb = 64, timeout_ms = 5000 }
on_error = "dead-letter"

[[stage]]
name = "per-customer-route"
plugin = "../plugins/dist/region-router.wasm"
config = { by_attribute = "customer", routes = { acme = ["eu-west-1", "eu-central-1"], globex = ["eu-west-1"], initech = ["eu-central-1"] }, default = ["eu-west-1", "eu-central-1"] }
limits = { memory_mb = 64, timeout_ms = 5000 }
on_error = "dead-letter"

[[stage]]
name = "policies-for-target"
plugin = "../plugins/dist/policy-mapper.wasm"
config = { account_map = { "111122223333" = "444455556666" }, name_template = "{name}" }
limits = { memory_mb = 64, timeout_ms = 5000 }
on_error = "dead-letter"
"#;

const PLUGINS: [&str; 4] = ["attribute-filter", "attribute-transform", "region-router", "policy-mapper"];

fn main() {
    let workspace =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is inside the workspace").to_path_buf();
    let missing: Vec<PathBuf> = PLUGINS
        .iter()
        .map(|p| workspace.join("plugins/dist").join(format!("{p}.wasm")))
        .filter(|p| !p.is_file())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "error: plug-in(s) not built: {}",
            missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
        eprintln!("run `bash scripts/build-plugins.sh` from {} first", workspace.display());
        std::process::exit(2);
    }

    let mut config = PipelineConfig::parse(&workspace.join("pipelines/bench.toml"), PIPELINE, &|_| None)
        .unwrap_or_else(|e| fail(&format!("bench pipeline: {e}")));
    // `IOTDR_BENCH_STAGE=<stage name>` keeps that stage alone (with IOTDR_BENCH_ONLY, for profiling it).
    if let Ok(name) = std::env::var("IOTDR_BENCH_STAGE") {
        config.stages.retain(|stage| stage.name == name);
        if config.stages.is_empty() {
            fail(&format!("IOTDR_BENCH_STAGE={name}: no such stage"));
        }
    }
    let cache =
        option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from).join("iotdr-bench-plugins");
    let engine = PluginEngine::new(Some(cache)).unwrap_or_else(|e| fail(&format!("engine: {e}")));
    let started = Instant::now();
    let mut wasm = Pipeline::build(&config, &engine).unwrap_or_else(|e| fail(&format!("building the pipeline: {e}")));
    let load_time = started.elapsed();
    let mut native = NativePipeline::new(&config);

    let events = generate(EVENTS);
    let batch_size = config.batch_size;
    let batches = || -> Vec<Vec<Event>> { events.chunks(batch_size).map(<[Event]>::to_vec).collect() };

    // `IOTDR_BENCH_ONLY=wasm` (or `native`) runs one side for a while and
    // reports nothing else: for profilers (`perf record ... target/release/deps/pipeline-*`).
    // Batches are made before the rounds, so the profile shows the pipeline, not their copying.
    if let Ok(side) = std::env::var("IOTDR_BENCH_ONLY") {
        let prepared: Vec<Vec<Vec<Event>>> = (0..ROUNDS * 3).map(|_| batches()).collect();
        for (round, batches) in prepared.into_iter().enumerate() {
            let elapsed = match side.as_str() {
                "wasm" => run_wasm(&mut wasm, batches).0,
                "native" => run_native(&mut native, batches).0,
                other => fail(&format!("IOTDR_BENCH_ONLY={other}: expected wasm or native")),
            };
            println!("{side} round {round}: {} events/s", thousands(EVENTS as f64 / elapsed.as_secs_f64()));
        }
        return;
    }

    // Warm-up, and the honesty check: both sides must produce the same events
    // and drops, in the same order.
    let wasm_out = run_wasm(&mut wasm, batches()).1;
    let native_out = run_native(&mut native, batches()).1;
    let summary = compare(&wasm_out, &native_out);
    drop((wasm_out, native_out));

    let (mut wasm_rates, mut native_rates) = side_by_side(&mut wasm, &mut native, &batches, ROUNDS);

    let wasm_median = median(&mut wasm_rates);
    let native_median = median(&mut native_rates);
    let ratio = wasm_median / native_median;
    println!();
    println!(
        "iotdr pipeline benchmark: {EVENTS} generated events, batches of {batch_size}, {ROUNDS} rounds per side (median; best in brackets)"
    );
    println!(
        "  identical output on both sides: {} events out ({} of them policies, split per region), {} dropped, {} dead letters",
        summary.out, summary.policies_out, summary.dropped, summary.dead_letters
    );
    println!("  plug-ins loaded and started in {:.0} ms", load_time.as_secs_f64() * 1e3);
    println!();
    println!("wasm pipeline (4 stages): {:>12} events/s  [{}]", thousands(wasm_median), thousands(best(&wasm_rates)));
    println!(
        "native (4 stages):        {:>12} events/s  [{}]",
        thousands(native_median),
        thousands(best(&native_rates))
    );
    println!("ratio wasm/native:        {ratio:>12.2}");
    println!();
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!(
        "{} wasm >= {} events/s (got {})",
        verdict(wasm_median >= TARGET_EVENTS_PER_SECOND),
        thousands(TARGET_EVENTS_PER_SECOND),
        thousands(wasm_median)
    );
    println!("{} wasm/native >= {TARGET_RATIO:.2} (got {ratio:.2})", verdict(ratio >= TARGET_RATIO));

    // Where the time goes: each stage alone, over the same events.
    println!();
    println!("each stage alone (ns per generated event, median of {STAGE_ROUNDS} rounds):");
    for stage in &config.stages {
        let mut alone = config.clone();
        alone.stages = vec![stage.clone()];
        let mut wasm =
            Pipeline::build(&alone, &engine).unwrap_or_else(|e| fail(&format!("building {}: {e}", stage.name)));
        let mut native = NativePipeline::new(&alone);
        compare(&run_wasm(&mut wasm, batches()).1, &run_native(&mut native, batches()).1);
        let (mut w, mut n) = side_by_side(&mut wasm, &mut native, &batches, STAGE_ROUNDS);
        let (w, n) = (median(&mut w), median(&mut n));
        println!("  {:<22} wasm {:>6.0} ns   native {:>6.0} ns   ratio {:.2}", stage.name, 1e9 / w, 1e9 / n, w / n);
    }
}

/// Events per second of each side, `rounds` times, alternating the sides so
/// drift on a shared machine hits both alike.
fn side_by_side(
    wasm: &mut Pipeline,
    native: &mut NativePipeline,
    batches: &dyn Fn() -> Vec<Vec<Event>>,
    rounds: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut wasm_rates = Vec::new();
    let mut native_rates = Vec::new();
    for _ in 0..rounds {
        let (elapsed, out) = run_wasm(wasm, batches());
        drop(out);
        wasm_rates.push(EVENTS as f64 / elapsed.as_secs_f64());
        let (elapsed, out) = run_native(native, batches());
        drop(out);
        native_rates.push(EVENTS as f64 / elapsed.as_secs_f64());
    }
    (wasm_rates, native_rates)
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn best(rates: &[f64]) -> f64 {
    rates.iter().copied().fold(0.0, f64::max)
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---- the two sides ---------------------------------------------------------

/// What one side made of all the batches, in order.
#[derive(Default)]
struct Output {
    events: Vec<Event>,
    dropped: Vec<Dropped>,
    dead_letters: usize,
}

fn run_wasm(pipeline: &mut Pipeline, batches: Vec<Vec<Event>>) -> (Duration, Vec<Processed>) {
    let mut results = Vec::with_capacity(batches.len());
    let started = Instant::now();
    for batch in batches {
        results.push(pipeline.process(batch).unwrap_or_else(|halted| fail(&format!("wasm pipeline halted: {halted}"))));
    }
    (started.elapsed(), results)
}

fn run_native(pipeline: &mut NativePipeline, batches: Vec<Vec<Event>>) -> (Duration, Vec<Output>) {
    let mut results = Vec::with_capacity(batches.len());
    let started = Instant::now();
    for batch in batches {
        results.push(pipeline.process(batch));
    }
    (started.elapsed(), results)
}

struct Summary {
    out: usize,
    dropped: usize,
    dead_letters: usize,
    policies_out: usize,
}

fn compare(wasm: &[Processed], native: &[Output]) -> Summary {
    let mut summary = Summary { out: 0, dropped: 0, dead_letters: 0, policies_out: 0 };
    assert_eq!(wasm.len(), native.len());
    for (batch, (w, n)) in wasm.iter().zip(native).enumerate() {
        if w.dead_letters.len() != n.dead_letters || w.skipped != 0 {
            fail(&format!("batch {batch}: unexpected failures: {:?} (native: {})", w.dead_letters, n.dead_letters));
        }
        if w.events != n.events {
            match w.events.iter().zip(&n.events).position(|(a, b)| a != b) {
                Some(i) => fail(&format!(
                    "batch {batch}: wasm and native differ at event {i}:\n  wasm:   {:?}\n  native: {:?}",
                    w.events[i], n.events[i]
                )),
                None => fail(&format!("batch {batch}: wasm made {} events, native {}", w.events.len(), n.events.len())),
            }
        }
        if w.dropped != n.dropped {
            fail(&format!(
                "batch {batch}: dropped events differ:\n  wasm:   {:?}\n  native: {:?}",
                w.dropped, n.dropped
            ));
        }
        summary.out += w.events.len();
        summary.dropped += w.dropped.len();
        summary.dead_letters += n.dead_letters;
        summary.policies_out += w.events.iter().filter(|e| e.entity == Entity::Policy).count();
    }
    summary
}

// ---- the native stages -----------------------------------------------------
//
// The same four stages as the plug-ins, as plain Rust over host events, built
// from the very `config` tables the plug-ins receive; the policy mapper's
// document rewriting is the plug-in's own code (`policy_mapper::PolicyDocument`),
// compiled natively. Each implements the
// plug-in's semantics for the options it accepts; options the bench does not
// use are refused (deny_unknown_fields) rather than silently ignored.

struct NativePipeline {
    targets: Vec<String>,
    stages: Vec<(String, NativeStage)>,
}

enum NativeStage {
    Filter(FilterConfig),
    Transform(TransformConfig),
    Router(RouterConfig),
    PolicyMapper(PolicyConfig),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterConfig {
    attribute: String,
    #[serde(default)]
    keep_values: Vec<String>,
    #[serde(default)]
    drop_values: Vec<String>,
    #[serde(default)]
    missing: Missing,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Missing {
    #[default]
    Keep,
    Drop,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransformConfig {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default = "default_transform_entities")]
    entities: Vec<String>,
}

fn default_transform_entities() -> Vec<String> {
    vec!["thing".into(), "thing-group".into()]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterConfig {
    by_attribute: String,
    routes: BTreeMap<String, Vec<String>>,
    default: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyConfig {
    #[serde(default)]
    account_map: BTreeMap<String, String>,
    #[serde(default = "keep_name")]
    name_template: String,
}

fn keep_name() -> String {
    "{name}".into()
}

impl NativePipeline {
    fn new(config: &PipelineConfig) -> NativePipeline {
        let stages = config
            .stages
            .iter()
            .map(|stage| {
                let kind = stage.plugin.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                let json = &stage.config_json;
                let parse_error = |e: serde_json::Error| -> NativeStage { fail(&format!("native {kind}: {e}")) };
                let native = match kind {
                    "attribute-filter" => serde_json::from_str(json).map(NativeStage::Filter),
                    "attribute-transform" => serde_json::from_str(json).map(NativeStage::Transform),
                    "region-router" => serde_json::from_str(json).map(NativeStage::Router),
                    "policy-mapper" => serde_json::from_str::<PolicyConfig>(json).map(|config| {
                        if config.name_template != "{name}" {
                            fail("the native policy mapper leaves certificates alone: keep name_template = \"{name}\"");
                        }
                        NativeStage::PolicyMapper(config)
                    }),
                    other => fail(&format!("no native version of {other}")),
                }
                .unwrap_or_else(parse_error);
                (stage.name.clone(), native)
            })
            .collect();
        NativePipeline { targets: config.targets.clone(), stages }
    }

    fn process(&mut self, mut events: Vec<Event>) -> Output {
        for event in &mut events {
            if event.targets.is_empty() {
                event.targets = self.targets.clone();
            }
        }
        let mut output = Output::default();
        for (name, stage) in &self.stages {
            if events.is_empty() {
                break;
            }
            events = stage.process(name, events, &mut output);
        }
        output.events = events;
        output
    }
}

impl NativeStage {
    /// One batch through the stage. Like the plug-ins, the filter and the
    /// router decide once per distinct attribute value of the batch (coded
    /// by the host's own `dictionary_codes`), then look each event up.
    fn process(&self, stage: &str, events: Vec<Event>, output: &mut Output) -> Vec<Event> {
        let mut next = Vec::with_capacity(events.len());
        let mut reject = |event: Event, reason: String| {
            output.dropped.push(Dropped { stage: stage.to_string(), reason, event });
        };
        match self {
            NativeStage::Filter(config) => {
                let attribute = &config.attribute;
                let (values, codes) = dictionary_codes(events.iter().map(|e| e.attributes.get(attribute)));
                let drops: Vec<Option<String>> = values
                    .iter()
                    .map(|value| {
                        if config.drop_values.contains(value) {
                            Some(format!("{attribute}={value}"))
                        } else if !config.keep_values.is_empty() && !config.keep_values.contains(value) {
                            Some(format!("{attribute}={value} is not kept"))
                        } else {
                            None
                        }
                    })
                    .collect();
                for (event, code) in events.into_iter().zip(codes) {
                    match code.checked_sub(1).map(|at| &drops[at as usize]) {
                        Some(Some(reason)) => reject(event, reason.clone()),
                        None if config.missing == Missing::Drop => reject(event, format!("no attribute {attribute}")),
                        _ => next.push(event),
                    }
                }
            }
            NativeStage::Transform(config) => {
                for mut event in events {
                    if config.entities.iter().any(|e| e == event.entity.as_str()) {
                        for (from, to) in &config.rename {
                            if let Some(value) = event.attributes.remove(from) {
                                event.attributes.insert(to.clone(), value);
                            }
                        }
                        for key in &config.remove {
                            event.attributes.remove(key);
                        }
                        for (key, value) in &config.set {
                            event.attributes.insert(key.clone(), value.clone());
                        }
                    }
                    next.push(event);
                }
            }
            NativeStage::Router(config) => {
                let (values, codes) = dictionary_codes(events.iter().map(|e| e.attributes.get(&config.by_attribute)));
                let routes: Vec<Option<&Vec<String>>> = values.iter().map(|value| config.routes.get(*value)).collect();
                for (mut event, code) in events.into_iter().zip(codes) {
                    let route = code.checked_sub(1).and_then(|at| routes[at as usize]).or(config.default.as_ref());
                    if let Some(regions) = route {
                        event.targets = regions.clone();
                    }
                    next.push(event);
                }
            }
            NativeStage::PolicyMapper(config) => {
                for event in events {
                    config.map(event, &mut next, output);
                }
            }
        }
        next
    }
}

impl PolicyConfig {
    /// The plug-in's work for one event: a policy is split per target
    /// region, its document's ARNs mapped for each.
    fn map(&self, event: Event, next: &mut Vec<Event>, output: &mut Output) {
        // Certificates' policy names stay with `{name}`, the bench's template.
        if event.entity != Entity::Policy || event.targets.is_empty() {
            next.push(event);
            return;
        }
        let text = event.document.clone();
        let document = match text.as_deref().map(PolicyDocument::parse) {
            None => None,
            Some(Ok(document)) => Some(document),
            Some(Err(_)) => {
                // The plug-in fails the event; with `dead-letter` it leaves the pipeline unchanged.
                output.dead_letters += 1;
                return;
            }
        };
        let regions = event.targets.clone();
        // Copies first, while the original still holds the source document.
        let copies: Vec<Event> = regions[1..].iter().map(|_| event.clone()).collect();
        let first_out = next.len();
        next.push(event);
        next.extend(copies);
        for (event, region) in next[first_out..].iter_mut().zip(&regions) {
            self.map_for_region(event, document, region);
        }
    }

    fn map_for_region(&self, event: &mut Event, document: Option<PolicyDocument>, region: &str) {
        event.targets = vec![region.to_string()];
        if let Some(mapped) = map_name(&self.name_template, &event.name, region, &event.source_region) {
            event.name = mapped;
        }
        let source_region = &event.source_region;
        let mapped = document.map(|d| d.rewrite_arns(|arn| map_arn(arn, source_region, region, &self.account_map)));
        if let Some(mapped) = mapped.transpose().expect("generated ARNs decode").flatten() {
            event.document = Some(mapped);
        }
    }
}

// ---- the generated fleet ---------------------------------------------------

/// A 64-bit LCG (Knuth's MMIX constants): deterministic, no dependencies.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Weighted by repetition: acme 40 %, globex 30 %, initech 20 %, umbrella (no route) 10 %.
const CUSTOMERS: [&str; 10] =
    ["acme", "acme", "acme", "acme", "globex", "globex", "globex", "initech", "initech", "umbrella"];
const KINDS: [&str; 5] = ["pump", "valve", "chiller", "meter", "gateway"];
const SITES: [&str; 6] = ["berlin", "lyon", "austin", "osaka", "leeds", "porto"];
const GROUPS: [&str; 8] =
    ["emea", "amer", "apac", "berlin-plant", "lyon-plant", "austin-plant", "osaka-plant", "spares"];
const EXTRA_ATTRIBUTES: [&str; 9] =
    ["model", "serial", "install-date", "owner", "rack", "hw-rev", "zone", "line", "tier"];

/// A mix resembling a fleet's registry and shadow traffic: mostly things
/// created and updated with 5-10 attributes, shadow updates with JSON
/// documents, group memberships, some groups, policies with ARN-bearing
/// documents, certificates and type associations; about 5 % carry env=test.
fn generate(count: usize) -> Vec<Event> {
    let mut rng = Lcg(0x10d7_0000_5eed);
    (0..count)
        .map(|n| {
            let thing = format!("{}-{:05}", rng.pick(&KINDS), rng.below(20_000));
            let customer = rng.pick(&CUSTOMERS);
            let mut event = match rng.below(100) {
                0..55 => thing_event(&mut rng, &thing, customer),
                55..70 => shadow_event(&mut rng, &thing),
                70..82 => {
                    let op = if rng.percent(85) { Operation::Added } else { Operation::Removed };
                    let mut e = Event::new(Entity::ThingGroupMembership, op, &thing);
                    e.set_related(related::THING_GROUP, Some(rng.pick(&GROUPS).to_string()));
                    e
                }
                82..86 => group_event(&mut rng, customer),
                86..91 => policy_event(&mut rng, customer),
                91..95 => {
                    let id: String = (0..4).map(|_| format!("{:016x}", rng.next() << 31 ^ rng.next())).collect();
                    let mut e = Event::new(Entity::Certificate, Operation::Created, id);
                    e.set_related(related::CERTIFICATE_STATUS, Some("ACTIVE".into()));
                    e.set_related(related::CA_CERTIFICATE, Some(format!("{:016x}", rng.next())));
                    e
                }
                _ => {
                    let mut e = Event::new(Entity::ThingTypeAssociation, Operation::Added, &thing);
                    e.set_related(
                        related::THING_TYPE,
                        Some(format!("{}-v{}", &thing[..thing.find('-').unwrap()], 1 + rng.below(4))),
                    );
                    e
                }
            };
            event.id = format!("{:032x}", (n as u128) << 64 | u128::from(rng.next()));
            event.source_region = SOURCE_REGION.into();
            event.account_id = SOURCE_ACCOUNT.into();
            event.timestamp_ms = 1_764_000_000_000 + n as u64 * 37;
            event
        })
        .collect()
}

fn env(rng: &mut Lcg) -> &'static str {
    // Things and groups are ~59 % of events; 8.5 % of them are test devices.
    if rng.below(1000) < 85 { "test" } else { rng.pick(&["prod", "prod", "prod", "staging"]) }
}

fn thing_event(rng: &mut Lcg, thing: &str, customer: &str) -> Event {
    let operation = match rng.below(100) {
        0..30 => Operation::Created,
        30..97 => Operation::Updated,
        _ => Operation::Deleted,
    };
    let mut e = Event::new(Entity::Thing, operation, thing);
    e.version = Some(1 + rng.below(40));
    e.attributes.insert("env".into(), env(rng).into());
    if rng.percent(92) {
        e.attributes.insert("customer".into(), customer.into());
    }
    if rng.percent(80) {
        e.attributes.insert("fw".into(), format!("{}.{}.{}", 1 + rng.below(3), rng.below(10), rng.below(20)));
    }
    e.attributes.insert("site".into(), rng.pick(&SITES).into());
    let wanted = 5 + rng.below(6) as usize;
    let mut extra = 0;
    while e.attributes.len() < wanted {
        let key = EXTRA_ATTRIBUTES[extra % EXTRA_ATTRIBUTES.len()];
        extra += 1;
        let value = match key {
            "serial" => format!("SN{:010}", rng.below(10_000_000_000)),
            "install-date" => format!("2024-{:02}-{:02}", 1 + rng.below(12), 1 + rng.below(28)),
            _ => format!("{key}-{}", rng.below(50)),
        };
        e.attributes.insert(key.into(), value);
    }
    let kind = &thing[..thing.find('-').unwrap()];
    e.set_related(related::THING_TYPE, Some(format!("{kind}-v{}", 1 + rng.below(4))));
    e
}

fn shadow_event(rng: &mut Lcg, thing: &str) -> Event {
    let mut e = Event::new(Entity::Shadow, Operation::Updated, thing);
    e.version = Some(rng.below(100_000));
    if rng.percent(30) {
        e.set_related(related::SHADOW_NAME, Some("config".into()));
    }
    e.document = Some(format!(
        r#"{{"state":{{"reported":{{"temperature":{}.{},"humidity":{},"online":{},"fw":"2.{}.{}","uptime_s":{}}},"desired":{{"setpoint":{}}}}},"version":{}}}"#,
        15 + rng.below(15),
        rng.below(10),
        20 + rng.below(60),
        rng.percent(95),
        rng.below(10),
        rng.below(20),
        rng.below(10_000_000),
        18 + rng.below(6),
        e.version.unwrap()
    ));
    e
}

fn group_event(rng: &mut Lcg, customer: &str) -> Event {
    let group = format!("{}-{}", rng.pick(&SITES), rng.pick(&["plant", "line-a", "line-b", "spares"]));
    let operation = if rng.percent(30) { Operation::Created } else { Operation::Updated };
    let mut e = Event::new(Entity::ThingGroup, operation, &group);
    e.version = Some(1 + rng.below(10));
    e.attributes.insert("env".into(), env(rng).into());
    e.attributes.insert("customer".into(), customer.into());
    e.attributes.insert("tier".into(), rng.pick(&["gold", "silver", "bronze"]).into());
    if rng.percent(50) {
        e.attributes.insert("fw".into(), "pinned".into());
    }
    e.set_related(related::PARENT_GROUP, Some(rng.pick(&["emea", "amer", "apac"]).into()));
    e.document = Some(format!(r#"{{"description":"{group} of {customer}"}}"#));
    e
}

fn policy_event(rng: &mut Lcg, customer: &str) -> Event {
    let name = format!("fleet-{customer}-{}", rng.below(50));
    let operation = if rng.percent(50) { Operation::Created } else { Operation::Updated };
    let mut e = Event::new(Entity::Policy, operation, name);
    e.version = Some(1 + rng.below(5));
    let region = SOURCE_REGION;
    let account = SOURCE_ACCOUNT;
    e.document = Some(format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:{region}:{account}:client/${{iot:Connection.Thing.ThingName}}"}},{{"Effect":"Allow","Action":["iot:Publish","iot:Receive"],"Resource":["arn:aws:iot:{region}:{account}:topic/fleet/{customer}/*","arn:aws:iot:{region}:{account}:topic/$aws/things/${{iot:Connection.Thing.ThingName}}/shadow/*"]}},{{"Effect":"Allow","Action":"iot:Subscribe","Resource":["arn:aws:iot:*:{account}:topicfilter/fleet/{customer}/*","arn:aws:iot:eu-west-1:999988887777:topicfilter/shared/*"]}},{{"Effect":"Allow","Action":["iot:GetThingShadow","iot:UpdateThingShadow"],"Resource":"arn:aws:iot:{region}:{account}:thing/${{iot:Connection.Thing.ThingName}}","Condition":{{"Bool":{{"iot:Connection.Thing.IsAttached":"true"}}}}}}]}}"#
    ));
    e
}
