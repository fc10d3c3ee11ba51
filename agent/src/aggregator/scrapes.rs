//! vLLM's own `/metrics`, scraped: kept for re-export (capped), compared with the kernel's
//! view (the API server's overhead), and sampled for the diagnosis rules.

use super::{
    Aggregator, diagnosis,
    families::{FamilyLabels, InstanceLabels, ResetLabels, RuleLabels, ScrapeErrorLabels},
    store::VllmSnapshot,
};
use crate::model::{
    family::Family,
    scrape::{MAX_VLLM_SAMPLES, ScrapeResult},
};

/// Keeps the first `max` samples of a scraped page (whole families first come, first kept);
/// returns how many were dropped.
pub(super) fn cap_samples(families: &mut Vec<Family>, max: usize) -> u64 {
    let mut kept = 0usize;
    let mut dropped = 0u64;
    families.retain(|f| {
        if kept + f.samples.len() <= max {
            kept += f.samples.len();
            true
        } else {
            dropped += f.samples.len() as u64;
            false
        }
    });
    dropped
}

/// vLLM's own cumulative time to first token (sum, count) from its scraped families.
fn vllm_ttft(families: &[Family]) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        families
            .iter()
            .filter(|f| f.name == "vllm:time_to_first_token_seconds")
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == format!("vllm:time_to_first_token_seconds{suffix}"))
            .map(|s| s.value)
            .sum()
    };
    (total("_sum"), total("_count"))
}

impl Aggregator {
    pub(super) fn scrape(&mut self, result: ScrapeResult) {
        let m = &self.store.metrics;
        let id = result.target.id.clone();
        let labels = InstanceLabels { vllm_instance: id.clone() };
        m.vllm_scrape_duration.get_or_create(&labels).set(result.duration.as_secs_f64());
        self.known_instances.insert(id.clone());
        let mut vllm = self.store.vllm.write();
        match result.outcome {
            Ok(mut families) => {
                m.vllm_up.get_or_create(&labels).set(1);
                let refused = cap_samples(&mut families, MAX_VLLM_SAMPLES) + result.dropped;
                if refused > 0 {
                    m.series_refused.get_or_create(&FamilyLabels { family: "vllm" }).inc_by(refused);
                }
                self.record_diagnosis_sample(&id, &families);
                let theirs = vllm_ttft(&families);
                let previous = self.vllm_ttft_seen.insert(id.clone(), theirs);
                let ours = self.ttft_since_scrape.remove(&id).unwrap_or((0.0, 0));
                if let Some((sum0, count0)) = previous {
                    let (dsum, dcount) = (theirs.0 - sum0, theirs.1 - count0);
                    if dcount >= 1.0 && ours.1 > 0 {
                        let overhead = ours.0 / ours.1 as f64 - dsum / dcount;
                        m.api_server_overhead.get_or_create(&labels).set(overhead);
                    }
                }
                vllm.insert(id, VllmSnapshot { families, labels: result.target.labels });
            }
            Err((reason, detail)) => {
                tracing::debug!(instance = id, "scrape failed: {detail}");
                m.vllm_up.get_or_create(&labels).set(0);
                m.vllm_scrape_errors
                    .get_or_create(&ScrapeErrorLabels { vllm_instance: id.clone(), reason })
                    .inc();
                // Nothing stale or half-parsed stays exported.
                vllm.remove(&id);
            }
        }
    }

    /// One diagnosis sample for `id` from its fresh scrape and the agent's own counters; then the
    /// rules' verdict over the default window as `inferwatch_diagnosis_active`.
    fn record_diagnosis_sample(&self, id: &str, families: &[Family]) {
        let total = |name: &str, sample: &str, combine: fn(f64, f64) -> f64| {
            families
                .iter()
                .filter(|f| f.name == name)
                .flat_map(|f| &f.samples)
                .filter(|s| s.name == sample)
                .map(|s| s.value)
                .fold(0.0, combine)
        };
        let sum = |name: &str| total(name, name, |a, b| a + b);
        let m = &self.store.metrics;
        let labels = InstanceLabels { vllm_instance: id.to_string() };
        let resets: f64 = ["sent", "received"]
            .iter()
            .map(|d| {
                m.tcp_resets.get_or_create(&ResetLabels { vllm_instance: id.to_string(), direction: d }).get()
                    as f64
            })
            .sum();
        let sums = self.phase_sums.get(id).copied().unwrap_or_default();
        let sample = diagnosis::Sample {
            t: self.store.started.elapsed().as_secs_f64(),
            instance: id.to_string(),
            waiting: sum("vllm:num_requests_waiting"),
            running: sum("vllm:num_requests_running"),
            kv_cache_usage: total("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", f64::max),
            preemptions: sum("vllm:num_preemptions_total"),
            requests_succeeded: sum("vllm:request_success_total"),
            max_num_seqs: self.max_num_seqs.get(id).copied(),
            ttft_sum: sums.ttft,
            frontend_sum: sums.frontend,
            queued_sum: sums.queued,
            api_runqueue_sum: self.api_runqueue.0,
            api_runqueue_count: self.api_runqueue.1,
            retransmits: m.tcp_retransmits.get_or_create(&labels).get() as f64,
            resets,
            gpu_memory_ratio: None,
        };
        let now = sample.t;
        let mut samples = self.store.diagnosis_samples.write();
        samples.push_back(sample);
        while samples.front().is_some_and(|s| s.t < now - 3600.0) {
            samples.pop_front();
        }
        let verdict = diagnosis::diagnose(samples.make_contiguous(), now, 300.0);
        drop(samples);
        for rule in diagnosis::RULES {
            let active = verdict.findings.iter().any(|f| f.rule == rule);
            m.diagnosis_active.get_or_create(&RuleLabels { rule }).set(i64::from(active));
        }
    }
}
