//! The single owner of the agent's state: every event arrives here through one channel, and
//! only this module writes the metric families.

use std::{collections::HashMap, sync::Arc};

use tokio::sync::mpsc;

use crate::{
    events::{AgentEvent, SockOp},
    metrics::{LOST_MALFORMED, LostLabels, Metrics, SocketBytesLabels, SocketOpLabels},
    procfs,
};

pub struct Aggregator {
    metrics: Arc<Metrics>,
    /// Command names of watched processes, keyed by tgid.
    comms: HashMap<u32, String>,
    /// Last cumulative loss count seen per reason, to turn totals into counter increments.
    lost_totals: HashMap<&'static str, u64>,
}

impl Aggregator {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, comms: HashMap::new(), lost_totals: HashMap::new() }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<AgentEvent>) {
        while let Some(event) = events.recv().await {
            self.apply(event);
        }
    }

    pub fn apply(&mut self, event: AgentEvent) {
        match event {
            AgentEvent::Sock(op) => self.sock_op(op),
            AgentEvent::Watched { tgid, comm } => {
                self.comms.insert(tgid, comm);
                self.metrics.watched_processes.set(self.comms.len() as i64);
            }
            AgentEvent::KernelLost { reason, total } => {
                let seen = self.lost_totals.entry(reason).or_insert(0);
                // Totals only grow while the maps live; a smaller one means a reload: start over.
                let delta = total.checked_sub(*seen).unwrap_or(total);
                *seen = total;
                self.metrics.events_lost.get_or_create(&LostLabels { reason }).inc_by(delta);
            }
            AgentEvent::Malformed => {
                self.metrics.events_lost.get_or_create(&LostLabels { reason: LOST_MALFORMED }).inc();
            }
        }
    }

    fn sock_op(&mut self, op: SockOp) {
        self.metrics.events.inc();
        let comm =
            self.comms.entry(op.tgid).or_insert_with(|| procfs::comm(op.tgid).unwrap_or_default()).clone();
        self.metrics
            .socket_ops
            .get_or_create(&SocketOpLabels { pid: op.tgid, comm: comm.clone(), syscall: op.syscall })
            .inc();
        if op.ret > 0 {
            self.metrics
                .socket_bytes
                .get_or_create(&SocketBytesLabels { pid: op.tgid, comm, direction: op.direction.as_str() })
                .inc_by(op.ret as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::Direction, metrics::LOST_RING_BUFFER_FULL};

    fn op(tgid: u32, syscall: &'static str, direction: Direction, ret: i32) -> AgentEvent {
        AgentEvent::Sock(SockOp { ts_ns: 1, sock: 2, tgid, tid: tgid, ret, syscall, direction })
    }

    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counts_ops_and_bytes_per_process_and_call() {
        let metrics = Arc::new(Metrics::new());
        let mut agg = Aggregator::new(metrics.clone());
        agg.apply(AgentEvent::Watched { tgid: 10, comm: "vllm".into() });
        for _ in 0..3 {
            agg.apply(op(10, "write", Direction::Sent, 100));
        }
        agg.apply(op(10, "sendto", Direction::Sent, -11));
        agg.apply(op(10, "read", Direction::Received, 7));
        let text = metrics.encode().unwrap();
        let ops = |s: &str| {
            value(
                &text,
                &format!("inferwatch_process_socket_ops_total{{pid=\"10\",comm=\"vllm\",syscall=\"{s}\"}}"),
            )
        };
        assert_eq!(ops("write"), Some(3));
        assert_eq!(ops("sendto"), Some(1), "failed calls are operations too");
        assert_eq!(ops("read"), Some(1));
        let bytes = |d: &str| {
            value(
                &text,
                &format!(
                    "inferwatch_process_socket_bytes_total{{pid=\"10\",comm=\"vllm\",direction=\"{d}\"}}"
                ),
            )
        };
        assert_eq!(bytes("sent"), Some(300), "errors move no bytes");
        assert_eq!(bytes("received"), Some(7));
        assert_eq!(value(&text, "inferwatch_agent_events_total"), Some(5));
        assert_eq!(value(&text, "inferwatch_watched_processes"), Some(1));
    }

    #[test]
    fn kernel_loss_totals_become_increments() {
        let metrics = Arc::new(Metrics::new());
        let mut agg = Aggregator::new(metrics.clone());
        let series = "inferwatch_agent_events_lost_total{reason=\"ring_buffer_full\"}";
        for (total, expect) in [(5, 5), (5, 5), (12, 12), (3, 15)] {
            agg.apply(AgentEvent::KernelLost { reason: LOST_RING_BUFFER_FULL, total });
            assert_eq!(value(&metrics.encode().unwrap(), series), Some(expect), "after total {total}");
        }
        agg.apply(AgentEvent::Malformed);
        let text = metrics.encode().unwrap();
        assert_eq!(value(&text, "inferwatch_agent_events_lost_total{reason=\"malformed\"}"), Some(1));
    }
}
