//! The system call behind a socket operation: its number and arguments, from the task's saved
//! user registers.
//!
//! From Linux 5.15 `bpf_task_pt_regs` names them, and the verifier checks each load against the
//! kernel's BTF. Before, they are read from the top of the task's kernel stack, where the
//! entry code saved them, at offsets the agent took from the kernel's BTF.

use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{bpf_get_current_task, bpf_get_current_task_btf, bpf_task_pt_regs},
};
use inferwatch_common::kernel::FEATURE_TASK_PT_REGS;
#[cfg(bpf_target_arch = "aarch64")]
use inferwatch_common::kernel::regs::aarch64 as arch;
#[cfg(bpf_target_arch = "x86_64")]
use inferwatch_common::kernel::regs::x86_64 as arch;

use crate::{KERNEL_LAYOUT, has, loaded};

#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
compile_error!("inferwatch's kernel programs read x86-64 or arm64 registers only");

/// A system call's number and its second and third arguments.
#[derive(Clone, Copy)]
pub struct SyscallRegs {
    pub nr: i32,
    pub arg1: u64,
    pub arg2: u64,
}

/// The current task's system call, if it is in one with saved user registers.
#[inline(always)]
pub fn current() -> Option<SyscallRegs> {
    if has(FEATURE_TASK_PT_REGS) { from_task_pt_regs() } else { from_kernel_stack() }
}

/// The number alone (the scheduler programs need nothing else).
#[inline(always)]
pub fn current_nr() -> Option<i32> {
    current().map(|r| r.nr)
}

#[inline(always)]
fn from_task_pt_regs() -> Option<SyscallRegs> {
    // SAFETY: both helpers are valid in tracing programs; the verifier knows the returned
    // pointer is a `struct pt_regs` (PTR_TO_BTF_ID) and checks each field load against BTF.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        if regs.is_null() {
            return None;
        }
        Some(SyscallRegs {
            nr: nr_at(regs),
            arg1: *regs.add(arch::ARG1_OFFSET).cast::<u64>(),
            arg2: *regs.add(arch::ARG2_OFFSET).cast::<u64>(),
        })
    }
}

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
unsafe fn nr_at(regs: *const u8) -> i32 {
    // orig_rax is a u64 field: loaded whole, as the verifier expects.
    unsafe { *regs.add(arch::NR_OFFSET).cast::<u64>() as i32 }
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
unsafe fn nr_at(regs: *const u8) -> i32 {
    unsafe { *regs.add(arch::NR_OFFSET).cast::<i32>() }
}

/// `task_pt_regs()` by hand: `task->stack + THREAD_SIZE - sizeof(struct pt_regs)`.
#[inline(always)]
fn from_kernel_stack() -> Option<SyscallRegs> {
    let stack_offset = loaded(&KERNEL_LAYOUT.task_stack_offset) as u64;
    let size = loaded(&KERNEL_LAYOUT.pt_regs_size) as u64;
    let thread = loaded(&KERNEL_LAYOUT.thread_size) as u64;
    if stack_offset == 0 || size == 0 {
        return None;
    }
    // SAFETY: the helpers check the kernel addresses.
    unsafe {
        let task = bpf_get_current_task();
        let stack: u64 = bpf_probe_read_kernel((task + stack_offset) as *const u64).ok()?;
        let regs = stack + thread - size;
        let nr: u64 = bpf_probe_read_kernel((regs + arch::NR_OFFSET as u64) as *const u64).ok()?;
        Some(SyscallRegs {
            // arm64's syscallno is an s32 in the low half (little-endian); x86's orig_rax a u64.
            nr: nr as i32,
            arg1: bpf_probe_read_kernel((regs + arch::ARG1_OFFSET as u64) as *const u64).ok()?,
            arg2: bpf_probe_read_kernel((regs + arch::ARG2_OFFSET as u64) as *const u64).ok()?,
        })
    }
}
