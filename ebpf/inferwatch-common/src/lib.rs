//! Types shared by the kernel programs (`inferwatch-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding, and its size is asserted at compile
//! time on both sides: the kernel writes these bytes into a ring buffer and the agent reads
//! them back, so any drift between the two builds must fail the build, not corrupt events.
#![no_std]

/// Name of the hash map of watched thread-group ids (key `u32` tgid, value [`WatchFlags`]).
pub const WATCHED_TGIDS_MAP: &str = "WATCHED_TGIDS";
/// Name of the ring buffer carrying [`SockEvent`]s to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU array (one `u64` slot per [`LostReason`]) of events dropped in the kernel.
pub const LOST_MAP: &str = "LOST";

/// Capacity of the watched-process map.
pub const MAX_WATCHED_TGIDS: u32 = 4096;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
/// 4 MiB: the reader drains every few milliseconds and is woken at 1/16 full, so this absorbs
/// bursts; the ring's pages count in the agent's RSS twice (the kernel maps its data area
/// twice, for wrap-around), so it is no larger than that needs.
pub const EVENTS_RING_BYTES: u32 = 1 << 22;
/// Pending ring-buffer bytes at which a data record wakes the reader (1/16 of the ring); below
/// it the reader drains on its own timer (the agent's `--drain-interval`).
pub const WAKEUP_PENDING_BYTES: u64 = EVENTS_RING_BYTES as u64 / 16;

/// `syscall_nr` when the socket operation did not come from a system call (kernel thread,
/// io_uring worker without saved user registers).
pub const NO_SYSCALL: i32 = -1;

/// Value stored per watched tgid. Reserved for per-process options (payload capture etc.).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchFlags {
    pub flags: u32,
}

/// Why the kernel side dropped an event; the index into [`LOST_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The ring buffer was full: userspace fell behind.
    RingFull = 0,
}
pub const LOST_REASONS: u32 = 1;

/// What a [`SockEvent`] reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockEventKind {
    /// Data left through a socket (`sock_send_length`).
    Send = 1,
    /// Data arrived through a socket (`sock_recv_length`).
    Recv = 2,
    /// A tracked TCP socket changed state (`inet_sock_set_state`): `ret` is the new state,
    /// `syscall_nr` the old one.
    State = 3,
    /// A TCP event on a tracked socket: `ret` is a [`NetEvent`] code.
    Net = 4,
}

/// What a [`SockEventKind::Net`] event reports.
pub const NET_RETRANSMIT: i32 = 1;
pub const NET_RESET_SENT: i32 = 2;
pub const NET_RESET_RECEIVED: i32 = 3;

impl SockEventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Send),
            2 => Some(Self::Recv),
            3 => Some(Self::State),
            4 => Some(Self::Net),
            _ => None,
        }
    }
}

/// Most payload bytes copied per event (the first bytes of the transfer). The runtime limit,
/// [`CAPTURE_BYTES_GLOBAL`], may lower it. A power of two: the kernel side masks with it.
/// Only bytes actually moved are copied, so a large maximum costs nothing for small transfers.
pub const MAX_CAPTURE: usize = 4096;
/// The agent's default runtime limit: request heads of typical clients, whole SSE events, and
/// vLLM's batched engine outputs at a concurrency of 32 (at 1024 bytes, most of those lose the
/// ids the phase breakdown needs).
pub const DEFAULT_CAPTURE: usize = 4096;
/// Name of the global (a `u32` in .rodata) holding the runtime capture limit.
pub const CAPTURE_BYTES_GLOBAL: &str = "CAPTURE_BYTES";
/// iovecs looked at per vectored call (`writev`, `sendmsg`, …).
pub const MAX_IOVECS: usize = 4;

/// Name of the LRU map from `struct sock` address to [`TrackedSock`].
pub const TRACKED_SOCKS_MAP: &str = "TRACKED_SOCKS";
pub const MAX_TRACKED_SOCKS: u32 = 65536;

/// Identity of a socket while the kernel programs follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedSock {
    /// Unique for the socket's life (CPU in the top 16 bits, a per-CPU counter below): the
    /// same address reused by a new socket gets a new id, so connections never merge.
    pub conn_id: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// Header of one ring-buffer record: a socket operation or state change of a watched
