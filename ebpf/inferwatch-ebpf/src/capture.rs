//! Copying the first bytes of a transfer from the caller's own buffers.
//!
//! Which buffer depends on the system call (its number and arguments are in the saved
//! registers): one buffer for `read`/`write`/`sendto`/`recvfrom`, an iovec array for
//! `readv`/`writev`, a `msghdr` for `sendmsg`/`recvmsg`. Other calls (`sendfile`, `splice`,
//! io_uring, …) are counted without bytes.

use aya_ebpf::{bindings::pt_regs, helpers::generated::bpf_probe_read_user};
use inferwatch_common::sock::{MAX_CAPTURE, MAX_IOVECS};

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

/// Copies up to the capture limit of the `moved` bytes into `out`; returns how many.
#[inline(always)]
pub fn payload(regs: &pt_regs, nr: i32, moved: usize, out: &mut [u8; 2 * MAX_CAPTURE]) -> usize {
    // SAFETY: a plain read of a constant the loader may have rewritten.
    let limit = unsafe { core::ptr::read_volatile(&CAPTURE_BYTES) } as usize;
    let want = min(min(moved, limit), MAX_CAPTURE);
    match nr {
        READ | WRITE | SENDTO | RECVFROM => copy(out, 0, regs.rsi, want),
        READV | WRITEV => copy_iovecs(out, regs.rsi, regs.rdx, want),
        SENDMSG | RECVMSG => {
            let mut msg = core::mem::MaybeUninit::<MsgHdr>::uninit();
            // SAFETY: reading user memory through the helper, which tolerates bad pointers.
            let r = unsafe {
                bpf_probe_read_user(msg.as_mut_ptr().cast(), size_of::<MsgHdr>() as u32, regs.rsi as *const _)
            };
            if r != 0 {
                return 0;
            }
            // SAFETY: the helper filled it.
            let msg = unsafe { msg.assume_init() };
            copy_iovecs(out, msg.iov, msg.iovlen, want)
        }
        _ => 0,
    }
}

#[inline(always)]
fn copy_iovecs(out: &mut [u8; 2 * MAX_CAPTURE], iov: u64, count: u64, want: usize) -> usize {
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
    done
}

/// Copies `len` user bytes from `src` to `out[offset..]`; returns the bytes copied.
#[inline(always)]
fn copy(out: &mut [u8; 2 * MAX_CAPTURE], offset: usize, src: u64, len: usize) -> usize {
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

#[inline(always)]
fn min(a: usize, b: usize) -> usize {
    if a < b { a } else { b }
}
