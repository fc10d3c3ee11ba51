//! Loading, attaching and feeding the kernel programs, and reading what they produce.
//!
//! The programs are dropped (and so detached) with [`Probes`]; nothing is pinned.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use bytes::BytesMut;
use inferwatch_common::{
    CAPTURE_BYTES_GLOBAL, EVENTS_MAP, LOST_MAP, LostReason, MAX_CAPTURE, SCHED_ROLE_COUNT, SCHED_ROLES_MAP,
    SCHED_SLOTS, SCHED_STATS_MAP, SchedStats, WATCHED_TGIDS_MAP, WatchFlags,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    events::{AgentEvent, RecordBatch},
    metrics::{LOST_AGENT_QUEUE_FULL, LOST_RING_BUFFER_FULL},
    procfs,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inferwatch.bpf.o"));

/// The BTF tracepoints, each a program of the same name: the socket-level ones (Linux >= 6.3)
/// and the scheduler's.
const TRACEPOINTS: [&str; 9] = [
    "sock_send_length",
    "sock_recv_length",
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
    "sched_switch",
    "sched_wakeup",
    "sched_wakeup_new",
];

pub struct Probes {
    // Owns the programs and their links: dropping it detaches everything.
    ebpf: Ebpf,
    watched: HashMap<MapData, u32, WatchFlags>,
    sched_roles: HashMap<MapData, u32, u8>,
}

/// The readable ends of the kernel maps, handed to their reader tasks.
pub struct Outputs {
    pub events: RingBuf<MapData>,
    pub lost: PerCpuArray<MapData, u64>,
    pub sched: PerCpuArray<MapData, SchedStats>,
    /// The programs' log channel, read by [`spawn_kernel_log`] once the runtime runs.
    pub kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Probes {
    /// Loads and attaches the programs; `capture_bytes` payload bytes are copied per transfer.
    pub fn load(capture_bytes: u32) -> Result<(Self, Outputs)> {
        if OBJECT.is_empty() {
            bail!(
                "this inferwatch binary was built without its kernel programs: build it with `cargo xtask build`"
            );
        }
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        let capture_bytes = capture_bytes.min(MAX_CAPTURE as u32);
        let mut ebpf = EbpfLoader::new()
            .override_global(CAPTURE_BYTES_GLOBAL, &capture_bytes, true)
            // The scheduler probes' task storage: aya creates it but has no userspace type for
            // it, and none is needed (only the kernel programs use it).
            .allow_unsupported_maps()
            .load(OBJECT)
            .context("loading inferwatch's eBPF object")?;
        let kernel_log = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| tracing::debug!("kernel-side logging unavailable: {e}"))
            .ok();
        for name in TRACEPOINTS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no program {name}"))?
                .try_into()?;
            program.load(name, &btf).with_context(|| {
                format!("loading the {name} BTF tracepoint (the socket ones need Linux >= 6.3 with BTF)")
            })?;
            program.attach().with_context(|| format!("attaching the {name} BTF tracepoint"))?;
        }
        let watched = HashMap::try_from(take_map(&mut ebpf, WATCHED_TGIDS_MAP)?)?;
        let events = RingBuf::try_from(take_map(&mut ebpf, EVENTS_MAP)?)?;
        let lost = PerCpuArray::try_from(take_map(&mut ebpf, LOST_MAP)?)?;
        let sched_roles = HashMap::try_from(take_map(&mut ebpf, SCHED_ROLES_MAP)?)?;
        let sched = PerCpuArray::try_from(take_map(&mut ebpf, SCHED_STATS_MAP)?)?;
        Ok((Self { ebpf, watched, sched_roles }, Outputs { events, lost, sched, kernel_log }))
    }

    /// Starts watching a process: its socket I/O reaches the ring buffer from now on.
    pub fn watch(&mut self, tgid: u32) -> Result<String> {
        let comm = procfs::comm(tgid).with_context(|| format!("process {tgid} is not running"))?;
        self.watched
            .insert(&tgid, &WatchFlags::default(), 0)
            .with_context(|| format!("adding process {tgid} to the watch map"))?;
        Ok(comm)
    }
}

impl Probes {
    /// Stops watching a process.
    pub fn unwatch(&mut self, tgid: u32) -> Result<()> {
        self.watched.remove(&tgid).with_context(|| format!("removing process {tgid} from the watch map"))
    }

