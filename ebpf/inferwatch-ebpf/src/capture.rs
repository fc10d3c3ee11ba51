//! Copying the first bytes of a transfer from the caller's own buffers.
//!
//! Which buffer depends on the system call (its number and arguments are in the saved
//! registers): one buffer for `read`/`write`/`sendto`/`recvfrom`, an iovec array for
//! `readv`/`writev`, a `msghdr` for `sendmsg`/`recvmsg`. Other calls (`sendfile`, `splice`,
//! io_uring, …) are counted without bytes.

#[cfg(not(feature = "compat"))]
use aya_ebpf::helpers::generated::bpf_loop;
use aya_ebpf::helpers::generated::bpf_probe_read_user;
use inferwatch_common::sock::{MAX_CAPTURE, TAIL_BYTES, TAIL_IOVECS, UIO_MAXIOV};

use crate::{
    CAPTURE_BYTES, loaded,
    nr::{READ, READV, RECVFROM, RECVMSG, SENDMSG, SENDTO, WRITE, WRITEV},
    opaque,
    regs::SyscallRegs,
};

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// `struct user_msghdr` up to the fields we read.
#[repr(C)]
#[derive(Clone, Copy)]
struct MsgHdr {
    name: u64,
    namelen: u32,
    _pad: u32,
    iov: u64,
    iovlen: u64,
}

/// The payload room of a scratch record.
type Out = [u8; 2 * MAX_CAPTURE + TAIL_BYTES];

/// What was copied of a transfer: its first `head` bytes, then its last `tail` bytes (only
/// when the transfer is longer than the head).
#[derive(Clone, Copy, Default)]
pub struct Copied {
    pub head: usize,
    pub tail: usize,
}

/// Copies up to the capture limit of the `moved` bytes into `out`, and when more moved, the
/// last bytes too.
#[inline(always)]
pub fn payload(regs: SyscallRegs, moved: usize, out: &mut Out) -> Copied {
    let limit = loaded(&CAPTURE_BYTES) as usize;
    let want = min(min(moved, limit), MAX_CAPTURE);
    let (iov, count) = match regs.nr {
        READ | WRITE | SENDTO | RECVFROM => return copy_buffer(out, regs.arg1, moved, want),
        READV | WRITEV => (regs.arg1, regs.arg2),
        SENDMSG | RECVMSG => {
            let mut msg = core::mem::MaybeUninit::<MsgHdr>::uninit();
            // SAFETY: reading user memory through the helper, which tolerates bad pointers.
            let r = unsafe {
                bpf_probe_read_user(
                    msg.as_mut_ptr().cast(),
                    size_of::<MsgHdr>() as u32,
                    regs.arg1 as *const _,
                )
            };
            if r != 0 {
                return Copied::default();
            }
            // SAFETY: the helper filled it.
            let msg = unsafe { msg.assume_init() };
            (msg.iov, msg.iovlen)
        }
        _ => return Copied::default(),
    };
    // One call site: the iovec walk is verified once.
    copy_iovecs(out, iov, count, moved, want)
}

#[inline(always)]
fn copy_buffer(out: &mut Out, base: u64, moved: usize, want: usize) -> Copied {
    let head = copy(out, 0, base, want);
    if head < want || moved <= head {
        return Copied { head, tail: 0 };
    }
    // `moved - head` is positive here, but verifiers before 6.8 cannot relate the two and see a
    // possibly negative length (6.1 refused the program): passed opaquely and masked to a
    // transfer's range (an `i32`), it is bounded where the helper needs it.
    let rest = opaque(moved - head) & i32::MAX as usize;
    let tail = min(TAIL_BYTES, rest);
    Copied { head, tail: copy_tail(out, head, base + (moved - tail) as u64, tail) }
}

/// Follows the iovecs of the call for the first bytes, as many as the capture takes. When the call moved
/// more than that, its last bytes are found too, whatever the iovec count (a chunked body's
/// terminator is often in the last of many: Node.js ends a stream with a `writev` of 5, hyper
/// queues several chunks per call). The bytes between are counted, unseen.
#[inline(always)]
fn copy_iovecs(out: &mut Out, iov: u64, count: u64, moved: usize, want: usize) -> Copied {
    let done = copy_iovec_head(out, iov, count, want as u64) as usize;
    // Past the head (the capture's limit, or the iovecs it follows): the last bytes too.
    if moved <= done {
        return Copied { head: done, tail: 0 };
    }
    Copied { head: done, tail: copy_iovec_tail(out, done, iov, count, moved, min(TAIL_BYTES, moved - done)) }
}

