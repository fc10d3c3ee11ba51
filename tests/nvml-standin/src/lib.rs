//! A STAND-IN for NVIDIA's `libnvidia-ml.so.1`, for tests on machines without a GPU.
//!
//! It exports every NVML function inferwatch's GPU collector calls, with NVML's own signatures,
//! structs (the bindgen output of `nvml.h`, from nvml-wrapper-sys) and return codes, and answers
//! from a scenario (see [`scenario`]): an H100's readings, idle or busy, compute processes by
//! pid, XID events, a GPU lost and back, functions refused (NOT_SUPPORTED) or slow. Every call
//! is counted per function, so a test can hold the collector to what it claims to cost.
//!
//! It is not NVIDIA's library and proves nothing about real hardware: `cargo xtask gpu-check`
//! on a real GPU does that. It is built by `cargo xtask nvml-standin` into
//! `target/nvml-standin/libnvidia-ml.so.1` and never shipped in the agent's image.
#![allow(non_snake_case, non_upper_case_globals, clippy::missing_safety_doc)]

mod calls;
mod scenario;

use std::{
    ffi::{c_char, c_int, c_uint, c_ulonglong},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nvml_wrapper_sys::bindings::*;

use crate::scenario::{Gpu, Load, Scenario};

const SUCCESS: nvmlReturn_t = nvmlReturn_enum_NVML_SUCCESS;
const UNINITIALIZED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
const INVALID_ARGUMENT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const NOT_SUPPORTED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
const NOT_FOUND: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
const INSUFFICIENT_SIZE: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
const TIMEOUT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_TIMEOUT;
const GPU_IS_LOST: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
const VERSION_MISMATCH: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;

/// nvmlInit calls not yet matched by nvmlShutdown.
static INITIALISED: AtomicU32 = AtomicU32::new(0);
/// When the library was first initialised: the clock of every reading.
static STARTED: Mutex<Option<Instant>> = Mutex::new(None);
/// Energy counters (mJ) and the time they were last advanced, per GPU.
static ENERGY: Mutex<Vec<(f64, f64)>> = Mutex::new(Vec::new());

fn seconds() -> f64 {
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    started.get_or_insert_with(Instant::now).elapsed().as_secs_f64()
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Counts the call, applies the scenario's delay for it, and hands over the scenario.
fn enter(function: &'static str) -> Scenario {
    calls::count(function);
    let scenario = scenario::current();
    calls::flush_to(scenario.calls_file.as_deref());
    if let Some(ms) = scenario.slow_ms.get(function) {
        std::thread::sleep(Duration::from_millis(*ms));
    }
    scenario
}

/// Handles are `index + 1` cast to NVML's opaque pointer: never dereferenced by the caller.
fn handle(index: usize) -> nvmlDevice_t {
    (index + 1) as nvmlDevice_t
}

fn index_of(device: nvmlDevice_t) -> usize {
    (device as usize).wrapping_sub(1)
}

/// The call's GPU, or the code NVML answers with: not initialised, no such handle, lost, or
/// this function refused by the scenario.
fn gpu(function: &'static str, device: nvmlDevice_t) -> Result<(usize, Gpu), nvmlReturn_t> {
    let scenario = enter(function);
    if INITIALISED.load(Ordering::SeqCst) == 0 {
        return Err(UNINITIALIZED);
    }
    let index = index_of(device);
    let gpu = scenario.gpus.get(index).cloned().ok_or(INVALID_ARGUMENT)?;
    if gpu.lost {
        return Err(GPU_IS_LOST);
    }
    if gpu.refuses(function) {
        return Err(NOT_SUPPORTED);
    }
    Ok((index, gpu))
}

/// Runs `f` on the call's GPU and writes its answer through `out`.
unsafe fn answer<T>(
    function: &'static str,
    device: nvmlDevice_t,
    out: *mut T,
    f: impl FnOnce(usize, &Gpu, f64) -> Result<T, nvmlReturn_t>,
) -> nvmlReturn_t {
    if out.is_null() {
        enter(function);
        return INVALID_ARGUMENT;
    }
    match gpu(function, device).and_then(|(index, gpu)| f(index, &gpu, seconds())) {
        Ok(value) => {
            unsafe { out.write(value) };
            SUCCESS
        }
        Err(code) => code,
    }
}

fn init(function: &'static str) -> nvmlReturn_t {
    enter(function);
    INITIALISED.fetch_add(1, Ordering::SeqCst);
    seconds();
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init("nvmlInit_v2")
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init("nvmlInitWithFlags")
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    enter("nvmlShutdown");
    match INITIALISED.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => SUCCESS,
        Err(_) => UNINITIALIZED,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static [u8] = match result {
        SUCCESS => b"Success\0",
        UNINITIALIZED => b"Uninitialized\0",
        INVALID_ARGUMENT => b"Invalid Argument\0",
        NOT_SUPPORTED => b"Not Supported\0",
        NOT_FOUND => b"Not Found\0",
        INSUFFICIENT_SIZE => b"Insufficient Size\0",
        TIMEOUT => b"Timeout\0",
        GPU_IS_LOST => b"GPU is lost\0",
        _ => b"Unknown Error\0",
    };
    text.as_ptr().cast()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let scenario = enter("nvmlDeviceGetCount_v2");
    if INITIALISED.load(Ordering::SeqCst) == 0 {
        return UNINITIALIZED;
    }
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    unsafe { count.write(scenario.gpus.len() as c_uint) };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let scenario = enter("nvmlDeviceGetHandleByIndex_v2");
    if INITIALISED.load(Ordering::SeqCst) == 0 {
        return UNINITIALIZED;
    }
    if device.is_null() || index as usize >= scenario.gpus.len() {
        return INVALID_ARGUMENT;
    }
    unsafe { device.write(handle(index as usize)) };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: nvmlDevice_t, index: *mut c_uint) -> nvmlReturn_t {
    unsafe { answer("nvmlDeviceGetIndex", device, index, |i, _, _| Ok(i as c_uint)) }
}

/// Copies `text` and its NUL into `out` of `length` bytes, or says it does not fit.
unsafe fn string_out(text: &str, out: *mut c_char, length: c_uint) -> nvmlReturn_t {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    if text.len() + 1 > length as usize {
        return INSUFFICIENT_SIZE;
    }
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), out, text.len());
        out.add(text.len()).write(0);
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match gpu("nvmlDeviceGetUUID", device) {
        Ok((index, gpu)) => unsafe { string_out(&gpu.uuid(index), uuid, length) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match gpu("nvmlDeviceGetName", device) {
        Ok((_, gpu)) => unsafe { string_out(&gpu.name, name, length) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    unsafe {
        answer("nvmlDeviceGetUtilizationRates", device, utilization, |i, g, t| {
            let r = scenario::readings(g, i, t);
            Ok(nvmlUtilization_t { gpu: r.utilization_gpu, memory: r.utilization_memory })
        })
    }
}

/// Memory NVML reports as used: what the processes hold (busy boards also hold their
/// framework's caches, which the processes' figures include).
fn used_memory(gpu: &Gpu) -> u64 {
    gpu.processes.iter().map(|p| p.used_memory_bytes).sum::<u64>().min(gpu.memory_total_bytes)
}

/// Memory the driver reserves on an H100 80GB HBM3.
const RESERVED: u64 = 595 << 20;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    const VERSION: c_uint = (size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;
    if !memory.is_null() && unsafe { (*memory).version } != VERSION {
        enter("nvmlDeviceGetMemoryInfo_v2");
        return VERSION_MISMATCH;
    }
    unsafe {
        answer("nvmlDeviceGetMemoryInfo_v2", device, memory, |_, g, _| {
            let used = used_memory(g);
            Ok(nvmlMemory_v2_t {
                version: VERSION,
                total: g.memory_total_bytes,
                reserved: RESERVED,
                used,
                free: g.memory_total_bytes.saturating_sub(RESERVED + used),
            })
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: nvmlDevice_t, power: *mut c_uint) -> nvmlReturn_t {
    unsafe {
        answer("nvmlDeviceGetPowerUsage", device, power, |i, g, t| {
            Ok(scenario::readings(g, i, t).power_milliwatts)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    unsafe {
        answer("nvmlDeviceGetEnforcedPowerLimit", device, limit, |_, g, _| {
            Ok((g.power_limit_watts * 1000.0) as c_uint)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    unsafe {
        answer("nvmlDeviceGetTotalEnergyConsumption", device, energy, |i, g, t| {
            // Energy since the "driver loaded": a large start, then the power read meanwhile.
            let mut all = ENERGY.lock().unwrap_or_else(|e| e.into_inner());
            if all.len() <= i {
                all.resize(i + 1, (0.0, 0.0));
            }
            let (millijoules, at) = &mut all[i];
            if *millijoules == 0.0 {
                *millijoules = 3.6e9;
            }
            *millijoules += scenario::readings(g, i, t).power_milliwatts as f64 * (t - *at).max(0.0);
            *at = t;
            Ok(*millijoules as c_ulonglong)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temperature: *mut c_uint,
) -> nvmlReturn_t {
    unsafe {
        answer("nvmlDeviceGetTemperature", device, temperature, |i, g, t| {
            if sensor != nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU {
                return Err(INVALID_ARGUMENT);
            }
            Ok(scenario::readings(g, i, t).temperature_celsius)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock: nvmlClockType_t,
    mhz: *mut c_uint,
) -> nvmlReturn_t {
    unsafe {
        answer("nvmlDeviceGetClockInfo", device, mhz, |i, g, t| {
            let r = scenario::readings(g, i, t);
            match clock {
                nvmlClockType_enum_NVML_CLOCK_SM | nvmlClockType_enum_NVML_CLOCK_GRAPHICS => {
                    Ok(r.sm_clock_mhz)
                }
                nvmlClockType_enum_NVML_CLOCK_MEM => Ok(r.memory_clock_mhz),
                _ => Err(NOT_SUPPORTED),
            }
        })
    }
}

unsafe fn clock_event_reasons(
    function: &'static str,
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    unsafe {
        answer(function, device, reasons, |i, g, t| Ok(scenario::readings(g, i, t).clock_event_reasons))
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    unsafe { clock_event_reasons("nvmlDeviceGetCurrentClocksThrottleReasons", device, reasons) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    unsafe { clock_event_reasons("nvmlDeviceGetCurrentClocksEventReasons", device, reasons) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    _error_type: nvmlMemoryErrorType_t,
    _counter_type: nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    unsafe { answer("nvmlDeviceGetTotalEccErrors", device, count, |_, _, _| Ok(0)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: nvmlDevice_t,
    _counter: nvmlPcieUtilCounter_t,
    kilobytes_per_second: *mut c_uint,
) -> nvmlReturn_t {
    unsafe {
        answer("nvmlDeviceGetPcieThroughput", device, kilobytes_per_second, |i, g, t| {
            // The real call samples for 20 ms.
            std::thread::sleep(Duration::from_millis(20));
            Ok((scenario::readings(g, i, t).pcie_bytes_per_second / 1024.0) as c_uint)
        })
    }
}

/// NVML's PCIe byte counters (field ids 197 and 198, per direction).
const FIELD_PCIE_TX_BYTES: c_uint = 197;
const FIELD_PCIE_RX_BYTES: c_uint = 198;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    if values.is_null() || count < 0 {
        enter("nvmlDeviceGetFieldValues");
        return INVALID_ARGUMENT;
    }
    let (index, gpu) = match gpu("nvmlDeviceGetFieldValues", device) {
        Ok(g) => g,
        Err(code) => return code,
    };
    let t = seconds();
    // The counters grow at the current rate (a steady integral is enough for rate tests).
    let bytes = (scenario::readings(&gpu, index, t).pcie_bytes_per_second * t) as c_ulonglong;
    // SAFETY: the caller hands `count` entries.
    let values = unsafe { std::slice::from_raw_parts_mut(values, count as usize) };
    for v in values {
        v.timestamp = unix_micros() as i64;
        v.latencyUsec = 0;
        match v.fieldId {
            FIELD_PCIE_TX_BYTES | FIELD_PCIE_RX_BYTES => {
                v.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                v.value.ullVal = bytes;
                v.nvmlReturn = SUCCESS;
            }
            _ => v.nvmlReturn = NOT_SUPPORTED,
        }
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    if count.is_null() {
        enter("nvmlDeviceGetComputeRunningProcesses_v3");
        return INVALID_ARGUMENT;
    }
    let (_, gpu) = match gpu("nvmlDeviceGetComputeRunningProcesses_v3", device) {
        Ok(g) => g,
        Err(code) => return code,
    };
    let room = unsafe { *count } as usize;
    unsafe { count.write(gpu.processes.len() as c_uint) };
    if gpu.processes.is_empty() {
        return SUCCESS;
    }
    if infos.is_null() || room < gpu.processes.len() {
        return INSUFFICIENT_SIZE;
    }
    for (i, p) in gpu.processes.iter().enumerate() {
        let info = nvmlProcessInfo_t {
            pid: p.pid,
            usedGpuMemory: p.used_memory_bytes,
            // Not a MIG instance.
            gpuInstanceId: u32::MAX,
            computeInstanceId: u32::MAX,
        };
        unsafe { infos.add(i).write(info) };
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    samples: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    if count.is_null() {
        enter("nvmlDeviceGetProcessUtilization");
        return INVALID_ARGUMENT;
    }
    let (index, gpu) = match gpu("nvmlDeviceGetProcessUtilization", device) {
        Ok(g) => g,
        Err(code) => return code,
    };
    // Idle, the driver has no sample since `last_seen` (the real one answers NOT_FOUND).
    let now = unix_micros();
    if gpu.load == Load::Idle || gpu.processes.is_empty() || now <= last_seen {
        unsafe { count.write(0) };
        return NOT_FOUND;
    }
    let room = unsafe { *count } as usize;
    unsafe { count.write(gpu.processes.len() as c_uint) };
    if samples.is_null() || room < gpu.processes.len() {
        return INSUFFICIENT_SIZE;
    }
    let sm = scenario::readings(&gpu, index, seconds()).process_sm_percent;
    for (i, p) in gpu.processes.iter().enumerate() {
        let sample = nvmlProcessUtilizationSample_t {
            pid: p.pid,
            timeStamp: now,
            smUtil: sm,
            memUtil: sm / 2,
            encUtil: 0,
            decUtil: 0,
        };
        unsafe { samples.add(i).write(sample) };
    }
    SUCCESS
}

mod gpm;
pub use gpm::*;

mod events;
pub use events::*;
