//! The scan stage: reading /proc, as little as possible, into the vLLM instances of this node
//! (classified, grouped, with their listening ports, models and containers).
//!
//! The agent runs in the host PID namespace, so containers' processes are seen too; ports are
//! read from each process's own network namespace (`/proc/PID/net/tcp`).

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    net::SocketAddr,
    path::Path,
};

use super::{classify::classify, group::group};
use crate::{
    collect::procfs::{
        self,
        cgroup::container_from_cgroup,
        cmdline::{models_from_cmdline, redacted_flags},
        comm_from_stat,
        net::listening_addresses_of,
        ppid_from_stat,
    },
    model::instance::{Instance, Process, Role},
};

/// The API servers' listening addresses, by pid and start time. Finding them walks the
/// kernel's whole TCP table (`/proc/PID/net/tcp` lists every bucket of the established hash, in
/// every namespace), so it is not done on every scan. A server's port does not change once it listens, so a found address is kept
/// for as long as that process lives; a server not yet listening (loading its model) is looked
/// at again on the next scan.
#[derive(Debug, Default)]
struct ListenCache(HashMap<u32, (u64, BTreeSet<SocketAddr>)>);

impl ListenCache {
    fn addresses(&mut self, root: &Path, pid: u32, started: u64) -> BTreeSet<SocketAddr> {
        if let Some((s, found)) = self.0.get(&pid)
            && *s == started
        {
            return found.clone();
        }
        let found = listening_addresses_of(&root.join(pid.to_string()));
        if found.is_empty() {
            self.0.remove(&pid);
        } else {
            self.0.insert(pid, (started, found.clone()));
        }
        found
    }

    /// Forgets the servers that are gone.
    fn keep_only(&mut self, api_servers: &HashMap<u32, u64>) {
        self.0.retain(|pid, (started, _)| api_servers.get(pid) == Some(started));
    }
}

/// What discovery keeps between scans: what it learnt of each process, and the API servers'
/// listening addresses.
///
/// Reading every process's `stat` and `cmdline` on every scan costs an open and a read per file
/// per process, growing with the node (BENCHMARKS.md, stop 16). A process is recognised from its /proc directory entry (pid and inode: the
/// kernel gives a new process a new inode, even under a reused pid) and read again only while
/// it is young (started less than `YOUNG_SECONDS` ago), when processes rename themselves (vLLM
/// retitles its children after they start), and on every `FULL_SCAN_EVERY`-th scan, which
/// bounds how late any other change (a late `exec` into vLLM, a parent that exited) is seen.
/// And when no task started or ended since the last scan, /proc is not even listed.
#[derive(Debug, Default)]
pub(crate) struct ScanCache {
    processes: HashMap<u32, Seen>,
    listen: ListenCache,
    scans: u64,
    /// The node's task count and last pid at the last scan.
    tasks: Option<(u64, u64)>,
    last_instances: Vec<Instance>,
    last_listed: bool,
    last_reads: usize,
}

/// A process as last read.
#[derive(Debug)]
struct Seen {
    inode: u64,
    ppid: u32,
    started: u64,
    /// For vLLM processes: role, command name and command line.
    vllm: Option<(Role, String, Vec<u8>)>,
}

/// A process younger than this is read on every scan.
const YOUNG_SECONDS: u64 = 30;
/// Every this many scans (30 s at the default 2 s interval), every process is read again.
const FULL_SCAN_EVERY: u64 = 15;

#[cfg(test)]
impl ScanCache {
    /// Processes whose /proc files the last scan read.
    pub(crate) fn last_reads(&self) -> usize {
        self.last_reads
    }

    /// Whether the last scan listed /proc.
    pub(crate) fn last_listed(&self) -> bool {
        self.last_listed
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }
}

/// Reads `stat` and `cmdline` of the process in `dir`.
fn read_process(dir: &Path, inode: u64) -> Option<Seen> {
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let (ppid, comm) = (ppid_from_stat(&stat)?, comm_from_stat(&stat)?);
    let cmdline = fs::read(dir.join("cmdline")).unwrap_or_default();
    let vllm = classify(&cmdline, comm).map(|role| (role, comm.to_string(), cmdline));
    let started = procfs::parse_start_time(&stat).unwrap_or(0);
    Some(Seen { inode, ppid, started, vllm })
}

/// The start time (in clock ticks since boot, as in `stat`) below which a process is no longer
/// young; 0 (everything young) when the uptime cannot be read.
fn young_after(root: &Path) -> u64 {
    let uptime = fs::read_to_string(root.join("uptime")).ok();
    let seconds = uptime.as_deref().and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    seconds.map_or(0, |s| ((s as u64).saturating_sub(YOUNG_SECONDS)) * ticks_per_second)
}

