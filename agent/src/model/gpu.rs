//! What one round of the GPU collector saw: plain data, joined to vLLM's processes and
//! exported by the aggregator.

/// One sampling round, or the collector's state when NVML is unusable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSnapshot {
    /// NVML loaded and at least one GPU found.
    pub collector_up: bool,
    pub devices: Vec<DeviceSample>,
    /// Cost of each kind of NVML call so far: (call, calls, seconds).
    pub calls: Vec<(&'static str, u64, f64)>,
}

/// One GPU. A field NVML does not support on this GPU is `None` and exported as nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// False once NVML reports the GPU lost (or any call fails with an unexpected error).
    pub up: bool,
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub memory_reserved_bytes: Option<u64>,
    pub power_milliwatts: Option<u32>,
    pub power_limit_milliwatts: Option<u32>,
    pub energy_millijoules: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// NVML's clock-event (throttle) reason bits.
    pub clock_event_bits: Option<u64>,
    pub pcie_rx_bytes_per_second: Option<f64>,
    pub pcie_tx_bytes_per_second: Option<f64>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// GPM (Hopper and newer), percentages over the last interval.
    pub gpm_sm_activity_percent: Option<f64>,
    pub gpm_tensor_activity_percent: Option<f64>,
    pub gpm_dram_bandwidth_percent: Option<f64>,
    /// Critical XID errors since the agent started, and the last one's code.
    pub xid_errors: u64,
    pub last_xid: Option<u64>,
    pub processes: Vec<ProcessSample>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub pid: u32,
    pub memory_bytes: Option<u64>,
    /// SM utilisation of this process over the last interval, from NVML's samples.
    pub sm_percent: Option<u32>,
}

/// Who a GPU process belongs to: the model its vLLM instance serves and its role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub model: String,
    pub role: &'static str,
}
