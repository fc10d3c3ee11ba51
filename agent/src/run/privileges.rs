//! Least privilege: once the kernel programs are loaded and attached, the agent gives up every
//! capability it no longer needs, for good (effective, permitted, inheritable, ambient and the
//! bounding set), and sets `no_new_privs`.
//!
//! What stays, and why:
//! - `CAP_SYS_PTRACE`: `/proc/PID/fd` and `/proc/PID/ns/net` of processes of other users
//!   (discovery matches vLLM's listening sockets by inode, and scrapes inside its netns).
//! - `CAP_DAC_READ_SEARCH`: the same `/proc` directories are mode 0500 for their owner.
//!
//! `CAP_SYS_ADMIN` is not kept: where the agent has it at start and discovery is on, a helper
//! process keeps it (with `CAP_SYS_PTRACE`, nothing else) to open sockets inside pods' network
//! namespaces (`collect::netns`); without it, pods are scraped through their own address.
//!
//! Everything else goes, `CAP_BPF` and `CAP_PERFMON` included: the maps are used through the
//! file descriptors already held, which needs no capability since Linux 6.5. Before 6.5 (with
//! `kernel.unprivileged_bpf_disabled` set, the usual default) every bpf() call needs CAP_BPF,
//! so there it is kept too.
//!
//! Capabilities are per thread, so this must run before any other thread exists (before the
//! async runtime starts); threads created later inherit the reduced sets.

use anyhow::{Context as _, Result, bail};

pub(crate) use crate::collect::procfs::{
    CAP_BPF, CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE,
};

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What the network-namespace helper keeps (see `collect::netns`): `setns`, and opening another
/// user's `/proc/PID/ns/net`.
pub(crate) const HELPER: u64 = (1u64 << CAP_SYS_ADMIN) | (1u64 << CAP_SYS_PTRACE);

/// The capabilities the running agent keeps on a kernel of version `kernel` (major, minor).
pub(crate) fn kept(kernel: (u32, u32)) -> u64 {
    let mut caps = (1u64 << CAP_SYS_PTRACE) | (1u64 << CAP_DAC_READ_SEARCH);
    if kernel < (6, 5) {
        caps |= 1u64 << CAP_BPF;
    }
    caps
}

/// Whether this thread has `cap` in its effective set.
pub(crate) fn has(cap: u32) -> bool {
    current().is_ok_and(|(_, data)| {
        let effective = (data[0].effective as u64) | ((data[1].effective as u64) << 32);
        effective & (1u64 << cap) != 0
    })
}

/// The running kernel's (major, minor), from uname; (0, 0) if unreadable (then CAP_BPF stays).
pub(crate) fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    parse_kernel_version(&release)
}

fn parse_kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor),
        _ => (0, 0),
    }
}

/// Names of the capabilities in `mask`, for the log line.
pub(crate) fn names(mask: u64) -> Vec<&'static str> {
    [
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_BPF, "CAP_BPF"),
    ]
    .into_iter()
    .filter(|(cap, _)| mask & (1u64 << cap) != 0)
    .map(|(_, name)| name)
    .collect()
}

/// Reduces this thread's capabilities to `keep` (intersected with what it has). Must be called
/// while the process has a single thread.
pub(crate) fn drop_all_but(keep: u64) -> Result<u64> {
    let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1);
    if threads != 1 {
        bail!("dropping capabilities with {threads} threads running would leave some privileged");
    }
    let (mut header, mut data) = current()?;
    let have = (data[0].permitted as u64) | ((data[1].permitted as u64) << 32);
    let keep = keep & have;
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    for cap in 0..=last_cap.min(63) {
        if keep & (1u64 << cap) == 0 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                // EINVAL: a capability this kernel does not know; EPERM: no CAP_SETPCAP (then
                // the bounding set was already reduced by whoever started us).
                if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM)) {
                    return Err(err)
                        .with_context(|| format!("dropping capability {cap} from the bounding set"));
                }
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
    }
    for (i, d) in data.iter_mut().enumerate() {
        let half = (keep >> (32 * i)) as u32;
        *d = CapData { effective: half, permitted: half, inheritable: 0 };
    }
    header.pid = 0;
    // SAFETY: header and data are the v3 layout the kernel expects (one header, two data words).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("capset");
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(keep)
}

fn current() -> Result<(CapHeader, [CapData; 2])> {
    let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: as in `drop_all_but`; the kernel writes two data words.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &header as *const CapHeader, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("capget");
    }
    Ok((header, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_set_depends_on_discovery_and_the_kernel() {
        assert_eq!(names(kept((6, 18))), ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"]);
        assert_eq!(kept((6, 5)), 0x0008_0004);
        assert_eq!(names(kept((6, 4))), ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE", "CAP_BPF"]);
        assert_eq!(names(HELPER), ["CAP_SYS_PTRACE", "CAP_SYS_ADMIN"]);
        assert_eq!(parse_kernel_version("6.18.44-cloud-amd64\n"), (6, 18));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), (5, 15));
        assert_eq!(parse_kernel_version("garbage"), (0, 0));
    }

    #[test]
    fn reads_own_capabilities() {
        let (_, data) = current().unwrap();
        let have = (data[0].effective as u64) | ((data[1].effective as u64) << 32);
        assert_eq!(have, crate::collect::procfs::effective_capabilities().unwrap());
    }
}
