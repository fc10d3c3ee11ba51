//! Event sets: critical XID errors from the scenario, each delivered once per set.

use std::{
    ffi::{c_uint, c_ulonglong},
    time::{Duration, Instant},
};

use nvml_wrapper_sys::bindings::*;

use crate::{INVALID_ARGUMENT, NOT_SUPPORTED, SUCCESS, TIMEOUT, enter, gpu, handle, index_of, scenario};

/// The GPUs registered in a set and the (GPU, event id) pairs it has delivered.
#[derive(Default)]
struct EventSet {
    gpus: Vec<usize>,
    delivered: Vec<(usize, u64)>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    enter("nvmlEventSetCreate");
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    unsafe { set.write(Box::into_raw(Box::<EventSet>::default()).cast()) };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    enter("nvmlEventSetFree");
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: created by nvmlEventSetCreate, freed once.
    drop(unsafe { Box::from_raw(set.cast::<EventSet>()) });
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    let (index, g) = match gpu("nvmlDeviceRegisterEvents", device) {
        Ok(g) => g,
        Err(code) => return code,
    };
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    if g.refuses("events") || types & !(nvmlEventTypeXidCriticalError as c_ulonglong) != 0 {
        return NOT_SUPPORTED;
    }
    let set = unsafe { &mut *set.cast::<EventSet>() };
    if !set.gpus.contains(&index) {
        set.gpus.push(index);
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    enter("nvmlEventSetWait_v2");
    if set.is_null() || data.is_null() {
        return INVALID_ARGUMENT;
    }
    let set = unsafe { &mut *set.cast::<EventSet>() };
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
    loop {
        let scenario = scenario::current();
        for &index in &set.gpus {
            let Some(g) = scenario.gpus.get(index) else { continue };
            if let Some(xid) = g.xid.iter().find(|x| !set.delivered.contains(&(index, x.id))) {
                set.delivered.push((index, xid.id));
                let event = nvmlEventData_t {
                    device: handle(index),
                    eventType: nvmlEventTypeXidCriticalError as c_ulonglong,
                    eventData: xid.code,
                    gpuInstanceId: u32::MAX,
                    computeInstanceId: u32::MAX,
                };
                debug_assert_eq!(index_of(event.device), index);
                unsafe { data.write(event) };
                return SUCCESS;
            }
        }
        if Instant::now() >= deadline {
            return TIMEOUT;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
