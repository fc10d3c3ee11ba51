//! GPM (Hopper and newer): samples and the metrics between two of them.

use std::ffi::c_uint;

use nvml_wrapper_sys::bindings::*;

use crate::{INVALID_ARGUMENT, NOT_SUPPORTED, SUCCESS, VERSION_MISMATCH, enter, gpu, scenario, seconds};

/// A sample: the time it was taken and the GPU's GPM readings then.
struct Sample {
    gpu: Option<usize>,
    readings: Option<scenario::Readings>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    support: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    if support.is_null() {
        enter("nvmlGpmQueryDeviceSupport");
        return INVALID_ARGUMENT;
    }
    if unsafe { (*support).version } != NVML_GPM_SUPPORT_VERSION {
        enter("nvmlGpmQueryDeviceSupport");
        return VERSION_MISMATCH;
    }
    match gpu("nvmlGpmQueryDeviceSupport", device) {
        Ok((_, g)) => {
            unsafe { (*support).isSupportedDevice = c_uint::from(!g.refuses("gpm")) };
            SUCCESS
        }
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    enter("nvmlGpmSampleAlloc");
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    let boxed = Box::new(Sample { gpu: None, readings: None });
    unsafe { sample.write(Box::into_raw(boxed).cast()) };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    enter("nvmlGpmSampleFree");
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: allocated by nvmlGpmSampleAlloc, freed once (NVML's contract).
    drop(unsafe { Box::from_raw(sample.cast::<Sample>()) });
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleGet(device: nvmlDevice_t, sample: nvmlGpmSample_t) -> nvmlReturn_t {
    let (index, g) = match gpu("nvmlGpmSampleGet", device) {
        Ok(g) => g,
        Err(code) => return code,
    };
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    if g.refuses("gpm") {
        return NOT_SUPPORTED;
    }
    let s = unsafe { &mut *sample.cast::<Sample>() };
    s.gpu = Some(index);
    s.readings = Some(scenario::readings(&g, index, seconds()));
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    enter("nvmlGpmMetricsGet");
    if request.is_null() {
        return INVALID_ARGUMENT;
    }
    let request = unsafe { &mut *request };
    if request.version != NVML_GPM_METRICS_GET_VERSION {
        return VERSION_MISMATCH;
    }
    if request.sample1.is_null()
        || request.sample2.is_null()
        || request.numMetrics as usize > request.metrics.len()
    {
        return INVALID_ARGUMENT;
    }
    let (first, second) = unsafe { (&*request.sample1.cast::<Sample>(), &*request.sample2.cast::<Sample>()) };
    let (Some(_), Some(r)) = (first.readings, second.readings) else { return INVALID_ARGUMENT };
    for m in &mut request.metrics[..request.numMetrics as usize] {
        let value = match m.metricId {
            nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_UTIL => Some(r.gpm_sm),
            nvmlGpmMetricId_t_NVML_GPM_METRIC_ANY_TENSOR_UTIL => Some(r.gpm_tensor),
            nvmlGpmMetricId_t_NVML_GPM_METRIC_DRAM_BW_UTIL => Some(r.gpm_dram),
            _ => None,
        };
        match value {
            Some(v) => {
                m.value = v;
                m.nvmlReturn = SUCCESS;
            }
            None => m.nvmlReturn = NOT_SUPPORTED,
        }
    }
    SUCCESS
}
