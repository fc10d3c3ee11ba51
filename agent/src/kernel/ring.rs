//! Reading what the programs produce: the ring buffer of socket records (drained in batches
//! into the aggregator's channel), the loss counters, the scheduler sums, the programs' own
//! statistics and log lines.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use bytes::BytesMut;
use inferwatch_common::sched::{ROLE_COUNT, SLOTS, SchedStats};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use super::{Error, KERNEL_LOSSES, KernelReport, LOST_AGENT_QUEUE_FULL, probes::Programs};
use crate::model::{health::Heartbeat, sock::RecordBatch};

/// Where the readers send what they read: the aggregator's input, whatever its type.
pub(crate) trait Sink: From<KernelReport> + Send + 'static {}
impl<M: From<KernelReport> + Send + 'static> Sink for M {}

/// Sends the kernel's per-role scheduler sums (summed over CPUs) to the aggregator every second:
/// one system call for all of them.
pub(crate) async fn report_sched<M: Sink>(stats: PerCpuArray<MapData, SchedStats>, tx: mpsc::Sender<M>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let mut slots = vec![0u64; (ROLE_COUNT * SLOTS) as usize];
        if let Ok(per_cpu) = stats.get(&0, 0) {
            for cpu in per_cpu.iter() {
                for (sum, v) in slots.iter_mut().zip(cpu.slots) {
                    *sum += v;
                }
            }
        }
        if tx.send(KernelReport::Sched(slots).into()).await.is_err() {
            return;
        }
    }
}

/// Sends each program's cumulative run time and run count every `interval`.
pub(crate) async fn report_programs<M: Sink>(programs: Programs, tx: mpsc::Sender<M>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if tx.send(KernelReport::ProgramStats(programs.stats()).into()).await.is_err() {
            // The aggregator is gone: the agent is stopping, and the programs detach here.
            return;
        }
    }
}

/// Forwards the programs' own log lines (aya-log) to ours. They log only on unexpected paths.
pub(crate) fn spawn_kernel_log(logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>) {
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
pub(crate) async fn read_events<M: Sink>(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<M>,
    dropped: Arc<AtomicU64>,
    interval: Duration,
    heartbeat: Arc<Heartbeat>,
) -> Result<(), Error> {
    // SAFETY: the RingBuf owns its map's fd for as long as the AsyncFd holds it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| Error::Poll(e.into_parts().1))?;
    let mut period = interval;
    let mut buf = BytesMut::with_capacity(DRAIN_BYTES);
    loop {
        let drained = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(Error::Poll)?;
                // Clear readiness before draining, not after: a signal that came between a
                // drain and a later clear would be lost.
                guard.clear_ready();
                drain(guard.get_inner_mut(), &mut buf, &tx, &dropped)
            }
            _ = tokio::time::sleep(period) => drain(ring.get_mut(), &mut buf, &tx, &dropped),
        };
        period = next_period(period, interval, drained);
        heartbeat.beat();
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
pub(crate) const BATCH: usize = 256;

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
fn drain<M: Sink>(
    ring: &mut RingBuf<MapData>,
    buf: &mut BytesMut,
    tx: &mpsc::Sender<M>,
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
        if tx.try_send(KernelReport::Batch(batch).into()).is_err() {
            dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Reports cumulative losses (kernel and queue) to the aggregator once a second.
pub(crate) async fn report_losses<M: Sink>(
    lost: PerCpuArray<MapData, u64>,
    tx: mpsc::Sender<M>,
    dropped: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for (index, reason) in KERNEL_LOSSES {
            match lost.get(&(index as u32), 0) {
                Ok(per_cpu) => {
                    let total = per_cpu.iter().sum();
                    if tx.send(KernelReport::Lost { reason, total }.into()).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!("reading the kernel's loss counters: {e}"),
            }
        }
        let total = dropped.load(Ordering::Relaxed);
        let event = KernelReport::Lost { reason: LOST_AGENT_QUEUE_FULL, total }.into();
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
