//! Which programs this kernel gets, decided from its BTF before anything is loaded: one
//! choice per hook, each said once in the log and in `inferwatch_probe_info{hook,attach}`.
//!
//! | hook          | preferred (kernel)                        | else                                   |
//! |---------------|-------------------------------------------|----------------------------------------|
//! | socket_io     | tp_btf `sock_{send,recv}_length` (6.3)    | fexit on `inet{,6}_`/`unix_*` `sendmsg`/`recvmsg`; kprobes where fexit cannot attach |
//! | syscall_regs  | `bpf_task_pt_regs` (5.15)                 | top of the task's kernel stack         |
//! | iovec_walk    | `bpf_loop` (5.17), up to 1,024 iovecs     | first 8 iovecs                         |
//! | sched         | tp_btf + task storage (5.17: the modern object) | tp_btf + hash map by thread id   |
//! | arrival       | tp_btf `sk_data_ready` (6.3)              | none: timed from the first read        |
//! | tcp_*         | tp_btf (4.16)                             | none                                   |

use inferwatch_common::kernel::{
    FEATURE_ARRIVAL, FEATURE_SCHED_PREV_STATE, FEATURE_TASK_PT_REGS, KernelLayout,
};

use super::btf::KernelBtf;
pub(crate) use crate::model::probe::SocketHook;

/// Which of the two embedded objects to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Object {
    /// Task storage, socket storage, `bpf_loop`: Linux 5.17 and later.
    Modern,
    /// Neither (5.10 to 5.16): a hash map for the scheduler's state, a bounded iovec walk.
    Compat,
}

/// An fexit program on a socket function, and the parameter count it was written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FexitTarget {
    pub program: &'static str,
    pub function: &'static str,
    pub params: usize,
}

const FEXIT_TARGETS: [FexitTarget; 8] = [
    FexitTarget { program: "inet_sendmsg_exit", function: "inet_sendmsg", params: 3 },
    FexitTarget { program: "inet6_sendmsg_exit", function: "inet6_sendmsg", params: 3 },
    FexitTarget { program: "unix_stream_sendmsg_exit", function: "unix_stream_sendmsg", params: 3 },
    FexitTarget { program: "unix_dgram_sendmsg_exit", function: "unix_dgram_sendmsg", params: 3 },
    FexitTarget { program: "inet_recvmsg_exit", function: "inet_recvmsg", params: 4 },
    FexitTarget { program: "inet6_recvmsg_exit", function: "inet6_recvmsg", params: 4 },
    FexitTarget { program: "unix_stream_recvmsg_exit", function: "unix_stream_recvmsg", params: 4 },
    FexitTarget { program: "unix_dgram_recvmsg_exit", function: "unix_dgram_recvmsg", params: 4 },
];

/// The optional BTF tracepoints besides the socket ones: (program, hook it serves).
pub(crate) const OPTIONAL_TRACEPOINTS: [(&str, &str); 7] = [
    ("inet_sock_set_state", "tcp_state"),
    ("tcp_retransmit_skb", "tcp_retransmit"),
    ("tcp_send_reset", "tcp_reset_sent"),
    ("tcp_receive_reset", "tcp_reset_received"),
    ("sched_switch", "sched"),
    ("sched_wakeup", "sched"),
    ("sched_wakeup_new", "sched"),
];

/// The socket tracepoints (both or neither).
pub(crate) const SOCKET_TRACEPOINTS: [&str; 2] = ["sock_send_length", "sock_recv_length"];

/// What the kernel's BTF says a kernel has: the questions [`plan`] asks.
pub(crate) trait KernelFacts {
    fn has_tracepoint(&self, name: &str) -> bool;
    fn tracepoint_params(&self, name: &str) -> Option<usize>;
    fn function_params(&self, name: &str) -> Option<usize>;
    fn has_helper(&self, name: &str) -> bool;
    fn has_map_type(&self, name: &str) -> bool;
    fn member_offset(&self, name: &str, member: &str) -> Option<u32>;
    fn struct_size(&self, name: &str) -> Option<u32>;
}