/// Reads /proc under `root` and returns every vLLM instance found; `cache` carries what earlier
/// scans learnt (see [`ScanCache`]).
pub(crate) fn scan(root: &Path, cache: &mut ScanCache) -> Vec<Instance> {
    let full = cache.scans.is_multiple_of(FULL_SCAN_EVERY);
    cache.scans += 1;
    cache.last_reads = 0;
    let young_after = young_after(root);
    // Listing /proc walks every task of the node and touches each one's structures: ~30 µs
    // with warm caches, but 5-10 ms when it comes every 2 s on a VM whose caches went cold
    // meanwhile. When no task was created or ended since the last scan (the kernel's task count
    // and last pid, in `loadavg`), nothing settled changed either, and the last result stands.
    let tasks = fs::read_to_string(root.join("loadavg")).ok().as_deref().and_then(task_counters);
    let unchanged = tasks.is_some() && tasks == cache.tasks;
    cache.tasks = tasks;
    let settled = cache.processes.values().all(|s| s.started < young_after);
    let listening = cache.last_instances.iter().all(|i| !i.listen.is_empty());
    cache.last_listed = full || !unchanged || !settled || !listening;
    if !cache.last_listed {
        return cache.last_instances.clone();
    }
    let found = scan_listing(root, cache, full, young_after);
    cache.last_instances = found.clone();
    found
}

/// The number of tasks and the last pid handed out, from `/proc/loadavg`
/// (`0.21 1.00 1.37 2/82 986`): together they change whenever a task starts or ends.
fn task_counters(loadavg: &str) -> Option<(u64, u64)> {
    let mut fields = loadavg.split_whitespace().skip(3);
    let total = fields.next()?.split_once('/')?.1.parse().ok()?;
    Some((total, fields.next()?.parse().ok()?))
}

