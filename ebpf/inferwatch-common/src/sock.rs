//! Socket events: what the socket programs write into the ring buffer, and their per-socket
//! and per-process state.

/// Why the kernel side dropped an event; the index into [`crate::maps::LOST`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The ring buffer was full: userspace fell behind.
    RingFull = 0,
    /// A kretprobe missed a watched call's return (more tasks were inside the hooked function
    /// at once, on the whole node, than the kernel's instances for it): the call is not seen.
    /// Found when the same task's next call finds the previous one still open.
    ReturnMissed = 1,
    /// An fexit program found this CPU's record slot in use by a task it preempted (kernels
    /// that preempt kernel code, `preempt=full`): its own record is dropped.
    SlotBusy = 2,
}
pub const LOST_REASONS: u32 = 3;

/// What a [`SockEvent`] reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockEventKind {
    /// Data left through a socket (`sock_send_length`).
    Send = 1,
    /// Data arrived through a socket (`sock_recv_length`).
    Recv = 2,
    /// A tracked TCP socket changed state (`inet_sock_set_state`): `ret` is the new
    /// [`crate::tcp::TcpState`], `syscall_nr` the old one.
    State = 3,
    /// A TCP event on a tracked socket: `ret` is a [`NetEventKind`].
    Net = 4,
}

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

/// What a [`SockEventKind::Net`] record reports (its `ret`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetEventKind {
    Retransmit = 1,
    ResetSent = 2,
    ResetReceived = 3,
}

impl NetEventKind {
    pub fn from_i32(v: i32) -> Option<Self> {
        match v {
            1 => Some(Self::Retransmit),
            2 => Some(Self::ResetSent),
            3 => Some(Self::ResetReceived),
            _ => None,
        }
    }
}

/// `syscall_nr` when the socket operation did not come from a system call (kernel thread,
/// io_uring worker without saved user registers).
pub const NO_SYSCALL: i32 = -1;

/// Most payload bytes copied per event (the first bytes of the transfer). The runtime limit,
/// [`crate::maps::CAPTURE_BYTES_GLOBAL`], may lower it. A power of two: the kernel side masks
/// with it. Only bytes actually moved are copied, so a large maximum costs nothing for small
/// transfers.
pub const MAX_CAPTURE: usize = 4096;
/// The agent's default runtime limit: request heads of typical clients, whole SSE events, and
/// vLLM's batched engine outputs at a concurrency of 32 (at 1024 bytes, most of those lose the
/// ids the phase breakdown needs).
pub const DEFAULT_CAPTURE: usize = 4096;
/// Last bytes of a transfer sent along when it is longer than the capture (any call that names
/// its buffers: `write`, `send`, `read`, `recv`, and the vectored ones, whatever their iovec
/// count): where a chunked body's terminator (`\r\n0\r\n\r\n`) is, whatever the transfer's size.
pub const TAIL_BYTES: usize = 64;
/// Most iovecs a vectored call's last bytes are gathered from (backwards from the one holding
/// its last byte): the terminator and its CRLFs fit in far fewer.
pub const TAIL_IOVECS: usize = 8;
/// The kernel's limit on iovecs per call: the walk that finds a vectored call's end is bounded
/// by it.
pub const UIO_MAXIOV: usize = 1024;

/// Identity of a socket while the kernel programs follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedSock {
    /// Unique for the socket's life (CPU in the top 16 bits, a per-CPU counter below): the
    /// same address reused by a new socket gets a new id, so connections never merge.
    pub conn_id: u64,
    pub tgid: u32,
    /// 1 once a watched process did I/O on it; 0 for a connection tracked from its handshake on
    /// a watched port only (it may be another namespace's, or another process's): its TCP
    /// events are not reported until then.
    pub confirmed: u8,
    /// The socket's address family, read once when it is first tracked (not per operation).
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<TrackedSock>() == 16);

