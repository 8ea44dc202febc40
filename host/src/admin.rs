//! The admin HTTP endpoint of `iotdr run` (`[admin] listen`, axum):
//! `/healthz`, `/status` (JSON), `/metrics` (Prometheus text,
//! `prometheus-client`) and `POST /reload`. The server task holds no state
//! of the run: each request is sent to the run loop ([`Request`]), whose
//! admin part answers it from what the run owns (the state store, the
//! limiter, the hot swap). Off loopback, `/status` and `/reload` need the
//! bearer token.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{mpsc, oneshot};

/// What the server asks the run loop.
pub enum Request {
    Status(oneshot::Sender<serde_json::Value>),
    Metrics(oneshot::Sender<String>),
    Reload(oneshot::Sender<serde_json::Value>),
}

#[derive(Clone)]
struct Shared {
    requests: mpsc::Sender<Request>,
    token: Option<String>,
}

/// The bearer token of `admin`: its file's first line, else IOTDR_ADMIN_TOKEN.
/// An address off loopback without one is refused.
pub fn token(admin: &crate::config::Admin) -> Result<Option<String>, String> {
    let token = crate::config::read_secret(admin.token_file.as_deref(), "admin.token_file", "IOTDR_ADMIN_TOKEN")?;
    if token.is_none() && !admin.listen.ip().is_loopback() {
        return Err(format!(
            "admin.listen {} is not a loopback address: set admin.token_file or IOTDR_ADMIN_TOKEN, \
             the bearer token /status and /reload then require",
            admin.listen
        ));
    }
    Ok(token)
}

/// Serves until the run ends (the task is dropped with it).
pub async fn serve(listener: tokio::net::TcpListener, token: Option<String>, requests: mpsc::Sender<Request>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .with_state(Shared { requests, token });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("the admin endpoint stopped: {e}");
    }
}

/// Whether the request may see `/status` or use `/reload`.
fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = &shared.token else { return true };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given == Some(token.as_str())
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response()
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "the run is ending\n").into_response()
}

/// Asks the run loop; `None` when the run is ending.
async fn ask<T>(shared: &Shared, request: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    shared.requests.send(request(tx)).await.ok()?;
    rx.await.ok()
}

async fn status(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    ask(&shared, Request::Status).await.map_or_else(unavailable, |status| axum::Json(status).into_response())
}

async fn metrics(State(shared): State<Shared>) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")];
    ask(&shared, Request::Metrics).await.map_or_else(unavailable, |text| (content_type, text).into_response())
}

async fn reload(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    ask(&shared, Request::Reload).await.map_or_else(unavailable, |outcome| axum::Json(outcome).into_response())
}

/// Seconds from an event's source time (its `timestamp`) to its batch
/// leaving the queue: applied, dropped or dead-lettered. A backlog shows as
/// large lags, which is what it is.
#[derive(Clone)]
pub struct LagHistogram(prometheus_client::metrics::histogram::Histogram);

/// From 10 ms to an hour: live lag sits at the low end, a backlog or an
/// outage at the high end.
const LAG_BUCKETS: [f64; 14] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0];

impl Default for LagHistogram {
    fn default() -> Self {
        LagHistogram(prometheus_client::metrics::histogram::Histogram::new(LAG_BUCKETS))
    }
}

impl LagHistogram {
    /// Observes the lag of events from `source_times_ms` at `now_ms`;
    /// returns the largest (none without events). A source clock ahead of
    /// ours counts as no lag.
    pub fn observe_since(&self, source_times_ms: &[u64], now_ms: u64) -> Option<u64> {
        let mut largest = None;
        for &at in source_times_ms {
            let lag = now_ms.saturating_sub(at);
            self.0.observe(lag as f64 / 1000.0);
            largest = largest.max(Some(lag));
        }
        largest
    }
}

