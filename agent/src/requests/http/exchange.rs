//! One request/response exchange: what is known while it is in flight, and what is reported
//! when it is over.

use super::{Needle, connection::Arrival, find, needle};
use crate::model::trace::TraceContext;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The response ended as HTTP says (terminator, last byte of a sized body, or a server
    /// close ending an unsized body).
    Complete,
    /// The connection ended first: client abort, reset, or the server giving up.
    Aborted,
    /// The agent stopped following the connection (its table was full) before the end.
    Evicted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Aborted => "aborted",
            Outcome::Evicted => "evicted",
        }
    }
}

/// A request whose response is over. Times are CLOCK_MONOTONIC nanoseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedRequest {
    /// The connection (set by the connection table; 0 from a lone [`super::Connection`]).
    pub conn_id: u64,
    pub method: &'static str,
    pub route: &'static str,
    pub model: Option<String>,
    /// 0 if no response head was written.
    pub status: u16,
    pub outcome: Outcome,
    pub stream: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// First byte of the request received: when it reached the server's socket where the
    /// kernel tells, else when the server first read it.
    pub received_ns: u64,
    /// When the server first read the request (`received_ns` → here: queued in the socket).
    pub first_read_ns: u64,
    /// Whether `received_ns` is the kernel's arrival time (so the queued time is known).
    pub arrival_known: bool,
    /// For a connection's first request: when the connection was established.
    pub established_ns: Option<u64>,
    pub headers_ns: Option<u64>,
    pub first_token_ns: Option<u64>,
    pub end_ns: u64,
    pub events: u32,
    pub content_events: u32,
    /// The longest gap between consecutive content events (each gap is reported as it happens,
    /// in [`Progress::gaps`]).
    pub max_chunk_gap_ns: Option<u64>,
    /// The response's own `"id"` (`cmpl-…`), to join with the engine IPC (and, as vLLM's
    /// request id, a span attribute).
    pub response_id: Option<String>,
    /// The client's W3C trace context, when its request carried one.
    pub trace: Option<TraceContext>,
    /// Prompt and generated tokens, from the stream's usage chunk when it was seen.
    pub usage: Option<(u32, u32)>,
}

/// What one transfer on a connection moved forward: requests whose heads are now known,
/// requests now over, and whether the connection turned out not to be HTTP. Reused from one
/// transfer to the next, so a request allocates none of its own.
#[derive(Debug, Default, PartialEq)]
pub struct Progress {
    /// Requests whose heads (and model) are now known: they are in flight.
    pub started: Vec<Started>,
    /// Gaps between consecutive content events of the connection's current response.
    pub gaps: Vec<Gap>,
    pub finished: Vec<FinishedRequest>,
    /// Set when the connection turned out not to be HTTP/1.1 server traffic.
    pub not_http: Option<&'static str>,
}

/// A request now in flight.
#[derive(Debug, PartialEq)]
pub struct Started {
    /// The connection (set by the connection table).
    pub conn_id: u64,
    pub route: &'static str,
    pub model: Option<String>,
}

/// A gap between two content events of the response being written on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    pub conn_id: u64,
    pub ns: u64,
}

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) method: &'static str,
    pub(super) route: &'static str,
    pub(super) model: Option<String>,
    pub(super) body: Vec<u8>,
    pub(super) started: bool,
    pub(super) arrival: Arrival,
    pub(super) request_bytes: u64,
    // Response side.
    pub(super) status: u16,
    pub(super) stream: bool,
    pub(super) response_bytes: u64,
    pub(super) headers_ns: Option<u64>,
    pub(super) first_token_ns: Option<u64>,
    pub(super) last_content_ns: Option<u64>,
    pub(super) events: u32,
    pub(super) content_events: u32,
    pub(super) max_chunk_gap_ns: Option<u64>,
    /// The first body bytes of the response, until its `"id"` is found.
    pub(super) id_scan: Vec<u8>,
    pub(super) response_id: Option<String>,
    pub(super) trace: Option<TraceContext>,
    pub(super) usage: Option<(u32, u32)>,
}

/// Response body bytes searched for the response's `"id"`.
pub(super) const ID_SCAN: usize = 512;

/// The first `"id":"…"` string of a JSON text (bounded, printable).
pub(super) fn response_id(body: &[u8]) -> Option<String> {
    static ID: Needle = needle!(b"\"id\"");
    let at = find(body, &ID)?;
    let rest =
        body[at + 4..].trim_ascii_start().strip_prefix(b":")?.trim_ascii_start().strip_prefix(b"\"")?;
    let id = &rest[..rest.iter().position(|&b| b == b'"')?];
    if id.is_empty() || id.len() > 128 || !id.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    String::from_utf8(id.to_vec()).ok()
}

pub(super) fn new_pending(
    method: &'static str,
    route: &'static str,
    arrival: Arrival,
    request_bytes: u64,
) -> Pending {
    Pending {
        method,
        route,
        model: None,
        body: Vec::new(),
        started: false,
        arrival,
        request_bytes,
        status: 0,
        stream: false,
        response_bytes: 0,
        headers_ns: None,
        first_token_ns: None,
        last_content_ns: None,
        events: 0,
        content_events: 0,
        max_chunk_gap_ns: None,
        id_scan: Vec::new(),
        response_id: None,
        trace: None,
        usage: None,
    }
}

pub(super) fn finished(req: Pending, end_ns: u64, outcome: Outcome) -> FinishedRequest {
    FinishedRequest {
        conn_id: 0,
        method: req.method,
        route: req.route,
        model: req.model,
        status: req.status,
        outcome,
        stream: req.stream,
        request_bytes: req.request_bytes,
        response_bytes: req.response_bytes,
        received_ns: req.arrival.at,
        first_read_ns: req.arrival.read,
        arrival_known: req.arrival.known,
        established_ns: req.arrival.established,
        headers_ns: req.headers_ns,
        first_token_ns: req.first_token_ns,
        end_ns,
        events: req.events,
        content_events: req.content_events,
        max_chunk_gap_ns: req.max_chunk_gap_ns,
        response_id: req.response_id,
        trace: req.trace,
        usage: req.usage,
    }
}