/// When a tracked socket's unread data arrived: socket-local storage, attached to the sockets
/// we track only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockArrival {
    /// When data became readable while none was waiting (`sk_data_ready`), cleared by the
    /// next read that returns bytes: the arrival of what that read gets. 0: nothing waiting.
    pub unread_since_ns: u64,
    /// When an accepted connection to a watched listening port became established (before
    /// the server accepted it); cleared by its first read.
    pub established_ns: u64,
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
    /// For a read: when the first of the data it returned reached the socket (see
    /// [`SockArrival::unread_since_ns`]); 0 where the kernel cannot tell.
    pub arrival_ns: u64,
    /// For the first read of an accepted connection: when it was established; else 0.
    pub established_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Bytes moved, or a negative errno; the new TCP state for [`SockEventKind::State`].
    pub ret: i32,
    /// The system call that did the I/O (from the saved registers), or [`NO_SYSCALL`].
    pub syscall_nr: i32,
    /// Payload bytes that follow this header (the first bytes of the transfer).
    pub captured: u16,
    /// A [`SockEventKind`].
    pub kind: u8,
    /// The socket's address family (`sk_family`: [`AF_UNIX`], [`AF_INET`], [`AF_INET6`], …);
    /// 0 where not read.
    pub family: u8,
    /// Of the `captured` bytes, how many are the transfer's last bytes (at most
    /// [`TAIL_BYTES`]); the ones before them are its first bytes. Non-zero only when the
    /// transfer was longer than the capture.
    pub tail: u16,
    pub _pad: [u8; 2],
}

pub const AF_UNIX: u8 = 1;
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// Offset of `skc_family` (u16) in `struct sock` (`__sk_common` comes first): after the
/// address pair (8), the hash (4) and the port pair (4) on every architecture and kernel
/// since 2.6.
pub const SKC_FAMILY_OFFSET: usize = 16;
/// Offset of `skc_state` (u8), right after `skc_family`.
pub const SKC_STATE_OFFSET: usize = 18;
/// Offset of `skc_num` (u16, the local port in host order), right before `skc_family`.
pub const SKC_NUM_OFFSET: usize = 14;

pub const SOCK_EVENT_SIZE: usize = 64;
const _: () = assert!(core::mem::size_of::<SockEvent>() == SOCK_EVENT_SIZE);
const _: () = assert!(core::mem::size_of::<TrackedSock>() == 16);
const _: () = assert!(MAX_CAPTURE.is_power_of_two());
const _: () = assert!(TAIL_IOVECS.is_power_of_two());

/// Per-CPU scratch where a record is assembled before it is copied to the ring buffer at its
/// real size. Twice [`MAX_CAPTURE`] of payload room (and a tail's), so the verifier can see
/// that any offset below `MAX_CAPTURE` plus any length below `MAX_CAPTURE` stays inside, and
/// any offset below `2 * MAX_CAPTURE` plus a tail's length.
#[repr(C)]
pub struct Scratch {
    pub event: SockEvent,
    pub payload: [u8; 2 * MAX_CAPTURE + TAIL_BYTES],
    /// Data records this CPU wrote since it last asked the ring how full it is (see
    /// [`WAKEUP_CHECK_EVERY`]).
    pub since_fill_check: u32,
    /// Non-zero while a preemptible (fexit) program assembles a record here. fexit programs
    /// run with migration off but preemption on (kernels with `preempt=full`): another task's
    /// program on this CPU finding the slot busy drops its record, counted, instead of
    /// overwriting the record of the task it preempted.
    pub busy: u64,
}

/// A CPU asks the ring buffer how much data is pending (to wake the reader) once per this many
/// of its data records, not on each: the question reads the reader's cache line (~24 ns of a
/// watched operation's ~500 on this project's VM). Between two checks a CPU adds at most this many records (each at
/// most `SOCK_EVENT_SIZE + 2 * MAX_CAPTURE + TAIL_BYTES` bytes) to the ring unnoticed.
pub const WAKEUP_CHECK_EVERY: u32 = 8;
