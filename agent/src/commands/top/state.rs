//! What `top` shows, fetched: the agent's instances, requests and metrics turned into a
//! [`Snapshot`] of plain rows (rates from counters between polls, quantiles from histograms).

use std::{collections::HashMap, time::Instant};

use super::view::{GpuRow, InstanceRow, RequestRow, Snapshot};
use crate::{
    api::{self, Family, RequestRecord, Role, total},
    commands::stats::percentile,
};

/// Polls the agent and turns counters into rates between polls.
pub(super) struct Fetcher {
    client: Result<api::Client, String>,
    previous: HashMap<String, (Instant, f64, f64)>,
}

/// p50 and p99 of a Prometheus histogram (cumulative buckets), interpolated as histogram_quantile.
pub(super) fn bucket_quantiles(buckets: &[(f64, f64)]) -> Option<(f64, f64)> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let q = |p: f64| {
        let rank = p * total;
        let mut lower = (0.0, 0.0);
        for &(le, count) in buckets {
            if count >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let span = count - lower.1;
                return if span > 0.0 { lower.0 + (le - lower.0) * (rank - lower.1) / span } else { le };
            }
            lower = (le, count);
        }
        lower.0
    };
    Some((q(0.5), q(0.99)))
}

/// Housekeeping (the agent's own scrapes, health checks) would crowd out the inference requests
/// a person looks for.
const HOUSEKEEPING: [&str; 5] = ["/metrics", "/health", "/ping", "/version", "/v1/models"];

impl Fetcher {
    pub(super) fn new(agent: &str) -> Self {
        let client = api::Client::new(agent, std::time::Duration::from_secs(3))
            .map_err(|_| "not an http://HOST:PORT address".to_string());
        Self { client, previous: HashMap::new() }
    }

    pub(super) async fn fetch(&mut self, agent: &str) -> Snapshot {
        let mut snapshot = Snapshot { agent: agent.to_string(), ..Default::default() };
        let client = match &self.client {
            Ok(c) => c,
            Err(e) => {
                snapshot.error = Some(e.clone());
                return snapshot;
            }
        };
        let (instances, families, records) =
            tokio::join!(client.instances(), client.metrics(), client.requests(300));
        let (instances, families, records) = match (instances, families, records) {
            (Ok(i), Ok(m), Ok(r)) => (i, m, r),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                snapshot.error = Some(e.to_string());
                return snapshot;
            }
        };
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        for i in &instances {
            let id = i.id.as_str();
            let pids: Vec<u32> = i.instance.pids(Role::ApiServer).collect();
            let mine: Vec<&RequestRecord> =
                records.iter().filter(|r| pids.contains(&r.pid) && r.route.starts_with("/v1/")).collect();
            let quantiles = |f: fn(&RequestRecord) -> Option<f64>| {
                let mut v: Vec<f64> = mine.iter().filter_map(|r| f(r)).map(|x| x * 1e3).collect();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| (percentile(&v, 50.0), percentile(&v, 99.0)))
            };
            let of_instance = [("vllm_instance", id)];
            let sum = |name: &str| total(&families, name, &of_instance, |a, b| a + b);
            let succeeded = sum("vllm:request_success_total");
            let tokens = sum("vllm:generation_tokens_total");
            let now = Instant::now();
            let (rps, tps) = match self.previous.insert(id.to_string(), (now, succeeded, tokens)) {
                Some((t, s0, k0)) if now > t => {
                    let dt = (now - t).as_secs_f64();
                    ((succeeded - s0).max(0.0) / dt, (tokens - k0).max(0.0) / dt)
                }
                _ => (0.0, 0.0),
            };
            snapshot.instances.push(InstanceRow {
                id: id.to_string(),
                model: i.models.first().cloned().unwrap_or_else(|| "?".to_string()),
                version: i.version.clone().unwrap_or_default(),
                requests_per_second: rps,
                running: sum("vllm:num_requests_running"),
                waiting: sum("vllm:num_requests_waiting"),
                kernel_ttft_ms: quantiles(|r| r.time_to_first_token_seconds),
                vllm_ttft_ms: bucket_quantiles(&ttft_buckets(&families, id)).map(|(a, b)| (a * 1e3, b * 1e3)),
                duration_ms: quantiles(|r| Some(r.duration_seconds)),
                tokens_per_second: tps,
                kv_cache: total(&families, "vllm:kv_cache_usage_perc", &of_instance, f64::max),
            });
        }
        let gpus: Vec<GpuRow> = families
            .iter()
            .filter(|f| f.name == "inferwatch_gpu_utilization_ratio")
            .flat_map(|f| &f.samples)
            .map(|s| GpuRow {
                index: s.label("gpu").unwrap_or_default().to_string(),
                utilization: s.value,
                ..Default::default()
            })
            .collect();
        snapshot.gpus = (!gpus.is_empty()).then_some(gpus);
        let ms = |v: Option<f64>| v.map(|v| v * 1e3);
        snapshot.requests = records
            .iter()
            .filter(|r| !HOUSEKEEPING.contains(&&*r.route))
            .map(|r| RequestRow {
                age_s: (now_unix - r.received_unix_seconds).max(0.0),
                model: r.model.clone(),
                route: r.route.to_string(),
                status: r.status.into(),
                outcome: r.outcome.to_string(),
                content_events: r.content_events.into(),
                headers_ms: ms(r.response_headers_seconds),
                queued_ms: ms(r.queued_seconds),
                frontend_in_ms: ms(r.frontend_in_seconds),
                engine_first_ms: ms(r.engine_first_seconds),
                ttft_ms: ms(r.time_to_first_token_seconds),
                duration_ms: r.duration_seconds * 1e3,
                trace_id: r.trace_id.clone(),
            })
            .collect();
        snapshot
    }
}

/// vLLM's own TTFT histogram of an instance: (upper bound, cumulative count), in order.
fn ttft_buckets(families: &[Family], instance: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = families
        .iter()
        .flat_map(|f| &f.samples)
        .filter(|s| {
            s.name == "vllm:time_to_first_token_seconds_bucket" && s.label("vllm_instance") == Some(instance)
        })
        .filter_map(|s| {
            let le = s.label("le")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, s.value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_cumulative_buckets() {
        let b = [(0.01, 50.0), (0.1, 99.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        let (p50, p99) = bucket_quantiles(&b).unwrap();
        assert!((p50 - 0.01).abs() < 1e-12);
        assert!((p99 - 0.1).abs() < 1e-12);
        assert_eq!(bucket_quantiles(&[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
    }
}
