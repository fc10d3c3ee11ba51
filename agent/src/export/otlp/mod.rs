//! OpenTelemetry traces: each finished request becomes a SERVER span (in the client's trace
//! when its request carried a `traceparent`) with a child per phase, exported over OTLP/HTTP
//! (protobuf) to a collector. Off unless an endpoint is configured.
//!
//! The aggregator offers each request to a bounded queue ([`SpanSink`]) and never waits; this
//! task samples, batches (up to [`BATCH`] requests or [`BATCH_WAIT`]), and sends with retries
//! and backoff. A slow or dead collector costs counted drops, never memory or the aggregator's
//! time. Its counters are published as families in the store.

pub(crate) mod config;
mod encode;
mod send;

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;

pub use self::config::{OtlpArgs, OtlpConfig};
use crate::{
    aggregator::store::Locked,
    model::{
        family::{Family, family, sample},
        trace::{Ids, RequestSpan, SinkCounts, SpanSink},
    },
};

/// Requests queued for export at most.
pub(crate) const QUEUE: usize = 4096;
/// Requests per export at most.
const BATCH: usize = 512;
/// Longest a request waits for its batch to fill.
const BATCH_WAIT: Duration = Duration::from_secs(1);
/// Tries per batch; the waits between them double from [`FIRST_BACKOFF`], or follow the
/// collector's `Retry-After` up to [`MAX_BACKOFF`].
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Drop reasons, each a series from the start.
const REASONS: [&str; 3] = ["queue_full", "export_failed", "rejected"];

#[derive(Default)]
struct Counters {
    exported: u64,
    dropped: BTreeMap<&'static str, u64>,
}

/// Starts the exporter when `config` is set: the sink the aggregator offers requests to.
pub(crate) fn start(
    config: Option<OtlpConfig>,
    families: Arc<Locked<Vec<Family>>>,
) -> Result<Option<SpanSink>, String> {
    let Some(config) = config else { return Ok(None) };
    let tls = send::tls_config(&config)?;
    let (sink, rx) = SpanSink::new(QUEUE, config.sampler, config.keep_slower_than);
    let counts = sink.counts.clone();
    tracing::info!(
        endpoint = format!(
            "{}://{}:{}{}",
            if config.url.tls { "https" } else { "http" },
            config.url.host,
            config.url.port,
            config.url.path
        ),
        "exporting request spans over OTLP/HTTP"
    );
    publish(&families, &Counters::default(), &counts);
    tokio::spawn(run(config, tls, rx, counts, families));
    Ok(Some(sink))
}

async fn run(
    config: OtlpConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut rx: mpsc::Receiver<RequestSpan>,
    counts: Arc<SinkCounts>,
    families: Arc<Locked<Vec<Family>>>,
) {
    let mut ids = Ids::new();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let mut counters = Counters::default();
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        // Sampled by the aggregator already (it labels its latencies with the kept traces).
        let requests = batch.len() as u64;
        let spans: Vec<_> = batch.iter().flat_map(|r| encode::request_spans(r, &mut ids)).collect();
        drop(batch);
        if requests > 0 {
            let body =
                Bytes::from(encode::export_request(&config.service_name, &host, spans).encode_to_vec());
            match export(&config, tls.as_ref(), body).await {
                Ok(()) => {
                    counters.exported += requests;
                    warned = false;
                }
                Err((reason, why)) => {
                    *counters.dropped.entry(reason).or_default() += requests;
                    if !warned {
                        tracing::warn!(
                            "OTLP export failed, {requests} request spans dropped (counted): {why}"
                        );
                        warned = true;
                    }
                }
            }
        }
        publish(&families, &counters, &counts);
    }
}

/// Sends one batch, retrying what may succeed later.
async fn export(
    config: &OtlpConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    body: Bytes,
) -> Result<(), (&'static str, String)> {
    let mut wait = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match send::post(&config.url, &config.headers, tls, body.clone()).await {
            Ok(()) => return Ok(()),
            Err(send::SendError::Rejected(why)) => return Err(("rejected", why)),
            Err(send::SendError::Retry { why, after }) => {
                if attempt == ATTEMPTS {
                    return Err(("export_failed", why));
                }
                tokio::time::sleep(after.unwrap_or(wait).min(MAX_BACKOFF)).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }
    Err(("export_failed", "no attempt".into()))
}

fn publish(families: &Arc<Locked<Vec<Family>>>, c: &Counters, counts: &SinkCounts) {
    let queue_full = counts.queue_full.load(Ordering::Relaxed);
    let dropped = REASONS
        .iter()
        .map(|&reason| {
            let n =
                if reason == "queue_full" { queue_full } else { c.dropped.get(reason).copied().unwrap_or(0) };
            sample("inferwatch_otlp_requests_dropped_total", &[("reason", reason)], n as f64)
        })
        .collect();
    *families.write() = vec![
        family(
            "inferwatch_otlp_requests_exported",
            "Requests whose spans were accepted by the OTLP collector",
            "counter",
            vec![sample("inferwatch_otlp_requests_exported_total", &[], c.exported as f64)],
        ),
        family(
            "inferwatch_otlp_requests_not_sampled",
            "Requests the trace sampler left out",
            "counter",
            vec![sample(
                "inferwatch_otlp_requests_not_sampled_total",
                &[],
                counts.not_sampled.load(Ordering::Relaxed) as f64,
            )],
        ),
        family(
            "inferwatch_otlp_requests_dropped",
            "Requests whose spans were dropped: queue_full (the collector too slow), export_failed (after retries), rejected (by the collector)",
            "counter",
            dropped,
        ),
    ];
}
