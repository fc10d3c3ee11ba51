//! The kernel side as the agent sees it: loading and attaching the programs ([`probes`]),
//! reading what they produce ([`ring`]), decoding their records ([`decode`]) and naming the
//! system calls behind them ([`syscalls`]).

pub(crate) mod btf;
pub mod decode;
pub(crate) mod kretprobe;
pub(crate) mod plan;
pub(crate) mod probes;
pub(crate) mod ring;
pub(crate) mod syscalls;

use inferwatch_common::sock::{LOST_REASONS, LostReason};

use crate::model::sock::RecordBatch;

/// What the kernel readers hand the aggregator.
#[derive(Debug)]
pub(crate) enum KernelReport {
    /// Kernel records of one ring-buffer drain, in order (one message, not one per record).
    Batch(RecordBatch),
    /// Cumulative count of events dropped, per reason (the kernel's per-CPU map, or our queue).
    Lost { reason: &'static str, total: u64 },
    /// Cumulative scheduler statistics per role (the kernel's `SCHED_STATS`, summed over CPUs).
    Sched(Vec<u64>),
    /// Cumulative run statistics of each kernel program.
    ProgramStats(Vec<ProgramStats>),
}

/// One kernel program's cumulative statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProgramStats {
    pub program: &'static str,
    /// Run time and runs: counted while `kernel.bpf_stats_enabled=1`.
    pub run_ns: u64,
    pub runs: u64,
    /// Runs the kernel skipped because the program was already running on that CPU (always
    /// counted for fexit and tracepoint programs from Linux 5.12).
    pub misses: u64,
}

/// Reasons an event can be lost, each a fixed label value.
pub(crate) const LOST_RING_BUFFER_FULL: &str = "ring_buffer_full";
pub(crate) const LOST_AGENT_QUEUE_FULL: &str = "agent_queue_full";
pub(crate) const LOST_MALFORMED: &str = "malformed";
/// A kretprobe missed a watched call's return (kprobe hooks only): see `LostReason::ReturnMissed`.
pub(crate) const LOST_KRETPROBE_MISSED: &str = "kretprobe_missed";
/// An fexit program found its CPU's record slot held by a task it preempted (kernels with
/// `preempt=full`): see `LostReason::SlotBusy`.
pub(crate) const LOST_SLOT_BUSY: &str = "preempted";
/// The kernel programs' loss counters (the `LOST` map's slots) with their labels: one entry per
/// `LostReason`, which the length makes the compiler check.
pub(crate) const KERNEL_LOSSES: [(LostReason, &str); LOST_REASONS as usize] = [
    (LostReason::RingFull, LOST_RING_BUFFER_FULL),
    (LostReason::ReturnMissed, LOST_KRETPROBE_MISSED),
    (LostReason::SlotBusy, LOST_SLOT_BUSY),
];
/// Every loss label: the kernel's, then the agent's own.
pub(crate) const LOST_LABELS: [&str; LOST_REASONS as usize + 2] =
    [LOST_RING_BUFFER_FULL, LOST_KRETPROBE_MISSED, LOST_SLOT_BUSY, LOST_AGENT_QUEUE_FULL, LOST_MALFORMED];

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(
        "this inferwatch binary was built without its kernel programs: build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {0}")]
    Btf(#[source] aya::BtfError),
    #[error("loading inferwatch's eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no {what} {name}")]
    Missing { what: &'static str, name: &'static str },
    #[error(
        "reading the kernel's BTF (/sys/kernel/btf/vmlinux; Linux >= 5.10 with CONFIG_DEBUG_INFO_BTF): {0}"
    )]
    KernelBtf(#[source] std::io::Error),
    #[error("{0}")]
    Plan(#[source] plan::PlanError),
    #[error("no socket hook could be attached ({0}): socket I/O cannot be watched")]
    NoSocketHook(String),
    #[error("{action} the {name} program: {source}")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("a kernel map: {0}")]
    Map(#[source] Box<aya::maps::MapError>),
    #[error("counting the possible CPUs ({0}): {1}")]
    Cpus(&'static str, #[source] std::io::Error),
    #[error("process {0} is beyond Linux's limit of thread-group ids (2^22)")]
    TgidLimit(u32),
    #[error("polling the ring buffer: {0}")]
    Poll(#[source] std::io::Error),
}
