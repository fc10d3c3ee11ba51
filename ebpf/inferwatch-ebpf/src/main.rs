//! inferwatch's kernel programs.
//!
//! Socket-level BTF tracepoints (Linux 6.3+), or on older kernels fexit programs on the
//! protocols' `sendmsg`/`recvmsg` (see `fallback.rs`): they fire on socket I/O and nothing
//! else, so processes that do not touch sockets pay nothing, and unwatched processes pay one
//! hash lookup. Each program is a thin wrapper over a `try_*` function; shared types live in
//! `inferwatch-common`. What differs between kernels is decided by the agent before loading,
//! in [`KERNEL_LAYOUT`].
//!
//! For a watched process, every socket operation becomes one ring-buffer record: a
//! [`SockEvent`] header followed by the first bytes of the transfer, copied from the user
//! buffer named by the system call's own saved registers.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no `AtomicU64::fetch_add`.
#![allow(internal_features)]
#![feature(core_intrinsics)]

#[cfg(not(feature = "compat"))]
mod arrival;
mod capture;
mod fallback;
mod regs;
mod sched;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use inferwatch_common::{
    kernel::KernelLayout,
    maps::{
        EVENTS_RING_BYTES, MAX_LISTEN_PORTS, MAX_TRACKED_SOCKS, WAKEUP_PENDING_BYTES, WATCHED_WORDS,
        watched_bit,
    },
    sock::{
        AF_INET, AF_INET6, LOST_REASONS, LostReason, MAX_CAPTURE, NO_SYSCALL, NetEventKind,
        SKC_FAMILY_OFFSET, SKC_NUM_OFFSET, SKC_STATE_OFFSET, SOCK_EVENT_SIZE, Scratch, SockArrival,
        SockEvent, SockEventKind, TrackedSock, WAKEUP_CHECK_EVERY,
    },
    tcp::TcpState,
};

/// The system call numbers of the architecture the programs will run on.
#[cfg(bpf_target_arch = "aarch64")]
pub(crate) use inferwatch_common::syscalls::aarch64 as nr;
#[cfg(bpf_target_arch = "x86_64")]
pub(crate) use inferwatch_common::syscalls::x86_64 as nr;

/// The running kernel's features and layout; the agent sets it at load.
#[unsafe(no_mangle)]
static KERNEL_LAYOUT: KernelLayout = KernelLayout::MODERN;

/// Whether the running kernel has `feature` (a `FEATURE_*` bit): a constant to the verifier,
/// which drops the branch not taken.
#[inline(always)]
pub(crate) fn has(feature: u32) -> bool {
    loaded(&KERNEL_LAYOUT.features) & feature != 0
}

/// A value the loader writes into read-only data (`CAPTURE_BYTES`, a `KERNEL_LAYOUT` field),
/// read as the program runs: the compiler must not fold in the default it was built with.
#[inline(always)]
pub(crate) fn loaded(value: &'static u32) -> u32 {
    // SAFETY: a plain read of a static.
    unsafe { core::ptr::read_volatile(value) }
}

/// `v` through a volatile stack slot: what the compiler knows of it is forgotten, so the checks
/// that follow are compiled as written, next to the access the verifier checks. Verifiers before
/// 6.8 cannot follow checks LLVM folds from comparisons of two variables (5.10 and 6.1 refused
/// such programs).
#[inline(always)]
pub(crate) fn opaque(v: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&v) }
}

/// Runtime payload capture limit in bytes (at most `MAX_CAPTURE`); the agent sets it at load.
#[unsafe(no_mangle)]
static CAPTURE_BYTES: u32 = MAX_CAPTURE as u32;

#[map]
static WATCHED_TGIDS: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// Whether the agent watches the process `tgid`: an array lookup, which the verifier inlines.
#[inline(always)]
pub(crate) fn is_watched(tgid: u32) -> bool {
    let (word, bit) = watched_bit(tgid);
    WATCHED_TGIDS.get(word).is_some_and(|w| w & bit != 0)
}

