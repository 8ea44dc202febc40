//! Pipeline files: parsing, `${VAR}` interpolation and validation, with errors
//! that name the file, line and column of what is wrong.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

use crate::event::Entity;
use crate::plugin::StageLimits;

/// A problem in a pipeline file, at a place in it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no single place (an unreadable file).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// The events the stage failed on go to the dead-letter store; the rest go on.
    DeadLetter,
    /// The events the stage failed on go on as if the stage were not there.
    Skip,
    /// The run stops; nothing after the failing batch is checkpointed.
    Halt,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    pub source_region: String,
    pub targets: Vec<String>,
    pub batch_size: usize,
    pub regions: BTreeMap<String, Region>,
    pub source: Source,
    pub stages: Vec<Stage>,
    pub apply: Apply,
    pub ingest: Ingest,
    /// How often `iotdr run` compares the targets with the source and queues
    /// the drift (`[reconcile] every`); `None`: never.
    pub reconcile_every: Option<Duration>,
    pub state_dir: PathBuf,
    /// The file's `[[tests]]` (`iotdr test`, `iotdr validate`).
    pub tests: Vec<PipelineTest>,
    /// The admin HTTP endpoint of `iotdr run` (`[admin]`).
    pub admin: Option<Admin>,
}

/// `[admin]`: where `iotdr run` serves `/status`, `/metrics`, `/reload`, `/healthz`.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: std::net::SocketAddr,
    /// The bearer token for `/status` and `/reload`, read from this file
    /// (else from IOTDR_ADMIN_TOKEN); required off loopback.
    pub token_file: Option<PathBuf>,
}

/// One `[[tests]]` of a pipeline file: records in, what must come out.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineTest {
    pub name: String,
    /// Where it is in the file (`line:column`), for reports.
    pub place: String,
    /// Records given inline, one per string, in any form the decoder accepts.
    pub input: Vec<String>,
    /// A JSON-lines file of records (read when the test runs).
    pub input_file: Option<PathBuf>,
    /// Checked after this stage instead of after the whole pipeline.
    pub after: Option<String>,
    pub expect: Expected,
}

/// What a pipeline test expects of the events that come out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Expected {
    pub outcome: Outcome,
    /// How many events come out (a split makes several).
    pub count: Option<usize>,
    /// What every event has.
    pub every: EventExpect,
    /// What each event has, in order (`[[tests.events]]`); when given, as
    /// many events must come out.
    pub each: Vec<EventExpect>,
}

/// What one event that comes out of a pipeline test must have.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventExpect {
    /// The target regions (in any order).
    pub targets: Option<Vec<String>>,
    /// The entity name (after a rename).
    pub event_name: Option<String>,
    /// Attributes it has, with these values.
    pub attributes: BTreeMap<String, String>,
    /// Attributes it does not have.
    pub absent_attributes: Vec<String>,
    /// Its document, compared as JSON (a mapped policy).
    pub document: Option<serde_json::Value>,
    /// Related names it carries (`policy`, `thing-group`, ...).
    pub related: BTreeMap<String, String>,
}

/// What becomes of a test's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// At least one event comes out, and none failed.
    #[default]
    Kept,
    /// Every input is dropped by a stage on purpose.
    Dropped,
    /// A stage fails on an input (a dead letter, or a halt).
    Failed,
}

/// How records become queued events (`[ingest]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Ingest {
    /// Things and JITR certificates are read from the source again this long
    /// after an event about them; `None` (0 in the file) never.
    pub recheck_after: Option<Duration>,
    /// Reading the source pauses while this many events wait to be applied.
    pub queue_limit: u64,
    /// How long an ingest read retries a source that does not answer before
    /// its event is left to a second read; `None` (0 in the file): until the
    /// retry deadline. Only with second reads.
    pub defer_reads_after: Option<Duration>,
}

