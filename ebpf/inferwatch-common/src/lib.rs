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
pub const EVENTS_RING_BYTES: u32 = 1 << 22;

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
}

impl SockEventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Send),
            2 => Some(Self::Recv),
            _ => None,
        }
    }
}

/// One socket operation of a watched process, as seen at the socket layer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the operation returned.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: an identity, never dereferenced by userspace.
    pub sock: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Bytes moved, or a negative errno.
    pub ret: i32,
    /// The system call that did the I/O (`orig_ax` of the saved registers), or [`NO_SYSCALL`].
    pub syscall_nr: i32,
    /// A [`SockEventKind`].
    pub kind: u8,
    pub _pad: [u8; 7],
}

pub const SOCK_EVENT_SIZE: usize = 40;
const _: () = assert!(core::mem::size_of::<SockEvent>() == SOCK_EVENT_SIZE);
const _: () = assert!(core::mem::size_of::<WatchFlags>() == 4);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, #[repr(C)], no padding left implicit.
    unsafe impl aya::Pod for super::WatchFlags {}
    unsafe impl aya::Pod for super::SockEvent {}
}
