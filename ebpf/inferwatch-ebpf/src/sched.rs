//! Scheduler statistics of vLLM's processes, aggregated in the kernel per role: on-CPU time,
//! context switches, off-CPU time by what the task blocked in, and run-queue delay (woken or
//! preempted → running again). No events leave the kernel; the agent reads per-CPU sums.
//!
//! Tasks are keyed by their `task_struct` address: `sched_switch`'s `prev` is the current task
//! (its tgid is at hand), and the address recognises `next` and a woken task later without
//! reading task_struct fields, whose offsets vary between kernels.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use inferwatch_common::{
    MAX_SCHED_TASKS, MAX_WATCHED_TGIDS, OFF_FUTEX, OFF_OTHER, OFF_PREEMPTED, OFF_SLEEP, RUNQUEUE_BUCKETS,
    SCHED_ROLE_COUNT, SCHED_SLOTS, SLOT_OFFCPU_FUTEX_NS, SLOT_OFFCPU_OTHER_NS, SLOT_OFFCPU_SLEEP_NS,
    SLOT_ONCPU_NS, SLOT_RUNQUEUE_BUCKETS, SLOT_RUNQUEUE_COUNT, SLOT_RUNQUEUE_NS, SLOT_SWITCHES, TaskSched,
};

use crate::{current_regs, syscall_nr_of};

#[map]
static SCHED_ROLES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED_TGIDS, 0);

#[map]
static SCHED_TASKS: LruHashMap<u64, TaskSched> = LruHashMap::with_max_entries(MAX_SCHED_TASKS, 0);

#[map]
static SCHED_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SCHED_ROLE_COUNT * SCHED_SLOTS, 0);

const TASK_RUNNING: u32 = 0;
const FUTEX: i32 = 202;
const FUTEX_WAITV: i32 = 449;
const NANOSLEEP: i32 = 35;
const CLOCK_NANOSLEEP: i32 = 230;

#[inline(always)]
fn add(role: u8, slot: u32, value: u64) {
    if let Some(p) = SCHED_STATS.get_ptr_mut(role as u32 * SCHED_SLOTS + slot) {
        // Per-CPU slot: no other writer.
        unsafe { *p += value };
    }
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)`.
///
/// Runs on every context switch of the node: tasks that are not vLLM's cost two lookups and
/// nothing else (the clock is read only when a vLLM task is involved), and a known task's state
/// is updated in place (an LRU insert, with its lock and allocation, only for a task's first switch).
#[inline(always)]
pub fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let mut now = 0u64;

    // The task leaving: `prev` is the current task.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(&role) = unsafe { SCHED_ROLES.get(&tgid) } {
        now = unsafe { bpf_ktime_get_ns() };
        let prev_state: u32 = ctx.arg(3);
        let reason = if prev_state == TASK_RUNNING {
            OFF_PREEMPTED
        } else {
            match current_regs().map(syscall_nr_of) {
                Some(FUTEX | FUTEX_WAITV) => OFF_FUTEX,
                Some(NANOSLEEP | CLOCK_NANOSLEEP) => OFF_SLEEP,
                _ => OFF_OTHER,
            }
        };
        add(role, SLOT_SWITCHES, 1);
        // Preempted: it is runnable now, so its run-queue wait starts now.
        let wake_ns = if reason == OFF_PREEMPTED { now } else { 0 };
        match SCHED_TASKS.get_ptr_mut(&prev) {
            Some(state) => {
                // SAFETY: a live map value; a concurrent update of the same task is impossible
                // (it is switching out on this CPU).
                let state = unsafe { &mut *state };
                if state.on_ns != 0 {
                    add(role, SLOT_ONCPU_NS, now.saturating_sub(state.on_ns));
                }
                state.role = role;
                state.on_ns = 0;
                state.off_ns = now;
                state.off_reason = reason;
                state.wake_ns = wake_ns;
            }
            None => {
                let state =
                    TaskSched { role, off_ns: now, off_reason: reason, wake_ns, ..Default::default() };
                let _ = SCHED_TASKS.insert(&prev, &state, 0);
            }
        }
    }

    // The task arriving.
    if let Some(state) = SCHED_TASKS.get_ptr_mut(&next) {
        if now == 0 {
            now = unsafe { bpf_ktime_get_ns() };
        }
        let state = unsafe { &mut *state };
        if state.wake_ns != 0 {
            let delay = now.saturating_sub(state.wake_ns);
            add(state.role, SLOT_RUNQUEUE_NS, delay);
            add(state.role, SLOT_RUNQUEUE_COUNT, 1);
            add(state.role, SLOT_RUNQUEUE_BUCKETS + bucket(delay), 1);
        }
        state.wake_ns = 0;
        state.off_ns = 0;
        state.on_ns = now;
    }
    Ok(())
}

/// `sched_wakeup(struct task_struct *p)` / `sched_wakeup_new`: a blocked task becomes runnable.
#[inline(always)]
pub fn try_sched_wakeup(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let task: u64 = ctx.arg(0);
    let Some(state) = SCHED_TASKS.get_ptr_mut(&task) else { return Ok(()) };
    let state = unsafe { &mut *state };
    if state.wake_ns != 0 || state.off_ns == 0 {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let slot = match state.off_reason {
        OFF_FUTEX => SLOT_OFFCPU_FUTEX_NS,
        OFF_SLEEP => SLOT_OFFCPU_SLEEP_NS,
        _ => SLOT_OFFCPU_OTHER_NS,
    };
    add(state.role, slot, now.saturating_sub(state.off_ns));
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
