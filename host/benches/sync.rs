//! `iotdr sync` of a generated fleet into an empty second moto region, then
//! a smart re-sync and a verification of the same fleet, with moto's own
//! request ceiling measured in the same run:
//!
//! * full sync: things/s, requests/s to the emulator next to its ceiling,
//!   target calls per entity, source calls per entity;
//! * smart sync of the synced fleet: target writes (goal 0) and target
//!   reads per thing (goal <= 1);
//! * verify: things/s;
//! * the time the same sync would take at AWS's default quotas.
//!
//!   cargo bench -p iotdr --bench sync            (needs scripts/moto.sh install)
//!   IOTDR_BENCH_THINGS=500 cargo bench -p iotdr --bench sync     (a smaller fleet)

#[allow(dead_code)]
mod common;
use common::{fleet, moto};

use iotdr::aws::{Limiter, RegionClients, RetryPolicy};
use iotdr::config::Pipeline as PipelineConfig;
use iotdr::pipeline::Pipeline;
use iotdr::plugin::PluginEngine;
use iotdr::run::{Options, run};
use iotdr::sink::AwsSink;
use iotdr::source::RegistryScan;
use iotdr::state::StateStore;
use iotdr::verify::{KINDS, Reads, sync_drift, verify};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";
const CONCURRENCY: usize = 16;
const CEILING_CALLS: usize = 2000;