/// What `/metrics` shows, gathered by the run loop.
pub struct Gauges<'a> {
    pub calls: Vec<(String, &'static str, crate::aws::CallStats)>,
    pub queue_depth: u64,
    /// Changes waiting for something they need in a target.
    pub waiting: u64,
    pub dead_letters: u64,
    /// Per step, and per stage for the `stage` step.
    pub dead_letters_by_step: Vec<(String, Option<String>, u64)>,
    pub lag: &'a LagHistogram,
    pub changes: u64,
    pub version: u64,
    pub stage_counters: &'a [(String, std::collections::BTreeMap<String, u64>)],
    pub stage_counts: &'a [(String, crate::pipeline::StageCounts)],
}

/// `gauges` in Prometheus text format.
pub fn render_metrics(gauges: &Gauges) -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;
    type Labels = Vec<(&'static str, String)>;
    let mut registry = Registry::with_prefix("iotdr");
    let api = |name: &str, help: &str, registry: &mut Registry, value: fn(&crate::aws::CallStats) -> u64| {
        let family = Family::<Labels, Counter>::default();
        for (region, operation, stats) in &gauges.calls {
            family
                .get_or_create(&vec![("region", region.clone()), ("operation", operation.to_string())])
                .inc_by(value(stats));
        }
        registry.register(name, help, family);
    };
    api("api_calls", "AWS API calls that ended, per region and operation", &mut registry, |s| s.calls);
    api("api_requests", "AWS API requests sent, retries included", &mut registry, |s| s.requests);
    api("api_throttled", "AWS API answers that were throttling", &mut registry, |s| s.throttled);
    api("api_transient_failures", "AWS API 5xx, timeouts and lost connections", &mut registry, |s| {
        s.transient_failures
    });
    let gauge = |name: &str, help: &str, value: u64, registry: &mut Registry| {
        let gauge = Gauge::<i64>::default();
        gauge.set(value as i64);
        registry.register(name, help, gauge);
    };
    gauge("queue_depth", "Events stored and waiting to be applied", gauges.queue_depth, &mut registry);
    gauge(
        "waiting_changes",
        "Changes waiting for something they need in a target (a thing, type, group, policy, certificate)",
        gauges.waiting,
        &mut registry,
    );
    gauge("dead_letters", "Dead letters kept in the state store", gauges.dead_letters, &mut registry);
    let by_step = Family::<Labels, Gauge>::default();
    for (step, stage, count) in &gauges.dead_letters_by_step {
        let mut labels = vec![("step", step.clone())];
        labels.extend(stage.clone().map(|stage| ("stage", stage)));
        by_step.get_or_create(&labels).set(*count as i64);
    }
    registry.register("dead_letters_by_step", "Dead letters kept, per step where their event failed", by_step);
    registry.register(
        "lag_seconds",
        "Seconds from an event's source time to its batch leaving the queue",
        gauges.lag.0.clone(),
    );
    gauge("pipeline_version", "The version of the pipeline serving batches", gauges.version, &mut registry);
    let changes = Counter::<u64>::default();
    changes.inc_by(gauges.changes);
    registry.register("changes_applied", "Changes applied to target regions by this run", changes);
    let plugin = Family::<Labels, Counter>::default();
    for (stage, counters) in gauges.stage_counters {
        for (name, value) in counters {
            plugin.get_or_create(&vec![("stage", stage.clone()), ("counter", name.clone())]).inc_by(*value);
        }
    }
    registry.register("plugin_count", "The plug-ins' own counters (`count`), per stage", plugin);
    let stage = |name: &str, help: &str, registry: &mut Registry, value: fn(&crate::pipeline::StageCounts) -> u64| {
        let family = Family::<Labels, Counter>::default();
        for (stage, counts) in gauges.stage_counts {
            family.get_or_create(&vec![("stage", stage.clone())]).inc_by(value(counts));
        }
        registry.register(name, help, family);
    };
    stage("stage_events_in", "Events into each stage (since its version started)", &mut registry, |c| c.events_in);
    stage("stage_events_out", "Events each stage passed on", &mut registry, |c| c.events_out);
    stage("stage_events_dropped", "Events each stage dropped on purpose", &mut registry, |c| c.dropped);
    stage("stage_events_failed", "Events each stage failed on", &mut registry, |c| c.failed);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String");
    text
}
