//! The NVML collector: its own thread samples every GPU each `--gpu-interval` and sends a
//! [`GpuSnapshot`] to the aggregator; `/metrics` serves the latest one and never waits on NVML.
//! A second thread waits on NVML's event set for critical XID errors.
//!
//! What changes slowly is read slowly: names, UUIDs and memory totals once; the power limit
//! and ECC counters every [`SLOW_ROUNDS`] rounds; the PCIe rates from the driver's byte
//! counters (cheap) or, where those are missing, from `nvmlDeviceGetPcieThroughput` (which
//! samples for 20 ms per call) only every [`SLOW_ROUNDS`] rounds. Every call is timed and its
//! cost exported (`inferwatch_gpu_nvml_call_seconds_total{call}`), so a GPU node shows where
//! the collector's time goes.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nvml_wrapper::{
    Device, Nvml,
    enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
    enums::device::{SampleValue, UsedGpuMemory},
    error::NvmlError,
    struct_wrappers::device::FieldValueSample,
    structs::device::FieldId,
};
use tokio::sync::mpsc;

use crate::model::gpu::{DeviceSample, GpuSnapshot, ProcessSample};

/// Where the collector sends its rounds: the aggregator's input, whatever its type.
pub(crate) trait Sink: From<GpuSnapshot> + Send + 'static {}
impl<M: From<GpuSnapshot> + Send + 'static> Sink for M {}

/// Where `libnvidia-ml.so.1` is looked for after the loader's own path.
pub(crate) const LIBRARY_DIRS: [&str; 6] = [
    "/usr/local/nvidia/lib64",
    "/usr/lib64/nvidia",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib/aarch64-linux-gnu",
    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu",
];
const LIBRARY: &str = "libnvidia-ml.so.1";
/// Rounds between reads of what changes slowly (power limit, ECC, PCIe fallback).
const SLOW_ROUNDS: u64 = 30;
/// The two calls that cost milliseconds of CPU each on an H200 (measured: the energy counter
/// 3.0 ms, per-process utilisation 1.8 ms, next to 0.4 ms for everything else of a round) are
/// made at most this often whatever `--gpu-interval` is: a cumulative counter and a per-process
/// mean over the window lose nothing but resolution.
const ENERGY_EVERY: Duration = Duration::from_secs(10);
const PROCESS_UTILIZATION_EVERY: Duration = Duration::from_secs(5);
/// How often a missing NVML is looked for again (a driver installed after the agent).
const RETRY: Duration = Duration::from_secs(60);
/// Rounds with every GPU down after which NVML is shut down and loaded afresh (a driver
/// reload or upgrade invalidates the old handle for good).
const REINIT_AFTER_ROUNDS: u32 = 30;

const NVML_FI_DEV_PCIE_COUNT_TX_BYTES: u32 = 197;
const NVML_FI_DEV_PCIE_COUNT_RX_BYTES: u32 = 198;

#[derive(Clone, Debug)]
pub(crate) struct GpuConfig {
    pub interval: Duration,
    /// `--nvml-lib`: this file only.
    pub library: Option<PathBuf>,
}

/// The candidates, in order: `--nvml-lib` alone, else the loader's path and the usual folders.
pub(crate) fn library_candidates(explicit: Option<&PathBuf>) -> Vec<PathBuf> {
    match explicit {
        Some(path) => vec![path.clone()],
        None => std::iter::once(PathBuf::from(LIBRARY))
            .chain(LIBRARY_DIRS.iter().map(|d| PathBuf::from(d).join(LIBRARY)))
            .collect(),
    }
}

/// No candidate library loaded; each one tried with why, in order.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .tried.join("; "))]
pub(crate) struct OpenError {
    pub tried: Vec<String>,
}

/// Loads NVML from the first candidate that works; the error names every one tried.
pub(crate) fn open(explicit: Option<&PathBuf>) -> Result<Nvml, OpenError> {
    let mut tried = Vec::new();
    for candidate in library_candidates(explicit) {
        if candidate.is_absolute() && !candidate.exists() {
            tried.push(format!("{}: not found", candidate.display()));
            continue;
        }
        match Nvml::builder().lib_path(OsStr::new(candidate.as_os_str())).init() {
            Ok(nvml) => return Ok(nvml),
            Err(e) => tried.push(format!("{}: {e}", candidate.display())),
        }
    }
    Err(OpenError { tried })
}

