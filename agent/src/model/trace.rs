//! W3C trace context (`traceparent`, `tracestate`) as a client sent it with a request: the
//! only header values the agent keeps, so that a request's span joins the client's trace.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// A `traceparent` (version 00) and its `tracestate`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The client's span: the parent of the request's server span.
    pub parent_span_id: [u8; 8],
    /// Whether the client sampled its trace (flag 01).
    pub sampled: bool,
    /// Kept as sent when it is well-formed and at most [`MAX_TRACESTATE`] bytes.
    pub tracestate: Option<String>,
}

/// A finished request as a trace span: what the OTLP exporter encodes. Sizes, times and labels
/// only, never payload; `trace` is the client's context when its request carried one.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestSpan {
    pub trace: Option<TraceContext>,
    /// The trace it belongs to: the client's, or a new one.
    pub trace_id: [u8; 16],
    pub pid: u32,
    pub method: &'static str,
    pub route: &'static str,
    /// The request's model as the agent labels it (a served model, or `other`).
    pub model: String,
    pub status: u16,
    pub outcome: &'static str,
    pub stream: bool,
    /// vLLM's request id (the response's `"id"`).
    pub response_id: Option<String>,
    /// Unix nanoseconds: the request's arrival and its response's end.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub time_to_first_token_seconds: Option<f64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub content_events: u32,
    /// Prompt and generated tokens (the stream's usage chunk).
    pub usage: Option<(u32, u32)>,
    /// Child spans: (phase, start, end) in Unix nanoseconds, in order.
    pub phases: Vec<(&'static str, u64, u64)>,
}

/// Where the aggregator hands finished requests to the OTLP exporter: it samples them here, and
/// offers the kept ones to a bounded queue that never blocks it; what does not fit is counted
/// and dropped.
#[derive(Clone, Debug)]
pub struct SpanSink {
    tx: tokio::sync::mpsc::Sender<RequestSpan>,
    sampler: Sampler,
    keep_slower_than_ns: u64,
    pub counts: Arc<SinkCounts>,
}

/// What the aggregator's side of the sink counted.
#[derive(Debug, Default)]
pub struct SinkCounts {
    pub queue_full: AtomicU64,
    pub not_sampled: AtomicU64,
}

impl SpanSink {
    /// A sink with room for `capacity` requests, and its receiving end.
    pub fn new(
        capacity: usize,
        sampler: Sampler,
        keep_slower_than: std::time::Duration,
    ) -> (Self, tokio::sync::mpsc::Receiver<RequestSpan>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        let keep_slower_than_ns = keep_slower_than.as_nanos().min(u64::MAX as u128) as u64;
        (Self { tx, sampler, keep_slower_than_ns, counts: Arc::default() }, rx)
    }

    /// Whether a request's spans are exported: aborted and slow ones (`slow_ns`: its time to
    /// first token, or its duration when sent whole) always, the others as the sampler says;
    /// and only while the queue has room (the aggregator is its one producer, so the offer that
    /// follows fits), so that an exemplar never names a trace that was not sent.
    pub fn samples(
        &self,
        trace_id: &[u8; 16],
        parent_sampled: Option<bool>,
        complete: bool,
        slow_ns: u64,
    ) -> bool {
        let keep =
            !complete || slow_ns > self.keep_slower_than_ns || self.sampler.keeps(trace_id, parent_sampled);
        if !keep {
            self.counts.not_sampled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.tx.capacity() == 0 {
            self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn offer(&self, span: RequestSpan) {
        if self.tx.try_send(span).is_err() {
            self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How a request's span is chosen for export.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Keep a trace if the low 8 bytes of its id, read as a number, fall under `ratio` of their
    /// range (the SDKs' `TraceIdRatioBased`, so every service keeps the same traces).
    Ratio(f64),
    /// The client's sampled flag when it sent a `traceparent`, else the inner sampler.
    ParentBased(&'static Sampler),
}

impl Sampler {
    /// Whether the span of a request in trace `trace_id` is kept.
    pub fn keeps(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(r) => {
                let low = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or_default());
                (low as f64) < r * (u64::MAX as f64)
            }
            Sampler::ParentBased(inner) => parent_sampled.unwrap_or_else(|| inner.keeps(trace_id, None)),
        }
    }
}

/// Random ids: xorshift64* seeded from the kernel's entropy once (trace and span ids need to be
/// unique, not secret).
pub struct Ids(u64);

impl Ids {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self(u64::from_le_bytes(seed) ^ nanos.as_nanos() as u64 | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).max(1)
    }

    pub fn span_id(&mut self) -> [u8; 8] {
        self.next().to_be_bytes()
    }

    pub fn trace_id(&mut self) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&self.next().to_be_bytes());
        t[8..].copy_from_slice(&self.next().to_be_bytes());
        t
    }
}

impl Default for Ids {
    fn default() -> Self {
        Self::new()
    }
}

/// The W3C limit on `tracestate`: 32 list members of at most 256 bytes is far more than anyone
/// sends; 512 bytes bounds what a hostile client can make the agent hold per request.
pub const MAX_TRACESTATE: usize = 512;

impl TraceContext {
    /// `traceparent: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`. Unknown versions are
    /// read by their first four fields, as the specification says; all-zero ids, version ff and
    /// anything malformed give None.
    pub fn parse(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<Self> {
        let value = std::str::from_utf8(traceparent).ok()?.trim();
        let mut parts = value.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2
            || version.eq_ignore_ascii_case("ff")
            || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        let _ = hex::<1>(version)?;
        let trace_id = hex::<16>(trace)?;
        let parent_span_id = hex::<8>(span)?;
        let [flags] = hex::<1>(flags)?;
        if trace_id == [0; 16] || parent_span_id == [0; 8] {
            return None;
        }
        let tracestate = tracestate
            .filter(|s| {
                s.len() <= MAX_TRACESTATE
                    && s.iter().all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\t')
            })
            .and_then(|s| std::str::from_utf8(s).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        Some(Self { trace_id, parent_span_id, sampled: flags & 1 == 1, tracestate })
    }
}

/// Lowercase hex, as trace ids are written.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `2 * N` lowercase hex digits (uppercase is invalid in `traceparent`).
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, [high, low]) in s.as_bytes().as_chunks::<2>().0.iter().enumerate() {
        out[i] = digit(*high)? << 4 | digit(*low)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_and_its_state() {
        let t = TraceContext::parse(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some(b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        )
        .unwrap();
        assert_eq!(t.trace_id[0], 0x4b);
        assert_eq!(t.parent_span_id[7], 0xb7);
        assert!(t.sampled);
        assert_eq!(t.tracestate.as_deref(), Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        let unsampled = TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", None);
        assert!(!unsampled.unwrap().sampled);
    }

    #[test]
    fn anything_malformed_is_no_context() {
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version with more fields is read by its first four.
        assert!(
            TraceContext::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz", None)
                .is_some()
        );
        // A tracestate too long or with control bytes is dropped, the context kept.
        let long = vec![b'a'; MAX_TRACESTATE + 1];
        let t = TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some(&long))
            .unwrap();
        assert_eq!(t.tracestate, None);
        let t =
            TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some(b"a=\x01"));
        assert_eq!(t.unwrap().tracestate, None);
    }
}
