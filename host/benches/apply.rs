//! Applying a generated fleet to a moto target region: target API calls per
//! replicated change, and sustained changes/s next to moto's own ceiling (a
//! trivial request loop at the same concurrency), measured in the same run.
//!
//!   cargo bench -p iotdr --bench apply            (needs scripts/moto.sh install; builds nothing else)

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

const THINGS: usize = 300;
const CONCURRENCY: usize = 16;
const CEILING_CALLS: usize = 1500;

fn main() {
    common::use_test_credentials();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let moto = moto::Moto::start();
    let fleet = runtime.block_on(fleet::seed(&moto, "us-east-1", THINGS));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("events.jsonl"), fleet.events.join("\n") + "\n").unwrap();
    let text = format!(
        r#"
[pipeline]
name = "bench"
source_region = "us-east-1"
targets = ["eu-west-1"]
[regions.us-east-1]
endpoint_url = "{url}"
[regions.eu-west-1]
endpoint_url = "{url}"
[source]
kind = "file"
path = "events.jsonl"
[apply]
concurrency = {CONCURRENCY}
# moto has no quotas: measure iotdr, not AWS's default rates.
rate_limits = {{ "*" = 100000.0 }}
"#,
        url = moto.url
    );
    let config = PipelineConfig::parse(&dir.path().join("bench.toml"), &text, &|_| None).unwrap();
    let engine = PluginEngine::new(None).unwrap();
    let mut pipeline = Pipeline::build(&config, &engine).unwrap();
    let state = Arc::new(StateStore::open(&dir.path().join("state")).unwrap());
    let limiter = Arc::new(Limiter::from_config(&config.apply));
    let mut sink = runtime.block_on(AwsSink::connect(&config, state.clone(), limiter.clone())).unwrap();
    let fetcher = runtime.block_on(SourceFetcher::connect(&config, limiter)).unwrap();
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
    let stats = sink.stats();
    let source = fetcher.stats();
    assert_eq!(summary.dead_letters, 0, "the benchmark run must apply everything");

    // moto's ceiling: the same kind of write, nothing else, same concurrency.
    let ceiling =
        runtime.block_on(moto.ceiling("eu-west-1", CEILING_CALLS, CONCURRENCY, |i| format!("dev-{:04}", i % THINGS)));

    let changes = summary.changes as f64;
    // Source reads at ingest go to the same emulator: they count against its ceiling too.
    let moto_requests = (stats.requests + source.requests) as f64 / elapsed;
    println!("generated fleet: {THINGS} things, {} events ({} records)", fleet.events.len(), summary.records);
    println!("changes applied:            {}", summary.changes);
    println!("target API calls:           {} ({} requests with retries)", stats.calls, stats.requests);
    println!("source reads at ingest:     {} requests", source.requests);
    println!(
        "calls per change:           {:.2}   (goal <= 1.2; the AWS sample uses 6+ per thing)",
        stats.calls as f64 / changes
    );
    println!(
        "iotdr sustained:            {:.0} changes/s ({:.0} requests/s to the emulator)",
        changes / elapsed,
        moto_requests
    );
    println!("moto raw ceiling:           {ceiling:.0} requests/s (UpdateThing loop, concurrency {CONCURRENCY})");
    println!(
        "ratio iotdr/ceiling:        {:.2} (requests/s against the emulator's own limit)",
        moto_requests / ceiling
    );
}