/// Starts the collector thread. It reports `collector_up 0` (once per state change) when NVML
/// is missing or sees no GPU, and keeps looking every minute.
pub(crate) fn spawn<M: Sink>(config: GpuConfig, tx: mpsc::Sender<M>) {
    let spawned = std::thread::Builder::new().name("nvml".into()).spawn(move || {
        let mut logged = false;
        loop {
            match open(config.library.as_ref()) {
                Ok(nvml) => match nvml.device_count() {
                    Ok(n) if n > 0 => {
                        tracing::info!(gpus = n, "NVML loaded: sampling every {:?}", config.interval);
                        logged = false;
                        if sample_forever(&nvml, n, &config, &tx).is_err() {
                            return; // the aggregator is gone: the agent is stopping
                        }
                        tracing::warn!("every GPU stopped answering: loading NVML afresh");
                        drop(nvml);
                        continue;
                    }
                    Ok(_) => report_down(&mut logged, "NVML loaded but it sees no GPU", &tx),
                    Err(e) => report_down(&mut logged, &format!("NVML cannot count GPUs: {e}"), &tx),
                },
                Err(e) => report_down(&mut logged, &format!("no usable NVML library ({e})"), &tx),
            }
            if tx.is_closed() {
                return;
            }
            std::thread::sleep(RETRY);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the GPU collector thread: {e}");
    }
}

fn report_down<M: Sink>(logged: &mut bool, why: &str, tx: &mpsc::Sender<M>) {
    if !*logged {
        tracing::info!("GPU metrics off: {why}; everything else works (inferwatch_gpu_collector_up 0)");
        *logged = true;
    }
    let _ = tx.try_send(GpuSnapshot::default().into());
}

/// Time spent per kind of NVML call.
#[derive(Default)]
struct CallCosts(BTreeMap<&'static str, (u64, Duration)>);

impl CallCosts {
    fn time<T>(&mut self, call: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let e = self.0.entry(call).or_default();
        e.0 += 1;
        e.1 += start.elapsed();
        out
    }

    fn snapshot(&self) -> Vec<(&'static str, u64, f64)> {
        self.0.iter().map(|(c, (n, d))| (*c, *n, d.as_secs_f64())).collect()
    }
}

/// What is kept between rounds for one GPU.
#[derive(Default)]
struct DeviceState<'nvml> {
    sample: DeviceSample,
    pcie_counters: Option<(Instant, u64, u64)>,
    pcie_counters_supported: bool,
    last_process_sample_us: Option<u64>,
    /// When the costly calls were last made, and the per-process SM means they gave.
    energy_read: Option<Instant>,
    process_utilization_read: Option<Instant>,
    process_sm: HashMap<u32, u32>,
    gpm_previous: Option<nvml_wrapper::gpm::GpmSample<'nvml>>,
    gpm_supported: bool,
}

/// XID counts per GPU index: (count, last code), written by the event thread.
type XidCounts = Arc<Mutex<HashMap<u32, (u64, u64)>>>;

fn sample_forever<M: Sink>(
    nvml: &Nvml,
    count: u32,
    config: &GpuConfig,
    tx: &mpsc::Sender<M>,
) -> Result<(), ()> {
    let xids: XidCounts = Arc::default();
    std::thread::scope(|scope| {
        let events_xids = xids.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let events_stop = stop.clone();
        scope.spawn(move || watch_xid_events(nvml, count, &events_xids, &events_stop));
        let result = sample_rounds(nvml, count, config, tx, &xids);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })
}

fn sample_rounds<M: Sink>(
    nvml: &Nvml,
    count: u32,
    config: &GpuConfig,
    tx: &mpsc::Sender<M>,
    xids: &XidCounts,
) -> Result<(), ()> {
    let mut costs = CallCosts::default();
    let mut states: Vec<DeviceState> = (0..count).map(|_| DeviceState::default()).collect();
    for (index, state) in states.iter_mut().enumerate() {
        init_device(nvml, index as u32, state, &mut costs);
    }
    let mut round: u64 = 0;
    let mut all_down_rounds = 0u32;
    loop {
        let started = Instant::now();
        for (index, state) in states.iter_mut().enumerate() {
            match nvml.device_by_index(index as u32) {
                Ok(device) => sample_device(&device, state, round, &mut costs),
                Err(e) => mark_down(state, &e),
            }
            if let Some((n, last)) = xids.lock().unwrap_or_else(|e| e.into_inner()).get(&(index as u32)) {
                state.sample.xid_errors = *n;
                state.sample.last_xid = Some(*last);
            }
        }
        all_down_rounds = if states.iter().all(|s| !s.sample.up) { all_down_rounds + 1 } else { 0 };
        if all_down_rounds >= REINIT_AFTER_ROUNDS {
            return Ok(());
        }
        let snapshot = GpuSnapshot {
            collector_up: true,
            devices: states.iter().map(|s| s.sample.clone()).collect(),
            calls: costs.snapshot(),
        };
        // A full queue drops this round; the next one replaces it.
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(snapshot.into()) {
            return Err(());
        }
        round += 1;
        std::thread::sleep(config.interval.saturating_sub(started.elapsed()));
    }
}

fn init_device(nvml: &Nvml, index: u32, state: &mut DeviceState<'_>, costs: &mut CallCosts) {
    state.sample.index = index;
    let Ok(device) = costs.time("device_by_index", || nvml.device_by_index(index)) else {
        state.sample.uuid = format!("unknown-{index}");
        return;
    };
    state.sample.uuid = costs.time("uuid", || device.uuid()).unwrap_or_else(|_| format!("unknown-{index}"));
    state.sample.name = costs.time("name", || device.name()).unwrap_or_default();
    state.gpm_supported = costs.time("gpm_support", || device.gpm_support()).unwrap_or(false);
    state.pcie_counters_supported = true; // until the driver says otherwise
    state.sample.up = true;
}

fn mark_down(state: &mut DeviceState<'_>, e: &NvmlError) {
    if state.sample.up {
        tracing::warn!(gpu = state.sample.index, uuid = %state.sample.uuid, "GPU stopped answering NVML: {e}");
    }
    state.sample.up = false;
}

/// NotSupported (and friends) means "this GPU has no such field": skip it. GpuLost marks the
/// GPU down.
fn field<T>(state: &mut DeviceState<'_>, result: Result<T, NvmlError>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(NvmlError::GpuLost) => {
            mark_down(state, &NvmlError::GpuLost);
            None
        }
        Err(_) => None,
    }
}

