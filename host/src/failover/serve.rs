//! `iotdr health serve`: the health checks over HTTP, ready to be the target
//! of Route 53 HTTP(S) health checks.
//!
//! - `GET /health/<region>`: an MQTT round trip ([`MqttCheck`]) made for this
//!   request; 200 when it passed, 503 when not, a JSON body either way.
//! - `GET /control-plane/<region>`: a cheap read of the region's IoT API
//!   (`ListThings`, one result), reported on its own: devices keep working
//!   on a broker whose control plane is down, and the reverse.
//! - `GET /health`: every region's MQTT check at once (for people).
//! - `GET /healthz`: the server itself.
//!
//! With a secret set, `/health` and `/control-plane` want `?secret=<it>`
//! (Route 53 can send a query string in its resource path) and answer 403
//! without it.

use super::check::{CheckReport, MqttCheck};
use super::config::DrConfig;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// What the server holds: per region, its check and the limit on checks at once.
struct Regions {
    checks: BTreeMap<String, (MqttCheck, Semaphore)>,
    control_planes: BTreeMap<String, aws_sdk_iot::Client>,
    secret: Option<String>,
    timeout: Duration,
}

/// Builds the checks of every region in `config` (reading their certificate
/// files and the secret), then serves on `listener` until the process ends.
pub async fn serve(config: &DrConfig, listener: tokio::net::TcpListener) -> Result<(), String> {
    let health = config.health().map_err(|e| e.to_string())?;
    let secret = config.health_secret()?;
    let mut checks = BTreeMap::new();
    let mut control_planes = BTreeMap::new();
    for (name, region) in &config.regions {
        let credentials =
            config.credentials(name).ok_or_else(|| format!("region {name}: no certificate to check with"))?;
        let check = MqttCheck::new(name, &region.mqtt_endpoint, credentials, health)?;
        checks.insert(name.clone(), (check, Semaphore::new(health.concurrency)));
        let clients = crate::aws::RegionClients::connect(name, &region.api, false)
            .await
            .map_err(|e| format!("region {name}: {e}"))?;
        control_planes.insert(name.clone(), clients.iot);
    }
    let regions = Arc::new(Regions { checks, control_planes, secret, timeout: health.timeout });
    // Every route but /healthz wants the secret, when one is set.
    let guarded = Router::new()
        .route("/health", get(all_regions))
        .route("/health/{region}", get(one_region))
        .route("/control-plane/{region}", get(control_plane))
        .route_layer(axum::middleware::from_fn_with_state(regions.clone(), require_secret));
    let app = Router::new().route("/healthz", get(|| async { "ok\n" })).merge(guarded).with_state(regions.clone());
    tracing::info!(
        listen = %listener.local_addr().map_err(|e| e.to_string())?,
        regions = ?regions.checks.keys().collect::<Vec<_>>(),
        secret = regions.secret.is_some(),
        "serving health checks"
    );
    axum::serve(listener, app).await.map_err(|e| format!("the health server stopped: {e}"))
}

/// Whether the query string carries the secret (or none is needed).
fn allowed(regions: &Regions, query: Option<&str>) -> bool {
    let Some(secret) = &regions.secret else { return true };
    let given =
        query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| pair.strip_prefix("secret=")).unwrap_or_default();
    // Compared without an early exit, so the time taken tells nothing.
    given.len() == secret.len() && given.bytes().zip(secret.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn require_secret(
    State(regions): State<Arc<Regions>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if allowed(&regions, request.uri().query()) {
        next.run(request).await
    } else {
        (StatusCode::FORBIDDEN, "a secret is required: ?secret=\n").into_response()
    }
}

fn unknown(region: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("no region {region} in the DR file\n")).into_response()
}

async fn check(regions: &Regions, region: &str) -> Option<CheckReport> {
    let (check, limit) = regions.checks.get(region)?;
    // A turn waited for no longer than a check may take: the caller (Route 53
    // wants an answer within 2 s) hears "busy" rather than nothing.
    let Ok(Ok(_turn)) = tokio::time::timeout(regions.timeout, limit.acquire()).await else {
        return Some(check.busy());
    };
    let report = check.run().await;
    match &report.failure {
        None => tracing::debug!(region, latency_ms = report.latency_ms, "health check passed"),
        Some(failure) => tracing::warn!(region, latency_ms = report.latency_ms, failure, "health check failed"),
    }
    Some(report)
}

fn answer(healthy: bool, body: serde_json::Value) -> Response {
    let code = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body)).into_response()
}

async fn one_region(State(regions): State<Arc<Regions>>, Path(region): Path<String>) -> Response {
    match check(&regions, &region).await {
        Some(report) => answer(report.healthy, serde_json::to_value(&report).expect("a report is JSON")),
        None => unknown(&region),
    }
}

async fn all_regions(State(regions): State<Arc<Regions>>) -> Response {
    let reports = futures_util::future::join_all(regions.checks.keys().map(|region| check(&regions, region))).await;
    let reports: Vec<CheckReport> = reports.into_iter().flatten().collect();
    let healthy = reports.iter().all(|r| r.healthy);
    answer(healthy, json!({ "healthy": healthy, "regions": reports }))
}

async fn control_plane(State(regions): State<Arc<Regions>>, Path(region): Path<String>) -> Response {
    let Some(iot) = regions.control_planes.get(&region) else { return unknown(&region) };
    let started = Instant::now();
    let outcome = tokio::time::timeout(regions.timeout, iot.list_things().max_results(1).send()).await;
    let failure = match outcome {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(crate::aws::AwsError::from_sdk(e).to_string()),
        Err(_) => Some(format!("no answer within {} ms", regions.timeout.as_millis())),
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    if let Some(failure) = &failure {
        tracing::warn!(region, latency_ms, failure, "control-plane probe failed");
    }
    let mut body =
        json!({ "region": region, "healthy": failure.is_none(), "operation": "ListThings", "latency_ms": latency_ms });
    if let Some(failure) = failure {
        body["failure"] = failure.into();
    }
    answer(body["healthy"] == true, body)
}
