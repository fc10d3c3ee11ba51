//! Scheduler statistics of vLLM's processes, aggregated in the kernel per role: on-CPU time,
//! context switches, off-CPU time by what the task blocked in, and run-queue delay (woken or
//! preempted → running again). No events leave the kernel; the agent reads per-CPU sums.
//!
//! A vLLM task's state lives in task-local storage, attached to its `task_struct` when it first
//! switches out (`prev` is the current task, so its tgid is at hand) and freed with the task.
//! Finding it again for `next` or a woken task is one load from the task when it has none (the
//! common case on a node: most switches are not vLLM's) and a cache slot when it has, instead
//! of a hash-table lookup per switch and per wakeup. The `compat` object (kernels before 5.17)
//! keeps the state in an LRU hash by thread id instead, cleared when a thread exits.

#[cfg(not(feature = "compat"))]
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE},
    helpers::generated::bpf_task_storage_get,
    macros::btf_map,
};
#[cfg(feature = "compat")]
use aya_ebpf::{helpers::bpf_probe_read_kernel, maps::LruHashMap};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel as read_kernel},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use inferwatch_common::{
    kernel::FEATURE_SCHED_PREV_STATE,
    maps::MAX_WATCHED_TGIDS,
    sched::{OffReason, RUNQUEUE_BUCKETS, SchedStats, Slot, TaskSched, index},
};

use crate::{
    KERNEL_LAYOUT, has, loaded,
    nr::{CLOCK_NANOSLEEP, FUTEX, FUTEX_WAITV, NANOSLEEP},
    opaque, regs,
};

#[map]
static SCHED_ROLES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED_TGIDS, 0);

/// The BTF definition of a task-storage map (aya-ebpf has no type for one): the loader reads
/// the map's type, flags and key/value types from these fields' BTF; they hold nothing.
#[cfg(not(feature = "compat"))]
#[repr(C)]
pub struct TaskStorage {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const TaskSched,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers that are never dereferenced; the static only names the map.
#[cfg(not(feature = "compat"))]
unsafe impl Sync for TaskStorage {}

#[cfg(not(feature = "compat"))]
impl TaskStorage {
    const fn new() -> Self {
        use core::ptr::null;
        Self { r#type: null(), key: null(), value: null(), max_entries: null(), map_flags: null() }
    }

    /// The task's state; with `create`, a zeroed one is attached if it has none.
    #[expect(
        clippy::mut_from_ref,
        reason = "the storage lives in the kernel, not in `self`; only the task switching (or being woken, under its runqueue lock) here touches it"
    )]
    #[inline(always)]
    fn get(&self, task: u64, create: bool) -> Option<&mut TaskSched> {
        let flags = if create { BPF_LOCAL_STORAGE_GET_F_CREATE as u64 } else { 0 };
        // SAFETY: `task` is a `struct task_struct *` argument of the tracepoint, which the
        // verifier checks (PTR_TO_BTF_ID); the helper returns a pointer into the task's
        // storage, valid for this program run, or null.
        unsafe {
            let map = core::ptr::from_ref(self).cast_mut().cast();
            let p = bpf_task_storage_get(map, task as *mut _, core::ptr::null_mut(), flags);
            p.cast::<TaskSched>().as_mut()
        }
    }
}

#[cfg(not(feature = "compat"))]
#[btf_map]
static SCHED_TASKS: TaskStorage = TaskStorage::new();

/// Before task storage: the state of each measured thread, by thread id. Threads that exit
/// leave their entry until the LRU reuses it.
#[cfg(feature = "compat")]
#[map]
static SCHED_TASKS: LruHashMap<u32, TaskSched> = LruHashMap::with_max_entries(MAX_SCHED_THREADS, 0);

#[cfg(feature = "compat")]
const MAX_SCHED_THREADS: u32 = 16384;

/// `sched_process_exit(struct task_struct *p)`, in the exiting thread: its state goes, so a
/// later thread given the same id (of any process) does not inherit a vLLM role.
#[cfg(feature = "compat")]
#[aya_ebpf::macros::btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    let _ = SCHED_TASKS.remove(&(bpf_get_current_pid_tgid() as u32));
    0
}

#[cfg(feature = "compat")]
static NEW_TASK: TaskSched =
    TaskSched { on_ns: 0, off_ns: 0, wake_ns: 0, role: 0, off_reason: 0, _pad: [0; 6] };

/// The state of `task` (a `struct task_struct *`); with `create`, a zeroed one if it has none.
#[cfg(not(feature = "compat"))]
#[inline(always)]
fn task_state(task: u64, create: bool) -> Option<&'static mut TaskSched> {
    SCHED_TASKS.get(task, create)
}

#[cfg(feature = "compat")]
#[inline(always)]
fn task_state(task: u64, create: bool) -> Option<&'static mut TaskSched> {
    let offset = loaded(&KERNEL_LAYOUT.task_pid_offset) as u64;
    // SAFETY: the helper checks the kernel address.
    let tid: u32 = unsafe { bpf_probe_read_kernel((task + offset) as *const u32).ok()? };
    if create && SCHED_TASKS.get_ptr_mut(&tid).is_none() {
        // From a static, not a zeroed local: that would be a call to `memset`, a global
        // function with a pointer argument, which Linux 5.10's verifier refuses.
        let _ = SCHED_TASKS.insert(&tid, &NEW_TASK, 0);
    }
    // SAFETY: a map value; only the task itself (switching) or its waker under the runqueue
    // lock writes it.
    SCHED_TASKS.get_ptr_mut(&tid).map(|p| unsafe { &mut *p })
}

