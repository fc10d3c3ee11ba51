//! vLLM instances as discovery describes them (info, model and owner joins), and the TCP
//! counters of their API servers' connections.

use std::collections::HashSet;

use super::{
    Aggregator,
    families::{InstanceLabels, ResetLabels, VllmInfoLabels},
};
use crate::{
    collect::procfs::cmdline::flag_value,
    model::{
        gpu::Owner,
        instance::{InstanceView, Role},
        sock::{NetEvent, NetWhat},
    },
};

impl Aggregator {
    pub(super) fn instances(&mut self, instances: Vec<InstanceView>) {
        let m = &self.store.metrics;
        self.instance_model.clear();
        self.instance_of_pid.clear();
        self.gpu_owners.clear();
        m.vllm_info.clear();
        let ids: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        for i in &instances {
            let api: Vec<u32> = i.instance.pids(Role::ApiServer).collect();
            if let [model] = i.models.as_slice() {
                for pid in &api {
                    self.instance_model.insert(*pid, model.clone());
                }
            }
            for pid in &api {
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
        // Instances that are gone: stop exporting their vLLM metrics and their up/down state.
        let mut vllm = self.store.vllm.write();
        let gone: Vec<String> = vllm.keys().filter(|k| !ids.contains(k.as_str())).cloned().collect();
        for id in gone {
            vllm.remove(&id);
            m.vllm_up.remove(&InstanceLabels { vllm_instance: id.clone() });
            m.vllm_scrape_duration.remove(&InstanceLabels { vllm_instance: id });
        }
        drop(vllm);
        *self.store.instances.write() = instances;
    }

    /// A retransmit or reset on a connection of an API server.
    pub(super) fn net_event(&mut self, net: NetEvent) {
        let vllm_instance =
            self.instance_of_pid.get(&net.tgid).cloned().unwrap_or_else(|| format!("pid:{}", net.tgid));
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