    /// Each program's cumulative run time (ns) and run count, as the kernel keeps them while
    /// `kernel.bpf_stats_enabled=1` (zero otherwise).
    pub fn program_stats(&self) -> Vec<(&'static str, u64, u64)> {
        TRACEPOINTS
            .iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((*name, info.run_time().as_nanos() as u64, info.run_count()))
            })
            .collect()
    }

    /// Measures a process's scheduling under `role` (an index of `SCHED_STATS`), or stops.
    pub fn set_sched_role(&mut self, tgid: u32, role: Option<u8>) -> Result<()> {
        match role {
            Some(role) => self.sched_roles.insert(&tgid, &role, 0),
            None => self.sched_roles.remove(&tgid),
        }
        .with_context(|| format!("updating the scheduler role of {tgid}"))
    }
}

/// Sends the kernel's per-role scheduler sums (summed over CPUs) to the aggregator every second:
/// one system call for all of them.
pub async fn report_sched(stats: PerCpuArray<MapData, SchedStats>, tx: mpsc::Sender<AgentEvent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let mut slots = vec![0u64; (SCHED_ROLE_COUNT * SCHED_SLOTS) as usize];
        if let Ok(per_cpu) = stats.get(&0, 0) {
            for cpu in per_cpu.iter() {
                for (sum, v) in slots.iter_mut().zip(cpu.slots) {
                    *sum += v;
                }
            }
        }
        if tx.send(AgentEvent::Sched(slots)).await.is_err() {
            return;
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).with_context(|| format!("the eBPF object has no map {name}"))
}

/// Forwards the programs' own log lines (aya-log) to ours. They log only on unexpected paths.
/// Forwards the kernel programs' log records to ours.
pub fn spawn_kernel_log(logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>) {
    let Some(logger) = logger else { return };
    // SAFETY: the logger owns its map's fd, and flushing neither closes nor replaces it.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("kernel-side logging unavailable: {}", e.into_parts().1);
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Drains the ring buffer into the aggregator's channel. A full channel drops the event and
/// counts it in `dropped`: the kernel must never wait on us.
///
/// Data records do not wake us (see `wakeup_flags` in the kernel programs): we drain every
/// `interval` (`--drain-interval`), and earlier when the kernel signals that a burst is filling
/// the ring or a state change arrived.
pub async fn read_events(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<AgentEvent>,
    dropped: Arc<AtomicU64>,
    interval: Duration,
) -> Result<()> {
    // SAFETY: the RingBuf owns its map's fd for as long as the AsyncFd holds it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e.into_parts().1))?;
    let mut period = interval;
    let mut buf = BytesMut::with_capacity(DRAIN_BYTES);
    loop {
        let drained = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                // Clear readiness before draining, not after: a signal that came between a
                // drain and a later clear would be lost.
                guard.clear_ready();
                drain(guard.get_inner_mut(), &mut buf, &tx, &dropped)
            }
            _ = tokio::time::sleep(period) => drain(ring.get_mut(), &mut buf, &tx, &dropped),
        };
        period = next_period(period, interval, drained);
    }
}

/// Idle, the drain period doubles up to this many times `--drain-interval` (80 ms at the
/// default 10 ms: an idle agent wakes ~12 times a second); the first record brings it back.
const IDLE_BACKOFF: u32 = 8;

/// The wait before the next drain, after one that read `drained` records.
fn next_period(period: Duration, interval: Duration, drained: usize) -> Duration {
    if drained > 0 { interval } else { (period * 2).min(interval * IDLE_BACKOFF) }
}

/// Records per message to the aggregator: one channel operation and wakeup per batch.
pub const BATCH: usize = 256;

/// Bytes set aside per batch: typical records are a header and a short payload prefix. A batch
/// of larger records grows its buffer; the next one starts afresh.
const BATCH_BYTES: usize = BATCH * 256;

/// The drain's buffer: room for one 10 ms drain at ~300k records/s of `wrk`-sized exchanges
/// (at that rate the kernel wakes the reader every few ms, whatever `--drain-interval` says).
/// Pages are touched only as far as a drain fills it, so an idle agent does not pay for it.
const DRAIN_BYTES: usize = 16 * BATCH_BYTES;

/// Readies `buf` for a drain: back to the front of its memory when the aggregator has dropped
/// every batch of it (only a pointer moves). When it still holds some and little room is left,
/// or an earlier overflow left a small buffer behind (`bytes` grows a shared buffer in small
/// steps), a full-size one replaces it; the old one is freed with its last batch.
fn start_drain(buf: &mut BytesMut) {
    if !buf.try_reclaim(DRAIN_BYTES) && buf.capacity() - buf.len() < DRAIN_BYTES / 2 {
        *buf = BytesMut::with_capacity(DRAIN_BYTES);
    }
}

