//! Per-process socket counters (`inferwatch_process_socket_*`), and the processes watched.

use prometheus_client::metrics::counter::Counter;

use super::{
    Aggregator,
    families::{FamilyLabels, SocketBytesLabels, SocketOpLabels},
};
use crate::{
    collect::procfs,
    kernel::syscalls,
    model::sock::{Direction, SockOp},
};

/// The series handles of one process: by system call, and bytes sent/received.
#[derive(Default)]
pub(super) struct ProcessCounters {
    ops: Vec<(&'static str, Counter)>,
    sent: Option<Counter>,
    received: Option<Counter>,
}

const SOCKET_OPS: &str = "inferwatch_process_socket_ops";
const SOCKET_BYTES: &str = "inferwatch_process_socket_bytes";

impl Aggregator {
    pub(super) fn watched(&mut self, tgid: u32, comm: String) {
        self.comms.insert(tgid, comm);
        self.store.metrics.watched_processes.set(self.comms.len() as i64);
    }

    pub(super) fn unwatched(&mut self, tgid: u32) {
        self.process_counters.remove(&tgid);
        // Its per-pid series go: a process that is gone adds nothing more, and vLLM's
        // restarts must not pile up series of dead pids.
        if let Some(comm) = self.comms.remove(&tgid) {
            self.remove_process_series(tgid, &comm);
        }
        self.store.metrics.watched_processes.set(self.comms.len() as i64);
    }

    fn remove_process_series(&mut self, pid: u32, comm: &str) {
        let metrics = &self.store.metrics;
        for syscall in syscalls::LABELS {
            let ops = SocketOpLabels { pid, comm: comm.to_string(), syscall };
            metrics.socket_ops.remove(&ops);
            self.budget.release(SOCKET_OPS, &ops);
        }
        for direction in ["sent", "received"] {
            let bytes = SocketBytesLabels { pid, comm: comm.to_string(), direction };
            metrics.socket_bytes.remove(&bytes);
            self.budget.release(SOCKET_BYTES, &bytes);
        }
    }

    /// Per-process counters. The handles of a process's series are kept after their first
    /// use, so a socket operation costs two atomic increments, not label hashing and copies.
    pub(super) fn sock_op(&mut self, op: &SockOp<'_>) {
        let metrics = &self.store.metrics;
        metrics.events.inc();
        metrics.payload_bytes.inc_by((op.payload.len() + op.tail.len()) as u64);
        let handles = self.process_counters.entry(op.tgid).or_default();
        let comms = &mut self.comms;
        let mut comm =
            |tgid: u32| comms.entry(tgid).or_insert_with(|| procfs::comm(tgid).unwrap_or_default()).clone();
        match handles.ops.iter().find(|(syscall, _)| *syscall == op.syscall) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let ops = SocketOpLabels { pid: op.tgid, comm: comm(op.tgid), syscall: op.syscall };
                if self.budget.admit(SOCKET_OPS, &ops) {
                    let counter = metrics.socket_ops.get_or_create(&ops).clone();
                    counter.inc();
                    handles.ops.push((op.syscall, counter));
                } else {
                    metrics.series_refused.get_or_create(&FamilyLabels { family: SOCKET_OPS }).inc();
                }
            }
        }
        if op.ret > 0 {
            let slot = match op.direction {
                Direction::Sent => &mut handles.sent,
                Direction::Received => &mut handles.received,
            };
            match slot {
                Some(counter) => {
                    counter.inc_by(op.ret as u64);
                }
                None => {
                    let bytes = SocketBytesLabels {
                        pid: op.tgid,
                        comm: comm(op.tgid),
                        direction: op.direction.as_str(),
                    };
                    if self.budget.admit(SOCKET_BYTES, &bytes) {
                        let counter = metrics.socket_bytes.get_or_create(&bytes).clone();
                        counter.inc_by(op.ret as u64);
                        *slot = Some(counter);
                    } else {
                        metrics.series_refused.get_or_create(&FamilyLabels { family: SOCKET_BYTES }).inc();
                    }
                }
            }
        }
    }
}