/// The state of [`copy_iovec_head`]'s walk, on the caller's stack.
#[repr(C)]
struct HeadWalk {
    out: *mut Out,
    iov: u64,
    count: u64,
    want: u64,
    done: u64,
}

/// Copies the first `want` bytes an iovec array names (following as many iovecs as that takes, at
/// most `UIO_MAXIOV`) to the start of `out`; returns the bytes copied. `bpf_loop` (Linux 5.17+):
/// the verifier checks one step, not 1024 unrolled ones.
#[cfg(not(feature = "compat"))]
#[inline(always)]
fn copy_iovec_head(out: &mut Out, iov: u64, count: u64, want: u64) -> u64 {
    let mut walk = HeadWalk { out, iov, count, want, done: 0 };
    let count = if count > UIO_MAXIOV as u64 { UIO_MAXIOV as u32 } else { count as u32 };
    // SAFETY: the callback and its context live for the call; the helper runs it `count` times
    // at most.
    unsafe {
        bpf_loop(count, head_step as *mut _, (&mut walk as *mut HeadWalk).cast(), 0);
    }
    walk.done
}

/// Before `bpf_loop` (the object for kernels older than 5.17): the head is looked for in the
/// first `COMPAT_HEAD_IOVECS` iovecs, a loop the verifier unrolls.
#[cfg(feature = "compat")]
#[inline(always)]
fn copy_iovec_head(out: &mut Out, iov: u64, count: u64, want: u64) -> u64 {
    const COMPAT_HEAD_IOVECS: u64 = 8;
    let mut walk = HeadWalk { out, iov, count, want, done: 0 };
    for i in 0..COMPAT_HEAD_IOVECS {
        if head_step(i, (&mut walk as *mut HeadWalk).cast()) != 0 {
            break;
        }
    }
    walk.done
}

/// One iovec of [`copy_iovec_head`]'s walk; 1 stops the loop.
#[cfg_attr(feature = "compat", inline(always))]
extern "C" fn head_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `HeadWalk` on the caller's stack, for this call only.
    let w = unsafe { &mut *ctx.cast::<HeadWalk>() };
    if i >= w.count || w.done >= w.want || w.want > MAX_CAPTURE as u64 {
        return 1;
    }
    let Some(v) = read_iovec(w.iov, i) else {
        return 1;
    };
    // SAFETY: the scratch record's payload area, as in `payload`.
    let Some(out) = (unsafe { w.out.as_mut() }) else {
        return 1;
    };
    let rest = w.want - w.done;
    if v.len >= rest {
        w.done += copy(out, w.done as usize, v.base, rest as usize) as u64;
        return 1;
    }
    if v.len > 0 && copy(out, w.done as usize, v.base, v.len as usize) == 0 {
        return 1;
    }
    w.done += v.len;
    0
}

/// The `i`th iovec of the array at `iov`.
#[inline(always)]
fn read_iovec(iov: u64, i: u64) -> Option<Iovec> {
    let mut v = core::mem::MaybeUninit::<Iovec>::uninit();
    let at = iov + i * size_of::<Iovec>() as u64;
    // SAFETY: reading user memory through the helper, which tolerates bad pointers.
    let r = unsafe { bpf_probe_read_user(v.as_mut_ptr().cast(), size_of::<Iovec>() as u32, at as *const _) };
    // SAFETY: the helper filled it.
    (r == 0).then(|| unsafe { v.assume_init() })
}

/// The iovec holding the last of `moved` bytes (at most `UIO_MAXIOV` walked) and how many of
/// its bytes were moved, as `index << 32 | used`; `u64::MAX` if not found. A global function:
/// the verifier checks it once, on its own, instead of once per path that reaches it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn iovec_end(iov: u64, count: u64, moved: u64) -> u64 {
    let count = if count > UIO_MAXIOV as u64 { UIO_MAXIOV as u64 } else { count };
    let mut seen = 0u64;
    for i in 0..UIO_MAXIOV as u64 {
        if i >= count {
            break;
        }
        let Some(v) = read_iovec(iov, i) else {
            return u64::MAX;
        };
        if seen + v.len >= moved {
            return (i << 32) | ((moved - seen) & 0xffff_ffff);
        }
        seen += v.len;
    }
    u64::MAX
}

