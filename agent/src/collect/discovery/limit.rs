//! How many instances the agent follows, and which. Anyone on the node can start a process
//! titled like vLLM's API server; a flood of them must neither exhaust the agent nor push a
//! real vLLM out. Candidates are ranked — verified ones first (their API server has vLLM's or
//! PyTorch's code mapped, which a title alone does not give), then the oldest — and only the
//! first [`MAX_INSTANCES`] are kept; the rest are counted.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::Path,
    time::{Duration, Instant},
};

use crate::model::instance::{Instance, Role};

/// Instances followed at most (described, scraped, watched).
pub(crate) const MAX_INSTANCES: usize = 64;
/// How long a process found unverified is not looked at again (it may still be importing
/// torch: a real server starting among many impostors waits at most this long).
const RECHECK: Duration = Duration::from_secs(5);
/// Lines of /proc/PID/maps read at most per check: a real API server maps torch early.
const MAX_MAPS_LINES: usize = 65_536;

/// Whether a process has vLLM's or PyTorch's code mapped, remembered per process.
#[derive(Default)]
pub(crate) struct Verifier {
    /// (pid, start time) → verified, or when it was last found unverified.
    seen: HashMap<(u32, u64), Result<(), Instant>>,
}

impl Verifier {
    pub(crate) fn verified(&mut self, root: &Path, pid: u32, started: u64) -> bool {
        match self.seen.get(&(pid, started)) {
            Some(Ok(())) => return true,
            Some(Err(at)) if at.elapsed() < RECHECK => return false,
            _ => {}
        }
        let found = maps_show_vllm(root, pid);
        self.seen.insert((pid, started), if found { Ok(()) } else { Err(Instant::now()) });
        found
    }

    /// Forgets processes no longer among the candidates.
    pub(crate) fn keep_only(&mut self, alive: impl Fn(u32, u64) -> bool) {
        self.seen.retain(|&(pid, started), _| alive(pid, started));
    }
}

/// Whether `/proc/PID/maps` names a file of vLLM's package or of libtorch.
fn maps_show_vllm(root: &Path, pid: u32) -> bool {
    let Ok(file) = std::fs::File::open(root.join(pid.to_string()).join("maps")) else { return false };
    BufReader::new(file)
        .split(b'\n')
        .take(MAX_MAPS_LINES)
        .map_while(Result::ok)
        .any(|line| maps_line_is_vllm(&line))
}

fn maps_line_is_vllm(line: &[u8]) -> bool {
    // The path is the last field; only mapped files count (not `[heap]` or anonymous memory).
    let Some(slash) = line.iter().position(|&b| b == b'/') else { return false };
    let path = &line[slash..];
    let has = |needle: &[u8]| path.windows(needle.len()).any(|w| w == needle);
    has(b"/libtorch") || has(b"/site-packages/vllm/") || has(b"/dist-packages/vllm/")
}

/// Ranks `instances` (verified first, then oldest root) and keeps the first [`MAX_INSTANCES`];
/// returns how many were left out.
pub(crate) fn rank_and_cap(
    instances: &mut Vec<Instance>,
    mut verified: impl FnMut(u32) -> bool,
    start_time: impl Fn(u32) -> Option<u64>,
) -> usize {
    for i in instances.iter_mut() {
        let api = i.pids(Role::ApiServer).next();
        i.verified = api.is_some_and(&mut verified);
    }
    // Cached: the key reads /proc (a start time), once per instance rather than per comparison.
    instances.sort_by_cached_key(|i| (!i.verified, start_time(i.root_pid).unwrap_or(u64::MAX), i.root_pid));
    let dropped = instances.len().saturating_sub(MAX_INSTANCES);
    instances.truncate(MAX_INSTANCES);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::instance::Process;

    fn instance(pid: u32) -> Instance {
        Instance {
            root_pid: pid,
            processes: vec![Process { pid, ppid: 1, role: Role::ApiServer, comm: "python3".into() }],
            listen: vec![],
            cmdline_models: vec![],
            flags: vec![],
            container_id: None,
            pod_uid: None,
            verified: false,
        }
    }

    #[test]
    fn a_flood_of_titled_processes_does_not_push_out_a_verified_server() {
        // 500 impostors, all older than the real server (pid 9000).
        let mut all: Vec<Instance> = (100..600).map(instance).chain([instance(9000)]).collect();
        let dropped = rank_and_cap(&mut all, |pid| pid == 9000, |pid| Some(pid as u64));
        assert_eq!(dropped, 501 - MAX_INSTANCES);
        assert_eq!(all.len(), MAX_INSTANCES);
        assert_eq!(all[0].root_pid, 9000);
        assert!(all[0].verified);
        // Among the unverified, the oldest stay.
        assert_eq!(all[1].root_pid, 100);
        assert_eq!(all.last().unwrap().root_pid, 100 + MAX_INSTANCES as u32 - 2);
    }

    #[test]
    fn maps_lines_count_only_mapped_vllm_or_torch_files() {
        let real = b"7f1c2a000000-7f1c2b000000 r-xp 00000000 fd:01 123 /opt/venv/lib/python3.12/site-packages/torch/lib/libtorch_cpu.so";
        assert!(maps_line_is_vllm(real));
        assert!(maps_line_is_vllm(b"7f-80 r-xp 0 fd:01 1 /usr/lib/python3/dist-packages/vllm/_C.abi3.so"));
        assert!(!maps_line_is_vllm(b"7f-80 rw-p 0 00:00 0 [heap]"));
        assert!(!maps_line_is_vllm(b"7f-80 r-xp 0 fd:01 1 /usr/bin/python3.12"));
        assert!(!maps_line_is_vllm(b"7f-80 r-xp 0 fd:01 1 /tmp/vllm.entrypoints.openai.api_server"));
    }

    #[test]
    fn this_process_is_not_vllm_and_is_checked_once_per_window() {
        let mut v = Verifier::default();
        let me = std::process::id();
        assert!(!v.verified(Path::new("/proc"), me, 1));
        assert!(matches!(v.seen.get(&(me, 1)), Some(Err(_))));
        v.keep_only(|_, _| false);
        assert!(v.seen.is_empty());
    }
}