#[map]
static TRACKED_SOCKS: LruHashMap<u64, TrackedSock> = LruHashMap::with_max_entries(MAX_TRACKED_SOCKS, 0);

/// Ports watched processes listen on (the agent keeps it in step), to their tgid.
#[map]
static LISTEN_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_LISTEN_PORTS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_REASONS, 0);

/// Per-CPU counters behind connection ids: one for system calls, one for softirq context
/// (accepted connections), which may interrupt the first between its load and its store.
#[map]
static CONN_COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Where a record is assembled: one slot per CPU (the agent sets the count to the possible
/// CPUs at load), indexed by the CPU. Not a per-CPU array: those live in the kernel's linear
/// map, where hardened usercopy looks up the destination's page on every user copy; a
/// mmapable array's memory comes from vmalloc, whose lookup it skips when page faults are off,
/// as they are in `bpf_probe_read_user` (measured: send −9, receive −30 ns, within the VM's
/// noise; BENCHMARKS.md).
#[map]
static SCRATCH: Array<Scratch> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// `sock_send_length(struct sock *sk, int ret, int flags)`: after every `sock_sendmsg`.
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    match try_sock_io(ctx.arg(0), ctx.arg(1), SockEventKind::Send, false) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`: after every `sock_recvmsg`, when
/// the received bytes are already in the caller's buffer.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    match try_sock_io(ctx.arg(0), ctx.arg(1), SockEventKind::Recv, false) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`. Often runs in
/// softirq context (a peer's FIN or RST), so it filters on the sockets we track, not on tgid.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `sched_switch`: on- and off-CPU accounting of vLLM's tasks (see sched.rs).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    match sched::try_sched_switch(&ctx) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `sched_wakeup`: a blocked vLLM task becomes runnable.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    match sched::try_sched_wakeup(&ctx) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `sched_wakeup_new`: a new vLLM task becomes runnable.
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    match sched::try_sched_wakeup(&ctx) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// One socket operation of `sock` (a `struct sock *`) that returned `ret`. `preemptible`: the
/// calling program may be preempted (fexit; tracepoints and kprobes run with preemption off), so
/// the CPU's record slot is claimed first (a constant: the other programs carry no claim).
#[inline(always)]
fn try_sock_io(sock: u64, ret: i32, kind: SockEventKind, preemptible: bool) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // The filter comes first: everything below is paid by watched processes only.
    if !is_watched(tgid) {
        return Ok(());
    }
    // The socket's arrival state first: the map calls below take `sock` as a key from the stack,
    // after which some verifiers (6.12) no longer see it as the socket the storage needs.
    // (The send's zeros pass through `opaque`: adjacent zero fields become a call of a memset
    // subprogram otherwise, a call and return on every send.)
    let (arrival_ns, established_ns) = if kind == SockEventKind::Recv {
        let a = take_arrival(sock, ret > 0);
        (a.unread_since_ns, a.established_ns)
    } else {
        (opaque(0) as u64, opaque(0) as u64)
    };
    let tracked = track(sock, tgid);
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let scratch = SCRATCH.get_ptr_mut(cpu).ok_or(1)?;
    // SAFETY: this CPU's slot, ours until this program returns: tracing programs run with
    // migration off, the socket programs do not nest, and a preemptible one claims it.
    let scratch = unsafe { &mut *scratch };
    if preemptible && !claim(&mut scratch.busy) {
        count_lost(LostReason::SlotBusy);
        return Err(1);
    }
    let sent =
        assemble_and_send(scratch, sock, ret, kind, tgid, pid_tgid, arrival_ns, established_ns, tracked);
    if preemptible {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&mut scratch.busy, 0) };
    }
    sent
}

