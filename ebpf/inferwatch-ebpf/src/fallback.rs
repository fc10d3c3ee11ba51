//! Socket I/O on kernels without the `sock_send_length`/`sock_recv_length` tracepoints (before
//! Linux 6.3): fexit programs on the protocols' `sendmsg`/`recvmsg`, which every send and
//! receive of a TCP, UDP or Unix socket goes through once, with the socket, and with the same
//! return value the tracepoints see. The agent attaches each one the kernel has, after checking
//! its signature in the kernel's BTF (see `agent/src/kernel/plan.rs`); where fexit cannot
//! attach, a kprobe/kretprobe pair on the same functions does the same.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use inferwatch_common::sock::{LostReason, SockEventKind};

use crate::{count_lost, is_watched, try_sock_io};

/// `offsetof(struct socket, sk)`: stable from 5.10 to 6.18 (state, type, flags, file before
/// it). A plain load, so the verifier checks it against the kernel's BTF and types the result
/// as a `struct sock *`: a kernel where it moved refuses the program instead of reading
/// garbage.
const SOCKET_SK_WORD: usize = 3;

/// The `struct sock *` of a `struct socket *` argument.
#[inline(always)]
fn sock_of(ctx: &FExitContext) -> u64 {
    let socket: *const u64 = ctx.arg(0);
    // SAFETY: a BTF-typed pointer argument; the verifier checks the load.
    unsafe { *socket.add(SOCKET_SK_WORD) }
}

/// One fexit program per function: `$ret` is the index of the return value among the
/// arguments (the function's parameter count).
macro_rules! socket_exit {
    ($name:ident, $function:literal, $ret:literal, $kind:expr) => {
        #[doc = concat!("After `", $function, "`: its return value is argument ", $ret, ".")]
        #[fexit(function = $function)]
        pub fn $name(ctx: FExitContext) -> i32 {
            let ret: i64 = ctx.arg($ret);
            // fexit programs may be preempted: the record slot is claimed.
            match try_sock_io(sock_of(&ctx), ret as i32, $kind, true) {
                Ok(()) => 0,
                Err(e) => e,
            }
        }
    };
}

// (struct socket *, struct msghdr *, size_t)
socket_exit!(inet_sendmsg_exit, "inet_sendmsg", 3, SockEventKind::Send);
socket_exit!(inet6_sendmsg_exit, "inet6_sendmsg", 3, SockEventKind::Send);
socket_exit!(unix_stream_sendmsg_exit, "unix_stream_sendmsg", 3, SockEventKind::Send);
socket_exit!(unix_dgram_sendmsg_exit, "unix_dgram_sendmsg", 3, SockEventKind::Send);
// (struct socket *, struct msghdr *, size_t, int flags)
socket_exit!(inet_recvmsg_exit, "inet_recvmsg", 4, SockEventKind::Recv);
socket_exit!(inet6_recvmsg_exit, "inet6_recvmsg", 4, SockEventKind::Recv);
socket_exit!(unix_stream_recvmsg_exit, "unix_stream_recvmsg", 4, SockEventKind::Recv);
socket_exit!(unix_dgram_recvmsg_exit, "unix_dgram_recvmsg", 4, SockEventKind::Recv);

/// Where a kernel has no BPF trampolines for kernel functions (arm64 before 6.4), fexit cannot
/// attach: a kprobe on the same functions remembers the socket of a watched task's call, and a
/// kretprobe sees the result. Keyed by task: the call may sleep and return on another CPU. A
/// return the kernel missed (more tasks of the node inside the function at once than its
/// kretprobe instances: the agent asks for 4,096, the kernel's default is far fewer) leaves its
/// entry behind: the task's next call finds it and counts the loss. An LRU, so that entries no
/// later call finds make room.
#[map]
static ENTRY_SOCKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_ENTRY_SOCKS, 0);

/// Watched tasks inside a socket call at once.
const MAX_ENTRY_SOCKS: u32 = 16384;

/// Before any of the fallback functions: remembers the `struct sock *` of a watched task's call.
#[kprobe]
pub fn socket_call_entry(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // The filter comes first, as in `try_sock_io`.
    if !is_watched((pid_tgid >> 32) as u32) {
        return 0;
    }
    let Some(socket) = ctx.arg::<u64>(0) else { return 0 };
    // SAFETY: the helper checks the kernel address.
    let Ok(sock) = (unsafe { bpf_probe_read_kernel((socket + 8 * SOCKET_SK_WORD as u64) as *const u64) })
    else {
        return 0;
    };
    if let Some(open) = ENTRY_SOCKS.get_ptr_mut(&pid_tgid) {
        // This task's previous call is still open: a task makes one socket call at a time, so
        // its return was missed. Its entry is reused in place (an insert would take a node of
        // the LRU, which may evict another task's live entry).
        count_lost(LostReason::ReturnMissed);
        // SAFETY: this task's own entry; only it writes it.
        unsafe { *open = sock };
        return 0;
    }
    let _ = ENTRY_SOCKS.insert(&pid_tgid, &sock, 0);
    0
}

/// After a send function (`inet_sendmsg`, …) returns.
#[kretprobe]
pub fn socket_send_return(ctx: RetProbeContext) -> u32 {
    socket_call_return(&ctx, SockEventKind::Send)
}

/// After a receive function (`inet_recvmsg`, …) returns.
#[kretprobe]
pub fn socket_recv_return(ctx: RetProbeContext) -> u32 {
    socket_call_return(&ctx, SockEventKind::Recv)
}

#[inline(always)]
fn socket_call_return(ctx: &RetProbeContext, kind: SockEventKind) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a map lookup; only this task writes its entry.
    let Some(&sock) = (unsafe { ENTRY_SOCKS.get(&pid_tgid) }) else { return 0 };
    let _ = ENTRY_SOCKS.remove(&pid_tgid);
    let ret: i64 = ctx.ret();
    match try_sock_io(sock, ret as i32, kind, false) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}