fn sample_device<'n>(device: &Device<'n>, state: &mut DeviceState<'n>, round: u64, costs: &mut CallCosts) {
    if !state.sample.up {
        // A GPU that came back (driver reload, reset) answers again.
        if costs.time("uuid", || device.uuid()).is_err() {
            return;
        }
        tracing::info!(gpu = state.sample.index, "GPU answers NVML again");
        state.sample.up = true;
    }
    let slow = round.is_multiple_of(SLOW_ROUNDS);
    let util = costs.time("utilization_rates", || device.utilization_rates());
    let util = field(state, util);
    state.sample.utilization_gpu_percent = util.as_ref().map(|u| u.gpu);
    state.sample.utilization_memory_percent = util.map(|u| u.memory);
    let memory = costs.time("memory_info", || device.memory_info());
    let memory = field(state, memory);
    state.sample.memory_used_bytes = memory.as_ref().map(|m| m.used);
    state.sample.memory_total_bytes = memory.as_ref().map(|m| m.total);
    state.sample.memory_reserved_bytes = memory.map(|m| m.reserved);
    let power = costs.time("power_usage", || device.power_usage());
    state.sample.power_milliwatts = field(state, power);
    if due(&mut state.energy_read, ENERGY_EVERY) {
        let energy = costs.time("total_energy_consumption", || device.total_energy_consumption());
        state.sample.energy_millijoules = field(state, energy);
    }
    let temperature = costs.time("temperature", || device.temperature(TemperatureSensor::Gpu));
    state.sample.temperature_celsius = field(state, temperature);
    let sm = costs.time("clock_info", || device.clock_info(Clock::SM));
    state.sample.sm_clock_mhz = field(state, sm);
    let mem = costs.time("clock_info", || device.clock_info(Clock::Memory));
    state.sample.memory_clock_mhz = field(state, mem);
    let reasons = costs.time("current_clocks_event_reasons", || device.current_throttle_reasons());
    state.sample.clock_event_bits = field(state, reasons).map(|r| r.bits());
    if slow {
        let limit = costs.time("enforced_power_limit", || device.enforced_power_limit());
        state.sample.power_limit_milliwatts = field(state, limit);
        let corrected = costs.time("total_ecc_errors", || {
            device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
        });
        state.sample.ecc_corrected = field(state, corrected);
        let uncorrected = costs.time("total_ecc_errors", || {
            device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
        });
        state.sample.ecc_uncorrected = field(state, uncorrected);
    }
    sample_pcie(device, state, slow, costs);
    sample_processes(device, state, costs);
    sample_gpm(device, state, costs);
}

