//! What the agent learns about the running kernel before it loads the programs.
//!
//! The agent writes a [`KernelLayout`] into the programs' read-only data. The verifier reads
//! frozen read-only data as constants, so a branch a kernel cannot take (a helper it lacks, a
//! tracepoint argument it does not pass) is dead code: never checked, removed before the
//! program runs. One object then serves kernels from 5.10 on.

/// The global (in .rodata) holding the [`KernelLayout`].
pub const KERNEL_LAYOUT_GLOBAL: &str = "KERNEL_LAYOUT";

/// `bpf_task_pt_regs` (Linux 5.15) and `bpf_get_current_task_btf` (5.11): the system call's
/// registers straight from the task. Without them, from the top of the task's kernel stack.
pub const FEATURE_TASK_PT_REGS: u32 = 1 << 0;
/// `sk_data_ready` is a tracepoint (Linux 6.3) and socket storage works in tracing programs:
/// arrivals are stamped.
pub const FEATURE_ARRIVAL: u32 = 1 << 1;
/// `sched_switch` passes `prev_state` (Linux 5.18); before, it is read from the task.
pub const FEATURE_SCHED_PREV_STATE: u32 = 1 << 2;

/// Field offsets and sizes of kernel structures that vary between kernels (from the kernel's
/// BTF), and the features the programs may use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// `FEATURE_*` bits.
    pub features: u32,
    /// `offsetof(struct task_struct, stack)`: the task's kernel stack.
    pub task_stack_offset: u32,
    /// `offsetof(struct task_struct, __state)` (`state` before 5.14).
    pub task_state_offset: u32,
    /// `offsetof(struct task_struct, pid)`: the thread id.
    pub task_pid_offset: u32,
    /// `sizeof(struct pt_regs)`: the user registers sit at the top of the kernel stack.
    pub pt_regs_size: u32,
    /// `THREAD_SIZE`: the kernel stack's size (16 KiB on x86-64 and arm64 without KASAN).
    pub thread_size: u32,
}
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 24);

impl KernelLayout {
    /// Linux 6.3+ on x86-64 as Debian builds it: every feature; offsets unused with them.
    pub const MODERN: Self = Self {
        features: FEATURE_TASK_PT_REGS | FEATURE_ARRIVAL | FEATURE_SCHED_PREV_STATE,
        task_stack_offset: 0,
        task_state_offset: 0,
        task_pid_offset: 0,
        pt_regs_size: 0,
        thread_size: 16384,
    };
}

/// Where a system call's number and its second and third arguments (a buffer or iovec array,
/// and a length or count) sit in the saved user registers, per architecture.
pub mod regs {
    /// `struct pt_regs`: rsi, rdx, orig_rax (a `u64`).
    pub mod x86_64 {
        pub const ARG1_OFFSET: usize = 13 * 8;
        pub const ARG2_OFFSET: usize = 12 * 8;
        pub const NR_OFFSET: usize = 15 * 8;
    }
    /// `struct pt_regs`: regs[1], regs[2], syscallno (an `s32` after regs[31], sp, pc, pstate
    /// and orig_x0).
    pub mod aarch64 {
        pub const ARG1_OFFSET: usize = 8;
        pub const ARG2_OFFSET: usize = 2 * 8;
        pub const NR_OFFSET: usize = 35 * 8;
    }
}
