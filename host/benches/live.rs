//! Live replication from the `dynamodb-stream` source on moto, measured in one run:
//!
//! 1. lag from an item written to the event table to its change applied in
//!    the target, p50/p99/max, at a sustained rate (default 200 events/s for
//!    60 s), the source's thing reads held to AWS's default quotas (second
//!    reads come due in waves: unpaced, they would take moto's CPU from the
//!    stream, which AWS's quotas keep them from doing there);
//! 2. a backlog drained as fast as it goes: events/s, and the requests/s it
//!    made to the busier emulator next to moto's own ceiling (a plain
//!    UpdateThing loop at the same concurrency) measured in the same run;
//! 3. the peak RSS of the `iotdr` binary draining a 50,000-event backlog.
//!
//!   cargo bench -p iotdr --bench live      (needs scripts/moto.sh install)
//!
//! The source region (its event table and the IoT reads) and the target
//! region are two moto servers, as they are two regions in AWS.
//!
//! IOTDR_BENCH_RATE, IOTDR_BENCH_SECONDS, IOTDR_BENCH_BACKLOG and
//! IOTDR_BENCH_RSS_BACKLOG change the sizes.

#[allow(dead_code)]
mod common;
use common::moto;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use futures_util::StreamExt;
use iotdr::aws::{Limiter, RegionClients, SourceFetcher};
use iotdr::config::Pipeline as PipelineConfig;
use iotdr::pipeline::Pipeline;
use iotdr::plugin::PluginEngine;
use iotdr::run::{Options, run};
use iotdr::sink::{AwsSink, Job, JobResult, Sink, SinkError};
use iotdr::source::DynamodbStream;
use iotdr::state::StateStore;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";
const THINGS: usize = 500;
const CONCURRENCY: usize = 16;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The `n`-th event of the generated stream, as the rule would have written
/// it, stamped `at_ms`: things created, then updated, each followed by a
/// report to its shadow (versions numbered as the shadow service does).
fn item(n: usize, at_ms: u64) -> HashMap<String, AttributeValue> {
    // Event 2k is thing k's registry event, 2k + 1 its shadow report.
    let thing = format!("bench-{:04}", (n / 2) % THINGS);
    let s = |v: &str| AttributeValue::S(v.to_string());
    let (topic, payload): (String, HashMap<String, AttributeValue>) = if n % 2 == 1 {
        let state = HashMap::from([(
            "reported".to_string(),
            AttributeValue::M(HashMap::from([("n".to_string(), AttributeValue::N(n.to_string()))])),
        )]);
        (
            format!("$aws/things/{thing}/shadow/update/accepted"),
            HashMap::from([
                ("state".to_string(), AttributeValue::M(state)),
                ("version".to_string(), AttributeValue::N((n / (2 * THINGS) + 1).to_string())),
                ("timestamp".to_string(), AttributeValue::N((at_ms / 1000).to_string())),
            ]),
        )
    } else {
        let operation = if n < 2 * THINGS { "created" } else { "updated" };
        (
            format!("$aws/events/thing/{thing}/{operation}"),
            HashMap::from([
                ("eventType".to_string(), s("THING_EVENT")),
                ("operation".to_string(), s(&operation.to_uppercase())),
                ("accountId".to_string(), s("123456789012")),
                ("thingName".to_string(), s(&thing)),
                ("eventId".to_string(), s(&format!("bench-{n}"))),
                ("timestamp".to_string(), AttributeValue::N(at_ms.to_string())),
                ("attributes".to_string(), AttributeValue::M(HashMap::from([("n".to_string(), s(&n.to_string()))]))),
            ]),
        )
    };
    HashMap::from([
        ("id".to_string(), s(&format!("{n:09}"))),
        ("topic".to_string(), s(&topic)),
        ("payload".to_string(), AttributeValue::M(payload)),
    ])
}

