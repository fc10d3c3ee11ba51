//! vLLM instances as discovery describes them (info, model and owner joins), and the TCP
//! counters of their API servers' connections.

use std::collections::HashSet;

use super::{
    Aggregator,
    families::{InstanceLabels, ResetLabels, ScrapeErrorLabels, VllmInfoLabels},
};
use crate::{
    collect::procfs::cmdline::flag_value,
    model::{
        gpu::Owner,
        instance::{InstanceView, Role},
        sock::{NetEvent, NetWhat},
    },
};

/// Every `reason` of `inferwatch_vllm_scrape_errors_total`.
const SCRAPE_ERROR_REASONS: [&str; 7] =
    ["connect", "timeout", "io", "too_large", "malformed_http", "http_status", "parse"];

impl Aggregator {
    pub(super) fn instances(&mut self, instances: Vec<InstanceView>) {
        let m = &self.store.metrics;
        self.instance_served.clear();
        self.instance_of_pid.clear();
        self.gpu_owners.clear();
        m.vllm_info.clear();
        for i in &instances {
            let api: Vec<u32> = i.instance.pids(Role::ApiServer).collect();
            for pid in &api {
                self.instance_served.insert(*pid, i.models.clone());
                self.instance_of_pid.insert(*pid, i.id.clone());
            }
            let model = i.models.first().or(i.instance.cmdline_models.first()).cloned().unwrap_or_default();
            for p in &i.instance.processes {
                self.gpu_owners.insert(p.pid, Owner { model: model.clone(), role: p.role.as_str() });
            }
            if let Some(n) = flag_value(&i.instance.flags, "--max-num-seqs").and_then(|v| v.parse().ok()) {
                self.max_num_seqs.insert(i.id.clone(), n);
            }
            // Zero-valued from the start, so rates and alerts see the first retransmit or reset.
            m.tcp_retransmits.get_or_create(&InstanceLabels { vllm_instance: i.id.clone() }).inc_by(0);
            for direction in ["sent", "received"] {
                m.tcp_resets.get_or_create(&ResetLabels { vllm_instance: i.id.clone(), direction }).inc_by(0);
            }
            if let Some(total) = i.listen_overflows {
                let seen = self.listen_overflows.entry(i.id.clone()).or_insert(total);
                let counter =
                    m.tcp_listen_overflows.get_or_create(&InstanceLabels { vllm_instance: i.id.clone() });
                counter.inc_by(total.saturating_sub(*seen));
                *seen = total;
            }
            let engine = i.instance.pids(Role::EngineCore).next();
            m.vllm_info
                .get_or_create(&VllmInfoLabels {
                    vllm_instance: i.id.clone(),
                    version: i.version.clone().unwrap_or_default(),
                    model: i.models.join(","),
                    api_pid: api.first().map(|p| p.to_string()).unwrap_or_default(),
                    engine_pid: engine.map(|p| p.to_string()).unwrap_or_default(),
                    port: i.instance.listen.first().map(|a| a.port().to_string()).unwrap_or_default(),
                })
                .set(1);
        }
        // Instances that are gone (discovered ones no longer found; `--vllm-url` ones stay):
        // their series and what was kept for them go, so restarts and churn pile up nothing.
        let current: HashSet<String> =
            instances.iter().map(|i| i.id.clone()).chain(self.explicit_instances.iter().cloned()).collect();
        let gone: Vec<String> = self.known_instances.difference(&current).cloned().collect();
        for id in gone {
            self.forget_instance(&id);
        }
        self.known_instances = current;
        *self.store.instances.write() = instances;
    }

    /// Removes every series and every state kept for instance `id`.
    pub(super) fn forget_instance(&mut self, id: &str) {
        let m = &self.store.metrics;
        let instance = InstanceLabels { vllm_instance: id.to_string() };
        self.store.vllm.write().remove(id);
        m.vllm_up.remove(&instance);
        m.vllm_scrape_duration.remove(&instance);
        m.tcp_retransmits.remove(&instance);
        m.tcp_listen_overflows.remove(&instance);
        m.api_server_overhead.remove(&instance);
        for direction in ["sent", "received"] {
            m.tcp_resets.remove(&ResetLabels { vllm_instance: id.to_string(), direction });
        }
        for reason in SCRAPE_ERROR_REASONS {
            m.vllm_scrape_errors.remove(&ScrapeErrorLabels { vllm_instance: id.to_string(), reason });
        }
        self.listen_overflows.remove(id);
        self.ttft_since_scrape.remove(id);
        self.vllm_ttft_seen.remove(id);
        self.phase_sums.remove(id);
        self.max_num_seqs.remove(id);
        self.known_instances.remove(id);
    }

    /// A retransmit or reset on a connection of an API server.
    pub(super) fn net_event(&mut self, net: NetEvent) {
        // A process outside any instance (a `--pid`) counts under one bounded value, not its pid.
        let vllm_instance =
            self.instance_of_pid.get(&net.tgid).cloned().unwrap_or_else(|| "unknown".to_string());
        let m = &self.store.metrics;
        match net.what {
            NetWhat::Retransmit => {
                m.tcp_retransmits.get_or_create(&InstanceLabels { vllm_instance }).inc();
            }
            NetWhat::ResetSent => {
                m.tcp_resets.get_or_create(&ResetLabels { vllm_instance, direction: "sent" }).inc();
            }
            NetWhat::ResetReceived => {
                m.tcp_resets.get_or_create(&ResetLabels { vllm_instance, direction: "received" }).inc();
            }
        }
    }
}
