//! `inferwatch top`: a live terminal view of a node's vLLM, fed only by the agent's HTTP API
//! (`/api/v1/instances`, `/metrics`, `/api/v1/requests`), so it works against a remote agent
//! and rides out agent restarts. Drawing is in topview.rs, a pure function of the snapshot.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use serde_json::Value;

use crate::{
    bench::{percentile, url_addr},
    cli::TopArgs,
    httpclient::{self, Target},
    promtext::{self, Family},
    topview::{self, InstanceRow, RequestRow, Snapshot, ViewState},
};

/// Polls the agent and turns counters into rates between polls.
struct Fetcher {
    agent: String,
    target: Option<Target>,
    previous: HashMap<String, (Instant, f64, f64)>,
}

async fn get(target: &Target, path: &str) -> Result<Vec<u8>, String> {
    httpclient::get(target, path, Duration::from_secs(3), 64 << 20).await.map_err(|e| e.to_string())
}

fn sum(families: &[Family], sample: &str, instance: &str, combine: fn(f64, f64) -> f64) -> f64 {
    families
        .iter()
        .flat_map(|f| &f.samples)
        .filter(|s| s.name == sample && s.labels.iter().any(|(k, v)| k == "vllm_instance" && v == instance))
        .map(|s| s.value)
        .fold(0.0, combine)
}