/// process. `captured` payload bytes follow it in the same record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the operation returned.
    pub ts_ns: u64,
    /// See [`TrackedSock::conn_id`].
    pub conn_id: u64,
    /// Kernel address of the `struct sock`: an identity, never dereferenced by userspace.
    pub sock: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Bytes moved, or a negative errno; the new TCP state for [`SockEventKind::State`].
    pub ret: i32,
    /// The system call that did the I/O (`orig_ax` of the saved registers), or [`NO_SYSCALL`].
    pub syscall_nr: i32,
    /// Payload bytes that follow this header (the first bytes of the transfer).
    pub captured: u16,
    /// A [`SockEventKind`].
    pub kind: u8,
    pub _pad: [u8; 5],
}

pub const SOCK_EVENT_SIZE: usize = 48;
const _: () = assert!(core::mem::size_of::<SockEvent>() == SOCK_EVENT_SIZE);
const _: () = assert!(core::mem::size_of::<WatchFlags>() == 4);
const _: () = assert!(core::mem::size_of::<TrackedSock>() == 16);
const _: () = assert!(MAX_CAPTURE.is_power_of_two());

/// Per-CPU scratch where a record is assembled before it is copied to the ring buffer at its
/// real size. Twice [`MAX_CAPTURE`] of payload room, so the verifier can see that any offset
/// below `MAX_CAPTURE` plus any length below `MAX_CAPTURE` stays inside.
#[repr(C)]
pub struct Scratch {
    pub event: SockEvent,
    pub payload: [u8; 2 * MAX_CAPTURE],
}

/// Name of the hash map from tgid to [`SchedRole`] of the processes whose scheduling is measured.
pub const SCHED_ROLES_MAP: &str = "SCHED_ROLES";
/// Name of the per-CPU array of scheduler statistics: one [`SchedStats`] (so that the agent
/// reads them all with one system call).
pub const SCHED_STATS_MAP: &str = "SCHED_STATS";

/// vLLM process roles, as indices into [`SCHED_STATS_MAP`].
pub const SCHED_ROLE_COUNT: u32 = 3;
pub const ROLE_API_SERVER: u8 = 0;
pub const ROLE_ENGINE_CORE: u8 = 1;
pub const ROLE_WORKER: u8 = 2;

/// Slots per role in [`SCHED_STATS_MAP`].
pub const SCHED_SLOTS: u32 = 32;
pub const SLOT_ONCPU_NS: u32 = 0;
pub const SLOT_SWITCHES: u32 = 1;
/// Off-CPU (blocked, until woken) in a futex wait: locks, condition variables, Python's GIL.
pub const SLOT_OFFCPU_FUTEX_NS: u32 = 2;
/// Off-CPU in a sleep (nanosleep, clock_nanosleep).
pub const SLOT_OFFCPU_SLEEP_NS: u32 = 3;
/// Off-CPU in any other blocking call (epoll, reads, …).
pub const SLOT_OFFCPU_OTHER_NS: u32 = 4;
pub const SLOT_RUNQUEUE_NS: u32 = 5;
pub const SLOT_RUNQUEUE_COUNT: u32 = 6;
/// Run-queue delay histogram: slot `SLOT_RUNQUEUE_BUCKETS + b` counts delays of at most 2^b µs
/// (the last bucket: anything longer).
pub const SLOT_RUNQUEUE_BUCKETS: u32 = 7;
pub const RUNQUEUE_BUCKETS: u32 = 24;
const _: () = assert!(SLOT_RUNQUEUE_BUCKETS + RUNQUEUE_BUCKETS <= SCHED_SLOTS);

/// All scheduler statistics of one CPU: [`SCHED_SLOTS`] `u64`s per role, in role order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SchedStats {
    pub slots: [u64; (SCHED_ROLE_COUNT * SCHED_SLOTS) as usize],
}

/// Why a task left the CPU.
pub const OFF_PREEMPTED: u8 = 0;
pub const OFF_FUTEX: u8 = 1;
pub const OFF_SLEEP: u8 = 2;
pub const OFF_OTHER: u8 = 3;

/// Per-task scheduler state, keyed by task address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskSched {
    pub on_ns: u64,
    pub off_ns: u64,
    pub wake_ns: u64,
    pub role: u8,
    pub off_reason: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<TaskSched>() == 32);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, #[repr(C)], no padding left implicit.
    unsafe impl aya::Pod for super::WatchFlags {}
    unsafe impl aya::Pod for super::SockEvent {}
    unsafe impl aya::Pod for super::TrackedSock {}
    unsafe impl aya::Pod for super::SchedStats {}
}
