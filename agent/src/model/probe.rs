//! How the kernel side watches, as the agent chose it for the running kernel.

/// How socket operations are seen (`--socket-hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub(crate) enum SocketHook {
    /// The socket tracepoints where the kernel has them (Linux 6.3+), else fexit.
    #[default]
    Auto,
    /// The socket tracepoints, or refuse to start.
    Tracepoint,
    /// fexit on the protocols' sendmsg/recvmsg, even where the tracepoints exist.
    Fexit,
    /// kprobe/kretprobe pairs on the same functions (what `auto` falls back to where fexit
    /// cannot attach: arm64 before Linux 6.4).
    Kprobe,
}

/// One hook and how it is attached on this kernel (`inferwatch_probe_info{hook,attach}`), e.g.
/// `("socket_io", "fexit")` or `("arrival", "unavailable")`.
pub(crate) type ProbeChoice = (&'static str, &'static str);

/// The kernel's ceiling for a kretprobe's instances (`KRETPROBE_MAXACTIVE_MAX`), and the agent's
/// default where socket I/O is hooked with kprobes (see `kernel/kretprobe.rs`).
pub const MAX_KRETPROBE_INSTANCES: u32 = 4096;