fn sample_pcie(device: &Device<'_>, state: &mut DeviceState<'_>, slow: bool, costs: &mut CallCosts) {
    if state.pcie_counters_supported {
        let ids = [FieldId(NVML_FI_DEV_PCIE_COUNT_TX_BYTES), FieldId(NVML_FI_DEV_PCIE_COUNT_RX_BYTES)];
        let values = costs.time("field_values_pcie_counters", || device.field_values_for(&ids));
        let read = |v: Option<&Result<FieldValueSample, NvmlError>>| match v {
            Some(Ok(FieldValueSample { value: Ok(SampleValue::U64(n)), .. })) => Some(*n),
            Some(Ok(FieldValueSample { value: Ok(SampleValue::U32(n)), .. })) => Some(*n as u64),
            _ => None,
        };
        if let Ok(values) = values
            && let (Some(tx), Some(rx)) = (read(values.first()), read(values.get(1)))
        {
            let now = Instant::now();
            if let Some((at, prev_tx, prev_rx)) = state.pcie_counters {
                let secs = now.duration_since(at).as_secs_f64();
                state.sample.pcie_tx_bytes_per_second = counter_rate(prev_tx, tx, secs);
                state.sample.pcie_rx_bytes_per_second = counter_rate(prev_rx, rx, secs);
            }
            state.pcie_counters = Some((now, tx, rx));
            return;
        }
        state.pcie_counters_supported = false;
    }
    if slow {
        // KB/s over a 20 ms window, per direction: costly, so only on slow rounds.
        let tx = costs.time("pcie_throughput", || device.pcie_throughput(PcieUtilCounter::Send));
        state.sample.pcie_tx_bytes_per_second = field(state, tx).map(|kb| kb as f64 * 1024.0);
        let rx = costs.time("pcie_throughput", || device.pcie_throughput(PcieUtilCounter::Receive));
        state.sample.pcie_rx_bytes_per_second = field(state, rx).map(|kb| kb as f64 * 1024.0);
    }
}

fn sample_processes(device: &Device<'_>, state: &mut DeviceState<'_>, costs: &mut CallCosts) {
    let processes = costs.time("running_compute_processes", || device.running_compute_processes());
    let Some(processes) = field(state, processes) else {
        state.sample.processes.clear();
        return;
    };
    let since = state.last_process_sample_us;
    if due(&mut state.process_utilization_read, PROCESS_UTILIZATION_EVERY) {
        let samples = costs.time("process_utilization_stats", || device.process_utilization_stats(since));
        // NotFound: no sample since `since` (an idle GPU); that is no utilisation, not an error.
        let samples = match samples {
            Ok(s) => s,
            Err(e) => {
                field::<()>(state, Err(e));
                Vec::new()
            }
        };
        if let Some(latest) = samples.iter().map(|s| s.timestamp).max() {
            state.last_process_sample_us = Some(latest);
        }
        state.process_sm =
            process_sm_percent(&samples.iter().map(|s| (s.pid, s.sm_util)).collect::<Vec<_>>());
    }
    let sm = &state.process_sm;
    state.sample.processes = processes
        .iter()
        .map(|p| ProcessSample {
            pid: p.pid,
            memory_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            },
            sm_percent: sm.get(&p.pid).copied().or(since.map(|_| 0)),
        })
        .collect();
}

/// Whether a call made at most every `every` is due now (and if so, it is marked made).
fn due(last: &mut Option<Instant>, every: Duration) -> bool {
    let now = Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < every) {
        return false;
    }
    *last = Some(now);
    true
}

