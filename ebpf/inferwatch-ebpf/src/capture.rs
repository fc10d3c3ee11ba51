//! Copying the first bytes of a transfer from the caller's own buffers.
//!
//! Which buffer depends on the system call (its number and arguments are in the saved
//! registers): one buffer for `read`/`write`/`sendto`/`recvfrom`, an iovec array for
//! `readv`/`writev`, a `msghdr` for `sendmsg`/`recvmsg`. Other calls (`sendfile`, `splice`,
//! io_uring, …) are counted without bytes.

use aya_ebpf::{bindings::pt_regs, helpers::generated::bpf_probe_read_user};
use inferwatch_common::sock::{MAX_CAPTURE, MAX_IOVECS, TAIL_BYTES};

use crate::{
    CAPTURE_BYTES,
    nr::{READ, READV, RECVFROM, RECVMSG, SENDMSG, SENDTO, WRITE, WRITEV},
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
pub fn payload(regs: &pt_regs, nr: i32, moved: usize, out: &mut Out) -> Copied {
    // SAFETY: a plain read of a constant the loader may have rewritten.
    let limit = unsafe { core::ptr::read_volatile(&CAPTURE_BYTES) } as usize;
    let want = min(min(moved, limit), MAX_CAPTURE);
    match nr {
        READ | WRITE | SENDTO | RECVFROM => copy_buffer(out, regs.rsi, moved, want),
        READV | WRITEV => copy_iovecs(out, regs.rsi, regs.rdx, moved, want),
        SENDMSG | RECVMSG => {
            let mut msg = core::mem::MaybeUninit::<MsgHdr>::uninit();
            // SAFETY: reading user memory through the helper, which tolerates bad pointers.
            let r = unsafe {
                bpf_probe_read_user(msg.as_mut_ptr().cast(), size_of::<MsgHdr>() as u32, regs.rsi as *const _)
            };
            if r != 0 {
                return Copied::default();
            }
            // SAFETY: the helper filled it.
            let msg = unsafe { msg.assume_init() };
            copy_iovecs(out, msg.iov, msg.iovlen, moved, want)
        }
        _ => Copied::default(),
    }
}

#[inline(always)]
fn copy_buffer(out: &mut Out, base: u64, moved: usize, want: usize) -> Copied {
    let head = copy(out, 0, base, want);
    if head < want || moved <= head {
        return Copied { head, tail: 0 };
    }
    let tail = min(TAIL_BYTES, moved - head);
    Copied { head, tail: copy_tail(out, head, base + (moved - tail) as u64, tail) }
}

/// Follows the iovecs of the call (up to `MAX_IOVECS`) for the first bytes. Past them, what
/// the call moved is counted without bytes (and the reassembly treats it as unseen).
#[inline(always)]
fn copy_iovecs(out: &mut Out, iov: u64, count: u64, _moved: usize, want: usize) -> Copied {
    let mut done = 0usize;
    for i in 0..MAX_IOVECS {
        if i as u64 >= count || done >= want {
            break;
        }
        let mut v = core::mem::MaybeUninit::<Iovec>::uninit();
        let at = iov + (i * size_of::<Iovec>()) as u64;
        // SAFETY: as above.
        let r =
            unsafe { bpf_probe_read_user(v.as_mut_ptr().cast(), size_of::<Iovec>() as u32, at as *const _) };
        if r != 0 {
            break;
        }
        // SAFETY: the helper filled it.
        let v = unsafe { v.assume_init() };
        let n = min(v.len as usize, want - done);
        done += copy(out, done, v.base, n);
    }
    Copied { head: done, tail: 0 }
}

/// Copies `len` user bytes from `src` to `out[offset..]`; returns the bytes copied.
#[inline(always)]
fn copy(out: &mut Out, offset: usize, src: u64, len: usize) -> usize {
    // Bounds the verifier can follow: offset < MAX_CAPTURE and len <= MAX_CAPTURE, so the
    // write stays inside the 2 * MAX_CAPTURE buffer.
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
    let offset = offset & (2 * MAX_CAPTURE - 1);
    if len == 0 || len > TAIL_BYTES {
        return 0;
    }
    // SAFETY: offset < 2 * MAX_CAPTURE and len <= TAIL_BYTES: inside `out`.
    let r = unsafe { bpf_probe_read_user(out.as_mut_ptr().add(offset).cast(), len as u32, src as *const _) };
    if r == 0 { len } else { 0 }
}

#[inline(always)]
fn min(a: usize, b: usize) -> usize {
    if a < b { a } else { b }
}
