//! The `iotdr` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use iotdr::aws::{Limiter, ReadPlan, RegionClients, SourceFetcher};
use iotdr::config::Pipeline as PipelineConfig;
use iotdr::event::{Event, decode_line};
use iotdr::pipeline::Pipeline;
use iotdr::plugin::{Fate, PluginEngine, StageLimits, StageRunner};
use iotdr::progress::Progress;
use iotdr::run::{AdminPart, Options, Reconcile, Reload, replay, run};
use iotdr::sink::{AwsSink, DryRun};
use iotdr::source::{AnySource, DynamodbStream, FileSource, MqttSource, RegistryScan};
use iotdr::state::{DeadLetter, FolderLock, StateStore, Step};
use iotdr::verify::Reads;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "iotdr",
    version,
    about = "Disaster recovery for AWS IoT fleets: replicate registry, certificate and shadow events across regions through WebAssembly plug-ins"
)]
struct Cli {
    /// Where compiled plug-ins are cached (default: ~/.cache/iotdr/plugins).
    #[arg(long, global = true, env = "IOTDR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Log lines for people (`human`) or one JSON object per line (`json`);
    /// the level is set by IOTDR_LOG (default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks a pipeline file and its plug-ins (each plug-in is loaded and given its config),
    /// and runs its `[[tests]]`.
    Validate { pipeline: PathBuf },
    /// Runs the pipeline file's `[[tests]]` with the real plug-ins and prints
    /// each result, with what differs on a failure (exit 1 when one fails).
    Test { pipeline: PathBuf },
    /// Runs a pipeline.
    Run {
        pipeline: PathBuf,
        /// Print the API calls a real run would make, one JSON object per line, instead of making them.
        #[arg(long)]
        dry_run: bool,
        /// Exit once the source has nothing more, instead of waiting for new events.
        #[arg(long)]
        until_idle: bool,
        /// In a dry run, still fetch what events lack (PEMs, policies,
        /// attachments) from the source region, as a real run does.
        #[arg(long)]
        fetch: bool,
        /// Read the source from its beginning again instead of resuming
        /// where the last run stopped (replays converge: see the ledger).
        #[arg(long)]
        from_start: bool,
        /// With --until-idle and an `mqtt` source: idle once nothing arrived
        /// for this long (`3s`, `500ms`).
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        idle_after: Duration,
    },
    /// Copies the source region's whole registry (types, groups, billing
    /// groups, policies, certificates, things with their memberships,
    /// principals and shadows) through the pipeline's stages to its targets.
    /// An interrupted sync resumes at the page it stopped at.
    Sync {
        pipeline: PathBuf,
        /// Print the API calls it would make instead of making them.
        #[arg(long)]
        dry_run: bool,
        /// Start the listing again from its beginning instead of resuming.
        #[arg(long)]
        from_start: bool,
        /// `full` writes everything it lists; `smart` first compares each
        /// target with the source (as `verify` does) and writes only what is
        /// missing or different.
        #[arg(long, value_enum, default_value_t = SyncMode::Full)]
        mode: SyncMode,
        /// Only the things fleet indexing finds for this query
        /// (`thingName:pump*`, `attributes.site:lyon`), with their
        /// memberships, principals and shadows; needs fleet indexing on in
        /// the source region. Types, groups, policies and certificates are
        /// copied whole. With `--mode smart`, only those things are compared.
        #[arg(long)]
        query: Option<String>,
        /// Write what it lists into the event table of the pipeline's
        /// `dynamodb-stream` source instead of applying it: `iotdr run`
        /// then replicates it through its stages like any other event.
        #[arg(long, conflicts_with_all = ["dry_run", "query"])]
        into_table: bool,
        /// Do not ask IAM's policy simulator, before writing, whether these
        /// credentials may write in every target (for policies that allow
        /// writes on some names only, which the check cannot tell apart).
        #[arg(long)]
        skip_permission_check: bool,
    },
    /// Compares each target region with the source region passed through the
    /// pipeline's stages, entity by entity: things (attributes, type, groups,
    /// billing group, certificates), thing types, groups, billing groups,
    /// certificates (PEM, status, policies), policies (default document) and
    /// shadows (state). Exits 1 when a target drifted, 0 when all are equal.
    Verify {
        pipeline: PathBuf,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Send the drift to the targets (the source's events of what is
        /// missing or different, deletions of extras), then verify again.
        #[arg(long)]
        repair: bool,
        /// Do not ask IAM's policy simulator, before writing, whether these
        /// credentials may write in every target (for policies that allow
        /// writes on some names only, which the check cannot tell apart).
        #[arg(long)]
        skip_permission_check: bool,
    },
    /// Sets up the source region for live replication, idempotently: turns
    /// registry events on, creates the event table (with a NEW_IMAGE stream
    /// and a time to live) and the topic rules that fill it.
    Setup {
        pipeline: PathBuf,
        /// The IAM role the topic rules write to the table with.
        #[arg(long)]
        role_arn: String,
        /// The event table (default: the pipeline's `dynamodb-stream` table, else iotdr-events).
        #[arg(long)]
        table: Option<String>,
        /// How long items stay in the table (`48h`, `7d`).
        #[arg(long, default_value = "48h", value_parser = iotdr::config::interval)]
        ttl: Duration,
        /// Read, and print what it would change, without changing it.
        #[arg(long)]
        dry_run: bool,
    },
    /// MQTT health checks of each region of a DR file, served over HTTP.
    Health {
        #[command(subcommand)]
        command: HealthCommand,
    },
    /// The Route 53 failover records of a DR file: health checks, the
    /// failover CNAME pair of the devices' endpoint name and its TXT record.
    Failover {
        #[command(subcommand)]
        command: FailoverCommand,
    },
    /// Lists, replays or purges the dead letters of a pipeline (kept in its state folder).
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Works with plug-ins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SyncMode {
    Full,
    Smart,
}

#[derive(Subcommand)]
enum HealthCommand {
    /// Serves `/health/<region>` (an MQTT round trip made per request: 200
    /// or 503 with a JSON body), `/control-plane/<region>` (a cheap read of
    /// the region's IoT API) and `/health` (every region) on `[health] listen`.
    Serve { config: PathBuf },
    /// Runs each region's MQTT check once and prints the reports as JSON
    /// (exit 1 when one fails).
    Check { config: PathBuf },
}

#[derive(Subcommand)]
enum FailoverCommand {
    /// Creates or updates the health checks and records, keeping the
    /// current decision (the configured primary the first time).
    Apply {
        config: PathBuf,
        /// Print what it would change, without changing it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Sends devices to `region` first.
    Promote {
        config: PathBuf,
        region: String,
        #[arg(long)]
        dry_run: bool,
    },
    /// Sends devices to the configured primary first again.
    Failback {
        config: PathBuf,
        #[arg(long)]
        dry_run: bool,
    },
    /// Checks both regions every `watch_interval_ms` and promotes the other
    /// one when the serving primary fails `failure_threshold` checks in a
    /// row (and back, with `auto_failback`); prints each decision as a JSON line.
    Watch { config: PathBuf },
    /// Shows the decision, the records and Route 53's view of each health check.
    Status {
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Prints each dead letter as one JSON line: id, time, stage, reason, event or record.
    List { pipeline: PathBuf },
    /// Runs dead letters again from where they failed; those that go through are removed.
    Replay {
        pipeline: PathBuf,
        /// Only these ids (default: all).
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
    /// Deletes dead letters.
    Purge {
        pipeline: PathBuf,
        /// Only these ids.
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<i64>,
        /// Every dead letter of the pipeline.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Runs one plug-in over events and prints keep, drop, split or fail per event
    /// (exit code 3 when an event failed or did not decode).
    Test {
        /// The plug-in component (.wasm).
        plugin: PathBuf,
        /// JSON-lines events, in any form the decoder accepts.
        #[arg(long)]
        events: PathBuf,
        /// The stage config, as JSON.
        #[arg(long, default_value = "{}")]
        config: String,
        #[arg(long, default_value = "us-east-1")]
        source_region: String,
        /// Target regions the events start with, comma-separated.
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IOTDR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // The process's one async runtime: sources, the source region's reads
    // and the target regions' writes all run on it.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The pipeline's source, at its checkpoint (or its start, `from_start`).
#[allow(clippy::too_many_arguments)]
async fn open_source(
    config: &PipelineConfig,
    state: &StateStore,
    limiter: &Arc<Limiter>,
    from_start: bool,
    until_idle: bool,
    idle_after: Duration,
    scan_query: Option<&str>,
) -> Result<AnySource> {
    match &config.source {
        iotdr::config::Source::File { path } => {
            let key = FileSource::checkpoint_key(path);
            if from_start {
                state.remove_checkpoints(&key)?;
            }
            let checkpoint = state.checkpoint(&key)?;
            let file = FileSource::open(path, checkpoint.as_deref(), until_idle)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok(AnySource::File(file))
        }
        iotdr::config::Source::DynamodbStream { table, start } => {
            let prefix = DynamodbStream::checkpoint_prefix(table);
            if from_start {
                state.remove_checkpoints(&prefix)?;
            }
            let settings = config.regions.get(&config.source_region).cloned().unwrap_or_default();
            let clients = RegionClients::connect(&config.source_region, &settings, false)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to the source region {}: {e}", config.source_region))?;
            let stream = DynamodbStream::new(table, clients, limiter.clone(), *start, state.checkpoints(&prefix)?);
            Ok(AnySource::DynamodbStream(Box::new(stream)))
        }
        iotdr::config::Source::Mqtt(settings) => {
            // The broker keeps the session's place: there is nothing to forget here.
            let _ = from_start;
            let source = MqttSource::new(settings, idle_after, 4 * config.batch_size + 64)?;
            Ok(AnySource::Mqtt(Box::new(source)))
        }
        iotdr::config::Source::Scan => {
            let key = RegistryScan::checkpoint_key(&config.source_region, scan_query);
            if from_start {
                state.remove_checkpoints(&key)?;
            }
            let settings = config.regions.get(&config.source_region).cloned().unwrap_or_default();
            // Shadows are read too: the data plane is needed.
            let clients = RegionClients::connect(&config.source_region, &settings, true)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to the source region {}: {e}", config.source_region))?;
            let scan = RegistryScan::new(clients, limiter.clone(), state.checkpoint(&key)?.as_deref())
                .with_query(scan_query.map(str::to_string))
                .with_progress(Progress::for_stderr().listing(&format!("sync {}", config.source_region)));
            Ok(AnySource::Scan(Box::new(scan)))
        }
    }
}

/// `3s`, `500ms`, `2m`, or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((text, ""), |i| text.split_at(i));
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 3s or 500ms"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn engine(cache_dir: Option<PathBuf>) -> Result<PluginEngine> {
    PluginEngine::new(cache_dir.or_else(PluginEngine::default_cache_dir))
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("starting the WebAssembly engine")
}

async fn execute(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { pipeline } => {
            let config = PipelineConfig::load(&pipeline)?;
            let engine = engine(cli.cache_dir)?;
            let built = Pipeline::build(&config, &engine)?;
            let stages: Vec<&str> = built.stage_names().collect();
            println!(
                "{}: valid: pipeline `{}`, {} → {}, stages: {}",
                pipeline.display(),
                config.name,
                config.source_region,
                config.targets.join(", "),
                if stages.is_empty() { "none".to_string() } else { stages.join(" → ") }
            );
            // A pipeline whose own tests fail is not valid.
            let results = iotdr::pipeline_tests::run_all(&config, &engine)?;
            if results.iter().all(|r| r.passed()) {
                if !results.is_empty() {
                    println!("{}: its {} test(s) pass", pipeline.display(), results.len());
                }
                Ok(ExitCode::SUCCESS)
            } else {
                print!("{}", iotdr::pipeline_tests::render(&results));
                eprintln!("error: {}: its tests fail (see above)", pipeline.display());
                Ok(ExitCode::from(1))
            }
        }
        Command::Test { pipeline } => {
            let config = PipelineConfig::load(&pipeline)?;
            let engine = engine(cli.cache_dir)?;
            let results = iotdr::pipeline_tests::run_all(&config, &engine)?;
            if results.is_empty() {
                eprintln!("{}: no [[tests]] in this pipeline", pipeline.display());
            }
            print!("{}", iotdr::pipeline_tests::render(&results));
            Ok(if results.iter().all(|r| r.passed()) { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Sync { into_table: true, mode: SyncMode::Smart, .. } => {
            anyhow::bail!("--into-table copies everything: it works with --mode full only")
        }
        Command::Sync { pipeline, from_start, into_table: true, .. } => sync_into_table(&pipeline, from_start).await,
        Command::Sync {
            pipeline, dry_run, from_start: _, mode: SyncMode::Smart, query, skip_permission_check, ..
        } => smart_sync(&pipeline, dry_run, query, !skip_permission_check, cli.cache_dir).await,
        Command::Sync { pipeline, dry_run, from_start, mode: SyncMode::Full, query, skip_permission_check, .. } => {
            let mut config = PipelineConfig::load(&pipeline)?;
            if !dry_run {
                iotdr::preflight::check(&config, query.as_deref(), !skip_permission_check).await?;
            }
            config.source = iotdr::config::Source::Scan;
            let run = RunFlags {
                dry_run,
                until_idle: true,
                fetch: false,
                from_start,
                idle_after: Duration::ZERO,
                scan_query: query,
            };
            run_pipeline(&pipeline, config, run, cli.cache_dir).await
        }
        Command::Run { pipeline, dry_run, until_idle, fetch, from_start, idle_after } => {
            let config = PipelineConfig::load(&pipeline)?;
            if config.source == iotdr::config::Source::Scan {
                anyhow::bail!(
                    "{}: a `scan` source lists the whole source region once: run it with `iotdr sync {}`",
                    pipeline.display(),
                    pipeline.display()
                );
            }
            let run = RunFlags { dry_run, until_idle, fetch, from_start, idle_after, scan_query: None };
            run_pipeline(&pipeline, config, run, cli.cache_dir).await
        }
        Command::Verify { pipeline, json, repair, skip_permission_check } => {
            verify(&pipeline, json, repair, !skip_permission_check, cli.cache_dir).await
        }
        Command::Setup { pipeline, role_arn, table, ttl, dry_run } => {
            let config = PipelineConfig::load(&pipeline)?;
            let from_source = match &config.source {
                iotdr::config::Source::DynamodbStream { table, .. } => Some(table.clone()),
                _ => None,
            };
            let table = match (table, from_source) {
                (Some(given), Some(source)) if given != source => anyhow::bail!(
                    "--table {given}: {} reads the stream of table {source}; set up that one (leave --table out)",
                    pipeline.display()
                ),
                (given, source) => given.or(source).unwrap_or_else(|| iotdr::setup::DEFAULT_TABLE.to_string()),
            };
            let settings = iotdr::setup::Settings { table, role_arn, ttl, dry_run };
            let steps = iotdr::setup::setup(&config, &settings)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to the source region {}: {e}", config.source_region))?;
            println!("{}{}", config.source_region, if dry_run { " (dry run: nothing changed)" } else { "" });
            for step in &steps {
                println!("  {step}");
            }
            let failed = steps.iter().filter(|s| matches!(s.outcome, iotdr::setup::Outcome::Failed(_))).count();
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Health { command } => health(command).await,
        Command::Failover { command } => failover(command).await,
        Command::DeadLetters { command } => dead_letters(command, cli.cache_dir).await,
        Command::Plugin { command: PluginCommand::Test { plugin, events, config, source_region, targets } } => {
            serde_json::from_str::<serde_json::Value>(&config).context("--config is not JSON")?;
            let engine = engine(cli.cache_dir)?;
            let loaded = Arc::new(engine.load(&plugin)?);
            let mut runner = StageRunner::start("test", loaded, config, StageLimits::default())
                .with_context(|| format!("starting {}", plugin.display()))?;
            let mut source =
                FileSource::open(&events, None, true).with_context(|| format!("opening {}", events.display()))?;
            let mut out = std::io::stdout().lock();
            let mut failures = 0;
            loop {
                let records = source.next_batch(256)?;
                if records.is_empty() {
                    break;
                }
                let mut batch = Vec::new();
                for record in records {
                    match decode_line(&record.text, &source_region) {
                        Ok(mut event) => {
                            event.targets = targets.clone();
                            batch.push(event);
                        }
                        Err(e) => {
                            failures += 1;
                            let line = serde_json::json!({ "origin": record.origin, "outcome": "invalid", "reason": e.to_string() });
                            writeln!(out, "{line}")?;
                        }
                    }
                }
                let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
                for (id, fate) in ids.into_iter().zip(runner.process(batch)) {
                    let line = match fate {
                        Fate::Kept(event) => {
                            let event = iotdr::state::redacted(event);
                            serde_json::json!({ "id": id, "outcome": "keep", "event": event })
                        }
                        Fate::Split(events) => {
                            let events: Vec<_> = events.into_iter().map(iotdr::state::redacted).collect();
                            serde_json::json!({ "id": id, "outcome": "split", "events": events })
                        }
                        Fate::Dropped(_, reason) => {
                            serde_json::json!({ "id": id, "outcome": "drop", "reason": reason })
                        }
                        Fate::Failed(_, reason) => {
                            failures += 1;
                            serde_json::json!({ "id": id, "outcome": "fail", "reason": reason })
                        }
                    };
                    writeln!(out, "{line}")?;
                }
            }
            for (metric, value) in runner.counters() {
                eprintln!("counter {metric} = {value}");
            }
            // 3, not 2: clap exits 2 on a usage error.
            Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
    }
}

/// How `run` (or `sync`) was asked to run.
struct RunFlags {
    dry_run: bool,
    until_idle: bool,
    fetch: bool,
    from_start: bool,
    idle_after: Duration,
    /// `sync --query`: the things the scan lists.
    scan_query: Option<String>,
}

/// `iotdr run`, and `iotdr sync` (the same with the `scan` source).
async fn run_pipeline(
    pipeline: &std::path::Path,
    config: PipelineConfig,
    flags: RunFlags,
    cache_dir: Option<PathBuf>,
) -> Result<ExitCode> {
    let RunFlags { dry_run, until_idle, fetch, from_start, idle_after, ref scan_query } = flags;
    let engine = engine(cache_dir.clone())?;
    let mut built = Pipeline::build(&config, &engine)?;
    // One limiter for the run: one bucket per region and operation,
    // the source region's reads and the targets' writes alike.
    let limiter = Arc::new(Limiter::from_config(&config.apply));
    // A scan reads everything an event needs itself, and reads it now.
    let scan = config.source == iotdr::config::Source::Scan;
    let fetcher = if !scan && (fetch || !dry_run) {
        Some(
            SourceFetcher::connect(&config, limiter.clone())
                .await
                .map_err(|e| anyhow::anyhow!("connecting to the source region {}: {e}", config.source_region))?,
        )
    } else {
        None
    };
    // A dry run changes nothing: its queue and positions live in memory.
    // One run or sync per state folder: both drain its queue.
    let _lock = if dry_run { None } else { Some(FolderLock::take(&config.state_dir)?) };
    let state = Arc::new(if dry_run { StateStore::in_memory()? } else { StateStore::open(&config.state_dir)? });
    let mut source =
        open_source(&config, &state, &limiter, from_start, until_idle, idle_after, scan_query.as_deref()).await?;
    // A live run reconciles with its own instances of the stages (a sync never).
    let reconcile = match config.reconcile_every {
        Some(every) if !dry_run && !scan && !until_idle => Some(Reconcile {
            every,
            pipeline: tokio::sync::Mutex::new(Pipeline::build(&config, &engine)?),
            limiter: limiter.clone(),
        }),
        _ => None,
    };
    let options = Options {
        until_idle,
        poll_interval: Duration::from_millis(200),
        recheck_after: if dry_run { None } else { config.ingest.recheck_after },
        queue_limit: config.ingest.queue_limit,
        defer_reads_after: config.ingest.defer_reads_after,
        reconcile,
        // A run swaps in changes of its files (a sync lists once: never).
        reload: if !dry_run && !scan { Some(Reload::new(config.clone(), self::engine(cache_dir)?)) } else { None },
        admin: match &config.admin {
            Some(admin) if !dry_run && !scan => Some(start_admin(admin, pipeline, &limiter).await?),
            _ => None,
        },
    };
    if dry_run {
        let stdout = std::io::stdout();
        let mut sink = DryRun::new(stdout.lock());
        // Dead letters are reported on stderr.
        let report = |letter: &DeadLetter| {
            eprintln!("dead letter: {}", serde_json::to_string(&letter.redacted()).expect("JSON"));
        };
        let summary =
            run(&config, &state, &mut source, fetcher.as_ref(), &mut built, &mut sink, &options, &report).await?;
        eprintln!("summary: {}", serde_json::to_string(&summary).expect("JSON"));
        return Ok(ExitCode::SUCCESS);
    }
    let mut sink = AwsSink::connect(&config, state.clone(), limiter.clone()).await?;
    let stored = |_: &DeadLetter| {};
    let summary = run(&config, &state, &mut source, fetcher.as_ref(), &mut built, &mut sink, &options, &stored).await?;
    let stats = sink.stats();
    let changes = summary.changes;
    eprintln!(
        "summary: {}",
        serde_json::json!({
            "run": summary,
            "requests": stats,
            "source_requests": fetcher.as_ref().map(|f| f.stats()),
            "calls_per_change": if changes == 0 { 0.0 } else { stats.calls as f64 / changes as f64 },
        })
    );
    report_dead_letters(summary.dead_letters, &state, pipeline);
    Ok(ExitCode::SUCCESS)
}

/// Binds `[admin] listen` and serves it beside the run; the run loop answers.
async fn start_admin(
    admin: &iotdr::config::Admin,
    pipeline: &std::path::Path,
    limiter: &Arc<Limiter>,
) -> Result<AdminPart> {
    let token = iotdr::admin::token(admin).map_err(|e| anyhow::anyhow!("{}: {e}", pipeline.display()))?;
    let listener = tokio::net::TcpListener::bind(admin.listen)
        .await
        .with_context(|| format!("{}: binding admin.listen {}", pipeline.display(), admin.listen))?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let protected =
        if token.is_some() { "a bearer token required for /status and /reload" } else { "loopback only, no token" };
    tracing::info!("admin endpoint on http://{} ({protected}): /healthz /status /metrics /reload", admin.listen);
    if token.is_some() {
        eprintln!("admin endpoint on http://{}: /status and /reload require the bearer token", admin.listen);
    }
    tokio::spawn(iotdr::admin::serve(listener, token, tx));
    Ok(AdminPart { requests: tokio::sync::Mutex::new(rx), limiter: limiter.clone() })
}

/// Where the dead letters of a command went, when it made any.
fn report_dead_letters(count: u64, state: &StateStore, pipeline: &std::path::Path) {
    if count > 0 {
        eprintln!(
            "{count} dead letter(s) kept in {}: see `iotdr dead-letters list {}`",
            state.path().display(),
            pipeline.display()
        );
    }
}

/// `iotdr sync --into-table`: the source's registry written into the event
/// table of the pipeline's `dynamodb-stream` source.
async fn sync_into_table(pipeline: &std::path::Path, from_start: bool) -> Result<ExitCode> {
    let config = PipelineConfig::load(pipeline)?;
    let iotdr::config::Source::DynamodbStream { table, .. } = &config.source else {
        anyhow::bail!(
            "{}: --into-table writes into the event table of a `dynamodb-stream` source, and this pipeline's \
             [source] is not one",
            pipeline.display()
        );
    };
    let limiter = Arc::new(Limiter::from_config(&config.apply));
    let settings = config.regions.get(&config.source_region).cloned().unwrap_or_default();
    let connect = |data_plane| RegionClients::connect(&config.source_region, &settings, data_plane);
    let clients = connect(true)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the source region {}: {e}", config.source_region))?;
    // The table is checked before anything is listed.
    let event_table = iotdr::into_table::EventTable::open(clients.clone(), limiter.clone(), table)
        .await
        .context("the event table")?;
    let _lock = FolderLock::take(&config.state_dir)?;
    let state = StateStore::open(&config.state_dir)?;
    let key = iotdr::into_table::checkpoint_key(&config.source_region, table);
    if from_start {
        state.remove_checkpoints(&key)?;
    }
    let mut scan = RegistryScan::new(clients, limiter, state.checkpoint(&key)?.as_deref())
        .with_progress(Progress::for_stderr().listing(&format!("copy of {} into {table}", config.source_region)));
    let written = iotdr::into_table::copy(&mut scan, &event_table, &state)
        .await
        .with_context(|| format!("copying {} into table {table}", config.source_region))?;
    eprintln!("summary: {}", serde_json::json!({ "mode": "into-table", "table": table, "events": written }));
    Ok(ExitCode::SUCCESS)
}

/// `iotdr sync --mode smart`: verify, then write only the drift (no deletions).
async fn smart_sync(
    pipeline: &std::path::Path,
    dry_run: bool,
    query: Option<String>,
    check_permissions: bool,
    cache_dir: Option<PathBuf>,
) -> Result<ExitCode> {
    let config = PipelineConfig::load(pipeline)?;
    let engine = engine(cache_dir)?;
    let mut built = Pipeline::build(&config, &engine)?;
    let limiter = Arc::new(Limiter::from_config(&config.apply));
    let _lock = if dry_run { None } else { Some(FolderLock::take(&config.state_dir)?) };
    let state = Arc::new(if dry_run { StateStore::in_memory()? } else { StateStore::open(&config.state_dir)? });
    iotdr::preflight::check(&config, query.as_deref(), !dry_run && check_permissions).await?;
    let reads = Reads { query, ..Reads::expected() };
    let progress = Progress::for_stderr();
    let verification = iotdr::verify::verify(&config, &mut built, limiter.clone(), Some(&progress), &reads)
        .await
        .with_context(|| format!("comparing the targets of {} with the source", pipeline.display()))?;
    let compared: usize = verification.reports.iter().flat_map(|r| r.kinds.values()).map(|k| k.equal + k.drift()).sum();
    let (summary, requests) = if dry_run {
        let stdout = std::io::stdout();
        let mut sink = DryRun::new(stdout.lock());
        (iotdr::verify::sync_drift(&config, &mut built, &mut sink, &state, &verification).await?, None)
    } else {
        let mut sink = AwsSink::connect(&config, state.clone(), limiter.clone()).await?;
        let summary = iotdr::verify::sync_drift(&config, &mut built, &mut sink, &state, &verification).await?;
        (summary, Some(sink.stats()))
    };
    eprintln!(
        "summary: {}",
        serde_json::json!({ "mode": "smart", "compared": compared, "drifted": verification.drift(),
                            "run": summary, "requests": requests })
    );
    report_dead_letters(summary.dead_letters, &state, pipeline);
    Ok(ExitCode::SUCCESS)
}

/// `iotdr verify [--json] [--repair]`: exit 1 on drift (after the repair, with `--repair`).
async fn verify(
    pipeline: &std::path::Path,
    json: bool,
    repair: bool,
    check_permissions: bool,
    cache_dir: Option<PathBuf>,
) -> Result<ExitCode> {
    let config = PipelineConfig::load(pipeline)?;
    let engine = engine(cache_dir)?;
    let mut built = Pipeline::build(&config, &engine)?;
    let limiter = Arc::new(Limiter::from_config(&config.apply));
    let context = || format!("verifying {}", pipeline.display());
    // A region that does not answer would otherwise be retried for hours.
    iotdr::preflight::check(&config, None, repair && check_permissions).await?;
    let progress = Progress::for_stderr();
    let mut verification = iotdr::verify::verify(&config, &mut built, limiter.clone(), Some(&progress), &Reads::all())
        .await
        .with_context(context)?;
    let mut repaired = None;
    if repair && verification.drift() > 0 {
        if !json {
            print!("{}", iotdr::verify::render(&verification.reports));
        }
        // A repair writes like a run: it takes the state folder.
        let _lock = FolderLock::take(&config.state_dir)?;
        let state = Arc::new(StateStore::open(&config.state_dir)?);
        let mut sink = AwsSink::connect(&config, state.clone(), limiter.clone()).await?;
        let done = iotdr::verify::repair(&config, &mut built, &mut sink, &state, &verification)
            .await
            .with_context(|| format!("repairing the targets of {}", pipeline.display()))?;
        eprintln!("repair: {}", serde_json::to_string(&done).expect("JSON"));
        report_dead_letters(done.summary.dead_letters, &state, pipeline);
        let before = std::mem::replace(
            &mut verification,
            iotdr::verify::verify(&config, &mut built, limiter, Some(&progress), &Reads::all())
                .await
                .with_context(context)?,
        );
        repaired = Some((before.reports, done));
    }
    if json {
        let mut report = serde_json::json!({ "equal": verification.drift() == 0, "regions": verification.reports });
        if let Some((before, done)) = repaired {
            report["repair"] = serde_json::json!({ "before": before, "sent": done });
        }
        println!("{report}");
    } else {
        if repaired.is_some() {
            println!("after the repair:\n");
        }
        print!("{}", iotdr::verify::render(&verification.reports));
    }
    Ok(if verification.drift() == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn dead_letters(command: DeadLetterCommand, cache_dir: Option<PathBuf>) -> Result<ExitCode> {
    let pipeline = match &command {
        DeadLetterCommand::List { pipeline }
        | DeadLetterCommand::Replay { pipeline, .. }
        | DeadLetterCommand::Purge { pipeline, .. } => pipeline,
    };
    let config = PipelineConfig::load(pipeline)?;
    let state = Arc::new(StateStore::open(&config.state_dir)?);
    match command {
        DeadLetterCommand::List { .. } => {
            let mut out = std::io::stdout().lock();
            for stored in state.dead_letters()? {
                let mut line = serde_json::to_value(stored.letter.redacted()).expect("JSON");
                line["id"] = stored.id.into();
                writeln!(out, "{line}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetterCommand::Replay { ids, .. } => {
            let engine = engine(cache_dir)?;
            let mut built = Pipeline::build(&config, &engine)?;
            let limiter = Arc::new(Limiter::from_config(&config.apply));
            let mut sink = AwsSink::connect(&config, state.clone(), limiter.clone()).await?;
            let ids = (!ids.is_empty()).then_some(ids);
            // Letters that never completed (`decode`, `fetch`) read the source
            // again; connect to it only when one of them is replayed.
            let mut fetcher: Option<Result<SourceFetcher, String>> = None;
            let mut complete = async |events: Vec<Event>| {
                if fetcher.is_none() {
                    let connected = SourceFetcher::connect(&config, limiter.clone())
                        .await
                        .map_err(|e| format!("connecting to {}: {e}", config.source_region));
                    fetcher = Some(connected);
                }
                match fetcher.as_ref().expect("connected above") {
                    Ok(fetcher) => {
                        // A replay schedules no second reads: read everything now.
                        let plan = ReadPlan {
                            store: &state,
                            targets: &config.targets,
                            second_reads_from_ms: None,
                            defer_after: None,
                        };
                        let completed = fetcher.complete(events, Some(&plan)).await;
                        (completed.events, completed.dead_letters)
                    }
                    Err(reason) => {
                        let letters = events
                            .into_iter()
                            .map(|event| DeadLetter::for_event(Step::Fetch, reason.clone(), event))
                            .collect();
                        (Vec::new(), letters)
                    }
                }
            };
            let report = replay(&config, &mut built, &mut sink, &state, ids.as_deref(), &mut complete).await?;
            println!("{}", serde_json::to_string(&report).expect("JSON"));
            Ok(if report.still_failing == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
        DeadLetterCommand::Purge { ids, all, .. } => {
            let removed = state.remove_dead_letters(if all { None } else { Some(&ids) })?;
            println!("removed {removed} dead letter(s)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn health(command: HealthCommand) -> Result<ExitCode> {
    use iotdr::failover::{DrConfig, MqttCheck};
    match command {
        HealthCommand::Serve { config: file } => {
            let config = DrConfig::load(&file)?;
            let listen = config.health()?.listen;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("{}: health.listen {listen}", file.display()))?;
            eprintln!("serving health checks on http://{}", listener.local_addr()?);
            iotdr::failover::serve::serve(&config, listener)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        HealthCommand::Check { config: file } => {
            let config = DrConfig::load(&file)?;
            let health = config.health()?;
            let mut checks = Vec::new();
            for (name, region) in &config.regions {
                let credentials =
                    config.credentials(name).ok_or_else(|| anyhow::anyhow!("region {name}: no certificate"))?;
                checks.push(
                    MqttCheck::new(name, &region.mqtt_endpoint, credentials, health).map_err(anyhow::Error::msg)?,
                );
            }
            let reports = futures_util::future::join_all(checks.iter().map(MqttCheck::run)).await;
            for report in &reports {
                println!("{}", serde_json::to_string(report)?);
            }
            Ok(if reports.iter().all(|r| r.healthy) { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

async fn failover(command: FailoverCommand) -> Result<ExitCode> {
    use iotdr::failover::{DrConfig, Route53};
    if let FailoverCommand::Watch { config: file } = &command {
        let config = DrConfig::load(file)?;
        let print = |decided: &iotdr::failover::watch::Decided| {
            println!("{}", serde_json::to_string(decided).expect("a decision is JSON"));
        };
        iotdr::failover::watch::watch(&config, &print).await.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let (file, primary, dry_run) = match &command {
        FailoverCommand::Apply { config, dry_run } => (config, None, *dry_run),
        FailoverCommand::Promote { config, region, dry_run } => (config, Some(region.clone()), *dry_run),
        FailoverCommand::Failback { config, dry_run } => (config, None, *dry_run),
        FailoverCommand::Status { config, .. } => (config, None, true),
        FailoverCommand::Watch { .. } => unreachable!("watched above"),
    };
    let config = DrConfig::load(file)?;
    let failover = config.failover()?;
    let route53 = Route53::connect(&config).await.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let primary = match &command {
        FailoverCommand::Failback { .. } => Some(failover.primary.clone()),
        _ => primary,
    };
    if let Some(region) = &primary
        && region != &failover.primary
        && region != &failover.secondary
    {
        anyhow::bail!(
            "{}: {region} is neither the primary ({}) nor the secondary ({})",
            file.display(),
            failover.primary,
            failover.secondary
        );
    }
    let current = route53.current().await?;
    if let FailoverCommand::Status { json, .. } = command {
        return failover_status(&route53, &current, json).await;
    }
    let (decision, steps) = route53.plan(&current, primary.as_deref());
    println!(
        "{}: primary {}, secondary {}{}",
        route53.name(),
        decision.primary,
        decision.secondary,
        if dry_run { " (dry run: nothing changed)" } else { "" }
    );
    if steps.is_empty() {
        println!("  nothing to change");
    }
    for step in &steps {
        for line in step.to_string().lines() {
            println!("  {line}");
        }
    }
    if !dry_run {
        route53.execute(steps).await?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn failover_status(
    route53: &iotdr::failover::Route53,
    current: &iotdr::failover::route53::Current,
    json: bool,
) -> Result<ExitCode> {
    let decision = current.decision.clone();
    let mut checks = Vec::new();
    for (region, existing) in &current.health_checks {
        for check in existing {
            let (healthy, observed) = route53.check_status(&check.id).await?;
            checks.push(serde_json::json!({
                "region": region, "id": check.id, "healthy_checkers": healthy, "checkers": observed,
            }));
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "name": route53.name(), "decision": decision, "records": current.records, "health_checks": checks })
        );
        return Ok(ExitCode::SUCCESS);
    }
    match &decision {
        Some(d) => println!("{}: primary {}, secondary {}", route53.name(), d.primary, d.secondary),
        None => println!("{}: no decision recorded (run `iotdr failover apply`)", route53.name()),
    }
    for record in &current.records {
        println!(
            "  {} {} {} -> {}{}",
            record.kind,
            record.name,
            record.failover.as_deref().unwrap_or("-"),
            record.values.join(" "),
            record.health_check_id.as_deref().map(|id| format!(" (health check {id})")).unwrap_or_default()
        );
    }
    for check in &checks {
        println!(
            "  health check {} of {}: {} of {} Route 53 checkers see it healthy",
            check["id"].as_str().unwrap_or_default(),
            check["region"].as_str().unwrap_or_default(),
            check["healthy_checkers"],
            check["checkers"]
        );
    }
    Ok(ExitCode::SUCCESS)
}