impl KernelFacts for KernelBtf {
    fn has_tracepoint(&self, name: &str) -> bool {
        KernelBtf::has_tracepoint(self, name)
    }
    fn tracepoint_params(&self, name: &str) -> Option<usize> {
        KernelBtf::tracepoint_params(self, name)
    }
    fn function_params(&self, name: &str) -> Option<usize> {
        KernelBtf::function_params(self, name)
    }
    fn has_helper(&self, name: &str) -> bool {
        self.enum_has("bpf_func_id", &format!("BPF_FUNC_{name}"))
    }
    fn has_map_type(&self, name: &str) -> bool {
        self.enum_has("bpf_map_type", &format!("BPF_MAP_TYPE_{name}"))
    }
    fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        KernelBtf::member_offset(self, name, member)
    }
    fn struct_size(&self, name: &str) -> Option<u32> {
        KernelBtf::struct_size(self, name)
    }
}

/// The programs to load and how: the outcome of [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub object: Object,
    pub layout: KernelLayout,
    /// How socket I/O is hooked: never `Auto`.
    pub socket: SocketHook,
    /// The functions hooked (with fexit or kprobes) that fit their programs on this kernel.
    pub fexit: Vec<FexitTarget>,
    /// (hook, how) of the choices made here; attaching adds the rest.
    pub hooks: Vec<(&'static str, &'static str)>,
    /// What this kernel cannot do, for the log.
    pub limits: Vec<String>,
    /// Whether the scheduler programs can run (the task fields they need are known).
    pub sched: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PlanError {
    #[error("--socket-hook tracepoint: this kernel lacks the socket tracepoints (Linux >= 6.3)")]
    NoTracepoints,
    #[error(
        "this kernel has neither the socket tracepoints (Linux >= 6.3) nor BTF for any of {0}: socket I/O cannot be watched"
    )]
    NoSocketHook(String),
}