fn sample_gpm<'n>(device: &Device<'n>, state: &mut DeviceState<'n>, costs: &mut CallCosts) {
    use nvml_wrapper::enums::gpm::GpmMetricId;
    if !state.gpm_supported {
        return;
    }
    let sample = match costs.time("gpm_sample", || device.gpm_sample()) {
        Ok(s) => s,
        Err(_) => {
            state.gpm_supported = false;
            return;
        }
    };
    if let Some(previous) = state.gpm_previous.take() {
        let ids = [GpmMetricId::SmUtil, GpmMetricId::AnyTensorUtil, GpmMetricId::DramBwUtil];
        let results = costs.time("gpm_metrics_get", || {
            nvml_wrapper::gpm::gpm_metrics_get(sample.nvml(), &previous, &sample, &ids)
        });
        if let Ok(results) = results {
            let value = |i: usize| results.get(i).and_then(|r| r.as_ref().ok()).map(|r| r.value);
            state.sample.gpm_sm_activity_percent = value(0);
            state.sample.gpm_tensor_activity_percent = value(1);
            state.sample.gpm_dram_bandwidth_percent = value(2);
        }
    }
    state.gpm_previous = Some(sample);
}

/// Waits on NVML's event set for critical XID errors and counts them per GPU.
fn watch_xid_events(nvml: &Nvml, count: u32, xids: &XidCounts, stop: &std::sync::atomic::AtomicBool) {
    use nvml_wrapper::enums::event::XidError;
    // A failed registration consumes the set: start over with the GPUs that accepted.
    let mut accepted: Vec<u32> = Vec::new();
    let mut set = None;
    for index in 0..count {
        let mut candidates = accepted.clone();
        candidates.push(index);
        if let Some(fresh) = register_xid_events(nvml, &candidates) {
            accepted = candidates;
            set = Some(fresh);
        }
    }
    let registered = accepted.len();
    let Some(set) = set else { return };
    if registered == 0 {
        return;
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match set.wait(1000) {
            Ok(event) => {
                let Ok(index) = event.device.index() else { continue };
                let code = match event.event_data {
                    Some(XidError::Value(v)) => v,
                    _ => 0,
                };
                tracing::warn!(gpu = index, xid = code, "critical XID error");
                let mut counts = xids.lock().unwrap_or_else(|e| e.into_inner());
                let entry = counts.entry(index).or_default();
                entry.0 += 1;
                entry.1 = code;
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::info!("waiting for XID events failed: {e}; no longer counting them");
                return;
            }
        }
    }
}

/// An event set with critical XID errors registered on each of `gpus`, or None.
fn register_xid_events<'n>(nvml: &'n Nvml, gpus: &[u32]) -> Option<nvml_wrapper::EventSet<'n>> {
    let mut set = nvml.create_event_set().ok()?;
    for &i in gpus {
        let device = nvml.device_by_index(i).ok()?;
        match device.register_events(nvml_wrapper::bitmasks::event::EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => set = s,
            Err(e) => {
                tracing::info!(gpu = i, "XID events not supported: {}", e.error);
                return None;
            }
        }
    }
    Some(set)
}

/// A rate from two readings of a byte counter `seconds` apart; None on a reset or no time.
pub(crate) fn counter_rate(previous: u64, current: u64, seconds: f64) -> Option<f64> {
    (current >= previous && seconds > 0.0).then(|| (current - previous) as f64 / seconds)
}

