//! Every reader of /proc in one place: process files (`stat`, `comm`, `status`) here,
//! command lines in [`cmdline`], network namespaces in [`net`], containers in [`cgroup`]. The
//! parsers are pure and tested on text and on the fixture trees in `fixtures/`.

pub mod cgroup;
pub mod cmdline;
pub mod net;

use std::{fs, io, path::Path};

/// The command name of a process (`/proc/PID/comm`), without the trailing newline.
pub(crate) fn comm(pid: u32) -> io::Result<String> {
    comm_at(Path::new("/proc"), pid)
}

fn comm_at(proc_root: &Path, pid: u32) -> io::Result<String> {
    let raw = fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))?;
    Ok(raw.trim_end_matches('\n').to_string())
}

/// Capability numbers (include/uapi/linux/capability.h) of the ones the agent reads or keeps.
pub(crate) const CAP_DAC_READ_SEARCH: u32 = 2;
pub(crate) const CAP_SYS_PTRACE: u32 = 19;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
pub(crate) const CAP_PERFMON: u32 = 38;
pub(crate) const CAP_BPF: u32 = 39;

/// The effective capability mask of this process (`CapEff` in /proc/self/status).
pub(crate) fn effective_capabilities() -> io::Result<u64> {
    parse_cap_eff(&fs::read_to_string("/proc/self/status")?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff line in /proc/self/status"))
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// CPU time (user + system) this process and all its threads, live or exited, have used, in
/// seconds. From `getrusage`, at microsecond resolution (`/proc/self/stat` counts 10 ms ticks,
/// too coarse to tell what a few seconds of load cost).
pub(crate) fn own_cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: filled by the successful call above.
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

/// The fields of a `/proc/PID/stat` line after the command name, from field 3 (`state`) on:
/// the name may hold spaces and parentheses, so they start after the last `)`.
pub(crate) fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// When a process started (clock ticks since boot, `/proc/PID/stat` field 22): with the pid, it
/// names one process; a reused pid has another start time.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn parse_start_time(stat: &str) -> Option<u64> {
    stat_fields(stat)?.nth(19)?.parse().ok()
}

/// Resident memory of this process, in bytes.
pub(crate) fn own_resident_bytes() -> Option<u64> {
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

/// Parent pid from `/proc/PID/stat` (the command name may contain spaces and parentheses).
pub fn ppid_from_stat(stat: &str) -> Option<u32> {
    stat_fields(stat)?.nth(1)?.parse().ok()
}

/// The command name between the parentheses of a `/proc/PID/stat` line (what `comm` holds).
pub fn comm_from_stat(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// The fixture tree `name` under `fixtures/` (see its README).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/collect/procfs/fixtures").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_files_of_the_fixture_tree() {
        let root = fixture("vllm-node");
        assert_eq!(comm_at(&root, 4100).unwrap(), "python3");
        let stat = |pid: u32| fs::read_to_string(root.join(pid.to_string()).join("stat")).unwrap();
        assert_eq!(parse_start_time(&stat(4100)), Some(8_600_000));
        assert_eq!(ppid_from_stat(&stat(4100)), Some(4001));
        assert_eq!(comm_from_stat(&stat(4188)), Some("VLLM::EngineCor"));
        assert_eq!(ppid_from_stat(&stat(4188)), Some(4100));
        let status = fs::read_to_string(root.join("4100/status")).unwrap();
        assert_eq!(parse_cap_eff(&status), Some(0));
    }

    #[test]
    fn reads_own_comm() {
        let me = std::process::id();
        let c = comm(me).unwrap();
        assert!(!c.is_empty() && !c.ends_with('\n'), "{c:?}");
    }

    #[test]
    fn missing_process_is_an_error() {
        let dir = std::env::temp_dir().join(format!("inferwatch-procfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(comm_at(&dir, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn own_cpu_time_includes_exited_threads_below_a_tick() {
        let before = own_cpu_seconds().unwrap();
        // A thread that burns 30 ms of its own CPU time (not wall time: the machine may be busy).
        std::thread::spawn(|| {
            let thread_cpu = || {
                let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: clock_gettime fills the timespec it is given.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
                t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
            };
            let start = thread_cpu();
            while thread_cpu() - start < 0.03 {
                std::hint::black_box(start);
            }
        })
        .join()
        .unwrap();
        let used = own_cpu_seconds().unwrap() - before;
        assert!(used >= 0.029, "{used} s counted for a thread that used 30 ms");
        assert!(own_resident_bytes().unwrap() > 0);
    }

    #[test]
    fn parses_stat_past_odd_command_names() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn parent_pid_from_stat() {
        assert_eq!(ppid_from_stat("28305 (VLLM::Engine) Core) S 28276 28273 1091 0"), Some(28276));
    }

    #[test]
    fn the_command_name_comes_from_stat() {
        assert_eq!(comm_from_stat("7 (VLLM::EngineCor) S 1 7"), Some("VLLM::EngineCor"));
        assert_eq!(comm_from_stat("8 (a) b) (c) R 1 8"), Some("a) b) (c"));
        assert_eq!(comm_from_stat("garbage"), None);
        assert_eq!(comm_from_stat(") 1 ("), None);
    }
}