/// Claims a record slot for a preemptible program (`busy` 0 → 1); false if a task this one
/// preempted holds it. Same-CPU tasks only (migration is off). An atomic exchange from Linux
/// 5.12; the compat object (5.10-5.16) checks and stores, volatile so that the compiler keeps
/// both in place, where only a preemption between the two could defeat it.
#[inline(always)]
fn claim(busy: &mut u64) -> bool {
    #[cfg(not(feature = "compat"))]
    {
        // SAFETY: an aligned u64 of this CPU's slot (BPF exchanges 64-bit words).
        unsafe {
            core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::Relaxed }>(busy, 1) == 0
        }
    }
    #[cfg(feature = "compat")]
    {
        // SAFETY: plain accesses to this CPU's slot.
        unsafe {
            if core::ptr::read_volatile(busy) != 0 {
                return false;
            }
            core::ptr::write_volatile(busy, 1);
        }
        true
    }
}

/// The record of one socket operation, assembled in `scratch` and written to the ring.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn assemble_and_send(
    scratch: &mut Scratch,
    sock: u64,
    ret: i32,
    kind: SockEventKind,
    tgid: u32,
    pid_tgid: u64,
    arrival_ns: u64,
    established_ns: u64,
    tracked: TrackedSock,
) -> Result<(), i32> {
    // Without registers (a kernel whose layout the agent could not learn, which it logged once)
    // the operation is still counted, without its system call or bytes.
    let (syscall_nr, copied) = match regs::current() {
        None => (NO_SYSCALL, capture::Copied::default()),
        Some(regs) => {
            let copied = if ret > 0 {
                capture::payload(regs, ret as usize, &mut scratch.payload)
            } else {
                capture::Copied::default()
            };
            (regs.nr, copied)
        }
    };
    let captured = copied.head + copied.tail;
    scratch.event = SockEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: tracked.conn_id,
        sock,
        arrival_ns,
        established_ns,
        tgid,
        tid: pid_tgid as u32,
        ret,
        syscall_nr,
        captured: captured as u16,
        kind: kind as u8,
        family: tracked.family,
        tail: copied.tail as u16,
        _pad: [0; 2],
    };
    // Copy the record at its real size: header plus the captured bytes, no padding.
    let len = SOCK_EVENT_SIZE + (captured & (2 * MAX_CAPTURE - 1));
    // SAFETY: len <= size_of::<Scratch>() by the mask above.
    let record = unsafe { core::slice::from_raw_parts((scratch as *const Scratch).cast::<u8>(), len) };
    let flags = wakeup_flags(len, &mut scratch.since_fill_check);
    if EVENTS.output(record, flags).is_err() {
        count_lost(LostReason::RingFull);
        return Err(1);
    }
    Ok(())
}

/// The socket's address family (a `u16` that always fits a byte).
#[inline(always)]
fn family_of(sock: u64) -> u8 {
    // SAFETY: the helper checks the kernel address.
    unsafe { bpf_probe_read_kernel((sock + SKC_FAMILY_OFFSET as u64) as *const u16) }.map_or(0, |f| f as u8)
}

/// The socket's `skc_state` (a `TcpState` for TCP sockets).
#[inline(always)]
fn state_of(sock: u64) -> u8 {
    // SAFETY: the helper checks the kernel address.
    unsafe { bpf_probe_read_kernel((sock + SKC_STATE_OFFSET as u64) as *const u8) }.unwrap_or(0)
}

