//! `inferwatch diagnose`: the troubleshooting table as rules evaluated on live data. Each
//! finding names its evidence (numbers and their source) and the change to make.
//!
//! The aggregator records a [`Sample`] per instance at every scrape; rules look at the samples
//! of a window. Evaluation is pure, so every rule is unit-tested at its boundaries.

use serde::Serialize;

pub(crate) use crate::model::diagnosis::{Diagnosis, Finding};

/// What the agent knew about one instance at one scrape. Counters are cumulative.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the agent started.
    pub t: f64,
    pub instance: String,
    pub waiting: f64,
    pub running: f64,
    pub kv_cache_usage: f64,
    pub preemptions: f64,
    pub requests_succeeded: f64,
    pub max_num_seqs: Option<f64>,
    /// Streamed requests whose phases matched: sums of TTFT and of the frontend phases.
    pub ttft_sum: f64,
    /// The API server's phases: queued + frontend_in + frontend_out.
    pub frontend_sum: f64,
    /// Of which waiting in the socket before the server read the request.
    pub queued_sum: f64,
    pub api_runqueue_sum: f64,
    pub api_runqueue_count: f64,
    pub retransmits: f64,
    pub resets: f64,
    /// GPU memory used / total, when a GPU collector reports it.
    pub gpu_memory_ratio: Option<f64>,
}

pub(crate) const RULES: [&str; 6] =
    ["queueing", "kv_cache_full", "low_batch", "gpu_memory_full", "api_server_bound", "network"];

