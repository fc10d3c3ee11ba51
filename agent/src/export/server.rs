//! HTTP endpoints. Handlers only read what the aggregator wrote.
//!
//! - `GET /metrics`: OpenMetrics text, to anyone who can reach `--listen`.
//! - `GET /healthz`: `ok`, or 503 naming the stage that stopped making progress.
//! - `GET /readyz`: 200 once the first discovery scan has set up the watch maps.
//! - `GET /api/v1/requests?limit=N`: the N most recent finished requests (default 100,
//!   newest first), as JSON: sizes and times, never payload.
//! - `GET /api/v1/instances`: the vLLM instances found on this node.
//! - `GET /api/v1/diagnosis?window=SECONDS`: the diagnosis rules over a window (default 300).
//!
//! `/api/v1/*` describes other tenants' traffic and processes: by default only loopback clients
//! (this host, `kubectl port-forward`, `kubectl exec`) get it; `--api-access any` or basic auth
//! in `--web-config-file` opens it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use super::{listener::Client, stats::ServerStats};
use crate::{
    aggregator::{
        Store,
        diagnosis::{self, Diagnosis},
        store::RECENT_REQUESTS,
    },
    model::{health::Heartbeat, instance::InstanceView, request::RequestRecord},
};

pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Who may read `/api/v1/*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ApiAccess {
    /// Clients on a loopback address only.
    Loopback,
    /// Any client that can reach `--listen`.
    Any,
}

/// A rendered `/metrics` page is served again for this long: however often it is asked for,
/// the agent renders at most ten pages a second.
const PAGE_REUSE: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub(crate) struct AppState {
    pub store: Arc<Store>,
    pub stats: Arc<ServerStats>,
    /// The ring-buffer reader's sign of life (the aggregator's is in the store).
    pub ring: Arc<Heartbeat>,
    /// How long a stage may go without progress before `/healthz` says 503.
    pub stale_after: Duration,
    /// Set once the first discovery scan has set up the watch maps (`/readyz`).
    pub ready: Arc<AtomicBool>,
    page: Arc<Mutex<Option<(Instant, axum::body::Bytes)>>>,
}

impl AppState {
    pub(crate) fn new(
        store: Arc<Store>,
        stats: Arc<ServerStats>,
        ring: Arc<Heartbeat>,
        stale_after: Duration,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self { store, stats, ring, stale_after, ready, page: Arc::default() }
    }
}

/// The routes; `api_open` when `/api/v1/*` needs no loopback client (authentication configured,
/// or `--api-access any`).
pub(crate) fn router(state: AppState, api_open: bool) -> Router {
    let mut api = Router::new()
        .route("/api/v1/requests", get(requests))
        .route("/api/v1/instances", get(instances))
        .route("/api/v1/diagnosis", get(diagnosis));
    if !api_open {
        api = api.layer(axum::middleware::from_fn_with_state(state.stats.clone(), loopback_only));
    }
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(state)
}

/// Middleware of the API routes: 403 unless the client is on loopback.
async fn loopback_only(
    State(stats): State<Arc<ServerStats>>,
    client: Option<Extension<Client>>,
    request: Request,
    next: Next,
) -> Response {
    if client.is_some_and(|Extension(Client(peer))| peer.ip().is_loopback()) {
        return next.run(request).await;
    }
    stats.api_forbidden.inc();
    (
        StatusCode::FORBIDDEN,
        "/api/v1 is served to loopback clients only (kubectl port-forward or exec, or this host); \
         --api-access any, or basic auth in --web-config-file, opens it\n",
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut page = state.page.lock().unwrap_or_else(|e| e.into_inner());
    let body = match &*page {
        Some((at, body)) if at.elapsed() < PAGE_REUSE => body.clone(),
        _ => {
            let rendered = super::page::render(&state.store).and_then(|mut text| {
                // The server's own families go before the terminator.
                if text.ends_with("# EOF\n") {
                    text.truncate(text.len() - "# EOF\n".len());
                }
                let own = state.stats.encode()?;
                text.push_str(own.strip_suffix("# EOF\n").unwrap_or(&own));
                text.push_str("# EOF\n");
                Ok(text)
            });
            match rendered {
                Ok(text) => {
                    let body = axum::body::Bytes::from(text);
                    *page = Some((Instant::now(), body.clone()));
                    body
                }
                Err(e) => {
                    return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}\n"))
                        .into_response();
                }
            }
        }
    };
    drop(page);
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
}

/// `ok` while the ring reader and the aggregator make progress; 503 naming the one that stopped
/// (so the kubelet's liveness probe restarts a stuck agent instead of it exporting stale data).
async fn healthz(State(state): State<AppState>) -> Response {
    let stale: Vec<String> =
        [("ring-buffer reader", state.ring.age()), ("aggregator", state.store.heartbeat.age())]
            .into_iter()
            .filter(|(_, age)| *age > state.stale_after)
            .map(|(stage, age)| format!("{stage}: no progress for {:.1} s", age.as_secs_f64()))
            .collect();
    if stale.is_empty() {
        "ok\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {}\n", stale.join("; "))).into_response()
    }
}

/// 200 once the first discovery scan has set up the watch maps, 503 before: what a readiness
/// probe (and a test about to make traffic) waits for.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: the first discovery scan is under way\n")
            .into_response()
    }
}

async fn instances(State(state): State<AppState>) -> Json<Vec<InstanceView>> {
    Json(state.store.instances.read().clone())
}

#[derive(Deserialize)]
struct DiagnosisQuery {
    /// Seconds (default 300).
    window: Option<f64>,
}

async fn diagnosis(State(state): State<AppState>, Query(q): Query<DiagnosisQuery>) -> Json<Diagnosis> {
    let samples = state.store.diagnosis_samples.read();
    let (first, second) = samples.as_slices();
    let all: Vec<diagnosis::Sample> = first.iter().chain(second).cloned().collect();
    drop(samples);
    let now = state.store.started.elapsed().as_secs_f64();
    let window = q.window.filter(|w| w.is_finite()).unwrap_or(300.0).clamp(1.0, 3600.0);
    Json(diagnosis::diagnose(&all, now, window))
}

#[derive(Deserialize)]
struct RequestsQuery {
    limit: Option<usize>,
}

async fn requests(State(state): State<AppState>, Query(q): Query<RequestsQuery>) -> Json<Vec<RequestRecord>> {
    let limit = q.limit.unwrap_or(100).min(RECENT_REQUESTS);
    let recent = state.store.recent.read();
    Json(recent.iter().rev().take(limit).cloned().collect())
}
