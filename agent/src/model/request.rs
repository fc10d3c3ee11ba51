//! One finished request as `/api/v1/requests` shows it: sizes and times, never payload.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Strings that are `&'static` labels in the agent (no allocation per request) and owned when
/// a client reads them back.
pub type Label = Cow<'static, str>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    pub pid: u32,
    pub method: Label,
    pub route: Label,
    pub model: String,
    pub status: u16,
    pub outcome: Label,
    pub stream: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub events: u32,
    pub content_events: u32,
    /// CLOCK_MONOTONIC of the first request byte (comparable with a client on the same host).
    pub received_monotonic_ns: u64,
    pub received_unix_seconds: f64,
    pub response_headers_seconds: Option<f64>,
    pub time_to_first_token_seconds: Option<f64>,
    pub duration_seconds: f64,
    pub max_chunk_gap_seconds: Option<f64>,
    /// Request received → first read by the server: waiting in the socket (and, on a new
    /// connection, in the accept queue) while the server was busy. None where the kernel
    /// cannot tell the arrival (then `received_*` is the first read).
    #[serde(default)]
    pub queued_seconds: Option<f64>,
    /// The request's trace: the client's (`traceparent`) or, while spans are exported, the one
    /// the agent started (exported if sampled).
    #[serde(default)]
    pub trace_id: Option<String>,
    /// CLOCK_MONOTONIC of the server's first read of the request.
    #[serde(default)]
    pub first_read_monotonic_ns: u64,
    /// For a connection's first request: CLOCK_MONOTONIC when the connection was established.
    #[serde(default)]
    pub connection_established_monotonic_ns: Option<u64>,
    /// First read → handed to the engine (parsing, templating, tokenisation).
    pub frontend_in_seconds: Option<f64>,
    /// Handed over → the engine output that became the first token (queueing + prefill).
    pub engine_first_seconds: Option<f64>,
    /// Handed over → the last engine output (responses sent whole).
    pub engine_seconds: Option<f64>,
    /// That output received → written to the client (detokenisation, serialisation).
    pub frontend_out_seconds: Option<f64>,
    /// First token → end of the stream.
    pub decode_seconds: Option<f64>,
    /// Why the phases are missing, for a generation request whose IPC was not seen.
    pub phases_unmatched: Option<Label>,
}

/// Routes whose requests go through vLLM's engine.
pub const GENERATION_ROUTES: [&str; 3] = ["/v1/completions", "/v1/chat/completions", "/v1/responses"];
