//! What the stand-in pretends: GPUs, their load, their processes, and the faults a test asks
//! for. Read from `INFERWATCH_NVML_SCENARIO` (JSON) and read again whenever the file changes,
//! so a test can inject an XID or lose a GPU while the agent runs. Without it: one idle H100.
//!
//! The numbers are those of a real H100 80GB HBM3 (SXM), as measured on one: idle it reads
//! utilisation 0, 71–96 W, SM clock 345 MHz, clock-event reason GPU_IDLE and no process
//! utilisation samples (NOT_FOUND); under a bf16 matmul, utilisation 100, 414–725 W (the
//! limit is 700 W: short excursions above it), SM clock 1170–1425 MHz, SW_POWER_CAP, process SM
//! utilisation 49–75 %.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Mutex,
    time::{Instant, SystemTime},
};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub gpus: Vec<Gpu>,
    /// Milliseconds each named NVML function sleeps before answering (`nvmlDeviceGetPowerUsage`).
    pub slow_ms: BTreeMap<String, u64>,
    /// Where the call counts go (JSON: function → calls), rewritten as they change.
    pub calls_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gpu {
    pub name: String,
    pub uuid: Option<String>,
    pub load: Load,
    pub processes: Vec<Process>,
    /// Every call about this GPU answers GPU_IS_LOST while true.
    pub lost: bool,
    /// NVML functions that answer NOT_SUPPORTED for this GPU (`nvmlDeviceGetPcieThroughput`),
    /// and `gpm` / `events` for those features as a whole.
    pub not_supported: Vec<String>,
    /// Critical XID errors to deliver, each once per event set (by `id`).
    pub xid: Vec<Xid>,
    pub power_limit_watts: f64,
    pub memory_total_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    #[default]
    Idle,
    Busy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub pid: u32,
    pub used_memory_bytes: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xid {
    pub id: u64,
    pub code: u64,
}

/// An H100 80GB HBM3 as NVML describes it.
impl Default for Gpu {
    fn default() -> Self {
        Self {
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: None,
            load: Load::Idle,
            processes: Vec::new(),
            lost: false,
            not_supported: Vec::new(),
            xid: Vec::new(),
            power_limit_watts: 700.0,
            // 81559 MiB, NVML's total for this board.
            memory_total_bytes: 81_559 << 20,
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self { gpus: vec![Gpu::default()], slow_ms: BTreeMap::new(), calls_file: None }
    }
}

impl Gpu {
    pub fn uuid(&self, index: usize) -> String {
        self.uuid.clone().unwrap_or_else(|| format!("GPU-5fa1c0de-0000-4000-8000-{index:012x}"))
    }

    pub fn refuses(&self, what: &str) -> bool {
        self.not_supported.iter().any(|n| n == what)
    }
}

/// The scenario in force, reloaded when its file's modification time changes (looked at no
/// more than every 50 ms).
struct Loaded {
    scenario: Scenario,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
}

static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);

fn path() -> Option<PathBuf> {
    std::env::var_os("INFERWATCH_NVML_SCENARIO").map(PathBuf::from)
}

/// The current scenario. A file that cannot be read or parsed keeps the previous one (and says
/// so on stderr): a test writing it must not catch it half-written into a default.
pub fn current() -> Scenario {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = loaded.as_ref().is_none_or(|l| l.checked.is_none_or(|c| c.elapsed().as_millis() >= 50));
    if fresh {
        let previous = loaded.take();
        *loaded = Some(reload(previous));
    }
    loaded.as_ref().map(|l| l.scenario.clone()).unwrap_or_default()
}

fn reload(previous: Option<Loaded>) -> Loaded {
    let now = Some(Instant::now());
    let Some(path) = path() else {
        return Loaded { scenario: Scenario::default(), modified: None, checked: now };
    };
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if let Some(p) = &previous
        && p.modified == modified
        && modified.is_some()
    {
        return Loaded { scenario: p.scenario.clone(), modified, checked: now };
    }
    let parsed = std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str::<Scenario>(&text).map_err(|e| e.to_string()));
    match parsed {
        Ok(scenario) => Loaded { scenario, modified, checked: now },
        Err(e) => {
            eprintln!("nvml stand-in: scenario {}: {e}; keeping the previous one", path.display());
            let scenario = previous.map(|p| p.scenario).unwrap_or_default();
            Loaded { scenario, modified: None, checked: now }
        }
    }
}