/// Evaluates every rule on the samples of the last `window` seconds (ending at `now`).
pub(crate) fn diagnose(samples: &[Sample], now: f64, window: f64) -> Diagnosis {
    let recent: Vec<&Sample> = samples.iter().filter(|s| s.t >= now - window).collect();
    let mut instances: Vec<String> = recent.iter().map(|s| s.instance.clone()).collect();
    instances.sort();
    instances.dedup();
    let mut findings = Vec::new();
    let mut not_evaluated = Vec::new();
    for instance in &instances {
        let s: Vec<&Sample> = recent.iter().copied().filter(|x| &x.instance == instance).collect();
        if s.len() < 2 {
            not_evaluated.push((instance.clone(), "fewer than 2 scrapes in the window".into()));
            continue;
        }
        let (first, last) = (s[0], s[s.len() - 1]);
        let n = s.len() as f64;
        let mean = |f: fn(&Sample) -> f64| s.iter().map(|x| f(x)).sum::<f64>() / n;
        let delta = |f: fn(&Sample) -> f64| f(last) - f(first);
        let succeeded = delta(|x| x.requests_succeeded);
        let seqs = last
            .max_num_seqs
            .map_or("its current value (vLLM's default is 256 on GPUs)".to_string(), |m| format!("{m}"));

        // (a) Requests queueing: waiting > 0 in at least 80% of the scrapes.
        let queued = s.iter().filter(|x| x.waiting > 0.0).count() as f64 / n;
        if queued >= 0.8 {
            let mean_waiting = mean(|x| x.waiting);
            let mean_running = mean(|x| x.running);
            findings.push(Finding {
                rule: "queueing".into(),
                severity: if mean_waiting > mean_running { "critical" } else { "warning" }.into(),
                summary: format!("{instance}: requests wait for a slot in {:.0}% of scrapes", queued * 100.0),
                evidence: vec![
                    format!("vllm:num_requests_waiting mean {mean_waiting:.1} (>0 in {:.0}% of {} scrapes)", queued * 100.0, s.len()),
                    format!("vllm:num_requests_running mean {mean_running:.1}, --max-num-seqs {seqs}"),
                ],
                action: format!("raise --max-num-seqs above {seqs} if the KV cache has room (kv_cache_usage_perc well below 0.9); otherwise add GPUs or replicas"),
            });
        }
        // (b) KV cache near full or preempting.
        let kv_max = s.iter().map(|x| x.kv_cache_usage).fold(0.0, f64::max);
        let preempted = delta(|x| x.preemptions);
        if kv_max > 0.9 || preempted > 0.0 {
            findings.push(Finding {
                rule: "kv_cache_full".into(),
                severity: if preempted > 0.0 { "critical" } else { "warning" }.into(),
                summary: format!("{instance}: the KV cache is near full"),
                evidence: vec![
                    format!("vllm:kv_cache_usage_perc max {kv_max:.2}"),
                    format!("vllm:num_preemptions_total +{preempted:.0} in the window"),
                ],
                action: "lower --max-model-len, enable chunked prefill (--enable-chunked-prefill), or raise --gpu-memory-utilization".into(),
            });
        }
        // (c) Low throughput with headroom: traffic, but small batches and nothing waiting.
        let running = mean(|x| x.running);
        let max = last.max_num_seqs.unwrap_or(256.0);
        if succeeded > 0.0 && queued == 0.0 && running < 2.0 && running < max / 4.0 {
            findings.push(Finding {
                rule: "low_batch".into(),
                severity: "info".into(),
                summary: format!("{instance}: requests run in small batches (mean {running:.2} running) with no queue"),
                evidence: vec![
                    format!("vllm:num_requests_running mean {running:.2} of --max-num-seqs {seqs}"),
                    format!("vllm:request_success_total +{succeeded:.0}, vllm:num_requests_waiting 0 throughout"),
                ],
                action: "the server has headroom: send more concurrent requests, or raise --max-num-batched-tokens for longer prompts".into(),
            });
        }
        // (d) GPU memory: only with a GPU collector.
        match s.iter().filter_map(|x| x.gpu_memory_ratio).reduce(f64::max) {
            None => not_evaluated
                .push((format!("{instance}: gpu_memory_full"), "no GPU data (no NVML on this node)".into())),
            Some(ratio) if ratio > 0.95 => findings.push(Finding {
                rule: "gpu_memory_full".into(),
                severity: "warning".into(),
                summary: format!("{instance}: GPU memory {:.0}% used", ratio * 100.0),
                evidence: vec![format!("inferwatch_gpu_memory_used_bytes / total max {ratio:.2}")],
                action:
                    "serve quantised weights (AWQ/GPTQ) or lower --max-num-seqs / --gpu-memory-utilization"
                        .into(),
            }),
            Some(_) => {}
        }
        // (e) API-server bound: the API server's phases dominate TTFT, and it either waits for
        // CPU or leaves requests waiting in their sockets (a busy event loop).
        let ttft = delta(|x| x.ttft_sum);
        let frontend = delta(|x| x.frontend_sum);
        let queued = delta(|x| x.queued_sum);
        let rq_count = delta(|x| x.api_runqueue_count);
        let rq_mean = if rq_count > 0.0 { delta(|x| x.api_runqueue_sum) / rq_count } else { 0.0 };
        let cpu_starved = rq_mean > 0.001;
        let loop_busy = ttft > 0.0 && queued / ttft > 0.25;
        if ttft > 0.0 && frontend / ttft > 0.5 && (cpu_starved || loop_busy) {
            findings.push(Finding {
                rule: "api_server_bound".into(),
                severity: "warning".into(),
                summary: format!("{instance}: the API server, not the engine, dominates time to first token"),
                evidence: vec![
                    format!(
                        "inferwatch_request_phase_seconds: API-server phases (queued, frontend_in, frontend_out) {:.0}% of TTFT",
                        frontend / ttft * 100.0
                    ),
                    format!(
                        "inferwatch_request_phase_seconds{{phase=\"queued\"}}: requests waited in their sockets before the server read them for {:.0}% of TTFT",
                        queued / ttft * 100.0
                    ),
                    format!(
                        "inferwatch_sched_runqueue_delay_seconds{{role=\"api_server\"}} mean {:.2} ms",
                        rq_mean * 1e3
                    ),
                ],
                action: if cpu_starved {
                    "run more API servers (--api-server-count) and give the API server more CPU cores"
                } else {
                    "the API server's event loop is busy (requests wait unread): run more API servers (--api-server-count), and keep heavy work (large prompts' tokenisation, big responses) off it"
                }
                .into(),
            });
        }
        // (f) Network trouble.
        let retrans = delta(|x| x.retransmits);
        let resets = delta(|x| x.resets);
        if retrans > 10.0 || resets > (0.05 * succeeded).max(5.0) {
            findings.push(Finding {
                rule: "network".into(),
                severity: "warning".into(),
                summary: format!("{instance}: TCP trouble on client connections"),
                evidence: vec![
                    format!("inferwatch_tcp_retransmits_total +{retrans:.0}"),
                    format!("inferwatch_tcp_resets_total +{resets:.0} for {succeeded:.0} requests"),
                ],
                action: "check the network path and client timeouts (retransmits: loss or congestion; resets: clients giving up)".into(),
            });
        }
    }
    Diagnosis { window_seconds: window, instances, findings, not_evaluated }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(n: usize, f: impl Fn(usize, &mut Sample)) -> Vec<Sample> {
        (0..n)
            .map(|i| {
                let mut s = Sample {
                    t: i as f64 * 5.0,
                    instance: "localhost:8000".into(),
                    max_num_seqs: Some(8.0),
                    ..Default::default()
                };
                f(i, &mut s);
                s
            })
            .collect()
    }

    fn rules(d: &Diagnosis) -> Vec<String> {
        d.findings.iter().map(|f| f.rule.to_string()).collect()
    }

    #[test]
    fn an_idle_server_is_quiet() {
        let d = diagnose(&series(12, |_, _| {}), 55.0, 300.0);
        assert!(d.findings.is_empty(), "{d:?}");
    }

    #[test]
    fn queueing_at_the_80_percent_boundary() {
        // 8 of 10 scrapes with waiting requests: sustained.
        let d = diagnose(&series(10, |i, s| s.waiting = if i < 8 { 3.0 } else { 0.0 }), 45.0, 300.0);
        assert_eq!(rules(&d), ["queueing"]);
        assert!(d.findings[0].action.contains("--max-num-seqs above 8"));
        // 7 of 10: not sustained.
        let d = diagnose(&series(10, |i, s| s.waiting = if i < 7 { 3.0 } else { 0.0 }), 45.0, 300.0);
        assert!(d.findings.is_empty(), "{d:?}");
        // More waiting than running: critical.
        let d = diagnose(&series(4, |_, s| (s.waiting, s.running) = (5.0, 2.0)), 15.0, 300.0);
        assert_eq!(d.findings[0].severity, "critical");
    }

    #[test]
    fn kv_cache_boundaries() {
        let at = |kv: f64| diagnose(&series(3, |_, s| s.kv_cache_usage = kv), 10.0, 300.0);
        assert!(at(0.9).findings.is_empty(), "0.9 is not above 0.9");
        assert_eq!(rules(&at(0.91)), ["kv_cache_full"]);
        let d = diagnose(&series(3, |i, s| s.preemptions = i as f64), 10.0, 300.0);
        assert_eq!((rules(&d)[0].as_str(), &*d.findings[0].severity), ("kv_cache_full", "critical"));
    }

    #[test]
    fn small_batches_need_traffic() {
        let d = diagnose(
            &series(3, |i, s| (s.running, s.requests_succeeded) = (1.0, i as f64 * 10.0)),
            10.0,
            300.0,
        );
        assert_eq!(rules(&d), ["low_batch"]);
        let d = diagnose(
            &series(3, |i, s| (s.running, s.requests_succeeded) = (2.0, i as f64 * 10.0)),
            10.0,
            300.0,
        );
        assert!(d.findings.is_empty(), "2 running is not small: {d:?}");
    }

    #[test]
    fn api_server_bound_needs_both_signals() {
        let make = |frontend_share: f64, rq_ms: f64| {
            series(3, move |i, s| {
                s.ttft_sum = i as f64;
                s.frontend_sum = i as f64 * frontend_share;
                s.api_runqueue_count = i as f64 * 100.0;
                s.api_runqueue_sum = i as f64 * 100.0 * rq_ms / 1e3;
            })
        };
        assert_eq!(rules(&diagnose(&make(0.6, 1.5), 10.0, 300.0)), ["api_server_bound"]);
        assert!(diagnose(&make(0.5, 1.5), 10.0, 300.0).findings.is_empty(), "half is not dominating");
        assert!(diagnose(&make(0.6, 0.9), 10.0, 300.0).findings.is_empty(), "no CPU contention");
    }

    #[test]
    fn api_server_bound_by_requests_waiting_unread() {
        let make = |queued_share: f64| {
            series(3, move |i, s| {
                s.ttft_sum = i as f64;
                s.frontend_sum = i as f64 * 0.7;
                s.queued_sum = i as f64 * queued_share;
            })
        };
        let d = diagnose(&make(0.4), 10.0, 300.0);
        assert_eq!(rules(&d), ["api_server_bound"], "a busy loop without CPU contention");
        assert!(d.findings[0].evidence[1].contains("40% of TTFT"), "{:?}", d.findings[0].evidence);
        assert!(d.findings[0].action.contains("event loop"));
        assert!(diagnose(&make(0.2), 10.0, 300.0).findings.is_empty(), "a fifth queued is not a busy loop");
    }

    #[test]
    fn network_thresholds() {
        // Busy enough (4 running) that the small-batch rule stays out of it.
        let run = |retransmits: f64, resets: f64| {
            let samples = series(3, |i, s| {
                s.running = 4.0;
                s.requests_succeeded = i as f64 * 100.0;
                s.retransmits = i as f64 * retransmits;
                s.resets = i as f64 * resets;
            });
            rules(&diagnose(&samples, 10.0, 300.0))
        };
        assert_eq!(run(6.0, 0.0), ["network"], "12 retransmits");
        assert!(run(5.0, 0.0).is_empty(), "10 retransmits is the limit");
        assert!(run(0.0, 2.5).is_empty(), "5 resets in 200 requests is within 5%");
        assert_eq!(run(0.0, 6.0), ["network"]);
    }

    #[test]
    fn gpu_rule_needs_gpu_data_and_the_window_is_respected() {
        let d = diagnose(&series(3, |_, _| {}), 10.0, 300.0);
        assert!(
            d.not_evaluated
                .iter()
                .any(|(what, why)| what.ends_with("gpu_memory_full") && why.contains("no GPU"))
        );
        let d = diagnose(&series(3, |_, s| s.gpu_memory_ratio = Some(0.97)), 10.0, 300.0);
        assert_eq!(rules(&d), ["gpu_memory_full"]);
        // Queueing long ago, outside a 20 s window: quiet.
        let d = diagnose(&series(20, |i, s| s.waiting = if i < 10 { 4.0 } else { 0.0 }), 95.0, 20.0);
        assert!(d.findings.is_empty(), "{d:?}");
    }
}
