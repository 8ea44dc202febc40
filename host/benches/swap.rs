//! Hot swap, measured in one process without AWS: a run follows a file
//! source that a writer fills at a steady rate (default 400 events/s), its
//! sink only records what it is given; the region router's table is changed
//! 10 times (the pipeline file replaced, as an editor saves it). Per swap:
//! the time from the file's rename to the first batch served by the new
//! version, and the events applied per 100 ms around it.
//!
//!   bash scripts/build-plugins.sh && cargo bench -p iotdr --bench swap
//!
//! IOTDR_BENCH_RATE and IOTDR_BENCH_SWAPS change the sizes.

use iotdr::config::Pipeline as PipelineConfig;
use iotdr::pipeline::Pipeline;
use iotdr::plugin::PluginEngine;
use iotdr::run::{Options, Reload, run};
use iotdr::sink::{Job, JobResult, Sink, SinkError};
use iotdr::source::FileSource;
use iotdr::state::StateStore;
use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WEST: &str = "eu-west-1";
const CENTRAL: &str = "eu-central-1";

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Records when each job reached it, and where it went.
struct Recording(Rc<RefCell<Vec<(Instant, bool)>>>);

impl Sink for Recording {
    async fn apply(&mut self, jobs: &[Job]) -> Result<Vec<JobResult>, SinkError> {
        let now = Instant::now();
        self.0.borrow_mut().extend(jobs.iter().map(|job| (now, job.region == CENTRAL)));
        Ok(jobs.iter().map(|_| JobResult::Applied).collect())
    }
}

fn pipeline(router: &Path, region: &str) -> String {
    format!(
        r#"
[pipeline]
name = "swap-bench"
source_region = "us-east-1"
targets = ["{WEST}", "{CENTRAL}"]
batch_size = 64
[source]
kind = "file"
path = "events.jsonl"
[[stage]]
name = "route"
plugin = "{}"
config = {{ by_attribute = "customer", routes = {{ acme = ["{region}"] }} }}
[ingest]
recheck_after_ms = 0
"#,
        router.display()
    )
}

fn main() {
    let rate = setting("IOTDR_BENCH_RATE", 400);
    let swaps = setting("IOTDR_BENCH_SWAPS", 10) as usize;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let router = root.join("plugins/dist/region-router.wasm");
    assert!(router.exists(), "run scripts/build-plugins.sh first");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let path = dir.path().join("pipeline.toml");
    std::fs::write(dir.path().join("events.jsonl"), "").unwrap();
    std::fs::write(&path, pipeline(&router, WEST)).unwrap();
    let config = PipelineConfig::load(&path).unwrap();
    // The run's engine compiles the router once; the reload's finds it in the cache.
    let engine = PluginEngine::new(Some(cache.clone())).unwrap();
    let mut built = Pipeline::build(&config, &engine).unwrap();
    let state = StateStore::open(&dir.path().join("state")).unwrap();
    let iotdr::config::Source::File { path: events_path } = &config.source else { unreachable!() };
    let mut source = FileSource::open(events_path, None, false).unwrap();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let mut sink = Recording(seen.clone());
    let options = Options {
        until_idle: false,
        poll_interval: Duration::from_millis(5),
        recheck_after: None,
        queue_limit: config.ingest.queue_limit,
        defer_reads_after: config.ingest.defer_reads_after,
        reconcile: None,
        reload: Some(Reload::new(config.clone(), PluginEngine::new(Some(cache)).unwrap())),
        admin: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut events = std::fs::OpenOptions::new().append(true).open(events_path).unwrap();
    let written = RefCell::new(0u64);
    let writer = async {
        let every = Duration::from_millis(10);
        let per_tick = (rate / 100).max(1);
        loop {
            for _ in 0..per_tick {
                let n = *written.borrow();
                writeln!(
                    events,
                    r#"{{"event":{{"id":"e{n}","entity":"thing","operation":"updated","name":"t{}","attributes":{{"customer":"acme"}},"timestamp_ms":{}}}}}"#,
                    n % 1000,
                    1_764_000_000_000u64 + n
                )
                .unwrap();
                *written.borrow_mut() += 1;
            }
            events.flush().unwrap();
            tokio::time::sleep(every).await;
        }
    };
    let mut latencies = Vec::new();
    let mut dips = Vec::new();
    let swapper = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for swap in 0..swaps {
            let to_central = swap % 2 == 0;
            let next = path.with_extension("next");
            std::fs::write(&next, pipeline(&router, if to_central { CENTRAL } else { WEST })).unwrap();
            let changed = Instant::now();
            std::fs::rename(&next, &path).unwrap();
            let served = loop {
                let first =
                    seen.borrow().iter().find(|(at, central)| *at >= changed && *central == to_central).map(|s| s.0);
                if let Some(at) = first {
                    break at;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            latencies.push(served - changed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Events applied per 100 ms: the second before the change, the lowest window after it.
            let applied =
                |from: Instant, to: Instant| seen.borrow().iter().filter(|(at, _)| *at >= from && *at < to).count();
            let before = applied(changed - Duration::from_secs(1), changed) as f64 / 10.0;
            let lowest = (0..5)
                .map(|w| {
                    let from = changed + Duration::from_millis(100 * w);
                    applied(from, from + Duration::from_millis(100))
                })
                .min()
                .unwrap_or(0) as f64;
            dips.push((before, lowest));
        }
    };
    runtime.block_on(async {
        tokio::select! {
            result = run(&config, &state, &mut source, None, &mut built, &mut sink, &options, &|_| {}) => {
                panic!("the run ended: {result:?}")
            }
            _ = writer => unreachable!("the writer loops"),
            () = swapper => {}
        }
    });
    let mut sorted = latencies.clone();
    sorted.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!("{swaps} swaps of the router's table at {rate} events/s (batches of up to 64):");
    println!(
        "  file change to first batch of the new version: median {:.0} ms, max {:.0} ms   (goal <= 100 ms)",
        ms(&sorted[sorted.len() / 2]),
        ms(sorted.last().unwrap())
    );
    println!("    each: {}", latencies.iter().map(|d| format!("{:.0}", ms(d))).collect::<Vec<_>>().join(", "));
    let before: f64 = dips.iter().map(|d| d.0).sum::<f64>() / dips.len() as f64;
    let lowest: f64 = dips.iter().map(|d| d.1).sum::<f64>() / dips.len() as f64;
    println!(
        "  events applied per 100 ms: {before:.1} in the second before a swap, {lowest:.1} in the slowest 100 ms of the half second after it"
    );
}