/// A reproducible value in [0, 1) for GPU `index` and quantity `what`, changing every half
/// second: readings move within their measured ranges the way a real GPU's do.
pub fn jitter(index: usize, what: u64, seconds: f64) -> f64 {
    let tick = (seconds * 2.0) as u64;
    let mut x =
        (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ what.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= tick.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x = x.wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^= x >> 32;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// What the GPU reads now.
#[derive(Clone, Copy, Debug)]
pub struct Readings {
    pub utilization_gpu: u32,
    pub utilization_memory: u32,
    pub power_milliwatts: u32,
    pub temperature_celsius: u32,
    pub sm_clock_mhz: u32,
    pub memory_clock_mhz: u32,
    pub clock_event_reasons: u64,
    pub pcie_bytes_per_second: f64,
    pub process_sm_percent: u32,
    pub gpm_sm: f64,
    pub gpm_tensor: f64,
    pub gpm_dram: f64,
}

pub const GPU_IDLE: u64 = 0x1;
pub const SW_POWER_CAP: u64 = 0x4;

pub fn readings(gpu: &Gpu, index: usize, seconds: f64) -> Readings {
    let j = |what| jitter(index, what, seconds);
    let between = |what, low: f64, high: f64| low + (high - low) * j(what);
    match gpu.load {
        Load::Idle => Readings {
            utilization_gpu: 0,
            utilization_memory: 0,
            power_milliwatts: (between(1, 71.0, 96.0) * 1000.0) as u32,
            temperature_celsius: between(2, 29.0, 33.0) as u32,
            sm_clock_mhz: 345,
            memory_clock_mhz: 2619,
            clock_event_reasons: GPU_IDLE,
            pcie_bytes_per_second: between(3, 50e3, 200e3),
            process_sm_percent: 0,
            gpm_sm: 0.0,
            gpm_tensor: 0.0,
            gpm_dram: 0.0,
        },
        Load::Busy => Readings {
            utilization_gpu: 100,
            utilization_memory: between(4, 38.0, 52.0) as u32,
            power_milliwatts: (between(1, 414.0, 725.0) * 1000.0) as u32,
            temperature_celsius: between(2, 52.0, 66.0) as u32,
            sm_clock_mhz: between(5, 1170.0, 1425.0) as u32,
            memory_clock_mhz: 2619,
            clock_event_reasons: SW_POWER_CAP,
            pcie_bytes_per_second: between(3, 0.3e9, 1.2e9),
            process_sm_percent: between(6, 49.0, 75.0) as u32,
            gpm_sm: between(7, 80.0, 97.0),
            gpm_tensor: between(8, 40.0, 70.0),
            gpm_dram: between(9, 25.0, 60.0),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_stay_within_the_measured_ranges() {
        let idle = Gpu::default();
        let busy = Gpu { load: Load::Busy, ..Gpu::default() };
        for step in 0..400 {
            let t = step as f64 * 0.25;
            let r = readings(&idle, 0, t);
            assert!((71_000..=96_000).contains(&r.power_milliwatts), "{r:?}");
            assert_eq!((r.utilization_gpu, r.sm_clock_mhz, r.clock_event_reasons), (0, 345, GPU_IDLE));
            let r = readings(&busy, 0, t);
            assert!((414_000..=725_000).contains(&r.power_milliwatts), "{r:?}");
            assert!((1170..=1425).contains(&r.sm_clock_mhz) && (49..=75).contains(&r.process_sm_percent));
            assert_eq!((r.utilization_gpu, r.clock_event_reasons), (100, SW_POWER_CAP));
        }
    }

    #[test]
    fn a_scenario_file_reads_with_defaults() {
        let s: Scenario = serde_json::from_str(
            r#"{"gpus":[{"load":"busy","processes":[{"pid":7,"used_memory_bytes":1}]}]}"#,
        )
        .unwrap();
        assert_eq!(s.gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(s.gpus[0].load, Load::Busy);
        assert!(serde_json::from_str::<Scenario>(r#"{"gpu":[]}"#).is_err(), "typos are refused");
    }
}