async fn write_backlog(dynamodb: &aws_sdk_dynamodb::Client, table: &str, first: usize, count: usize) {
    let items: Vec<_> = (first..first + count).map(|n| item(n, 1_764_000_000_000 + n as u64)).collect();
    for chunk in items.chunks(25) {
        let requests = chunk
            .iter()
            .map(|item| {
                WriteRequest::builder()
                    .put_request(PutRequest::builder().set_item(Some(item.clone())).build().unwrap())
                    .build()
            })
            .collect();
        dynamodb.batch_write_item().request_items(table, requests).send().await.unwrap();
    }
}

/// One call to each service the live phase uses, before it is timed: a moto
/// server loads a service on its first request (0.3 s on an idle machine,
/// up to 2 s beside the writer), a cost AWS does not have and the ceiling,
/// measured on a warm server, does not include.
async fn warm_up(source: &RegionClients, target: &RegionClients) {
    let _ = source.iot.describe_thing().thing_name("warm-up").send().await;
    let _ = source.streams.list_streams().send().await;
    target.iot.create_thing().thing_name("warm-up").send().await.unwrap();
    let state = aws_smithy_types::Blob::new(r#"{"state":{"reported":{}}}"#);
    target.data.update_thing_shadow().thing_name("warm-up").payload(state).send().await.unwrap();
    let _ = target.data.delete_thing_shadow().thing_name("warm-up").send().await;
    target.iot.delete_thing().thing_name("warm-up").send().await.unwrap();
}

/// `reads_at_quotas`: the source's thing reads (ingest's and the second
/// reads') held to AWS's default quotas, as they are in AWS; else every rate
/// is unlimited, to measure iotdr against moto's own ceiling.
fn pipeline_text(source: &str, target: &str, table: &str, state: &str, reads_at_quotas: bool) -> String {
    let quotas = if reads_at_quotas { ", ListThingPrincipals = 20.0, DescribeThing = 350.0" } else { "" };
    format!(
        r#"
[pipeline]
name = "bench"
source_region = "{SOURCE}"
targets = ["{TARGET}"]
[regions.{SOURCE}]
endpoint_url = "{source}"
[regions.{TARGET}]
endpoint_url = "{target}"
[source]
kind = "dynamodb-stream"
table = "{table}"
[apply]
concurrency = {CONCURRENCY}
# moto has no quotas: measure iotdr, not AWS's default rates.
rate_limits = {{ "*" = 100000.0{quotas} }}
[state]
dir = "{state}"
"#
    )
}

/// The AWS sink, noting when each change was applied.
struct Timed {
    inner: AwsSink,
    lags: Rc<RefCell<Vec<u64>>>,
}

impl Sink for Timed {
    async fn apply(&mut self, jobs: &[Job]) -> Result<Vec<JobResult>, SinkError> {
        let results = self.inner.apply(jobs).await?;
        let now = now_ms();
        for (job, result) in jobs.iter().zip(&results) {
            // Shadow times are whole seconds: lag is measured on registry events.
            if *result == JobResult::Applied && job.event.entity == iotdr::event::Entity::Thing {
                self.lags.borrow_mut().push(now.saturating_sub(job.event.timestamp_ms));
            }
        }
        Ok(results)
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    common::use_test_credentials();
    let rate = setting("IOTDR_BENCH_RATE", 200);
    let seconds = setting("IOTDR_BENCH_SECONDS", 60);
    let backlog = setting("IOTDR_BENCH_BACKLOG", 5_000) as usize;
    let rss_backlog = setting("IOTDR_BENCH_RSS_BACKLOG", 50_000) as usize;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let moto = moto::Moto::start();
    let target_moto = moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new(None).unwrap();

    // 1. Lag at a sustained rate.
    let lag = runtime.block_on(async {
        let dynamodb = moto.event_table(SOURCE, "live").await;
        let state_dir = dir.path().join("live-state");
        let text = pipeline_text(&moto.url, &target_moto.url, "live", &state_dir.display().to_string(), true);
        let config = PipelineConfig::parse(&dir.path().join("live.toml"), &text, &|_| None).unwrap();
        let mut pipeline = Pipeline::build(&config, &engine).unwrap();
        let state = Arc::new(StateStore::open(&state_dir).unwrap());
        let limiter = Arc::new(Limiter::from_config(&config.apply));
        let fetcher = SourceFetcher::connect(&config, limiter.clone()).await.unwrap();
        let inner = AwsSink::connect(&config, state.clone(), limiter.clone()).await.unwrap();
        let lags = Rc::new(RefCell::new(Vec::new()));
        let mut sink = Timed { inner, lags: lags.clone() };
        let clients = RegionClients::connect(SOURCE, &config.regions[SOURCE], false).await.unwrap();
        warm_up(&clients, &RegionClients::connect(TARGET, &config.regions[TARGET], true).await.unwrap()).await;
        let counted = limiter.clone();
        let mut source = DynamodbStream::new("live", clients, limiter, config_start(&config), HashMap::new());
        let options = Options {
            until_idle: false,
            poll_interval: Duration::from_millis(50),
            recheck_after: config.ingest.recheck_after,
            queue_limit: config.ingest.queue_limit,
            defer_reads_after: config.ingest.defer_reads_after,
            reconcile: None,
            reload: None,
            admin: None,
        };
        let total = (rate * seconds) as usize;
        let writer = async {
            let started = Instant::now();
            // Each put at its time, a few in flight: a slow answer does not
            // hold the next item back, as the rules writing the table do not.
            let puts = (0..total).map(|n| {
                let dynamodb = &dynamodb;
                async move {
                    let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                    dynamodb.put_item().table_name("live").set_item(Some(item(n, now_ms()))).send().await.unwrap();
                }
            });
            futures_util::stream::iter(puts).buffer_unordered(CONCURRENCY).collect::<Vec<_>>().await;
            started.elapsed()
        };
        let things = total.div_ceil(2);
        let replicator = run(&config, &state, &mut source, Some(&fetcher), &mut pipeline, &mut sink, &options, &|_| {});
        let mut written = None;
        tokio::pin!(replicator);
        tokio::pin!(writer);
        loop {
            tokio::select! {
                result = &mut replicator => panic!("the run ended: {result:?}"),
                took = &mut writer, if written.is_none() => written = Some(took),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if written.is_some() && lags.borrow().len() >= things {
                break;
            }
        }
        // The replicator stops with this block (it follows the stream forever otherwise).
        let mut lags = lags.take();
        lags.sort_unstable();
        let took = written.unwrap();
        // What each emulator served meanwhile: the source the writer's puts
        // and iotdr's reads, the target iotdr's writes.
        let source = total as u64 + counted.stats(&[SOURCE.to_string()], &[]).requests;
        let target = counted.stats(&[TARGET.to_string()], &[]).requests;
        let per_second = |requests: u64| requests as f64 / took.as_secs_f64();
        (lags, took, per_second(source), per_second(target))
    });
    let (lags, written, live_source, live_target) = lag;

    // 2. A backlog as fast as it goes, next to moto's ceiling.
    let (drained, drain_secs, requests, ceiling) = runtime.block_on(async {
        let dynamodb = moto.event_table(SOURCE, "backlog").await;
        write_backlog(&dynamodb, "backlog", 0, backlog).await;
        let state_dir = dir.path().join("backlog-state");
        let text = pipeline_text(&moto.url, &target_moto.url, "backlog", &state_dir.display().to_string(), false);
        let config = PipelineConfig::parse(&dir.path().join("backlog.toml"), &text, &|_| None).unwrap();
        let mut pipeline = Pipeline::build(&config, &engine).unwrap();
        let state = Arc::new(StateStore::open(&state_dir).unwrap());
        let limiter = Arc::new(Limiter::from_config(&config.apply));
        let fetcher = SourceFetcher::connect(&config, limiter.clone()).await.unwrap();
        let mut sink = AwsSink::connect(&config, state.clone(), limiter.clone()).await.unwrap();
        let clients = RegionClients::connect(SOURCE, &config.regions[SOURCE], false).await.unwrap();
        let counted = limiter.clone();
        let mut source = DynamodbStream::new("backlog", clients, limiter, config_start(&config), HashMap::new());
        let options = Options {
            until_idle: true,
            poll_interval: Duration::from_millis(50),
            recheck_after: config.ingest.recheck_after,
            queue_limit: config.ingest.queue_limit,
            defer_reads_after: config.ingest.defer_reads_after,
            reconcile: None,
            reload: None,
            admin: None,
        };
        let started = Instant::now();
        let summary = run(&config, &state, &mut source, Some(&fetcher), &mut pipeline, &mut sink, &options, &|_| {})
            .await
            .unwrap();
        let took = started.elapsed().as_secs_f64();
        assert_eq!(summary.dead_letters, 0, "the backlog must apply whole: {summary:?}");
        // Stream reads count with the source's requests; the busier emulator is the bound.
        let source = counted.stats(&[SOURCE.to_string()], &[]).requests;
        let target = counted.stats(&[TARGET.to_string()], &[]).requests;
        let ceiling = target_moto.ceiling(TARGET, 1500, CONCURRENCY, |i| format!("bench-{:04}", i % THINGS)).await;
        (summary.records, took, source.max(target), ceiling)
    });

    // 3. Peak RSS of the binary draining a large backlog.
    let (rss_kb, rss_secs) = runtime.block_on(async {
        let dynamodb = moto.event_table(SOURCE, "rss").await;
        write_backlog(&dynamodb, "rss", 0, rss_backlog).await;
        let state_dir = dir.path().join("rss-state");
        let pipeline = dir.path().join("rss.toml");
        let text = pipeline_text(&moto.url, &target_moto.url, "rss", &state_dir.display().to_string(), false);
        std::fs::write(&pipeline, text).unwrap();
        let started = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_iotdr"))
            .args(["run", pipeline.to_str().unwrap(), "--until-idle"])
            .env("IOTDR_CACHE_DIR", dir.path().join("cache"))
            .envs(moto.env())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let status = format!("/proc/{}/status", child.id());
        let mut peak = 0u64;
        loop {
            if let Ok(text) = std::fs::read_to_string(&status)
                && let Some(line) = text.lines().find(|l| l.starts_with("VmHWM:"))
            {
                peak = peak.max(line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0));
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (peak, started.elapsed().as_secs_f64())
    });

    println!("live: {rate} events/s for {seconds} s through the dynamodb-stream source on moto (2 cores)");
    println!(
        "  written in {:.1} s ({:.0} events/s); lag item written -> change applied (thing events, n = {}):",
        written.as_secs_f64(),
        (rate * seconds) as f64 / written.as_secs_f64(),
        lags.len()
    );
    println!(
        "  p50 {} ms   p99 {} ms   max {} ms   (goal p99 <= 1000 ms)",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(0)
    );
    println!(
        "  moto served {live_source:.0} requests/s in the source region (the writer's puts, iotdr's reads) and {live_target:.0} in the target meanwhile"
    );
    println!("backlog: {drained} events in {drain_secs:.1} s = {:.0} events/s", drained as f64 / drain_secs);
    println!(
        "  {:.0} requests/s to the busier emulator; moto raw ceiling {ceiling:.0} requests/s (UpdateThing loop, concurrency {CONCURRENCY}); ratio {:.2}",
        requests as f64 / drain_secs,
        requests as f64 / drain_secs / ceiling
    );
    println!(
        "rss: peak {:.1} MB draining a {rss_backlog}-event backlog in {rss_secs:.0} s (goal <= 64 MB)",
        rss_kb as f64 / 1024.0
    );
}

fn config_start(config: &PipelineConfig) -> iotdr::config::StreamStart {
    match &config.source {
        iotdr::config::Source::DynamodbStream { start, .. } => *start,
        _ => unreachable!("the bench reads a stream"),
    }
}
