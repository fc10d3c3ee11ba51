//! Scheduler statistics: vLLM's roles, the per-role slots the kernel sums into, and the
//! per-task state behind them.

/// vLLM process roles, as indices into [`SchedStats`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    ApiServer = 0,
    EngineCore = 1,
    Worker = 2,
}
pub const ROLE_COUNT: u32 = 3;

/// The `u64` slots of each role in [`SchedStats`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    OnCpuNs = 0,
    Switches = 1,
    /// Off-CPU (blocked, until woken) in a futex wait: locks, condition variables, Python's GIL.
    OffCpuFutexNs = 2,
    /// Off-CPU in a sleep (nanosleep, clock_nanosleep).
    OffCpuSleepNs = 3,
    /// Off-CPU in any other blocking call (epoll, reads, …).
    OffCpuOtherNs = 4,
    RunqueueNs = 5,
    RunqueueCount = 6,
    /// Run-queue delay histogram: slot `RunqueueBuckets + b` counts delays of at most 2^b µs
    /// (the last bucket: anything longer).
    RunqueueBuckets = 7,
}
pub const RUNQUEUE_BUCKETS: u32 = 24;
/// Slots per role.
pub const SLOTS: u32 = 32;
const _: () = assert!(Slot::RunqueueBuckets as u32 + RUNQUEUE_BUCKETS <= SLOTS);

/// The index of `slot` (plus `offset`, for histogram buckets) of `role` in [`SchedStats::slots`].
pub const fn index(role: u8, slot: Slot, offset: u32) -> usize {
    (role as u32 * SLOTS + slot as u32 + offset) as usize
}

/// All scheduler statistics of one CPU: [`SLOTS`] `u64`s per role, in role order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SchedStats {
    pub slots: [u64; (ROLE_COUNT * SLOTS) as usize],
}

/// Why a task left the CPU.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffReason {
    Preempted = 0,
    Futex = 1,
    Sleep = 2,
    Other = 3,
}

/// Per-task scheduler state, in the task's local storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskSched {
    pub on_ns: u64,
    pub off_ns: u64,
    pub wake_ns: u64,
    /// A [`Role`].
    pub role: u8,
    /// An [`OffReason`].
    pub off_reason: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<TaskSched>() == 32);
