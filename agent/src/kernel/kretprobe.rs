//! kretprobes with room: created through tracefs, where their instance count can be set.
//!
//! A kretprobe holds one instance per task inside its function, from entry to return, for every
//! task of the node, watched or not; with none free, the return is missed. The kernel's default
//! is the possible CPUs (`max(10, 2 × CPUs)` on preemptible kernels), and a perf-created
//! kretprobe (aya's) cannot change it: a few dozen threads of any process blocked in a socket
//! call (blocking readers, a sender to a slow peer) starve it, and the watched processes' calls
//! return unseen (kernelcheck measured all of them on a 2-CPU VM with 18 blocked senders).
//! Through tracefs, `r<N>:` sets it, up to the kernel's 4,096 (~100 bytes each). The BPF
//! program is then attached to the trace event through perf.

use std::{
    fs,
    io::{self, Write},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

/// The trace event group of our probes; each event is named after its function and our pid.
const GROUP: &str = "inferwatch";

/// A kretprobe trace event with a program attached; removed when dropped.
#[derive(Debug)]
pub(crate) struct TracefsKretprobe {
    perf: Option<OwnedFd>,
    tracefs: PathBuf,
    event: String,
}

impl Drop for TracefsKretprobe {
    fn drop(&mut self) {
        // The event cannot be removed while a perf event uses it.
        drop(self.perf.take());
        let _ = remove_event(&self.tracefs, &self.event);
    }
}

/// The mounted tracefs: `/sys/kernel/tracing`, or the one under debugfs.
pub(crate) fn tracefs() -> io::Result<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("kprobe_events").exists())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no tracefs mounted (/sys/kernel/tracing)"))
}

/// The event name for `function` in process `pid` (trace event names: letters, digits, `_`).
pub(crate) fn event_name(function: &str, pid: u32) -> String {
    let function: String =
        function.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(48).collect();
    format!("r_{function}_{pid}")
}

/// The pid in one of our event names, if it is one.
fn event_pid(event: &str) -> Option<u32> {
    event.strip_prefix("r_")?.rsplit('_').next()?.parse().ok()
}

/// Our events in a `kprobe_events` listing (`r4096:inferwatch/r_inet_sendmsg_42 inet_sendmsg`).
fn our_events(listing: &str) -> impl Iterator<Item = &str> {
    listing.lines().filter_map(|line| {
        let name = line.split_whitespace().next()?.split_once(':')?.1;
        name.strip_prefix(GROUP)?.strip_prefix('/')
    })
}

/// Removes the events an agent that died without cleaning up left behind: their pid is gone or
/// is no inferwatch now (reused). An event still in use (a live agent's) cannot be removed.
pub(crate) fn remove_stale(tracefs: &Path) {
    let Ok(listing) = fs::read_to_string(tracefs.join("kprobe_events")) else { return };
    let ours = std::process::id();
    for event in our_events(&listing) {
        let Some(pid) = event_pid(event) else { continue };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if pid != ours && comm.trim() != "inferwatch" {
            let _ = remove_event(tracefs, event);
        }
    }
}

fn remove_event(tracefs: &Path, event: &str) -> io::Result<()> {
    append(&tracefs.join("kprobe_events"), &format!("-:{GROUP}/{event}"))
}

fn append(path: &Path, line: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

/// Creates a kretprobe on `function` with `instances` instances and attaches `program` (a
/// loaded kprobe program) to it.
pub(crate) fn attach(
    tracefs: &Path,
    program: BorrowedFd<'_>,
    function: &str,
    instances: u32,
) -> io::Result<TracefsKretprobe> {
    let event = event_name(function, std::process::id());
    // A leftover of ours with this name (a retry in this process) would make the write fail.
    let _ = remove_event(tracefs, &event);
    append(&tracefs.join("kprobe_events"), &format!("r{instances}:{GROUP}/{event} {function}"))?;
    // From here the event exists: dropping the handle removes it, whatever fails next.
    let mut probe = TracefsKretprobe { perf: None, tracefs: tracefs.to_path_buf(), event };
    let id: u64 = fs::read_to_string(tracefs.join("events").join(GROUP).join(&probe.event).join("id"))?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("the event's id: {e}")))?;
    let perf = perf_event_open_tracepoint(id)?;
    // SAFETY: ioctls on a perf event fd we own; SET_BPF takes a program fd, ENABLE nothing.
    unsafe {
        if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, program.as_raw_fd()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    probe.perf = Some(perf);
    Ok(probe)
}

/// `_IOW('$', 8, __u32)` and `_IO('$', 0)`: the same on x86-64 and arm64.
const PERF_EVENT_IOC_SET_BPF: u64 = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: u64 = 0x2400;

/// A perf event on trace event `id`, for all tasks (a program attached to a trace event runs on
/// every CPU; the event's own CPU only says where it is counted).
fn perf_event_open_tracepoint(id: u64) -> io::Result<OwnedFd> {
    use aya_obj::generated::{PERF_FLAG_FD_CLOEXEC, perf_event_attr, perf_type_id};
    // SAFETY: a plain-data kernel struct, valid zeroed.
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = perf_type_id::PERF_TYPE_TRACEPOINT as u32;
    attr.size = size_of::<perf_event_attr>() as u32;
    attr.config = id;
    attr.__bindgen_anon_1.sample_period = 1;
    attr.__bindgen_anon_2.wakeup_events = 1;
    // SAFETY: the attribute lives across the call; pid -1 with cpu 0: every task.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_carry_the_function_and_pid_and_are_found_again() {
        assert_eq!(event_name("inet_sendmsg", 42), "r_inet_sendmsg_42");
        assert_eq!(event_name("x.cold", 7), "r_x_cold_7");
        assert_eq!(event_pid("r_unix_stream_recvmsg_1234"), Some(1234));
        assert_eq!(event_pid("other"), None);
        let listing = "r4096:inferwatch/r_inet_sendmsg_42 inet_sendmsg\n\
                       p:kprobes/mine do_sys_open\n\
                       r16:inferwatcher/r_x_1 x\n\
                       r4096:inferwatch/r_inet_recvmsg_42 inet_recvmsg\n";
        let ours: Vec<_> = our_events(listing).collect();
        assert_eq!(ours, ["r_inet_sendmsg_42", "r_inet_recvmsg_42"]);
    }
}
