//! The maps both sides name, and their sizes.

/// Hash map of watched thread-group ids (key `u32` tgid, value [`crate::sock::WatchFlags`]).
pub const WATCHED_TGIDS: &str = "WATCHED_TGIDS";
/// Capacity of [`WATCHED_TGIDS`] and [`SCHED_ROLES`].
pub const MAX_WATCHED_TGIDS: u32 = 4096;

/// Ring buffer carrying [`crate::sock::SockEvent`] records to userspace.
pub const EVENTS: &str = "EVENTS";
/// Ring buffer size in bytes (a power of two, a multiple of the page size). 4 MiB: the reader
/// drains every few milliseconds and is woken at 1/16 full, so this absorbs bursts; the ring's
/// pages count in the agent's RSS twice (the kernel maps its data area twice, for
/// wrap-around), so it is no larger than that needs.
pub const EVENTS_RING_BYTES: u32 = 1 << 22;
/// Pending ring-buffer bytes at which a data record wakes the reader (1/16 of the ring); below
/// it the reader drains on its own timer (the agent's `--drain-interval`).
pub const WAKEUP_PENDING_BYTES: u64 = EVENTS_RING_BYTES as u64 / 16;

/// Per-CPU array of events dropped in the kernel: one `u64` per [`crate::sock::LostReason`].
pub const LOST: &str = "LOST";

/// LRU map from `struct sock` address to [`crate::sock::TrackedSock`].
pub const TRACKED_SOCKS: &str = "TRACKED_SOCKS";
pub const MAX_TRACKED_SOCKS: u32 = 65536;

/// Hash map from a TCP port that a watched process listens on (`u16`, host order) to that
/// process's tgid: its accepted connections are tracked from their establishment, so the time a
/// request waits before the server accepts and reads it is seen.
pub const LISTEN_PORTS: &str = "LISTEN_PORTS";
pub const MAX_LISTEN_PORTS: u32 = 4096;

/// Hash map from tgid to [`crate::sched::Role`] of the processes whose scheduling is measured.
pub const SCHED_ROLES: &str = "SCHED_ROLES";
/// Per-CPU array holding one [`crate::sched::SchedStats`], so the agent reads all of them with
/// one system call.
pub const SCHED_STATS: &str = "SCHED_STATS";

/// Array of one record-assembly slot per possible CPU; the agent sets its size at load.
pub const SCRATCH: &str = "SCRATCH";

/// The global (a `u32` in .rodata) holding the runtime payload capture limit.
pub const CAPTURE_BYTES_GLOBAL: &str = "CAPTURE_BYTES";
