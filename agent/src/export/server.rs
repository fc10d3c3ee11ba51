//! HTTP endpoints. Handlers only read what the aggregator wrote.
//!
//! - `GET /metrics`: OpenMetrics text.
//! - `GET /healthz`: `ok`.
//! - `GET /api/v1/requests?limit=N`: the N most recent finished requests (default 100,
//!   newest first), as JSON: sizes and times, never payload.
//! - `GET /api/v1/instances`: the vLLM instances found on this node.
//! - `GET /api/v1/diagnosis?window=SECONDS`: the diagnosis rules over a window (default 300).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use crate::{
    aggregator::{
        Store,
        diagnosis::{self, Diagnosis},
        store::RECENT_REQUESTS,
    },
    model::{instance::InstanceView, request::RequestRecord},
};

pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/requests", get(requests))
        .route("/api/v1/instances", get(instances))
        .route("/api/v1/diagnosis", get(diagnosis))
        .with_state(store)
}

async fn metrics(State(store): State<Arc<Store>>) -> Response {
    match super::page::render(&store) {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}\n")).into_response()
        }
    }
}

async fn instances(State(store): State<Arc<Store>>) -> Json<Vec<InstanceView>> {
    Json(store.instances.read().clone())
}

#[derive(Deserialize)]
struct DiagnosisQuery {
    /// Seconds (default 300).
    window: Option<f64>,
}

async fn diagnosis(State(store): State<Arc<Store>>, Query(q): Query<DiagnosisQuery>) -> Json<Diagnosis> {
    let samples = store.diagnosis_samples.read();
    let (first, second) = samples.as_slices();
    let all: Vec<diagnosis::Sample> = first.iter().chain(second).cloned().collect();
    drop(samples);
    let now = store.started.elapsed().as_secs_f64();
    Json(diagnosis::diagnose(&all, now, q.window.unwrap_or(300.0).max(1.0)))
}

#[derive(Deserialize)]
struct RequestsQuery {
    limit: Option<usize>,
}

async fn requests(
    State(store): State<Arc<Store>>,
    Query(q): Query<RequestsQuery>,
) -> Json<Vec<RequestRecord>> {
    let limit = q.limit.unwrap_or(100).min(RECENT_REQUESTS);
    let recent = store.recent.read();
    Json(recent.iter().rev().take(limit).cloned().collect())
}
