//! Checks made before touching BPF, so a missing privilege or kernel feature ends in one
//! actionable line instead of an errno from deep inside the loader.

use std::path::Path;

use anyhow::{Result, bail};

use super::privileges::{CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN};
use crate::collect::procfs;

pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub(crate) fn check() -> Result<()> {
    let caps = procfs::effective_capabilities()?;
    if let Some(problem) = privilege_problem(caps) {
        bail!("{problem}");
    }
    if let Some(problem) = btf_problem(Path::new(VMLINUX_BTF)) {
        bail!("{problem}");
    }
    raise_memlock_limit();
    raise_open_files_limit();
    Ok(())
}

/// What is missing to load and attach tracing programs, if anything.
pub(crate) fn privilege_problem(cap_eff: u64) -> Option<String> {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    Some(format!(
        "inferwatch needs root, or the capabilities CAP_BPF and CAP_PERFMON (missing: {}): run it with sudo, or with `cargo xtask run`",
        missing.join(", ")
    ))
}

pub(crate) fn btf_problem(vmlinux: &Path) -> Option<String> {
    if vmlinux.exists() {
        return None;
    }
    Some(format!(
        "this kernel exposes no BTF ({} is missing): inferwatch needs Linux >= 5.8 built with CONFIG_DEBUG_INFO_BTF=y, and >= 6.3 for its socket tracepoints",
        vmlinux.display()
    ))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}

/// Open files up to the hard limit: the HTTP server's connection cap (--http-max-connections)
/// is meant to bind before the descriptor limit does.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_capable_processes_pass() {
        assert_eq!(privilege_problem(u64::MAX), None);
        assert_eq!(privilege_problem(1 << CAP_SYS_ADMIN), None);
        assert_eq!(privilege_problem((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
    }

    #[test]
    fn unprivileged_process_is_told_what_is_missing() {
        let msg = privilege_problem(0).unwrap();
        assert!(msg.contains("missing: CAP_BPF, CAP_PERFMON"), "{msg}");
        assert!(msg.contains("sudo"), "{msg}");
        let msg = privilege_problem(1 << CAP_BPF).unwrap();
        assert!(msg.contains("missing: CAP_PERFMON"), "{msg}");
    }

    #[test]
    fn missing_btf_is_explained() {
        assert!(btf_problem(Path::new("/proc/self/status")).is_none());
        let msg = btf_problem(Path::new("/nonexistent/vmlinux")).unwrap();
        assert!(msg.contains("CONFIG_DEBUG_INFO_BTF"), "{msg}");
    }
}
