//! What the aggregator publishes for the exporters: the metric registry, the latest vLLM
//! scrapes, the instances, the recent requests and the diagnosis samples. Written by the
//! aggregator only; the HTTP handlers and the page only read.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Instant,
};

use super::{diagnosis::Sample, families::Metrics};
use crate::model::{family::Family, health::Heartbeat, instance::InstanceView, request::RequestRecord};

/// Finished requests kept for `/api/v1/requests`.
pub(crate) const RECENT_REQUESTS: usize = 2048;

/// A lock whose readers and writers carry on past a panic elsewhere: every value behind one
/// is replaced whole or appended to, so what a panicking writer left is still consistent
/// enough to export, and the supervisor ends the agent anyway.
#[derive(Debug, Default)]
pub(crate) struct Locked<T>(RwLock<T>);

impl<T> Locked<T> {
    #[cfg(test)]
    pub(crate) fn new(value: T) -> Self {
        Self(RwLock::new(value))
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The latest good scrape of one vLLM instance, re-exported under vLLM's own names.
pub(crate) struct VllmSnapshot {
    pub families: Vec<Family>,
    pub labels: Vec<(String, String)>,
}

pub(crate) struct Store {
    /// The agent's own families; the scheduler and GPU families are collectors in it that
    /// read `sched` and `gpu`.
    pub metrics: Metrics,
    /// By instance id.
    pub vllm: Locked<BTreeMap<String, VllmSnapshot>>,
    /// The instances of the latest discovery scan.
    pub instances: Locked<Vec<InstanceView>>,
    /// Scheduler statistics per vLLM role, as families (see `sched`).
    pub sched: Arc<Locked<Vec<Family>>>,
    /// GPU families from the collector's latest round, joined to vLLM's processes.
    pub gpu: Arc<Locked<Vec<Family>>>,
    /// The OTLP exporter's counters (none while it is off).
    pub otlp: Arc<Locked<Vec<Family>>>,
    /// One diagnosis sample per instance and scrape, for the last hour.
    pub diagnosis_samples: Locked<VecDeque<Sample>>,
    pub started: Instant,
    /// Newest last.
    pub recent: Locked<VecDeque<RequestRecord>>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, to give kernel timestamps a wall-clock time.
    pub realtime_offset_ns: i128,
    /// The aggregator's sign of life: it beats with every input (the scheduler reader sends one
    /// each second, so an idle node beats too).
    pub heartbeat: Heartbeat,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub(crate) fn new() -> Self {
        let sched = Arc::new(Locked::default());
        let gpu = Arc::new(Locked::default());
        let otlp = Arc::new(Locked::default());
        Self {
            metrics: Metrics::new(&[sched.clone(), gpu.clone(), otlp.clone()]),
            vllm: Locked::default(),
            instances: Locked::default(),
            sched,
            gpu,
            otlp,
            diagnosis_samples: Locked::default(),
            started: Instant::now(),
            recent: Locked::default(),
            realtime_offset_ns: realtime_offset_ns(),
            heartbeat: Heartbeat::default(),
        }
    }
}

fn realtime_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid clock id and a pointer to an initialised timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}