/// Decides every hook for a kernel.
pub(crate) fn plan(k: &dyn KernelFacts, socket: SocketHook) -> Result<Plan, PlanError> {
    let mut limits = Vec::new();
    let mut hooks = Vec::new();
    let have_tracepoints = SOCKET_TRACEPOINTS.iter().all(|t| k.has_tracepoint(t));
    let socket = match socket {
        SocketHook::Tracepoint if !have_tracepoints => return Err(PlanError::NoTracepoints),
        SocketHook::Auto if have_tracepoints => SocketHook::Tracepoint,
        // fexit needs the functions' BTF; kprobes do not.
        SocketHook::Auto if FEXIT_TARGETS.iter().any(|t| k.function_params(t.function).is_some()) => {
            SocketHook::Fexit
        }
        SocketHook::Auto => SocketHook::Kprobe,
        chosen => chosen,
    };
    let modern = k.has_helper("loop") && k.has_map_type("TASK_STORAGE");
    let object = if modern { Object::Modern } else { Object::Compat };
    let mut layout = KernelLayout {
        features: 0,
        thread_size: kernel_stack_size(std::env::consts::ARCH, page_size()),
        ..KernelLayout::MODERN
    };
    layout.task_stack_offset = k.member_offset("task_struct", "stack").unwrap_or(0);
    layout.pt_regs_size = k.struct_size("pt_regs").unwrap_or(0);
    if k.has_helper("task_pt_regs") && k.has_helper("get_current_task_btf") {
        layout.features |= FEATURE_TASK_PT_REGS;
        hooks.push(("syscall_regs", "bpf_task_pt_regs"));
    } else {
        if layout.task_stack_offset == 0 || layout.pt_regs_size == 0 {
            hooks.push(("syscall_regs", "unavailable"));
            limits.push("no bpf_task_pt_regs and no task_struct.stack/pt_regs in BTF: socket operations are counted without their system call or bytes".into());
        } else {
            hooks.push(("syscall_regs", "task_stack"));
        }
    }
    if k.tracepoint_params("sched_switch").is_some_and(|n| n >= 4) {
        layout.features |= FEATURE_SCHED_PREV_STATE;
    } else {
        layout.task_state_offset = k
            .member_offset("task_struct", "__state")
            .or_else(|| k.member_offset("task_struct", "state"))
            .unwrap_or(0);
    }
    layout.task_pid_offset = k.member_offset("task_struct", "pid").unwrap_or(0);
    // Offsets the scheduler programs read where the kernel does not hand them over: without
    // them the programs would read the task's first word, so they are not attached at all.
    let prev_state_known = layout.features & FEATURE_SCHED_PREV_STATE != 0 || layout.task_state_offset != 0;
    let sched = prev_state_known && (modern || layout.task_pid_offset != 0);
    if !sched {
        limits.push(
            "task_struct's state or pid is not in this kernel's BTF: scheduler statistics are off".into(),
        );
    }
    if modern {
        hooks.push(("iovec_walk", "bpf_loop"));
        hooks.push(("sched_state", "task_storage"));
    } else {
        hooks.push(("iovec_walk", "first_8_iovecs"));
        hooks.push(("sched_state", "hash_map"));
        limits.push("no bpf_loop or task storage (Linux < 5.17): vectored I/O is read across its first 8 iovecs, scheduler state kept in a hash map".into());
    }
    // Arrivals live in socket storage, which needs the socket as the tracepoints pass it (a
    // trusted pointer); fexit and kprobes only reach it through `struct socket`.
    if !(modern && k.has_tracepoint("sk_data_ready")) {
        limits.push("no sk_data_ready tracepoint (Linux < 6.3): requests are timed from the server's first read, without a queued phase".into());
    } else if socket == SocketHook::Tracepoint {
        layout.features |= FEATURE_ARRIVAL;
    } else {
        limits.push(format!("--socket-hook {socket:?}: requests are timed from the server's first read, without a queued phase"));
    }
    let mut fexit = Vec::new();
    if socket != SocketHook::Tracepoint {
        for target in FEXIT_TARGETS {
            match k.function_params(target.function) {
                Some(n) if n == target.params => fexit.push(target),
                Some(n) => limits.push(format!(
                    "{} takes {n} parameters here, not {}: not hooked",
                    target.function, target.params
                )),
                // A kprobe needs only the symbol (its programs read the arguments from registers,
                // in the signature these functions have had since Linux 4.x): attaching says
                // whether it exists. Debian 11's arm64 5.10 lacks the Unix ones in its BTF.
                None if socket == SocketHook::Kprobe => fexit.push(target),
                None => limits.push(format!("{} is not in this kernel's BTF: not hooked", target.function)),
            }
        }
        if fexit.is_empty() {
            let names: Vec<_> = FEXIT_TARGETS.iter().map(|t| t.function).collect();
            return Err(PlanError::NoSocketHook(names.join(", ")));
        }
    }
    Ok(Plan { object, layout, socket, fexit, hooks, limits, sched })
}

/// `THREAD_SIZE`, where the user registers sit at the top of a task's kernel stack: 16 KiB on
/// x86-64 and on arm64 with 4 KiB pages; arm64 kernels with 64 KiB pages (RHEL's) use one page
/// per stack (`THREAD_SHIFT = PAGE_SHIFT` with vmapped stacks). KASAN kernels, which double it,
/// are not production kernels and are not handled.
pub(crate) fn kernel_stack_size(arch: &str, page_size: u32) -> u32 {
    match arch {
        "aarch64" => page_size.max(16384),
        _ => 16384,
    }
}