/// The state `prev` switched out in: an argument from Linux 5.18, its task field before.
#[inline(always)]
fn prev_state(ctx: &BtfTracePointContext, prev: u64) -> u32 {
    if has(FEATURE_SCHED_PREV_STATE) {
        return ctx.arg(3);
    }
    let offset = loaded(&KERNEL_LAYOUT.task_state_offset) as u64;
    // SAFETY: the helper checks the kernel address.
    unsafe { read_kernel((prev + offset) as *const u32).unwrap_or(TASK_RUNNING) }
}

#[map]
static SCHED_STATS: PerCpuArray<SchedStats> = PerCpuArray::with_max_entries(1, 0);

const TASK_RUNNING: u32 = 0;

#[inline(always)]
fn add(role: u8, slot: Slot, offset: u32, value: u64) {
    if let Some(stats) = SCHED_STATS.get_ptr_mut(0) {
        // Per-CPU value: no other writer. `get_mut` bounds the index for the verifier, checked
        // as written (`opaque`: 5.10 could not follow LLVM's folded bound).
        if let Some(v) = unsafe { (*stats).slots.get_mut(opaque(index(role, slot, offset))) } {
            *v += value;
        }
    }
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)`.
///
/// Runs on every context switch of the node: tasks that are not vLLM's cost one hash lookup
/// (`prev`'s tgid) and one load (`next` has no storage) and nothing else; the clock is read only
/// when a vLLM task is involved.
#[inline(always)]
pub fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let mut now = 0u64;

    // The task leaving: `prev` is the current task.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(&role) = unsafe { SCHED_ROLES.get(&tgid) } {
        now = unsafe { bpf_ktime_get_ns() };
        let reason = if prev_state(ctx, prev) == TASK_RUNNING {
            OffReason::Preempted as u8
        } else {
            match regs::current_nr() {
                Some(FUTEX | FUTEX_WAITV) => OffReason::Futex as u8,
                Some(NANOSLEEP | CLOCK_NANOSLEEP) => OffReason::Sleep as u8,
                _ => OffReason::Other as u8,
            }
        };
        add(role, Slot::Switches, 0, 1);
        // Preempted: it is runnable now, so its run-queue wait starts now.
        let wake_ns = if reason == OffReason::Preempted as u8 { now } else { 0 };
        // A new storage is zeroed: on_ns 0, nothing to account yet. Allocation can fail (memory,
        // or the storage busy in a nested program on this CPU): the switch then goes uncounted.
        if let Some(state) = task_state(prev, true) {
            if state.on_ns != 0 {
                add(role, Slot::OnCpuNs, 0, now.saturating_sub(state.on_ns));
            }
            state.role = role;
            state.on_ns = 0;
            state.off_ns = now;
            state.off_reason = reason;
            state.wake_ns = wake_ns;
        }
    }

    // The task arriving.
    if let Some(state) = task_state(next, false) {
        if now == 0 {
            now = unsafe { bpf_ktime_get_ns() };
        }
        if state.wake_ns != 0 {
            let delay = now.saturating_sub(state.wake_ns);
            add(state.role, Slot::RunqueueNs, 0, delay);
            add(state.role, Slot::RunqueueCount, 0, 1);
            add(state.role, Slot::RunqueueBuckets, bucket(delay), 1);
        }
        // Volatile: LLVM would merge the two zeroings into a call to `memset`, a global
        // function with a pointer argument, which Linux 5.10's verifier refuses.
        // SAFETY: fields of a live map value.
        unsafe {
            core::ptr::write_volatile(&mut state.wake_ns, 0);
            core::ptr::write_volatile(&mut state.off_ns, 0);
        }
        state.on_ns = now;
    }
    Ok(())
}

/// `sched_wakeup(struct task_struct *p)` / `sched_wakeup_new`: a blocked task becomes runnable.
#[inline(always)]
pub fn try_sched_wakeup(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let task: u64 = ctx.arg(0);
    let Some(state) = task_state(task, false) else { return Ok(()) };
    if state.wake_ns != 0 || state.off_ns == 0 {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let slot = if state.off_reason == OffReason::Futex as u8 {
        Slot::OffCpuFutexNs
    } else if state.off_reason == OffReason::Sleep as u8 {
        Slot::OffCpuSleepNs
    } else {
        Slot::OffCpuOtherNs
    };
    add(state.role, slot, 0, now.saturating_sub(state.off_ns));
    state.wake_ns = now;
    Ok(())
}

/// Index of the smallest power-of-two microseconds bucket holding `delay_ns`.
#[inline(always)]
fn bucket(delay_ns: u64) -> u32 {
    let us = delay_ns / 1000;
    let mut b = 0u32;
    while b < RUNQUEUE_BUCKETS - 1 && (1u64 << b) < us {
        b += 1;
    }
    b
}