/// p50 and p99 of a Prometheus histogram (cumulative buckets), interpolated as histogram_quantile.
pub fn bucket_quantiles(buckets: &[(f64, f64)]) -> Option<(f64, f64)> {
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

impl Fetcher {
    async fn fetch(&mut self) -> Snapshot {
        let mut snapshot = Snapshot { agent: self.agent.clone(), ..Default::default() };
        let Some(target) = self.target.clone() else {
            snapshot.error = Some("not an http://HOST:PORT address".into());
            return snapshot;
        };
        let (instances, metrics, requests) = tokio::join!(
            get(&target, "/api/v1/instances"),
            get(&target, "/metrics"),
            get(&target, "/api/v1/requests?limit=300")
        );
        let (instances, metrics, requests) = match (instances, metrics, requests) {
            (Ok(i), Ok(m), Ok(r)) => (i, m, r),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                snapshot.error = Some(e);
                return snapshot;
            }
        };
        let instances: Vec<Value> = serde_json::from_slice(&instances).unwrap_or_default();
        let records: Vec<Value> = serde_json::from_slice(&requests).unwrap_or_default();
        let families = promtext::parse(&String::from_utf8_lossy(&metrics)).unwrap_or_default();
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        for i in &instances {
            let id = i["id"].as_str().unwrap_or("").to_string();
            let pids: Vec<u64> = i["processes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["role"] == "api_server")
                .filter_map(|p| p["pid"].as_u64())
                .collect();
            let mine: Vec<&Value> = records
                .iter()
                .filter(|r| r["pid"].as_u64().is_some_and(|p| pids.contains(&p)))
                .filter(|r| r["route"].as_str().is_some_and(|r| r.starts_with("/v1/")))
                .collect();
            let quantiles = |key: &str| {
                let mut v: Vec<f64> = mine.iter().filter_map(|r| r[key].as_f64()).map(|x| x * 1e3).collect();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| (percentile(&v, 50.0), percentile(&v, 99.0)))
            };
            let succeeded = sum(&families, "vllm:request_success_total", &id, |a, b| a + b);
            let tokens = sum(&families, "vllm:generation_tokens_total", &id, |a, b| a + b);
            let now = Instant::now();
            let (rps, tps) = match self.previous.insert(id.clone(), (now, succeeded, tokens)) {
                Some((t, s0, k0)) if now > t => {
                    let dt = (now - t).as_secs_f64();
                    ((succeeded - s0).max(0.0) / dt, (tokens - k0).max(0.0) / dt)
                }
                _ => (0.0, 0.0),
            };
            let mut buckets: Vec<(f64, f64)> = families
                .iter()
                .flat_map(|f| &f.samples)
                .filter(|s| {
                    s.name == "vllm:time_to_first_token_seconds_bucket"
                        && s.labels.iter().any(|(k, v)| k == "vllm_instance" && v == &id)
                })
                .filter_map(|s| {
                    let le = s.labels.iter().find(|(k, _)| k == "le")?.1.as_str();
                    let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                    Some((le, s.value))
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            snapshot.instances.push(InstanceRow {
                id: id.clone(),
                model: i["models"]
                    .as_array()
                    .and_then(|m| m.first())
                    .and_then(|m| m.as_str())
                    .unwrap_or("?")
                    .to_string(),
                version: i["version"].as_str().unwrap_or("").to_string(),
                requests_per_second: rps,
                running: sum(&families, "vllm:num_requests_running", &id, |a, b| a + b),
                waiting: sum(&families, "vllm:num_requests_waiting", &id, |a, b| a + b),
                kernel_ttft_ms: quantiles("time_to_first_token_seconds"),
                vllm_ttft_ms: bucket_quantiles(&buckets).map(|(a, b)| (a * 1e3, b * 1e3)),
                duration_ms: quantiles("duration_seconds"),
                tokens_per_second: tps,
                kv_cache: sum(&families, "vllm:kv_cache_usage_perc", &id, f64::max),
            });
        }
        let gpu_names: Vec<&promtext::Sample> = families
            .iter()
            .filter(|f| f.name == "inferwatch_gpu_utilization_ratio")
            .flat_map(|f| &f.samples)
            .collect();
        snapshot.gpus = (!gpu_names.is_empty()).then(|| {
            gpu_names
                .iter()
                .map(|s| topview::GpuRow {
                    index: s
                        .labels
                        .iter()
                        .find(|(k, _)| k == "gpu")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default(),
                    utilization: s.value,
                    ..Default::default()
                })
                .collect()
        });
        let ms = |r: &Value, k: &str| r[k].as_f64().map(|v| v * 1e3);
        // Housekeeping (the agent's own scrapes, health checks) would crowd out the inference
        // requests a person looks for.
        const HOUSEKEEPING: [&str; 5] = ["/metrics", "/health", "/ping", "/version", "/v1/models"];
        snapshot.requests = records
            .iter()
            .filter(|r| !HOUSEKEEPING.contains(&r["route"].as_str().unwrap_or("")))
            .map(|r| RequestRow {
                age_s: (now_unix - r["received_unix_seconds"].as_f64().unwrap_or(now_unix)).max(0.0),
                model: r["model"].as_str().unwrap_or("").to_string(),
                route: r["route"].as_str().unwrap_or("").to_string(),
                status: r["status"].as_u64().unwrap_or(0),
                outcome: r["outcome"].as_str().unwrap_or("").to_string(),
                content_events: r["content_events"].as_u64().unwrap_or(0),
                headers_ms: ms(r, "response_headers_seconds"),
                frontend_in_ms: ms(r, "frontend_in_seconds"),
                engine_first_ms: ms(r, "engine_first_seconds"),
                ttft_ms: ms(r, "time_to_first_token_seconds"),
                duration_ms: ms(r, "duration_seconds").unwrap_or(0.0),
            })
            .collect();
        snapshot
    }
}

pub async fn run(args: TopArgs) -> Result<()> {
    let color = std::env::var_os("NO_COLOR").is_none() && std::env::var("TERM").map_or(true, |t| t != "dumb");
    let target = url_addr(&args.agent).ok().map(|(addr, _)| Target { addr, netns_of: None });
    let mut fetcher = Fetcher { agent: args.agent.clone(), target, previous: HashMap::new() };
    let mut view = ViewState { color, ..Default::default() };
    let mut terminal = ratatui::init();
    let mut snapshot = fetcher.fetch().await;
    let mut last = Instant::now();
    let result: Result<()> = loop {
        if !view.paused && last.elapsed() >= args.interval {
            snapshot = fetcher.fetch().await;
            last = Instant::now();
        }
        if let Err(e) = terminal.draw(|f| topview::render(f, &snapshot, &view)) {
            break Err(e.into());
        }
        let key = tokio::task::block_in_place(|| -> std::io::Result<Option<KeyCode>> {
            if event::poll(Duration::from_millis(100))?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
            {
                return Ok(Some(k.code));
            }
            Ok(None)
        });
        match key {
            Err(e) => break Err(e.into()),
            Ok(Some(KeyCode::Char('q') | KeyCode::Esc)) => break Ok(()),
            Ok(Some(KeyCode::Char('p'))) => view.paused = !view.paused,
            Ok(Some(KeyCode::Char('s'))) => view.sort = view.sort.next(),
            Ok(Some(KeyCode::Char('m'))) => {
                let mut models: Vec<String> = snapshot.requests.iter().map(|r| r.model.clone()).collect();
                models.sort();
                models.dedup();
                view.model = match &view.model {
                    None => models.first().cloned(),
                    Some(m) => models.iter().position(|x| x == m).and_then(|i| models.get(i + 1)).cloned(),
                };
                view.selected = 0;
            }
            Ok(Some(KeyCode::Down | KeyCode::Char('j'))) => view.selected += 1,
            Ok(Some(KeyCode::Up | KeyCode::Char('k'))) => view.selected = view.selected.saturating_sub(1),
            _ => {}
        }
        view.selected = view.selected.min(topview::listed(&snapshot, &view).len().saturating_sub(1));
    };
    ratatui::restore();
    result
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