/// The kernel's page size (the same for every process).
fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// A kernel described by what its BTF would answer.
    #[derive(Default)]
    struct Fake {
        tracepoints: BTreeMap<&'static str, usize>,
        functions: BTreeMap<&'static str, usize>,
        helpers: BTreeSet<&'static str>,
        map_types: BTreeSet<&'static str>,
        state_field: &'static str,
    }

    impl KernelFacts for Fake {
        fn has_tracepoint(&self, name: &str) -> bool {
            self.tracepoints.contains_key(name)
        }
        fn tracepoint_params(&self, name: &str) -> Option<usize> {
            self.tracepoints.get(name).copied()
        }
        fn function_params(&self, name: &str) -> Option<usize> {
            self.functions.get(name).copied()
        }
        fn has_helper(&self, name: &str) -> bool {
            self.helpers.contains(name)
        }
        fn has_map_type(&self, name: &str) -> bool {
            self.map_types.contains(name)
        }
        fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
            match (name, member) {
                ("task_struct", "stack") => Some(32),
                ("task_struct", "pid") => Some(2400),
                ("task_struct", m) if m == self.state_field => Some(24),
                _ => None,
            }
        }
        fn struct_size(&self, name: &str) -> Option<u32> {
            (name == "pt_regs").then_some(168)
        }
    }

    fn kernel(version: (u32, u32)) -> Fake {
        let at = |v: (u32, u32)| version >= v;
        let mut k = Fake { state_field: if at((5, 14)) { "__state" } else { "state" }, ..Fake::default() };
        k.tracepoints.insert("sched_switch", if at((5, 18)) { 4 } else { 3 });
        k.tracepoints.insert("inet_sock_set_state", 3);
        if at((6, 3)) {
            for tp in ["sock_send_length", "sock_recv_length", "sk_data_ready"] {
                k.tracepoints.insert(tp, 3);
            }
        }
        for t in FEXIT_TARGETS {
            k.functions.insert(t.function, t.params);
        }
        let helpers = [((5, 11), "get_current_task_btf"), ((5, 15), "task_pt_regs"), ((5, 17), "loop")];
        k.helpers.extend(helpers.iter().filter(|(v, _)| at(*v)).map(|(_, h)| *h));
        if at((5, 11)) {
            k.map_types.insert("TASK_STORAGE");
        }
        k
    }

    #[test]
    fn a_new_kernel_gets_every_preferred_hook() {
        let p = plan(&kernel((6, 18)), SocketHook::Auto).unwrap();
        assert_eq!(p.object, Object::Modern);
        assert!(p.socket == SocketHook::Tracepoint && p.fexit.is_empty());
        assert_eq!(p.layout.features, KernelLayout::MODERN.features);
        assert!(p.limits.is_empty(), "{:?}", p.limits);
    }

    #[test]
    fn linux_6_1_uses_fexit_and_loses_only_arrivals() {
        let p = plan(&kernel((6, 1)), SocketHook::Auto).unwrap();
        assert_eq!(p.object, Object::Modern);
        assert_eq!(p.socket, SocketHook::Fexit);
        assert_eq!(p.fexit.len(), FEXIT_TARGETS.len());
        assert_eq!(p.layout.features, FEATURE_TASK_PT_REGS | FEATURE_SCHED_PREV_STATE);
        assert_eq!(p.limits.len(), 1, "{:?}", p.limits);
    }

    #[test]
    fn linux_5_10_reads_registers_and_state_from_the_task() {
        let p = plan(&kernel((5, 10)), SocketHook::Auto).unwrap();
        assert_eq!(p.object, Object::Compat);
        assert_eq!(p.layout.features, 0);
        assert_eq!((p.layout.task_stack_offset, p.layout.pt_regs_size), (32, 168));
        assert_eq!((p.layout.task_state_offset, p.layout.task_pid_offset), (24, 2400));
        assert!(p.hooks.contains(&("syscall_regs", "task_stack")));
        // 5.15: pt_regs from the helper, but still the compat object (no bpf_loop).
        let p = plan(&kernel((5, 15)), SocketHook::Auto).unwrap();
        assert_eq!((p.object, p.layout.features), (Object::Compat, FEATURE_TASK_PT_REGS));
        assert!(p.layout.task_state_offset == 24, "__state from 5.14");
    }

    #[test]
    fn forced_hooks_and_unfit_functions() {
        let p = plan(&kernel((6, 18)), SocketHook::Fexit).unwrap();
        assert!(p.socket == SocketHook::Fexit && p.fexit.len() == 8);
        assert_eq!(p.layout.features & FEATURE_ARRIVAL, 0, "arrivals need the tracepoints' socket");
        // kprobes: no arrivals (socket storage needs the tracepoints' socket).
        let p = plan(&kernel((6, 18)), SocketHook::Kprobe).unwrap();
        assert!(p.socket == SocketHook::Kprobe && p.fexit.len() == 8);
        assert_eq!(p.layout.features, FEATURE_SCHED_PREV_STATE | FEATURE_TASK_PT_REGS);
        assert_eq!((p.layout.task_stack_offset, p.layout.pt_regs_size), (32, 168));
        assert_eq!(plan(&kernel((6, 1)), SocketHook::Tracepoint), Err(PlanError::NoTracepoints));
        let mut k = kernel((6, 1));
        k.functions.insert("inet_recvmsg", 5);
        k.functions.remove("unix_dgram_sendmsg");
        let p = plan(&k, SocketHook::Auto).unwrap();
        assert_eq!(p.fexit.len(), 6);
        assert!(p.limits.iter().any(|l| l.contains("inet_recvmsg takes 5")), "{:?}", p.limits);
        // kprobes try a function BTF does not know (attaching says whether the symbol exists),
        // not one BTF says has another signature.
        let p = plan(&k, SocketHook::Kprobe).unwrap();
        let hooked: Vec<_> = p.fexit.iter().map(|t| t.function).collect();
        assert!(hooked.contains(&"unix_dgram_sendmsg") && !hooked.contains(&"inet_recvmsg"), "{hooked:?}");
        assert!(matches!(plan(&k, SocketHook::Fexit), Ok(p) if p.fexit.len() == 6));
        // No function in BTF: fexit cannot be planned, kprobes can.
        k.functions.clear();
        assert!(matches!(plan(&k, SocketHook::Fexit), Err(PlanError::NoSocketHook(_))));
        let p = plan(&k, SocketHook::Auto).unwrap();
        assert!(p.socket == SocketHook::Kprobe && p.fexit.len() == 8);
    }

    #[test]
    fn kernel_stacks_follow_arm64_page_size() {
        assert_eq!(kernel_stack_size("x86_64", 4096), 16384);
        assert_eq!(kernel_stack_size("aarch64", 4096), 16384);
        assert_eq!(kernel_stack_size("aarch64", 16384), 16384);
        assert_eq!(kernel_stack_size("aarch64", 65536), 65536);
    }

    #[test]
    fn this_machine_s_kernel_plans() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        let p = plan(&btf, SocketHook::Fexit).unwrap();
        // IPv6 may be a module (its functions in module BTF, which is not read): IPv4's are built in.
        let fit: Vec<_> = p.fexit.iter().map(|t| t.function).collect();
        assert!(fit.contains(&"inet_sendmsg") && fit.contains(&"inet_recvmsg"), "{:?}", p.limits);
        assert!(p.sched, "{:?}", p.limits);
    }

    #[test]
    fn unknown_task_fields_turn_the_scheduler_off_instead_of_reading_offset_zero() {
        let mut k = kernel((5, 10));
        k.state_field = "renamed";
        let p = plan(&k, SocketHook::Auto).unwrap();
        assert!(!p.sched && p.limits.iter().any(|l| l.contains("scheduler statistics are off")));
        assert!(plan(&kernel((5, 10)), SocketHook::Auto).unwrap().sched);
        assert!(plan(&kernel((6, 18)), SocketHook::Auto).unwrap().sched);
    }
}
