//! Replaying the file of a 1,500-thing fleet into an empty region at AWS's
//! default quotas: how long it takes next to the least time those quotas
//! allow for the calls it made (per operation: calls / rate, the largest
//! wins), measured in the same run, and what it read from the source.
//!
//!   cargo bench -p iotdr --bench replay            (needs scripts/moto.sh install)
//!
//! The source and the target region are two moto servers, so that neither
//! emulator's own request ceiling is what is measured.

#[allow(dead_code)]
mod common;
use common::{fleet, moto};

use iotdr::aws::{Limiter, SourceFetcher};
use iotdr::config::Pipeline as PipelineConfig;
use iotdr::pipeline::Pipeline;
use iotdr::plugin::PluginEngine;
use iotdr::run::{Options, run};
use iotdr::sink::AwsSink;
use iotdr::source::FileSource;
use iotdr::state::StateStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const THINGS: usize = 1500;
const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";

fn main() {
    common::use_test_credentials();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let source_moto = moto::Moto::start();
    let target_moto = moto::Moto::start();
    let fleet = runtime.block_on(fleet::seed(&source_moto, SOURCE, THINGS));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("events.jsonl"), fleet.events.join("\n") + "\n").unwrap();
    // No rate_limits: the defaults are AWS's quotas.
    let text = format!(
        r#"
[pipeline]
name = "replay-bench"
source_region = "{SOURCE}"
targets = ["{TARGET}"]
[regions.{SOURCE}]
endpoint_url = "{source}"
[regions.{TARGET}]
endpoint_url = "{target}"
[source]
kind = "file"
path = "events.jsonl"
"#,
        source = source_moto.url,
        target = target_moto.url,
    );
    let config = PipelineConfig::parse(&dir.path().join("bench.toml"), &text, &|_| None).unwrap();
    let engine = PluginEngine::new(None).unwrap();
    let mut pipeline = Pipeline::build(&config, &engine).unwrap();
    let state = Arc::new(StateStore::open(&dir.path().join("state")).unwrap());
    let limiter = Arc::new(Limiter::from_config(&config.apply));
    let mut sink = runtime.block_on(AwsSink::connect(&config, state.clone(), limiter.clone())).unwrap();
    let fetcher = runtime.block_on(SourceFetcher::connect(&config, limiter.clone())).unwrap();
    let iotdr::config::Source::File { path } = &config.source else { unreachable!() };
    let mut source = FileSource::open(path, None, true).unwrap();
    let options = Options {
        until_idle: true,
        poll_interval: Duration::from_millis(10),
        recheck_after: None,
        queue_limit: config.ingest.queue_limit,
        defer_reads_after: config.ingest.defer_reads_after,
        reconcile: None,
        reload: None,
        admin: None,
    };
    let started = Instant::now();
    let summary = runtime
        .block_on(run(&config, &state, &mut source, Some(&fetcher), &mut pipeline, &mut sink, &options, &|_| {}))
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(summary.dead_letters, 0, "the benchmark run must apply everything");

    // The least time AWS's default quotas allow for these calls: each
    // operation's bucket alone, all of them in parallel.
    let mut floor = (0.0, String::new());
    let mut lines = Vec::new();
    for region in [SOURCE, TARGET] {
        for (operation, calls) in limiter.calls_by_operation(region) {
            let rate = limiter.configured_rate(operation);
            let seconds = calls as f64 / rate;
            if seconds > floor.0 {
                floor = (seconds, format!("{operation} in {region}: {calls} calls at {rate}/s"));
            }
            lines.push(format!("  {region:<10} {operation:<28} {calls:>6} calls  {rate:>6}/s  >= {seconds:>6.1} s"));
        }
    }
    let thing_events = fleet.events.iter().filter(|e| e.contains("\"eventType\":\"THING_EVENT\"")).count();
    let principal_reads = limiter.calls_by_operation(SOURCE).get("ListThingPrincipals").copied().unwrap_or(0);
    println!("generated fleet: {THINGS} things, {} events", fleet.events.len());
    println!("changes applied:            {}", summary.changes);
    println!("calls per operation (at AWS's default quotas):");
    for line in lines {
        println!("{line}");
    }
    println!(
        "principal reads:            {principal_reads} for {thing_events} thing events ({:.2} per event)",
        principal_reads as f64 / thing_events as f64
    );
    println!("replay took:                {elapsed:.1} s");
    println!("quota floor:                {:.1} s ({})", floor.0, floor.1);
    println!("ratio replay/floor:         {:.2} (1.00: no time lost beyond what the quotas impose)", elapsed / floor.0);
}