impl Default for Ingest {
    fn default() -> Self {
        Ingest {
            recheck_after: Some(Duration::from_secs(30)),
            queue_limit: 10_000,
            defer_reads_after: Some(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Region {
    /// Where the region's AWS APIs are (an emulator, a VPC endpoint); AWS's own when unset.
    pub endpoint_url: Option<String>,
    /// The IoT data plane (shadows); else `endpoint_url`, else what `DescribeEndpoint` says.
    pub data_endpoint_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// JSON lines, one record each (replays, tests, examples).
    File {
        path: PathBuf,
    },
    /// The stream of the table an IoT topic rule fills with events.
    DynamodbStream {
        table: String,
        /// Where a shard without a checkpoint starts.
        start: StreamStart,
    },
    /// The source region's MQTT endpoint, subscribed to directly.
    Mqtt(crate::source::MqttSettings),
    Scan,
}

/// Where a stream shard without a checkpoint is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StreamStart {
    /// The oldest record the stream still holds (24 hours on AWS).
    #[default]
    TrimHorizon,
    /// Only what arrives after the run starts.
    Latest,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub plugin: PathBuf,
    /// The stage's `config` table as JSON, what the plug-in's `init` receives.
    pub config_json: String,
    pub limits: StageLimits,
    pub on_error: OnError,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Apply {
    /// Entities that are applied to the targets; the others are dropped after the stages.
    pub replicate: Vec<Entity>,
    pub global_registry_table: Option<String>,
    /// Where that table is; the first target when unset.
    pub global_registry_region: Option<String>,
    /// Changes applied at once per batch (different keys only; one key is always sequential).
    pub concurrency: usize,
    /// How long an API call is retried on throttling and transient failures
    /// (5xx, timeouts, unreachable endpoints) before its change fails.
    pub retry_deadline: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Requests per second per region, by AWS operation name, over the built-in defaults.
    pub rate_limits: BTreeMap<String, f64>,
    /// Policies attached in the targets to every certificate that arrives through JITR.
    pub jitr_policies: Vec<String>,
    /// How often a call whose dependency is missing in the target is tried
    /// again in place, and the pause between (growing 1×, 2×, 3× …).
    pub dependency_attempts: u32,
    pub dependency_pause: Duration,
    /// How long a run keeps a change whose dependency is missing waiting for
    /// it (tried again after pauses that start at `dependency_pause` and
    /// double) before it is dead-lettered.
    pub dependency_deadline: Duration,
}

impl Default for Apply {
    fn default() -> Self {
        Apply {
            replicate: Entity::ALL.to_vec(),
            global_registry_table: None,
            global_registry_region: None,
            concurrency: 16,
            retry_deadline: Duration::from_secs(6 * 3600),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(20),
            rate_limits: BTreeMap::new(),
            jitr_policies: Vec::new(),
            // A run does not hold its batch for a missing dependency: the
            // change waits in the store, and the batch goes on.
            dependency_attempts: 0,
            dependency_pause: Duration::from_millis(250),
            dependency_deadline: Duration::from_secs(3600),
        }
    }
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pipeline: RawPipeline,
    #[serde(default)]
    regions: BTreeMap<Spanned<String>, RawRegion>,
    source: Spanned<RawSource>,
    #[serde(default)]
    stage: Vec<RawStage>,
    #[serde(default)]
    apply: RawApply,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    reconcile: RawReconcile,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    tests: Vec<Spanned<RawTest>>,
    admin: Option<Spanned<RawAdmin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    token_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Spanned<String>,
    #[serde(default)]
    input: Vec<String>,
    input_file: Option<Spanned<String>>,
    after: Option<Spanned<String>>,
    #[serde(default)]
    expect: Outcome,
    count: Option<usize>,
    #[serde(flatten)]
    every: RawEventExpect,
    #[serde(default)]
    events: Vec<RawEventExpect>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEventExpect {
    targets: Option<Vec<String>>,
    event_name: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    absent_attributes: Vec<String>,
    // Not `Spanned`: a flattened table loses the spans (errors name the test).
    document: Option<String>,
    #[serde(default)]
    related: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReconcile {
    every: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    recheck_after_ms: Option<Spanned<i64>>,
    queue_limit: Option<Spanned<i64>>,
    defer_reads_after_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: String,
    source_region: Spanned<String>,
    targets: Spanned<Vec<Spanned<String>>>,
    batch_size: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    endpoint_url: Option<String>,
    data_endpoint_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum RawSource {
    File {
        path: String,
    },
    DynamodbStream {
        table: String,
        #[serde(default)]
        start: StreamStart,
    },
    Mqtt {
        endpoint: String,
        ca: String,
        certificate: String,
        private_key: String,
        client_id: String,
        topics: Option<Vec<String>>,
    },
    Scan {},
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Spanned<String>,
    plugin: Spanned<String>,
    #[serde(default)]
    config: Option<toml::Table>,
    #[serde(default)]
    limits: Option<Spanned<RawLimits>>,
    #[serde(default = "default_on_error")]
    on_error: OnError,
}

fn default_on_error() -> OnError {
    OnError::DeadLetter
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory_mb: Option<i64>,
    timeout_ms: Option<i64>,
    batches_per_instance: Option<i64>,
    retries: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApply {
    replicate: Option<Spanned<Vec<Spanned<String>>>>,
    global_registry_table: Option<String>,
    global_registry_region: Option<Spanned<String>>,
    concurrency: Option<Spanned<i64>>,
    /// Replaced by `retry_deadline_ms`; read only to say so.
    max_attempts: Option<Spanned<i64>>,
    retry_deadline_ms: Option<Spanned<i64>>,
    initial_backoff_ms: Option<Spanned<i64>>,
    max_backoff_ms: Option<Spanned<i64>>,
    #[serde(default)]
    rate_limits: BTreeMap<Spanned<String>, Spanned<f64>>,
    dependency_attempts: Option<Spanned<i64>>,
    dependency_pause_ms: Option<Spanned<i64>>,
    dependency_deadline_ms: Option<Spanned<i64>>,
    #[serde(default)]
    jitr_policies: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<String>,
}

/// The names `apply.replicate` accepts, and the entities each covers.
pub const REPLICATE_KINDS: [(&str, &[Entity]); 7] = [
    ("things", &[Entity::Thing, Entity::ThingTypeAssociation]),
    ("thing-types", &[Entity::ThingType]),
    ("thing-groups", &[Entity::ThingGroup, Entity::ThingGroupMembership, Entity::ThingGroupHierarchy]),
    ("billing-groups", &[Entity::BillingGroup, Entity::BillingGroupMembership]),
    ("certificates", &[Entity::Certificate]),
    ("policies", &[Entity::Policy]),
    ("shadows", &[Entity::Shadow]),
];

impl Pipeline {
    /// Reads, interpolates and validates a pipeline file. Relative paths in it
    /// are relative to the file's folder.
    pub fn load(file: &Path) -> Result<Pipeline, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        Pipeline::parse(file, &text, &|name| std::env::var(name).ok())
    }

    /// Parses `text` as if read from `file`; `env` resolves `${VAR}`.
    pub fn parse(file: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Pipeline, ConfigError> {
        let (raw, located) = TomlFile::read::<RawFile>(file, text, env)?;
        let at = |span: Range<usize>, message: String| located.at(span, message);
        let base = file.parent().unwrap_or(Path::new("."));

        let source_region = raw.pipeline.source_region.get_ref().clone();
        check_region(&source_region).map_err(|m| at(raw.pipeline.source_region.span(), m))?;
        if raw.pipeline.targets.get_ref().is_empty() {
            return Err(at(raw.pipeline.targets.span(), "`targets` needs at least one region".into()));
        }
        let mut targets = Vec::new();
        for target in raw.pipeline.targets.get_ref() {
            check_region(target.get_ref()).map_err(|m| at(target.span(), m))?;
            if *target.get_ref() == source_region {
                return Err(at(target.span(), format!("target {source_region} is the source region")));
            }
            if targets.contains(target.get_ref()) {
                return Err(at(target.span(), format!("target {} is listed twice", target.get_ref())));
            }
            targets.push(target.get_ref().clone());
        }
        let batch_size = match raw.pipeline.batch_size {
            None => 256,
            Some(size) if (1..=65_536).contains(size.get_ref()) => *size.get_ref() as usize,
            Some(size) => {
                return Err(at(size.span(), format!("batch_size {} is out of range 1..=65536", size.get_ref())));
            }
        };

        let mut regions = BTreeMap::new();
        for (name, region) in raw.regions {
            check_region(name.get_ref()).map_err(|m| at(name.span(), m))?;
            regions.insert(
                name.into_inner(),
                Region { endpoint_url: region.endpoint_url, data_endpoint_url: region.data_endpoint_url },
            );
        }

        let source_span = raw.source.span();
        let source = match raw.source.into_inner() {
            RawSource::File { path } => {
                let resolved = base.join(&path);
                if !resolved.is_file() {
                    return Err(at(source_span, format!("source file not found: {}", resolved.display())));
                }
                Source::File { path: resolved }
            }
            RawSource::DynamodbStream { table, start } => {
                if table.is_empty() {
                    return Err(at(source_span, "source.table cannot be empty".into()));
                }
                Source::DynamodbStream { table, start }
            }
            RawSource::Mqtt { endpoint, ca, certificate, private_key, client_id, topics } => {
                if !endpoint
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                {
                    return Err(at(source_span, format!("source.endpoint `{endpoint}` is not host:port")));
                }
                if client_id.is_empty() {
                    return Err(at(source_span, "source.client_id cannot be empty".into()));
                }
                let file = |key: &str, path: &str| {
                    let resolved = base.join(path);
                    if resolved.is_file() {
                        Ok(resolved)
                    } else {
                        Err(at(source_span.clone(), format!("source.{key}: file not found: {}", resolved.display())))
                    }
                };
                let settings = crate::source::MqttSettings {
                    ca: file("ca", &ca)?,
                    certificate: file("certificate", &certificate)?,
                    private_key: file("private_key", &private_key)?,
                    endpoint,
                    client_id,
                    topics: topics
                        .unwrap_or_else(|| crate::source::MQTT_DEFAULT_TOPICS.iter().map(|t| t.to_string()).collect()),
                };
                if settings.topics.is_empty() {
                    return Err(at(source_span, "source.topics cannot be empty".into()));
                }
                Source::Mqtt(settings)
            }
            RawSource::Scan {} => Source::Scan,
        };

        let mut stages: Vec<Stage> = Vec::new();
        for stage in raw.stage {
            let name = stage.name.get_ref();
            if name.is_empty() {
                return Err(at(stage.name.span(), "a stage name cannot be empty".into()));
            }
            if stages.iter().any(|s| &s.name == name) {
                return Err(at(stage.name.span(), format!("duplicate stage name `{name}`")));
            }
            let plugin = base.join(stage.plugin.get_ref());
            if !plugin.is_file() {
                return Err(at(
                    stage.plugin.span(),
                    format!(
                        "plug-in file not found: {} (the bundled plug-ins are built by scripts/build-plugins.sh)",
                        plugin.display()
                    ),
                ));
            }
            let limits = match stage.limits {
                None => StageLimits::default(),
                Some(limits) => stage_limits(limits.get_ref()).map_err(|m| at(limits.span(), m))?,
            };
            let config_json = serde_json::to_string(&stage.config.unwrap_or_default()).expect("TOML values are JSON");
            stages.push(Stage { name: name.clone(), plugin, config_json, limits, on_error: stage.on_error });
        }

        let mut tests = Vec::new();
        for test in raw.tests {
            let span = test.span();
            let test = test.into_inner();
            let ConfigError { line, column, .. } = located.at(test.name.span(), String::new());
            if test.input.is_empty() && test.input_file.is_none() {
                return Err(at(span, format!("test `{}` has no `input` and no `input_file`", test.name.get_ref())));
            }
            if let Some(after) = &test.after
                && !stages.iter().any(|s| &s.name == after.get_ref())
            {
                let known: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
                return Err(at(
                    after.span(),
                    format!(
                        "test `{}`: no stage `{}` (stages: {})",
                        test.name.get_ref(),
                        after.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
            let name = test.name.get_ref();
            let expectation = |raw: RawEventExpect| -> Result<EventExpect, ConfigError> {
                let document = match &raw.document {
                    None => None,
                    Some(text) => Some(
                        serde_json::from_str(text)
                            .map_err(|e| at(test.name.span(), format!("test `{name}`: `document` is not JSON: {e}")))?,
                    ),
                };
                Ok(EventExpect {
                    targets: raw.targets,
                    event_name: raw.event_name,
                    attributes: raw.attributes,
                    absent_attributes: raw.absent_attributes,
                    document,
                    related: raw.related,
                })
            };
            let expect = Expected {
                outcome: test.expect,
                count: test.count,
                every: expectation(test.every)?,
                each: test.events.into_iter().map(expectation).collect::<Result<_, _>>()?,
            };
            tests.push(PipelineTest {
                place: format!("{line}:{column}"),
                input: test.input,
                input_file: test.input_file.map(|path| base.join(path.get_ref())),
                after: test.after.map(Spanned::into_inner),
                expect,
                name: test.name.into_inner(),
            });
        }

        let admin = match raw.admin {
            None => None,
            Some(admin) => {
                let span = admin.span();
                let admin = admin.into_inner();
                let listen = admin.listen.parse().map_err(|_| {
                    at(
                        span.clone(),
                        format!("admin.listen `{}` is not an address and port (127.0.0.1:9464)", admin.listen),
                    )
                })?;
                Some(Admin { listen, token_file: admin.token_file.map(|f| base.join(f)) })
            }
        };

        let mut raw_apply = raw.apply;
        let replicate = match raw_apply.replicate.take() {
            None => Entity::ALL.to_vec(),
            Some(kinds) => {
                let mut entities = Vec::new();
                for kind in kinds.get_ref() {
                    let covered = REPLICATE_KINDS.iter().find(|(name, _)| name == kind.get_ref()).ok_or_else(|| {
                        let known: Vec<&str> = REPLICATE_KINDS.iter().map(|(n, _)| *n).collect();
                        at(kind.span(), format!("unknown kind `{}` (known: {})", kind.get_ref(), known.join(", ")))
                    })?;
                    entities.extend_from_slice(covered.1);
                }
                entities
            }
        };

        Ok(Pipeline {
            file: file.to_path_buf(),
            name: raw.pipeline.name,
            source_region,
            targets,
            batch_size,
            regions,
            source,
            stages,
            apply: apply_settings(raw_apply, replicate, &at)?,
            ingest: ingest_settings(&raw.ingest, &at)?,
            reconcile_every: match &raw.reconcile.every {
                None => None,
                Some(every) => {
                    Some(interval(every.get_ref()).map_err(|e| at(every.span(), format!("reconcile.every: {e}")))?)
                }
            },
            state_dir: base.join(raw.state.dir.as_deref().unwrap_or(".iotdr-state")),
            tests,
            admin,
        })
    }
}

fn apply_settings(
    raw: RawApply,
    replicate: Vec<Entity>,
    at: &dyn Fn(Range<usize>, String) -> ConfigError,
) -> Result<Apply, ConfigError> {
    let defaults = Apply::default();
    let bounded = |value: &Option<Spanned<i64>>, name: &str, range: Range<i64>| -> Result<Option<i64>, ConfigError> {
        match value {
            Some(v) if !range.contains(v.get_ref()) => Err(at(
                v.span(),
                format!("apply.{name} = {} is out of range {}..={}", v.get_ref(), range.start, range.end - 1),
            )),
            Some(v) => Ok(Some(*v.get_ref())),
            None => Ok(None),
        }
    };
    let millis = |ms: i64| Duration::from_millis(ms as u64);
    if let Some(attempts) = &raw.max_attempts {
        return Err(at(
            attempts.span(),
            "apply.max_attempts is gone: throttling and transient failures are retried until \
             apply.retry_deadline_ms (default 6 hours) instead of a number of attempts"
                .into(),
        ));
    }
    let mut rate_limits = BTreeMap::new();
    for (operation, rate) in raw.rate_limits {
        let name = operation.get_ref();
        if name != "*" && (name.is_empty() || !name.chars().next().is_some_and(|c| c.is_ascii_uppercase())) {
            return Err(at(
                operation.span(),
                format!("`{name}` is not an AWS operation name (like CreateThing) or `*`"),
            ));
        }
        if !(rate.get_ref().is_finite() && *rate.get_ref() > 0.0) {
            return Err(at(rate.span(), format!("rate for {name} must be a positive number of requests per second")));
        }
        rate_limits.insert(operation.into_inner(), *rate.get_ref());
    }
    let apply = Apply {
        replicate,
        global_registry_table: raw.global_registry_table,
        global_registry_region: match raw.global_registry_region {
            Some(region) => {
                check_region(region.get_ref()).map_err(|m| at(region.span(), m))?;
                Some(region.into_inner())
            }
            None => None,
        },
        concurrency: bounded(&raw.concurrency, "concurrency", 1..1025)?.map_or(defaults.concurrency, |n| n as usize),
        retry_deadline: bounded(&raw.retry_deadline_ms, "retry_deadline_ms", 1..604_800_001)?
            .map_or(defaults.retry_deadline, millis),
        initial_backoff: bounded(&raw.initial_backoff_ms, "initial_backoff_ms", 1..600_001)?
            .map_or(defaults.initial_backoff, millis),
        max_backoff: bounded(&raw.max_backoff_ms, "max_backoff_ms", 1..3_600_001)?.map_or(defaults.max_backoff, millis),
        rate_limits,
        jitr_policies: raw.jitr_policies,
        dependency_attempts: bounded(&raw.dependency_attempts, "dependency_attempts", 0..101)?
            .map_or(defaults.dependency_attempts, |n| n as u32),
        dependency_pause: bounded(&raw.dependency_pause_ms, "dependency_pause_ms", 0..600_001)?
            .map_or(defaults.dependency_pause, millis),
        dependency_deadline: bounded(&raw.dependency_deadline_ms, "dependency_deadline_ms", 0..604_800_001)?
            .map_or(defaults.dependency_deadline, millis),
    };
    if apply.initial_backoff > apply.max_backoff {
        let span = raw.initial_backoff_ms.as_ref().map_or(0..0, |v| v.span());
        return Err(at(span, "apply.initial_backoff_ms is larger than max_backoff_ms".into()));
    }
    Ok(apply)
}

fn ingest_settings(raw: &RawIngest, at: &dyn Fn(Range<usize>, String) -> ConfigError) -> Result<Ingest, ConfigError> {
    let defaults = Ingest::default();
    let bounded = |value: &Option<Spanned<i64>>, name: &str, range: Range<i64>| match value {
        Some(v) if !range.contains(v.get_ref()) => Err(at(
            v.span(),
            format!("ingest.{name} = {} is out of range {}..={}", v.get_ref(), range.start, range.end - 1),
        )),
        Some(v) => Ok(Some(*v.get_ref())),
        None => Ok(None),
    };
    Ok(Ingest {
        recheck_after: match bounded(&raw.recheck_after_ms, "recheck_after_ms", 0..86_400_001)? {
            None => defaults.recheck_after,
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms as u64)),
        },
        queue_limit: bounded(&raw.queue_limit, "queue_limit", 1..10_000_001)?
            .map_or(defaults.queue_limit, |n| n as u64),
        defer_reads_after: match bounded(&raw.defer_reads_after_ms, "defer_reads_after_ms", 0..86_400_001)? {
            None => defaults.defer_reads_after,
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms as u64)),
        },
    })
}

/// `90s`, `15m`, `1h`, `1d`: at least a second, at most a week.
pub fn interval(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 90s, 15m or 1h"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => return Err(format!("`{text}`: the unit is one of s, m, h, d (`90s`, `15m`, `1h`)")),
    };
    if !(1..=7 * 86_400).contains(&seconds) {
        return Err(format!("`{text}` is out of range 1s..=7d"));
    }
    Ok(Duration::from_secs(seconds))
}

fn stage_limits(raw: &RawLimits) -> Result<StageLimits, String> {
    let defaults = StageLimits::default();
    let bounded = |value: Option<i64>, name: &str, range: Range<i64>| -> Result<Option<i64>, String> {
        match value {
            Some(v) if !range.contains(&v) => {
                Err(format!("limits.{name} = {v} is out of range {}..={}", range.start, range.end - 1))
            }
            other => Ok(other),
        }
    };
    Ok(StageLimits {
        memory_bytes: bounded(raw.memory_mb, "memory_mb", 1..4097)?
            .map_or(defaults.memory_bytes, |mb| (mb as usize) << 20),
        timeout: bounded(raw.timeout_ms, "timeout_ms", 1..600_001)?
            .map_or(defaults.timeout, |ms| Duration::from_millis(ms as u64)),
        batches_per_instance: bounded(raw.batches_per_instance, "batches_per_instance", 1..1_000_001)?
            .map_or(defaults.batches_per_instance, |n| n as u32),
        retries: bounded(raw.retries, "retries", 0..11)?.map_or(defaults.retries, |n| n as u32),
    })
}

/// A shared secret: the first line of `file` (named `setting` in errors),
/// else the environment variable `env`; none when empty or unset.
pub fn read_secret(file: Option<&Path>, setting: &str, env: &str) -> Result<Option<String>, String> {
    let secret = match file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| format!("{setting} {}: {e}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        None => std::env::var(env).ok(),
    };
    Ok(secret.filter(|s| !s.is_empty()))
}

/// AWS region names: lowercase words and a number (`eu-west-1`, `us-gov-west-1`).
pub fn check_region(name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('-').collect();
    let ok = parts.len() >= 3
        && parts.last().is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        && parts[..parts.len() - 1].iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()));
    if ok { Ok(()) } else { Err(format!("`{name}` is not an AWS region name (like eu-west-1)")) }
}

/// One replacement made by [`interpolate`]: `out` in the result stands for `original` in the file.
struct Substitution {
    out: Range<usize>,
    original: Range<usize>,
}

/// A TOML file as written, read with `${VAR}` interpolation: errors about
/// it name places in the file as written (its other config files use it too).
pub(crate) struct TomlFile<'a> {
    file: &'a Path,
    original: &'a str,
    substitutions: Vec<Substitution>,
}

impl<'a> TomlFile<'a> {
    /// Interpolates `text` (read from `file`) and deserializes it.
    pub(crate) fn read<T: serde::de::DeserializeOwned>(
        file: &'a Path,
        text: &'a str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(T, TomlFile<'a>), ConfigError> {
        let mut located = TomlFile { file, original: text, substitutions: Vec::new() };
        let (interpolated, substitutions) =
            interpolate(text, env).map_err(|(offset, message)| located.at_original(offset, message))?;
        located.substitutions = substitutions;
        let raw =
            toml::from_str(&interpolated).map_err(|e| located.at(e.span().unwrap_or(0..0), e.message().to_string()))?;
        Ok((raw, located))
    }

    /// An error at `span` of the interpolated text.
    pub(crate) fn at(&self, span: Range<usize>, message: String) -> ConfigError {
        self.at_original(original_offset(&self.substitutions, span.start), message)
    }

    fn at_original(&self, offset: usize, message: String) -> ConfigError {
        let (line, column) = line_column(self.original, offset);
        ConfigError { file: self.file.to_path_buf(), line, column, message }
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` (the default when NAME is unset);
/// `$${` is a literal `${`. Errors carry the byte offset of the reference.
fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, Vec<Substitution>), (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut substitutions = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            let from = out.len();
            out.push_str("${");
            substitutions.push(Substitution { out: from..out.len(), original: offset + start - 1..offset + start + 2 });
            rest = &rest[start + 2..];
            offset += start + 2;
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or((offset + start, "unclosed `${`".to_string()))?;
        let reference = &after[..end];
        let (name, default) = match reference.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (reference, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((offset + start, format!("`${{{reference}}}` is not a variable reference")));
        }
        let consumed = start + 2 + end + 1;
        match env(name).or(default.map(str::to_string)) {
            Some(value) => {
                let from = out.len();
                out.push_str(&value);
                substitutions.push(Substitution { out: from..out.len(), original: offset + start..offset + consumed });
            }
            None => return Err((offset + start, format!("environment variable {name} is not set"))),
        }
        rest = &rest[consumed..];
        offset += consumed;
    }
    out.push_str(rest);
    Ok((out, substitutions))
}

/// Where an offset of the interpolated text was in the file as written; a
/// place inside a substituted value maps to its `${...}`.
fn original_offset(substitutions: &[Substitution], offset: usize) -> usize {
    let mut shift: isize = 0;
    for substitution in substitutions {
        if offset < substitution.out.start {
            break;
        }
        if offset < substitution.out.end {
            return substitution.original.start;
        }
        shift = substitution.original.end as isize - substitution.out.end as isize;
    }
    offset.saturating_add_signed(shift)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation() {
        let env = |name: &str| (name == "HOST").then(|| "127.0.0.1".to_string());
        assert_eq!(
            interpolate("url = \"http://${HOST}:${PORT:-5000}\"", &env).unwrap().0,
            "url = \"http://127.0.0.1:5000\""
        );
        assert_eq!(interpolate("a = \"$${HOST}\"", &env).unwrap().0, "a = \"${HOST}\"");
        assert_eq!(
            interpolate("a = \"${NOPE}\"", &env).map(|r| r.0).unwrap_err(),
            (5, "environment variable NOPE is not set".into())
        );
        assert!(interpolate("a = \"${", &env).is_err());
    }

    #[test]
    fn retries_have_a_deadline_not_a_count() {
        let file = |apply: &str| {
            format!(
                "[pipeline]\nname = \"p\"\nsource_region = \"us-east-1\"\ntargets = [\"eu-west-1\"]\n[source]\nkind = \"scan\"\n[apply]\n{apply}\n"
            )
        };
        let parse = |apply: &str| Pipeline::parse(Path::new("p.toml"), &file(apply), &|_| None);
        assert_eq!(parse("").unwrap().apply.retry_deadline, Duration::from_secs(6 * 3600));
        assert_eq!(parse("retry_deadline_ms = 1500").unwrap().apply.retry_deadline, Duration::from_millis(1500));
        let error = parse("max_attempts = 8").unwrap_err();
        assert_eq!(error.line, 8, "{error}");
        assert!(error.message.contains("retry_deadline_ms"), "{error}");
        assert!(parse("retry_deadline_ms = 0").is_err());
    }

    #[test]
    fn an_mqtt_source_names_what_is_wrong_and_defaults_its_topics() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(name), "-").unwrap();
        }
        let file = |source: &str| {
            format!(
                "[pipeline]\nname = \"p\"\nsource_region = \"us-east-1\"\ntargets = [\"eu-west-1\"]\n[source]\nkind = \"mqtt\"\n{source}\n"
            )
        };
        let keys = |endpoint: &str, key: &str| {
            format!(
                "endpoint = \"{endpoint}\"\nca = \"ca.pem\"\ncertificate = \"cert.pem\"\nprivate_key = \"{key}\"\nclient_id = \"r\""
            )
        };
        let parse = |source: &str| Pipeline::parse(&dir.path().join("p.toml"), &file(source), &|_| None);
        let Source::Mqtt(settings) = parse(&keys("broker:8883", "key.pem")).unwrap().source else { panic!("mqtt") };
        assert_eq!(settings.topics[0], "$aws/events/#");
        assert_eq!(settings.private_key, dir.path().join("key.pem"));
        let missing = parse(&keys("broker:8883", "nope.pem")).unwrap_err();
        assert!(missing.message.contains("source.private_key: file not found"), "{missing}");
        assert_eq!(missing.line, 5, "the [source] table: {missing}");
        let endpoint = parse(&keys("broker", "key.pem")).unwrap_err();
        assert!(endpoint.message.contains("is not host:port"), "{endpoint}");
    }

    #[test]
    fn a_reconcile_interval_reads_like_a_duration_and_names_its_line() {
        let file = |reconcile: &str| {
            format!(
                "[pipeline]\nname = \"p\"\nsource_region = \"us-east-1\"\ntargets = [\"eu-west-1\"]\n[source]\nkind = \"scan\"\n{reconcile}\n"
            )
        };
        let parse = |reconcile: &str| Pipeline::parse(Path::new("p.toml"), &file(reconcile), &|_| None);
        assert_eq!(parse("").unwrap().reconcile_every, None);
        assert_eq!(parse("[reconcile]\nevery = \"1h\"").unwrap().reconcile_every, Some(Duration::from_secs(3600)));
        assert_eq!(parse("[reconcile]\nevery = \"90s\"").unwrap().reconcile_every, Some(Duration::from_secs(90)));
        let error = parse("[reconcile]\nevery = \"1 hour\"").unwrap_err();
        assert_eq!(error.line, 8, "{error}");
        assert!(error.message.contains("reconcile.every"), "{error}");
        assert!(parse("[reconcile]\nevery = \"0s\"").is_err());
        assert!(parse("[reconcile]\nevry = \"1h\"").is_err());
    }

    #[test]
    fn regions() {
        assert!(check_region("eu-west-1").is_ok());
        assert!(check_region("us-gov-west-1").is_ok());
        assert!(check_region("europe").is_err());
        assert!(check_region("eu-west-").is_err());
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab", 0), (1, 1));
        assert_eq!(line_column("é", 1), (1, 1), "inside a character: that character");
    }

    #[test]
    fn errors_after_a_substitution_point_into_the_file_as_written() {
        let text = "[pipeline]\nname = \"${LONG}\"\nsource_region = \"us-east-1\"\ntargets = [\"nowhere\"]\n[source]\nkind = \"scan\"\n";
        let long = "x".repeat(200);
        let env = |name: &str| (name == "LONG").then(|| long.clone());
        let error = Pipeline::parse(Path::new("p.toml"), text, &env).unwrap_err();
        assert_eq!((error.line, error.column), (4, 12), "{error}");
        let error = Pipeline::parse(Path::new("p.toml"), "# é ${X:-}\n[oops", &|_| None).unwrap_err();
        assert_eq!(error.line, 2, "{error}");
    }

    #[test]
    fn rate_limits_take_operation_names_and_a_star() {
        let text = |limits: &str| {
            format!(
                "[pipeline]\nname = \"p\"\nsource_region = \"us-east-1\"\ntargets = [\"eu-west-1\"]\n[source]\nkind = \"scan\"\n[apply]\nrate_limits = {limits}\n"
            )
        };
        let parsed =
            Pipeline::parse(Path::new("p.toml"), &text(r#"{ "*" = 500, CreateThing = 50 }"#), &|_| None).unwrap();
        assert_eq!(parsed.apply.rate_limits["*"], 500.0);
        assert_eq!(parsed.apply.rate_limits["CreateThing"], 50.0);
        let error = Pipeline::parse(Path::new("p.toml"), &text("{ createThing = 5 }"), &|_| None).unwrap_err();
        assert!(error.to_string().contains("not an AWS operation name"), "{error}");
        assert_eq!(error.line, 8, "{error}");
        let error = Pipeline::parse(Path::new("p.toml"), &text(r#"{ "*" = 0 }"#), &|_| None).unwrap_err();
        assert!(error.to_string().contains("positive"), "{error}");
    }
}
