//! The metric families the agent exports. Only the aggregator writes them; the HTTP server
//! encodes the registry.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketOpLabels {
    pub pid: u32,
    pub comm: String,
    pub syscall: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketBytesLabels {
    pub pid: u32,
    pub comm: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Reasons an event can be lost, each a fixed label value.
pub const LOST_RING_BUFFER_FULL: &str = "ring_buffer_full";
pub const LOST_AGENT_QUEUE_FULL: &str = "agent_queue_full";
pub const LOST_MALFORMED: &str = "malformed";

pub struct Metrics {
    pub registry: Registry,
    pub socket_ops: Family<SocketOpLabels, Counter>,
    pub socket_bytes: Family<SocketBytesLabels, Counter>,
    pub events: Counter,
    pub events_lost: Family<LostLabels, Counter>,
    pub watched_processes: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let socket_ops = Family::<SocketOpLabels, Counter>::default();
        registry.register(
            "inferwatch_process_socket_ops",
            "Socket operations of watched processes, by the system call that made them",
            socket_ops.clone(),
        );
        let socket_bytes = Family::<SocketBytesLabels, Counter>::default();
        registry.register(
            "inferwatch_process_socket_bytes",
            "Bytes moved through sockets by watched processes",
            socket_bytes.clone(),
        );
        let events = Counter::default();
        registry.register("inferwatch_agent_events", "Kernel events received by the agent", events.clone());
        let events_lost = Family::<LostLabels, Counter>::default();
        for reason in [LOST_RING_BUFFER_FULL, LOST_AGENT_QUEUE_FULL, LOST_MALFORMED] {
            // Present from the start at 0, so `rate()` and alerts work before the first loss.
            let _ = events_lost.get_or_create(&LostLabels { reason });
        }
        registry.register(
            "inferwatch_agent_events_lost",
            "Kernel events dropped before they were counted, by reason",
            events_lost.clone(),
        );
        let watched_processes = Gauge::default();
        registry.register(
            "inferwatch_watched_processes",
            "Processes the kernel programs currently watch",
            watched_processes.clone(),
        );
        registry.register(
            "inferwatch_build",
            "Build information",
            Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION") }),
        );
        Self { registry, socket_ops, socket_bytes, events, events_lost, watched_processes }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_registry_exports_self_metrics() {
        let text = Metrics::new().encode().unwrap();
        assert!(text.contains("inferwatch_agent_events_total 0"), "{text}");
        assert!(text.contains("inferwatch_agent_events_lost_total{reason=\"ring_buffer_full\"} 0"));
        assert!(text.contains("inferwatch_build_info{version=\""));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn socket_ops_are_labelled_by_pid_comm_and_syscall() {
        let m = Metrics::new();
        m.socket_ops
            .get_or_create(&SocketOpLabels { pid: 7, comm: "python3".into(), syscall: "write" })
            .inc_by(3);
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                "inferwatch_process_socket_ops_total{pid=\"7\",comm=\"python3\",syscall=\"write\"} 3"
            ),
            "{text}"
        );
    }
}