/// A scan that lists /proc, reading the processes `cache` cannot vouch for.
fn scan_listing(root: &Path, cache: &mut ScanCache, full: bool, young_after: u64) -> Vec<Instance> {
    use std::os::unix::fs::DirEntryExt;

    let Ok(entries) = fs::read_dir(root) else { return Vec::new() };
    let mut known = HashMap::with_capacity(cache.processes.len());
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let inode = entry.ino();
        let seen = match cache.processes.remove(&pid) {
            Some(s) if s.inode == inode && !full && s.started < young_after => s,
            _ => {
                cache.last_reads += 1;
                let Some(now) = read_process(&entry.path(), inode) else { continue };
                now
            }
        };
        known.insert(pid, seen);
    }
    cache.processes = known;

    let ppids: HashMap<u32, u32> = cache.processes.iter().map(|(&pid, s)| (pid, s.ppid)).collect();
    let processes: Vec<Process> = cache
        .processes
        .iter()
        .filter_map(|(&pid, seen)| {
            let (role, comm, _) = seen.vllm.as_ref()?;
            Some(Process { pid, ppid: seen.ppid, role: *role, comm: comm.clone() })
        })
        .collect();
    let cmdline = |pid: &u32| Some(cache.processes.get(pid)?.vllm.as_ref()?.2.as_slice());
    let api_servers: HashMap<u32, u64> = processes
        .iter()
        .filter(|p| p.role == Role::ApiServer)
        .map(|p| (p.pid, cache.processes[&p.pid].started))
        .collect();
    cache.listen.keep_only(&api_servers);
    group(&processes, &ppids)
        .into_iter()
        .map(|(root_pid, mut procs)| {
            procs.sort_by_key(|p| (p.role, p.pid));
            let api: Vec<u32> = procs.iter().filter(|p| p.role == Role::ApiServer).map(|p| p.pid).collect();
            let mut listen = BTreeSet::new();
            for pid in &api {
                listen.extend(cache.listen.addresses(root, *pid, api_servers[pid]));
            }
            let models = api.iter().find_map(|pid| {
                let m = models_from_cmdline(cmdline(pid)?);
                (!m.is_empty()).then_some(m)
            });
            let flags = api.first().and_then(cmdline).map(redacted_flags).unwrap_or_default();
            let cgroup =
                fs::read_to_string(root.join(root_pid.to_string()).join("cgroup")).unwrap_or_default();
            let (container_id, pod_uid) = container_from_cgroup(&cgroup);
            Instance {
                root_pid,
                processes: procs,
                listen: listen.into_iter().collect(),
                cmdline_models: models.unwrap_or_default(),
                flags,
                container_id,
                pod_uid,
                verified: false,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_node_holds_one_instance() {
        let root = procfs::fixture("vllm-node");
        let found = scan(&root, &mut ScanCache::default());
        assert_eq!(found.len(), 1, "{found:#?}");
        let i = &found[0];
        assert_eq!(i.root_pid, 4100);
        let roles: Vec<(u32, Role)> = i.processes.iter().map(|p| (p.pid, p.role)).collect();
        assert_eq!(roles, [(4100, Role::ApiServer), (4188, Role::EngineCore)], "not the http.server");
        assert_eq!(i.listen, ["127.0.0.1:8000".parse::<SocketAddr>().unwrap()]);
        assert_eq!(i.cmdline_models, ["qwen-small"]);
        assert_eq!(i.pod_uid.as_deref(), Some("2f0c6bd1-5b1e-4c4e-9a4f-1b0a6e0f7c11"));
        assert_eq!(i.id(), "9f1c2d3e4f5a:8000");
        assert!(i.flags.contains(&"***".to_string()) && !i.flags.iter().any(|f| f.contains("sk-live")));
    }

    fn nul(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    /// A /proc tree with one API server (pid 100) listening on 127.0.0.1:8000 through fd 3.
    fn fake_proc(root: &Path, start_time: u64, net_tcp_listens: bool) {
        let dir = root.join("100");
        fs::create_dir_all(dir.join("net")).unwrap();
        fs::create_dir_all(dir.join("fd")).unwrap();
        let stat = format!("100 (python3) S 1 100 100 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 {start_time} 0 0");
        fs::write(dir.join("stat"), stat).unwrap();
        fs::write(dir.join("cmdline"), nul(&["python3", "-m", "vllm.entrypoints.openai.api_server"]))
            .unwrap();
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let row = "   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1\n";
        let table = if net_tcp_listens { format!("{header}{row}") } else { header.to_string() };
        fs::write(dir.join("net/tcp"), table).unwrap();
        let _ = fs::remove_file(dir.join("fd/3"));
        std::os::unix::fs::symlink("socket:[555]", dir.join("fd/3")).unwrap();
    }

    #[test]
    fn listening_addresses_are_read_once_per_server_process() {
        let root = std::env::temp_dir().join(format!("inferwatch-listen-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let mut cache = ScanCache::default();

        // Not listening yet (loading its model): nothing found, nothing remembered.
        fake_proc(&root, 42, false);
        assert!(scan(&root, &mut cache)[0].listen.is_empty());
        assert!(cache.listen.0.is_empty());

        fake_proc(&root, 42, true);
        assert_eq!(scan(&root, &mut cache)[0].listen, vec![addr]);
        assert_eq!(cache.listen.0.len(), 1);

        // The same process: the table is not read again (here it no longer shows the socket).
        fake_proc(&root, 42, false);
        assert_eq!(scan(&root, &mut cache)[0].listen, vec![addr]);

        // Another process under the same pid (a new start time) is looked at afresh.
        replace_process(&root, 43, false);
        assert!(scan(&root, &mut cache)[0].listen.is_empty());
        assert!(cache.listen.0.is_empty());

        // A server that is gone is forgotten.
        fake_proc(&root, 43, true);
        scan(&root, &mut cache);
        fs::remove_dir_all(root.join("100")).unwrap();
        assert!(scan(&root, &mut cache).is_empty());
        assert!(cache.listen.0.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    /// Replaces the fake process 100 by a new one: a new directory, so a new inode, as the
    /// kernel gives a new process (made first, so that the old inode cannot be reused for it).
    fn replace_process(root: &Path, start_time: u64, net_tcp_listens: bool) {
        let staging = root.join("staging");
        let _ = fs::remove_dir_all(&staging);
        fake_proc(&staging, start_time, net_tcp_listens);
        fs::remove_dir_all(root.join("100")).unwrap();
        fs::rename(staging.join("100"), root.join("100")).unwrap();
        fs::remove_dir_all(&staging).unwrap();
    }

    /// A new fake /proc tree named after `test`, holding the API server of [`fake_proc`] started
    /// at tick 42 and listening.
    fn fresh_fake_proc(test: &str) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("inferwatch-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fake_proc(&root, 42, true);
        root
    }

    #[test]
    fn known_processes_are_not_read_on_every_scan() {
        let root = fresh_fake_proc("scan-cache");
        let mut cache = ScanCache::default();
        let server = |found: Vec<Instance>| found[0].processes[0].comm.clone();

        // Young (started 10 s ago): read on every scan, so a rename right after start is seen.
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        fs::write(root.join("uptime"), format!("{}.25 99.0\n", 42 / ticks + 10)).unwrap();
        assert_eq!(server(scan(&root, &mut cache)), "python3");
        assert_eq!(cache.last_reads(), 1);
        for _ in 0..FULL_SCAN_EVERY {
            scan(&root, &mut cache);
            assert_eq!(cache.last_reads(), 1);
        }
        // Older than YOUNG_SECONDS: not read again until the next full scan, whatever changes.
        fs::write(root.join("uptime"), format!("{}.25 99.0\n", 42 / ticks + YOUNG_SECONDS + 1)).unwrap();
        let stat = root.join("100/stat");
        fs::write(&stat, fs::read_to_string(&stat).unwrap().replace("(python3)", "(vllm-api)")).unwrap();
        let mut quiet = 0;
        loop {
            let found = scan(&root, &mut cache);
            if cache.last_reads() == 1 {
                assert_eq!(server(found), "vllm-api", "a full scan reads it again");
                break;
            }
            assert_eq!(server(found), "python3");
            quiet += 1;
        }
        assert_eq!(quiet, FULL_SCAN_EVERY as usize - 1, "scans without reading it");

        // A new process under the same pid (a new inode) is read at once, young or not.
        replace_process(&root, 43, true);
        let found = scan(&root, &mut cache);
        assert_eq!(cache.last_reads(), 1);
        assert_eq!(server(found), "python3");
        assert_eq!(cache.processes[&100].started, 43);

        // Gone: forgotten.
        fs::remove_dir_all(root.join("100")).unwrap();
        assert!(scan(&root, &mut cache).is_empty());
        assert!(cache.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn proc_is_listed_only_when_tasks_started_or_ended() {
        let root = fresh_fake_proc("scan-tasks");
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        fs::write(root.join("uptime"), format!("{}.0 1.0\n", 42 / ticks + YOUNG_SECONDS + 1)).unwrap();
        let loadavg = |tasks: u32, last_pid: u32| {
            fs::write(root.join("loadavg"), format!("0.21 1.00 1.37 2/{tasks} {last_pid}\n")).unwrap()
        };
        loadavg(82, 986);
        let mut cache = ScanCache::default();
        let first = scan(&root, &mut cache);
        assert!(cache.last_listed());
        assert_eq!(first[0].listen, vec!["127.0.0.1:8000".parse().unwrap()]);

        // Nothing started or ended: the last result, without listing.
        assert_eq!(scan(&root, &mut cache), first);
        assert!(!cache.last_listed());

        // A task started (a new last pid), or one ended (fewer tasks): listed.
        loadavg(83, 990);
        scan(&root, &mut cache);
        assert!(cache.last_listed());
        scan(&root, &mut cache);
        assert!(!cache.last_listed());
        loadavg(82, 990);
        scan(&root, &mut cache);
        assert!(cache.last_listed());

        // A young process is looked at on every scan, tasks changing or not.
        fs::write(root.join("uptime"), format!("{}.0 1.0\n", 42 / ticks + 1)).unwrap();
        scan(&root, &mut cache);
        scan(&root, &mut cache);
        assert!(cache.last_listed());
        fs::write(root.join("uptime"), format!("{}.0 1.0\n", 42 / ticks + YOUNG_SECONDS + 1)).unwrap();
        scan(&root, &mut cache);

        // So is an API server that does not listen yet.
        replace_process(&root, 43, false);
        fs::write(root.join("uptime"), format!("{}.0 1.0\n", 43 / ticks + YOUNG_SECONDS + 1)).unwrap();
        loadavg(82, 995);
        assert!(scan(&root, &mut cache)[0].listen.is_empty());
        scan(&root, &mut cache);
        assert!(cache.last_listed(), "still waiting for its port");

        // And every FULL_SCAN_EVERY-th scan lists, whatever the counters say.
        fake_proc(&root, 43, true);
        assert_eq!(scan(&root, &mut cache)[0].listen.len(), 1);
        let mut quiet = 0;
        loop {
            scan(&root, &mut cache);
            if cache.last_listed() {
                break;
            }
            quiet += 1;
        }
        assert!(quiet > 0 && quiet < FULL_SCAN_EVERY as usize, "{quiet} scans without listing");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn scans_this_machine_without_failing() {
        // No vLLM is expected here; the scan must simply work on a real /proc.
        let found = scan(Path::new("/proc"), &mut ScanCache::default());
        for i in &found {
            assert!(i.processes.iter().any(|p| p.role == Role::ApiServer));
        }
    }
}