/// Copies up to [`BATCH`] records into `buf` and sends them as one message; repeats until the
/// ring is empty. Returns how many records it read.
///
/// `buf` lives as long as the reader: each batch is split off it, and once the aggregator has
/// dropped every batch, the next drain starts again at its front. So a busy agent neither
/// allocates nor faults in fresh pages per batch (before, that was a third of its CPU under
/// `wrk`). While the aggregator still holds batches, `reserve` allocates a new buffer.
fn drain(
    ring: &mut RingBuf<MapData>,
    buf: &mut BytesMut,
    tx: &mpsc::Sender<AgentEvent>,
    dropped: &AtomicU64,
) -> usize {
    start_drain(buf);
    let mut total = 0;
    loop {
        buf.reserve(BATCH_BYTES);
        let mut ends = Vec::with_capacity(BATCH);
        while ends.len() < BATCH
            && let Some(record) = ring.next()
        {
            buf.extend_from_slice(&record);
            ends.push(buf.len() as u32);
        }
        if ends.is_empty() {
            return total;
        }
        total += ends.len();
        let n = ends.len() as u64;
        let batch = RecordBatch::new(buf.split().freeze(), ends);
        if tx.try_send(AgentEvent::Batch(batch)).is_err() {
            dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Reports cumulative losses (kernel and queue) to the aggregator once a second.
pub async fn report_losses(
    lost: PerCpuArray<MapData, u64>,
    tx: mpsc::Sender<AgentEvent>,
    dropped: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match lost.get(&(LostReason::RingFull as u32), 0) {
            Ok(per_cpu) => {
                let total = per_cpu.iter().sum();
                let event = AgentEvent::KernelLost { reason: LOST_RING_BUFFER_FULL, total };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("reading the kernel's loss counters: {e}"),
        }
        let total = dropped.load(Ordering::Relaxed);
        let event = AgentEvent::KernelLost { reason: LOST_AGENT_QUEUE_FULL, total };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_ring_is_drained_less_often_until_records_come_back() {
        let interval = Duration::from_millis(10);
        let mut period = interval;
        let mut waits = Vec::new();
        for _ in 0..6 {
            period = next_period(period, interval, 0);
            waits.push(period.as_millis());
        }
        assert_eq!(waits, [20, 40, 80, 80, 80, 80]);
        assert_eq!(next_period(period, interval, 1), interval);
    }

    /// The drain's buffer discipline: once the aggregator has dropped a drain's batches, the
    /// next drain reuses the same memory from its front instead of allocating (a `bytes`
    /// upgrade must not change that).
    #[test]
    fn a_dropped_batch_gives_its_memory_back_to_the_drain() {
        let mut buf = BytesMut::with_capacity(DRAIN_BYTES);
        let start = buf.as_ptr() as usize;
        let range = start..start + buf.capacity();
        for round in 0..100 {
            start_drain(&mut buf);
            assert_eq!(buf.as_ptr() as usize, start, "round {round}: a drain starts at the front");
            let batches: Vec<_> = (0..3)
                .map(|_| {
                    buf.reserve(BATCH_BYTES);
                    assert!(range.contains(&(buf.as_ptr() as usize)), "round {round}: a new allocation");
                    buf.extend_from_slice(&[7; 3000]);
                    buf.extend_from_slice(&[8; 1000]);
                    RecordBatch::new(buf.split().freeze(), vec![3000, 4000])
                })
                .collect();
            assert_eq!(batches[2].records().map(<[u8]>::len).collect::<Vec<_>>(), [3000, 1000]);
            drop(batches);
        }
        // Batches still held (the aggregator is behind): no reclaim, and past the buffer's end
        // `bytes` allocates afresh, in small steps.
        let held: Vec<_> = (0..17)
            .map(|_| {
                buf.reserve(BATCH_BYTES);
                buf.extend_from_slice(&[9; BATCH_BYTES]);
                buf.split().freeze()
            })
            .collect();
        assert!(!range.contains(&(buf.as_ptr() as usize)));
        assert!(buf.capacity() < DRAIN_BYTES / 2);
        // The next drain gets a full-size buffer again, and keeps it once the batches are gone.
        start_drain(&mut buf);
        assert!(buf.capacity() >= DRAIN_BYTES);
        let full = buf.as_ptr() as usize;
        drop(held);
        buf.extend_from_slice(&[1; 100]);
        drop(buf.split().freeze());
        start_drain(&mut buf);
        assert_eq!(buf.as_ptr() as usize, full);
    }
}
