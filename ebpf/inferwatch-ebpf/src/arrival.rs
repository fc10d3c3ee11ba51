//! When a request reached the server's socket, before the server read it.
//!
//! `sk_data_ready` fires whenever data becomes readable on any socket of the node (in softirq
//! context for TCP), so the check that a socket is ours must cost next to nothing: the arrival
//! state lives in socket-local storage, attached only to sockets a watched process reads (and
//! to connections accepted on its ports, from their handshake). For every other
//! socket the lookup is one load of the socket's (empty) storage pointer, no hashing. The
//! storage goes with the socket when the kernel frees it.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE},
    helpers::{bpf_ktime_get_ns, generated::bpf_sk_storage_get},
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use inferwatch_common::sock::SockArrival;

/// The BTF definition of a socket-storage map (aya-ebpf has no type for one): the loader reads
/// the map's type, flags and key/value types from these fields' BTF; they hold nothing.
#[repr(C)]
pub struct SockStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockArrival,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers that are never dereferenced; the static only names the map.
unsafe impl Sync for SockStorage {}

impl SockStorage {
    const fn new() -> Self {
        use core::ptr::null;
        Self { r#type: null(), key: null(), value: null(), max_entries: null(), map_flags: null() }
    }

    /// The socket's arrival state; with `create`, a zeroed one is attached if it has none.
    #[expect(
        clippy::mut_from_ref,
        reason = "the storage lives in the kernel, not in `self`; racing writers at worst lose one arrival"
    )]
    #[inline(always)]
    pub(crate) fn get(&self, sock: u64, create: bool) -> Option<&mut SockArrival> {
        let flags = if create { BPF_LOCAL_STORAGE_GET_F_CREATE as u64 } else { 0 };
        // SAFETY: `sock` is a `struct sock *` argument of the tracepoint, which the verifier
        // checks (PTR_TO_BTF_ID); the helper returns a pointer into the socket's storage, valid
        // for this program run, or null.
        unsafe {
            let map = core::ptr::from_ref(self).cast_mut().cast();
            let p = bpf_sk_storage_get(map, sock as *mut _, core::ptr::null_mut(), flags);
            p.cast::<SockArrival>().as_mut()
        }
    }
}

#[btf_map]
pub(crate) static SOCK_ARRIVALS: SockStorage = SockStorage::new();

/// `sk_data_ready(const struct sock *sk)` (Linux 6.3 and later): data became readable on a
/// socket. The agent runs without it where the kernel lacks it (requests are then timed from
/// the connection's establishment or the server's first read).
#[btf_tracepoint(function = "sk_data_ready")]
pub fn sk_data_ready(ctx: BtfTracePointContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    if let Some(arrival) = SOCK_ARRIVALS.get(sock, false)
        && arrival.unread_since_ns == 0
    {
        arrival.unread_since_ns = unsafe { bpf_ktime_get_ns() };
    }
    0
}

/// At a read of a watched socket: attaches its arrival storage if it has none (arrivals are
/// stamped from now on); when the read `returned` bytes, hands over the arrival and
/// establishment times and clears them, so that the next arrival starts afresh.
#[inline(always)]
pub(crate) fn take(sock: u64, returned: bool) -> SockArrival {
    match SOCK_ARRIVALS.get(sock, true) {
        Some(arrival) if returned => {
            let seen = *arrival;
            // Field by field: a zeroed struct becomes a call of a memset subprogram.
            // SAFETY: plain stores into the socket's storage.
            unsafe {
                core::ptr::write_volatile(&mut arrival.unread_since_ns, 0);
                core::ptr::write_volatile(&mut arrival.established_ns, 0);
            }
            seen
        }
        _ => SockArrival::default(),
    }
}

/// Starts stamping arrivals on a socket we now track; `established_ns` for a connection
/// tracked from its handshake.
#[inline(always)]
pub(crate) fn follow(sock: u64, established_ns: u64) {
    if let Some(arrival) = SOCK_ARRIVALS.get(sock, true) {
        arrival.established_ns = established_ns;
    }
}