/// Ring-buffer notification policy for data records. The kernel's default wakes the reader
/// whenever it has caught up, which costs an interrupt and a cross-CPU wakeup per record at
/// moderate rates. Instead the reader drains on a short timer (the agent's `--drain-interval`)
/// and is woken when the pending data reaches `WAKEUP_PENDING_BYTES`, so bursts are drained
/// long before the ring fills. Each CPU looks at the fill once per `WAKEUP_CHECK_EVERY` of its
/// records (`since_check` counts them): while the ring stays that full, a check wakes the
/// reader again, which costs little as it is draining already.
#[inline(always)]
fn wakeup_flags(len: usize, since_check: &mut u32) -> u64 {
    *since_check += 1;
    if *since_check < WAKEUP_CHECK_EVERY {
        return BPF_RB_NO_WAKEUP as u64;
    }
    *since_check = 0;
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let record = (len as u64 + 8 + 7) & !7;
    if pending + record >= WAKEUP_PENDING_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// `tcp_retransmit_skb(const struct sock *sk, …)`.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    match try_net_event(&ctx, NetEventKind::Retransmit) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `tcp_send_reset(const struct sock *sk, …)`: sk is NULL for resets to packets of no socket.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    match try_net_event(&ctx, NetEventKind::ResetSent) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    match try_net_event(&ctx, NetEventKind::ResetReceived) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// A TCP event of a tracked socket (rare: retransmits, resets) as a ring-buffer record.
#[inline(always)]
fn try_net_event(ctx: &BtfTracePointContext, what: NetEventKind) -> Result<(), i32> {
    let sock: u64 = ctx.arg(0);
    let Some(tracked) = (unsafe { TRACKED_SOCKS.get(&sock) }).copied().filter(|t| t.confirmed != 0) else {
        return Ok(());
    };
    emit_header(SockEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: tracked.conn_id,
        sock,
        arrival_ns: 0,
        established_ns: 0,
        tgid: tracked.tgid,
        tid: 0,
        ret: what as i32,
        syscall_nr: NO_SYSCALL,
        captured: 0,
        kind: SockEventKind::Net as u8,
        family: 0,
        tail: 0,
        _pad: [0; 2],
    })
}

/// Emits a record without payload, waking the reader (state changes and resets are rare next
/// to data, and a prompt drain at a connection's end keeps the agent's bursts small).
#[inline(always)]
fn emit_header(event: SockEvent) -> Result<(), i32> {
    let Some(mut entry) = EVENTS.reserve::<SockEvent>(0) else {
        count_lost(LostReason::RingFull);
        return Err(1);
    };
    entry.write(event);
    entry.submit(0);
    Ok(())
}

#[inline(always)]
fn try_inet_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sock: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if old == TcpState::SynRecv as i32 && new == TcpState::Established as i32 {
        // A new child socket: no process has used it yet, so it is not tracked (an entry left
        // at its address by an unseen close is replaced).
        track_accepted(sock);
        return Ok(());
    }
    let Some(tracked) = (unsafe { TRACKED_SOCKS.get(&sock) }).copied() else {
        return Ok(());
    };
    if new == TcpState::Close as i32 {
        // The socket is done: a later socket at the same address must get a new id.
        let _ = TRACKED_SOCKS.remove(&sock);
    }
    if tracked.confirmed == 0 {
        // No watched process has used it (yet): not ours to report.
        return Ok(());
    }
    emit_header(SockEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: tracked.conn_id,
        sock,
        arrival_ns: 0,
        established_ns: 0,
        tgid: tracked.tgid,
        tid: 0,
        ret: new,
        syscall_nr: old,
        captured: 0,
        kind: SockEventKind::State as u8,
        family: 0,
        tail: 0,
        _pad: [0; 2],
    })
}

