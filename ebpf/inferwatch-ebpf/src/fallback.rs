//! Socket I/O on kernels without the `sock_send_length`/`sock_recv_length` tracepoints (before
//! Linux 6.3): fexit programs on the protocols' `sendmsg`/`recvmsg`, which every send and
//! receive of a TCP, UDP or Unix socket goes through once, with the socket, and with the same
//! return value the tracepoints see. The agent attaches each one the kernel has, after checking
//! its signature in the kernel's BTF (see `agent/src/kernel/plan.rs`).

use aya_ebpf::{macros::fexit, programs::FExitContext};
use inferwatch_common::sock::SockEventKind;

use crate::try_sock_io;

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
            match try_sock_io(&ctx, sock_of(&ctx), ret as i32, $kind) {
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
