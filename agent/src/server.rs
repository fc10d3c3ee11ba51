//! HTTP endpoints. Handlers only read what the aggregator wrote.
//!
//! - `GET /metrics`: OpenMetrics text.
//! - `GET /healthz`: `ok`.
//! - `GET /api/v1/requests?limit=N`: the N most recent finished requests (default 100,
//!   newest first), as JSON: sizes and times, never payload.
//! - `GET /api/v1/instances`: the vLLM instances found on this node.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use crate::aggregator::{RECENT_REQUESTS, RequestRecord, Shared};

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/requests", get(requests))
        .route("/api/v1/instances", get(instances))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match shared.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}\n")).into_response()
        }
    }
}

async fn instances(State(shared): State<Arc<Shared>>) -> Json<Vec<crate::watcher::InstanceView>> {
    Json(shared.instances.read().unwrap_or_else(|e| e.into_inner()).clone())
}

#[derive(Deserialize)]
struct RequestsQuery {
    limit: Option<usize>,
}

async fn requests(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<RequestsQuery>,
) -> Json<Vec<RequestRecord>> {
    let limit = q.limit.unwrap_or(100).min(RECENT_REQUESTS);
    let recent = shared.recent.read().unwrap_or_else(|e| e.into_inner());
    Json(recent.iter().rev().take(limit).cloned().collect())
}
