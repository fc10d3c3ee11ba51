//! inferwatch's kernel programs.
//!
//! Socket-level BTF tracepoints only: they fire on socket I/O and nothing else, so processes
//! that do not touch sockets pay nothing, and unwatched processes pay one hash lookup. Each
//! program is a thin wrapper over a `try_*` function; shared types live in `inferwatch-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use inferwatch_common::{
    EVENTS_RING_BYTES, LOST_REASONS, LostReason, MAX_WATCHED_TGIDS, NO_SYSCALL, SockEvent, SockEventKind,
    WatchFlags,
};

#[map]
static WATCHED_TGIDS: HashMap<u32, WatchFlags> = HashMap::with_max_entries(MAX_WATCHED_TGIDS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_REASONS, 0);

/// `sock_send_length(struct sock *sk, int ret, int flags)`: after every `sock_sendmsg`.
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    match try_sock_io(&ctx, SockEventKind::Send) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`: after every `sock_recvmsg`.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    match try_sock_io(&ctx, SockEventKind::Recv) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

#[inline(always)]
fn try_sock_io(ctx: &BtfTracePointContext, kind: SockEventKind) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // The filter comes first: everything below is paid by watched processes only.
    if unsafe { WATCHED_TGIDS.get(&tgid) }.is_none() {
        return Ok(());
    }
    let sock: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);

    let Some(mut entry) = EVENTS.reserve::<SockEvent>(0) else {
        count_lost(LostReason::RingFull);
        return Err(1);
    };
    entry.write(SockEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        sock,
        tgid,
        tid: pid_tgid as u32,
        ret,
        syscall_nr: current_syscall_nr(ctx),
        kind: kind as u8,
        _pad: [0; 7],
    });
    entry.submit(0);
    Ok(())
}

/// The system call this task is in, from its saved user registers (`orig_ax` on x86-64).
#[inline(always)]
fn current_syscall_nr(ctx: &BtfTracePointContext) -> i32 {
    // SAFETY: both helpers are valid in tracing programs; the verifier knows the returned
    // pointer is a `struct pt_regs` (PTR_TO_BTF_ID) and checks the field load against BTF.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        if regs.is_null() {
            // Not expected for a task in process context: say so once per occurrence.
            warn!(ctx, "socket I/O without saved user registers");
            return NO_SYSCALL;
        }
        syscall_nr_of(&*regs)
    }
}

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn syscall_nr_of(regs: &pt_regs) -> i32 {
    regs.orig_rax as i32
}

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!(
    "inferwatch's kernel programs read x86-64 registers; other architectures are not supported yet"
);

#[inline(always)]
fn count_lost(reason: LostReason) {
    if let Some(slot) = LOST.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer, a plain increment is exact.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