fn main() {
    common::use_test_credentials();
    let things: usize = std::env::var("IOTDR_BENCH_THINGS").ok().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let moto = moto::Moto::start();
    let seeding = Instant::now();
    runtime.block_on(fleet::seed(&moto, SOURCE, things));
    println!("seeded {things} things into {SOURCE} in {:.0} s", seeding.elapsed().as_secs_f64());

    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[pipeline]
name = "bench"
source_region = "{SOURCE}"
targets = ["{TARGET}"]
[regions.{SOURCE}]
endpoint_url = "{url}"
[regions.{TARGET}]
endpoint_url = "{url}"
[source]
kind = "scan"
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
    let limiter = || Arc::new(Limiter::from_config(&config.apply));

    // 1. The full sync, as `iotdr sync` runs it.
    let sync_limiter = limiter();
    let settings = config.regions.get(SOURCE).cloned().unwrap_or_default();
    let clients = runtime.block_on(RegionClients::connect(SOURCE, &settings, true)).unwrap();
    let mut scan = RegistryScan::new(clients, sync_limiter.clone(), None);
    let mut sink = runtime.block_on(AwsSink::connect(&config, state.clone(), sync_limiter.clone())).unwrap();
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
    let summary =
        runtime.block_on(run(&config, &state, &mut scan, None, &mut pipeline, &mut sink, &options, &|_| {})).unwrap();
    let sync_seconds = started.elapsed().as_secs_f64();
    assert_eq!(summary.dead_letters, 0, "the benchmark sync must apply everything");
    let target = sink.stats();
    let source = sync_limiter.stats(&[SOURCE.to_string()], &[]);
    let sync_calls =
        [(SOURCE, sync_limiter.calls_by_operation(SOURCE)), (TARGET, sync_limiter.calls_by_operation(TARGET))];

    // 2. A smart sync of the synced fleet: its verification, then the drift.
    let smart_limiter = limiter();
    let started = Instant::now();
    let verification =
        runtime.block_on(verify(&config, &mut pipeline, smart_limiter.clone(), None, &Reads::expected())).unwrap();
    let smart_reads = smart_limiter.stats(&[TARGET.to_string()], &[]);
    let write_limiter = limiter();
    let mut sink = runtime.block_on(AwsSink::connect(&config, state.clone(), write_limiter)).unwrap();
    runtime.block_on(sync_drift(&config, &mut pipeline, &mut sink, &state, &verification)).unwrap();
    let smart_seconds = started.elapsed().as_secs_f64();
    let smart_writes = sink.stats();
    assert_eq!(verification.drift(), 0, "the synced fleet must verify equal: {:?}", verification.reports);
    let expected = verification.expected.regions.get(TARGET).expect("the target has entities");
    let entities: usize = KINDS.iter().map(|kind| expected.of(kind).count()).sum();
    // What AWS writes apart from the entities: memberships and attachments.
    let things_relations: usize = expected
        .of("things")
        .map(|(_, thing)| {
            let listed = |field: &str| thing[field].as_array().map_or(0, Vec::len);
            listed("groups") + listed("certificates") + usize::from(!thing["billing_group"].is_null())
        })
        .sum();
    let policy_attachments: usize =
        expected.of("certificates").map(|(_, c)| c["policies"].as_array().map_or(0, Vec::len)).sum();
    let relations = things_relations + policy_attachments;
    let things_synced = expected.of("things").count();
    assert_eq!(things_synced, things);

    // 3. A verification of the same fleet (every shadow of every thing).
    let verify_limiter = limiter();
    let started = Instant::now();
    let verified =
        runtime.block_on(verify(&config, &mut pipeline, verify_limiter.clone(), None, &Reads::all())).unwrap();
    let verify_seconds = started.elapsed().as_secs_f64();
    assert_eq!(verified.drift(), 0);
    let verify_reads = verify_limiter.stats(&[SOURCE.to_string(), TARGET.to_string()], &[]);

    // moto's ceiling: the same kind of request, nothing else, same concurrency.
    let ceiling =
        runtime.block_on(moto.ceiling(TARGET, CEILING_CALLS, CONCURRENCY, |i| format!("dev-{:04}", i % things)));

    let per_kind: Vec<String> = KINDS.iter().map(|kind| format!("{} {kind}", expected.of(kind).count())).collect();
    println!("fleet: {things} things; {entities} entities ({})", per_kind.join(", "));
    println!();
    println!("full sync into an empty region: {sync_seconds:.1} s");
    println!("  things/s:                     {:.0}", things as f64 / sync_seconds);
    let requests = (target.requests + source.requests) as f64 / sync_seconds;
    println!("  requests/s to the emulator:   {requests:.0} (source reads and target writes, one server)");
    println!("  moto raw ceiling:             {ceiling:.0} requests/s (UpdateThing loop, concurrency {CONCURRENCY})");
    println!("  ratio to the ceiling:         {:.2}   (goal >= 0.9)", requests / ceiling);
    println!(
        "  target calls per entity:      {:.2}   (goal <= 1.2; {} calls)",
        target.calls as f64 / entities as f64,
        target.calls
    );
    println!(
        "  target calls per item:        {:.2}   (entities and their {relations} memberships and attachments, each a call of its own in AWS)",
        target.calls as f64 / (entities + relations) as f64
    );
    println!("    {}", top(&sync_calls[1].1, 8));
    println!("  source calls per entity:      {:.2}   ({} calls)", source.calls as f64 / entities as f64, source.calls);
    println!("    {}", top(&sync_calls[0].1, 8));
    println!();
    println!("smart sync of the synced fleet: {smart_seconds:.1} s");
    println!("  target writes:                {}   (goal 0)", smart_writes.calls);
    println!(
        "  target reads per thing:       {:.2}   (goal <= 1; {} reads: {})",
        smart_reads.calls as f64 / things as f64,
        smart_reads.calls,
        top(&smart_limiter.calls_by_operation(TARGET), 4)
    );
    println!();
    println!(
        "verify: {verify_seconds:.1} s, {:.0} things/s ({} reads of both regions: {:.2} per entity)",
        things as f64 / verify_seconds,
        verify_reads.calls,
        verify_reads.calls as f64 / entities as f64
    );
    println!();
    // At AWS's default quotas each operation's bucket bounds the sync: the
    // busiest one (its calls over its rate) is a lower bound on its time.
    let quotas = Limiter::new(&HashMap::new(), RetryPolicy::default());
    let mut bounds: Vec<(f64, String)> = sync_calls
        .iter()
        .flat_map(|(region, calls)| {
            let quotas = &quotas;
            calls.iter().map(move |(operation, calls)| {
                let rate = quotas.configured_rate(operation);
                (*calls as f64 / rate, format!("{operation} in {region}: {calls} at {rate}/s"))
            })
        })
        .collect();
    bounds.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("at AWS's default quotas this sync takes at least {:.0} s, bound by:", bounds[0].0);
    for (seconds, what) in bounds.iter().take(4) {
        println!("  {seconds:>6.0} s  {what}");
    }
}

/// The `n` most frequent operations of `calls`, as text.
fn top(calls: &std::collections::BTreeMap<&'static str, u64>, n: usize) -> String {
    let mut calls: Vec<_> = calls.iter().collect();
    calls.sort_by(|a, b| b.1.cmp(a.1));
    calls.iter().take(n).map(|(operation, count)| format!("{count} {operation}")).collect::<Vec<_>>().join(", ")
}