/// Copies the last `len` of the `moved` bytes of an iovec array to `out[offset..]`: finds the
/// iovec holding the last byte moved (a walk over the lengths, at most `UIO_MAXIOV`), then
/// copies backwards from it across at most `TAIL_IOVECS` iovecs. Returns the bytes copied (fewer
/// than `len` when the last bytes are spread over more iovecs than that).
#[inline(always)]
fn copy_iovec_tail(out: &mut Out, offset: usize, iov: u64, count: u64, moved: usize, len: usize) -> usize {
    let end = iovec_end(iov, count, moved as u64);
    if end == u64::MAX {
        return 0;
    }
    let (last, used) = (end >> 32, end & 0xffff_ffff);
    // Backwards from the end, twice: how many of the last `len` bytes the last `TAIL_IOVECS`
    // iovecs hold, then each piece copied where it belongs, so that what was found is contiguous
    // from `offset` and ends at the transfer's end. (No array of pieces: zeroing one costs the
    // verifier a loop per path.)
    let piece = |k: u64, want: u64| -> Option<(u64, u64)> {
        let v = read_iovec(iov, last - k)?;
        let avail = if k == 0 { used } else { v.len };
        let take = if avail < want { avail } else { want };
        Some((v.base + avail - take, take))
    };
    let mut found = 0u64;
    for k in 0..TAIL_IOVECS as u64 {
        if found >= len as u64 || k > last {
            break;
        }
        let Some((_, take)) = piece(k, len as u64 - found) else {
            break;
        };
        found += take;
    }
    let mut placed = 0u64;
    for k in 0..TAIL_IOVECS as u64 {
        if placed >= found || k > last {
            break;
        }
        let Some((src, take)) = piece(k, found - placed) else {
            return 0;
        };
        placed += take;
        if take > 0 && copy_tail(out, offset + (found - placed) as usize, src, take as usize) == 0 {
            return 0;
        }
    }
    found as usize
}

/// Copies `len` user bytes from `src` to `out[offset..]`; returns the bytes copied.
#[inline(always)]
fn copy(out: &mut Out, offset: usize, src: u64, len: usize) -> usize {
    // Bounds the verifier can follow: offset < MAX_CAPTURE and len <= MAX_CAPTURE, so the
    // write stays inside the 2 * MAX_CAPTURE buffer. In the compat object both are re-read
    // opaquely first: LLVM would otherwise drop checks it can prove from the callers'
    // comparisons of two variables, which Linux 5.10's verifier cannot follow.
    let (offset, len) = (compat_opaque(offset), compat_opaque(len));
    let offset = offset & (MAX_CAPTURE - 1);
    if len == 0 || len > MAX_CAPTURE {
        return 0;
    }
    // SAFETY: dst is inside `out` as argued above; the helper checks the user pointer.
    let r = unsafe { bpf_probe_read_user(out.as_mut_ptr().add(offset).cast(), len as u32, src as *const _) };
    if r == 0 { len } else { 0 }
}

/// Copies at most `TAIL_BYTES` user bytes to `out[offset..]` (offset below `2 * MAX_CAPTURE`).
#[inline(always)]
fn copy_tail(out: &mut Out, offset: usize, src: u64, len: usize) -> usize {
    let (offset, len) = (compat_opaque(offset), compat_opaque(len));
    let offset = offset & (2 * MAX_CAPTURE - 1);
    if len == 0 || len > TAIL_BYTES {
        return 0;
    }
    // SAFETY: offset < 2 * MAX_CAPTURE and len <= TAIL_BYTES: inside `out`.
    let r = unsafe { bpf_probe_read_user(out.as_mut_ptr().add(offset).cast(), len as u32, src as *const _) };
    if r == 0 { len } else { 0 }
}

/// [`opaque`] in the compat object only: the verifiers it serves cannot follow the compiler's
/// shortcuts around the copies; newer ones can, and there the shortcuts keep the iovec tail walk
/// within the 1M-instruction budget.
#[inline(always)]
fn compat_opaque(v: usize) -> usize {
    if cfg!(feature = "compat") { opaque(v) } else { v }
}

#[inline(always)]
fn min(a: usize, b: usize) -> usize {
    if a < b { a } else { b }
}