/// Per-process SM utilisation from NVML's samples (several per process per interval): the
/// mean of each pid's samples.
pub(crate) fn process_sm_percent(samples: &[(u32, u32)]) -> HashMap<u32, u32> {
    let mut sums: HashMap<u32, (u64, u64)> = HashMap::new();
    for &(pid, sm) in samples {
        let e = sums.entry(pid).or_default();
        e.0 += sm as u64;
        e.1 += 1;
    }
    sums.into_iter().map(|(pid, (sum, n))| (pid, (sum / n.max(1)) as u32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_in_the_usual_driver_folders_unless_told() {
        let all = library_candidates(None);
        assert_eq!(all[0], PathBuf::from("libnvidia-ml.so.1"), "the loader's path first");
        for dir in ["/usr/local/nvidia/lib64", "/usr/lib64/nvidia", "/usr/lib/x86_64-linux-gnu"] {
            assert!(all.contains(&PathBuf::from(dir).join(LIBRARY)), "{dir}");
        }
        let explicit = PathBuf::from("/opt/driver/libnvidia-ml.so.1");
        assert_eq!(library_candidates(Some(&explicit)), [explicit]);
    }

    /// Real NVML where a GPU exists; elsewhere it says why it checked nothing more.
    #[test]
    fn real_nvml_or_a_clear_reason() {
        match open(None) {
            Err(why) => {
                let why = why.to_string();
                eprintln!("SKIPPED real-NVML check: no NVML library here ({why})");
                assert!(why.contains("libnvidia-ml.so.1"), "the error names what was tried: {why}");
            }
            Ok(nvml) => {
                let n = nvml.device_count().expect("device_count");
                eprintln!("real NVML: {n} GPU(s)");
                assert!(n > 0);
                let device = nvml.device_by_index(0).unwrap();
                let mut state = DeviceState::default();
                let mut costs = CallCosts::default();
                init_device(&nvml, 0, &mut state, &mut costs);
                sample_device(&device, &mut state, 0, &mut costs);
                let s = &state.sample;
                assert!(s.up && s.uuid.starts_with("GPU-"), "{s:?}");
                assert!(s.memory_total_bytes.unwrap() > 0 && s.power_milliwatts.unwrap() > 0, "{s:?}");
                assert!(s.power_milliwatts <= s.power_limit_milliwatts, "{s:?}");
            }
        }
    }

    #[test]
    fn a_missing_explicit_library_is_named() {
        let err = open(Some(&PathBuf::from("/nonexistent/libnvidia-ml.so.1"))).err().unwrap();
        assert_eq!(err.to_string(), "/nonexistent/libnvidia-ml.so.1: not found");
    }

    #[test]
    fn rates_and_process_means() {
        assert_eq!(counter_rate(1_000, 3_000, 2.0), Some(1_000.0));
        assert_eq!(counter_rate(3_000, 1_000, 2.0), None, "a reset is not a negative rate");
        assert_eq!(counter_rate(1, 2, 0.0), None);
        let means = process_sm_percent(&[(1, 90), (1, 100), (2, 10)]);
        assert_eq!(means[&1], 95);
        assert_eq!(means[&2], 10);
    }

    /// The FFI path end to end against the NVML stand-in (tests/nvml-standin): `cargo xtask
    /// test` builds it and names it and this test's scenario file in the environment; without
    /// them the test says it checked nothing.
    #[test]
    fn the_collector_against_the_nvml_standin() {
        let (Some(lib), Some(scenario)) =
            (std::env::var_os("INFERWATCH_NVML_STANDIN"), std::env::var_os("INFERWATCH_NVML_SCENARIO"))
        else {
            eprintln!(
                "SKIPPED: INFERWATCH_NVML_STANDIN / INFERWATCH_NVML_SCENARIO not set (cargo xtask test sets them)"
            );
            return;
        };
        let (lib, scenario) = (PathBuf::from(lib), PathBuf::from(scenario));
        let calls_file = scenario.with_extension("calls.json");
        let write = |gpu1: &str, gpu0_extra: &str| {
            let text = format!(
                r#"{{"calls_file": {calls:?}, "slow_ms": {{"nvmlDeviceGetPowerUsage": 30}}, "gpus": [
                    {{"load": "busy", "processes": [{{"pid": 4242, "used_memory_bytes": 64424509440}}] {gpu0_extra}}},
                    {{"uuid": "GPU-second" {gpu1}}}]}}"#,
                calls = calls_file.display().to_string()
            );
            let staging = scenario.with_extension("staging");
            std::fs::write(&staging, text).unwrap();
            std::fs::rename(&staging, &scenario).unwrap();
        };
        write("", "");
        let nvml = open(Some(&lib)).expect("the stand-in loads as libnvidia-ml.so.1");
        assert_eq!(nvml.device_count().unwrap(), 2);
        drop(nvml);

        let (tx, mut rx) = mpsc::channel::<GpuSnapshot>(256);
        spawn(GpuConfig { interval: Duration::from_millis(100), library: Some(lib) }, tx);
        let mut next = |what: &str, done: &dyn Fn(&GpuSnapshot) -> bool| -> GpuSnapshot {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(s) = rx.blocking_recv()
                    && done(&s)
                {
                    return s;
                }
            }
            panic!("no snapshot with {what} within 20 s");
        };
        let s = next("process utilisation and GPM", &|s| {
            s.collector_up && s.devices.len() == 2 && s.devices[0].gpm_sm_activity_percent.is_some()
        });
        let (busy, idle) = (&s.devices[0], &s.devices[1]);
        assert_eq!((busy.name.as_str(), idle.uuid.as_str()), ("NVIDIA H100 80GB HBM3", "GPU-second"));
        assert!(busy.up && idle.up);
        assert_eq!((busy.utilization_gpu_percent, idle.utilization_gpu_percent), (Some(100), Some(0)));
        assert!((414_000..=725_000).contains(&busy.power_milliwatts.unwrap()), "{busy:?}");
        assert!((71_000..=96_000).contains(&idle.power_milliwatts.unwrap()), "{idle:?}");
        assert_eq!((busy.clock_event_bits, idle.clock_event_bits), (Some(0x4), Some(0x1)));
        assert_eq!(busy.memory_total_bytes, Some(81_559 << 20));
        assert_eq!(busy.processes.len(), 1);
        let p = &busy.processes[0];
        assert_eq!((p.pid, p.memory_bytes), (4242, Some(60 << 30)));
        assert!(p.sm_percent.is_some_and(|sm| (49..=75).contains(&sm)), "{p:?}");
        assert!(idle.processes.is_empty() && idle.gpm_sm_activity_percent == Some(0.0));
        assert!(busy.pcie_rx_bytes_per_second.is_some_and(|r| r > 1e8), "{busy:?}");
        assert_eq!(busy.power_limit_milliwatts, Some(700_000));

        // A critical XID on the busy GPU: counted once, with its code.
        write("", r#", "xid": [{"id": 1, "code": 79}]"#);
        let s = next("the XID", &|s| s.devices[0].xid_errors == 1);
        assert_eq!(s.devices[0].last_xid, Some(79));
        // The second GPU lost, then back.
        write(r#", "lost": true"#, r#", "xid": [{"id": 1, "code": 79}]"#);
        let s = next("the lost GPU", &|s| !s.devices[1].up);
        assert!(s.devices[0].up, "the other GPU carries on");
        write("", r#", "xid": [{"id": 1, "code": 79}]"#);
        let s = next("the GPU back", &|s| s.devices[1].up);
        assert_eq!(s.devices[0].xid_errors, 1, "an XID is delivered once");

        // What the collector says it called is what the library saw (up to the round in flight),
        // slow fields slowly, and a slow call shows in its cost.
        let enough = |s: &GpuSnapshot| {
            s.calls.iter().any(|(c, n, _)| *c == "power_usage" && *n >= 2 * (SLOW_ROUNDS + 5))
        };
        let s = next("35 rounds", &enough);
        // The library writes its counts every 100 ms: let it catch up past this snapshot.
        std::thread::sleep(Duration::from_millis(350));
        let seen: std::collections::BTreeMap<String, u64> =
            serde_json::from_str(&std::fs::read_to_string(&calls_file).unwrap()).unwrap();
        let claimed = |call: &str| s.calls.iter().find(|(c, ..)| *c == call).map_or(0, |(_, n, _)| *n);
        let rounds = claimed("power_usage");
        for (call, function) in [
            ("utilization_rates", "nvmlDeviceGetUtilizationRates"),
            ("memory_info", "nvmlDeviceGetMemoryInfo_v2"),
            ("power_usage", "nvmlDeviceGetPowerUsage"),
            ("total_energy_consumption", "nvmlDeviceGetTotalEnergyConsumption"),
            ("clock_info", "nvmlDeviceGetClockInfo"),
            ("enforced_power_limit", "nvmlDeviceGetEnforcedPowerLimit"),
            ("gpm_sample", "nvmlGpmSampleGet"),
        ] {
            let (ours, theirs) = (claimed(call), seen.get(function).copied().unwrap_or(0));
            // Up to four rounds since the snapshot, two GPUs, two calls of a kind per round (clocks).
            assert!(theirs >= ours && theirs <= ours + 16, "{call}: claimed {ours}, library saw {theirs}");
        }
        let limit = claimed("enforced_power_limit");
        // Every SLOW_ROUNDS rounds per GPU (power_usage is read on every round of each GPU up).
        assert!(
            limit >= 4 && limit * SLOW_ROUNDS <= rounds + 2 * SLOW_ROUNDS && limit * 10 < rounds,
            "power limit read {limit} times for {rounds} power readings"
        );
        let power_seconds = s.calls.iter().find(|(c, ..)| *c == "power_usage").unwrap().2;
        assert!(power_seconds >= rounds as f64 * 0.029, "{power_seconds} s for {rounds} slow calls");
    }
}