/// The tracked state of `sock`, with a fresh connection id the first time a watched process
/// uses it.
#[inline(always)]
fn track(sock: u64, tgid: u32) -> TrackedSock {
    if let Some(t) = TRACKED_SOCKS.get_ptr_mut(&sock) {
        // SAFETY: a map value, written here only by the process using the socket.
        unsafe {
            if (*t).confirmed == 0 || (*t).tgid != tgid {
                // Tracked from its handshake under the port's owner; the process that uses it
                // owns it (several processes may share a listening port), and it is ours now.
                (*t).tgid = tgid;
                (*t).confirmed = 1;
            }
            return *t;
        }
    }
    // A TCP socket already closed (a send whose record is written after a close that the
    // peer's RST caused meanwhile, a read after it): not a new connection. Tracking it would
    // leave an entry no close removes, inherited by the next socket at this address.
    let family = family_of(sock);
    if (family == AF_INET || family == AF_INET6) && state_of(sock) == TcpState::Close as u8 {
        return TrackedSock { family, ..TrackedSock::default() };
    }
    let tracked = TrackedSock { conn_id: new_conn_id(0), tgid, confirmed: 1, family, _pad: [0; 2] };
    // Its arrivals are stamped from its first read on (`take_arrival` attaches the storage).
    let _ = TRACKED_SOCKS.insert(&sock, &tracked, 0);
    tracked
}

/// An accepted connection to a port a watched process listens on, just established (it is in
/// the accept queue now, and its first request may arrive before the server accepts it):
/// tracked from here, so `sk_data_ready` sees that request arrive. One lookup per accepted
/// connection of the node.
#[inline(always)]
fn track_accepted(sock: u64) {
    // SAFETY: the helper checks the kernel address.
    let Ok(port) = (unsafe { bpf_probe_read_kernel((sock + SKC_NUM_OFFSET as u64) as *const u16) }) else {
        return;
    };
    let Some(&tgid) = (unsafe { LISTEN_PORTS.get(&port) }) else {
        return;
    };
    // Storage before the map call that takes `sock` as a key (see `try_sock_io`).
    follow_arrivals(sock, unsafe { bpf_ktime_get_ns() });
    let family = family_of(sock);
    let tracked = TrackedSock { conn_id: new_conn_id(1), tgid, confirmed: 0, family, _pad: [0; 2] };
    let _ = TRACKED_SOCKS.insert(&sock, &tracked, 0);
}

/// [`arrival::take`] where the kernel stamps arrivals: a read of a watched socket, which gets
/// its arrival storage here if it has none; `returned` whether the read returned bytes.
#[inline(always)]
fn take_arrival(sock: u64, returned: bool) -> SockArrival {
    #[cfg(not(feature = "compat"))]
    if has(inferwatch_common::kernel::FEATURE_ARRIVAL) {
        return arrival::take(sock, returned);
    }
    let _ = (sock, returned);
    // Zeros through `opaque`, as the send's are: a `memset` call on every read otherwise.
    SockArrival { unread_since_ns: opaque(0) as u64, established_ns: opaque(0) as u64 }
}

/// [`arrival::follow`] where the kernel stamps arrivals.
#[inline(always)]
fn follow_arrivals(sock: u64, established_ns: u64) {
    #[cfg(not(feature = "compat"))]
    if has(inferwatch_common::kernel::FEATURE_ARRIVAL) {
        arrival::follow(sock, established_ns);
    }
    let _ = (sock, established_ns);
}

/// A connection id never used before: the CPU in the top 16 bits, which counter (`slot`: 0
/// in system calls, 1 in softirq) in bit 47, that per-CPU counter below.
#[inline(always)]
fn new_conn_id(slot: u32) -> u64 {
    let Some(counter) = CONN_COUNTER.get_ptr_mut(slot) else {
        return 0;
    };
    // SAFETY: a per-CPU slot that only this context writes.
    let n = unsafe {
        *counter += 1;
        *counter
    };
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    (cpu << 48) | ((slot as u64 & 1) << 47) | (n & 0x7fff_ffff_ffff)
}

#[inline(always)]
pub(crate) fn count_lost(reason: LostReason) {
    if let Some(slot) = LOST.get_ptr_mut(reason as u32) {
        // A per-CPU slot, but a preemptible (fexit) program may be preempted between a load and
        // a store by another that counts too: an atomic add (its result unused, so the plain
        // `lock add` every kernel since 5.10 takes).
        // SAFETY: an aligned u64 of the map's value, for this call.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, 1)
        };
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
