//! Finding vLLM on this node from /proc alone: API servers, engine cores and workers, grouped
//! into instances by process tree, with their listening ports, models and containers.
//!
//! The parsing is pure (tested on text); [`scan`] does the reading. The agent runs in the host
//! PID namespace, so containers' processes are seen too; ports are read from each process's
//! own network namespace (`/proc/PID/net/tcp`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ApiServer,
    EngineCore,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ApiServer => "api_server",
            Role::EngineCore => "engine_core",
            Role::Worker => "worker",
        }
    }

    pub const ALL: [Role; 3] = [Role::ApiServer, Role::EngineCore, Role::Worker];

    /// Its index in the kernel's scheduler statistics.
    pub fn sched_index(self) -> u8 {
        match self {
            Role::ApiServer => inferwatch_common::ROLE_API_SERVER,
            Role::EngineCore => inferwatch_common::ROLE_ENGINE_CORE,
            Role::Worker => inferwatch_common::ROLE_WORKER,
        }
    }
}

/// The arguments of a /proc cmdline. A process that retitled itself (setproctitle) shows one
/// space-separated string instead of NUL-separated arguments.
fn arguments(cmdline: &[u8]) -> Vec<String> {
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    match args.as_slice() {
        [title] if title.contains(' ') => title.split_whitespace().map(str::to_string).collect(),
        _ => args,
    }
}

/// The role of a process from its command line (NUL-separated, as in /proc) and comm.
/// vLLM retitles its processes (`VLLM::EngineCore`, …), which rewrites both.
pub fn classify(cmdline: &[u8], comm: &str) -> Option<Role> {
    let args = arguments(cmdline);
    let first = args.first().map(String::as_str).unwrap_or("");
    let titled =
        |prefix: &str| first.starts_with(prefix) || comm.starts_with(&prefix[..prefix.len().min(15)]);
    if titled("VLLM::EngineCore") {
        return Some(Role::EngineCore);
    }
    if titled("VLLM::Worker") {
        return Some(Role::Worker);
    }
    if titled("VLLM::APIServer") {
        return Some(Role::ApiServer);
    }
    let is_python = first.rsplit('/').next().is_some_and(|b| b.starts_with("python"));
    let module = args.windows(2).any(|w| w[0] == "-m" && w[1] == "vllm.entrypoints.openai.api_server");
    // `vllm serve …` (the console script, run directly or through python).
    let serve = args.windows(2).any(|w| w[0].rsplit('/').next() == Some("vllm") && w[1] == "serve");
    let serve_script =
        first.rsplit('/').next() == Some("vllm") && args.get(1).map(String::as_str) == Some("serve");
    if (is_python && (module || serve)) || serve_script {
        return Some(Role::ApiServer);
    }
    None
}

/// `--served-model-name` (all its values), else `--model`, else the positional model of
/// `vllm serve MODEL`.
pub fn models_from_cmdline(cmdline: &[u8]) -> Vec<String> {
    let args = arguments(cmdline);
    let values_of = |flag: &str| -> Vec<String> {
        let mut out = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                out.push(v.to_string());
            } else if a == flag {
                out.extend(args[i + 1..].iter().take_while(|v| !v.starts_with("--")).cloned());
            }
        }
        out
    };
    let served = values_of("--served-model-name");
    if !served.is_empty() {
        return served;
    }
    if let Some(m) = values_of("--model").into_iter().next() {
        return vec![m];
    }
    args.iter()
        .position(|a| a == "serve")
        .and_then(|i| args.get(i + 1))
        .filter(|m| !m.starts_with('-'))
        .map(|m| vec![m.clone()])
        .unwrap_or_default()
}

/// Command-line arguments with secrets hidden.
pub fn redacted_flags(cmdline: &[u8]) -> Vec<String> {
    let args = arguments(cmdline);
    let secret = |a: &str| {
        let a = a.to_ascii_lowercase();
        a.starts_with("--") && ["key", "token", "secret", "password"].iter().any(|w| a.contains(w))
    };
    let mut out = Vec::new();
    let mut hide_next = false;
    for a in args {
        if hide_next && !a.starts_with("--") {
            out.push("***".to_string());
        } else if let Some((flag, _)) = a.split_once('=').filter(|(f, _)| secret(f)) {
            out.push(format!("{flag}=***"));
        } else {
            out.push(a.clone());
        }
        hide_next = secret(&a) && !a.contains('=');
    }
    out
}

/// The value of `--flag V` or `--flag=V` among redacted flags (the last one, as argparse takes).
pub fn flag_value(flags: &[String], flag: &str) -> Option<String> {
    flags.iter().enumerate().rev().find_map(|(i, a)| {
        a.strip_prefix(&format!("{flag}=")).map(str::to_string).or_else(|| {
            (a == flag).then(|| flags.get(i + 1).filter(|v| !v.starts_with("--")).cloned()).flatten()
        })
    })
}

/// Parent pid from `/proc/PID/stat` (the command name may contain spaces and parentheses).
pub fn ppid_from_stat(stat: &str) -> Option<u32> {
    crate::procfs::stat_fields(stat)?.nth(1)?.parse().ok()
}

/// Listening TCP sockets by inode, from `/proc/PID/net/tcp` or `tcp6`: the address to reach
/// each at (a wildcard address becomes loopback).
pub fn listening_ports(net_tcp: &str) -> HashMap<u64, SocketAddr> {
    net_tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (ip_hex, port_hex) = f.get(1)?.rsplit_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            let ip = parse_proc_ip(ip_hex)?;
            let ip = if ip.is_unspecified() {
                match ip {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                }
            } else {
                ip
            };
            let inode = f.get(9)?.parse().ok()?;
            Some((inode, SocketAddr::new(ip, port)))
        })
        .collect()
}

/// An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian) order.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()).collect();
    match words?.as_slice() {
        [w] => Some(IpAddr::V4(Ipv4Addr::from(w.swap_bytes()))),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// A counter of `/proc/net/netstat` (pairs of header and value lines, e.g. `TcpExt:`).
pub fn netstat_value(netstat: &str, section: &str, field: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = netstat.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Container id and Kubernetes pod uid from `/proc/PID/cgroup`, where the path shows them
/// (cgroupfs and systemd drivers; docker, containerd, CRI-O).
pub fn container_from_cgroup(cgroup: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for part in path.split('/') {
            let part = part.trim_end_matches(".scope").trim_end_matches(".slice");
            if let Some(uid) = part.rsplit_once("-pod").map(|(_, u)| u).or_else(|| part.strip_prefix("pod")) {
                let uid = uid.replace('_', "-");
                if uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                    pod = Some(uid);
                }
            }
            let id = part.rsplit(['-', ':']).next().unwrap_or(part);
            if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                container = Some(id.to_string());
            }
        }
    }
    (container, pod)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub role: Role,
    pub comm: String,
}

/// One vLLM deployment: the process tree under its first API server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// The root process (the first API server, or the launcher of several).
    pub root_pid: u32,
    pub processes: Vec<Process>,
    /// Addresses the API servers listen on (wildcards as loopback), in their network namespace.
    pub listen: Vec<SocketAddr>,
    /// From the command line (`/v1/models` is asked later, when the server answers).
    pub cmdline_models: Vec<String>,
    /// The API server's command-line arguments, with the values of secret-looking flags
    /// (`--api-key`, `*token*`, `*secret*`, `*password*`) replaced by `***`.
    pub flags: Vec<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

impl Instance {
    pub fn pids(&self, role: Role) -> impl Iterator<Item = u32> + '_ {
        self.processes.iter().filter(move |p| p.role == role).map(|p| p.pid)
    }

    /// A stable, readable identity: the API port and where it runs.
    pub fn id(&self) -> String {
        let port =
            self.listen.first().map_or_else(|| format!("pid{}", self.root_pid), |a| a.port().to_string());
        match &self.container_id {
            Some(c) => format!("{}:{port}", &c[..12.min(c.len())]),
            None => format!("localhost:{port}"),
        }
    }
}

/// Groups vLLM processes into instances: each belongs to its topmost vLLM ancestor.
pub fn group(processes: &[Process], all_ppids: &HashMap<u32, u32>) -> Vec<(u32, Vec<Process>)> {
    let vllm: BTreeMap<u32, &Process> = processes.iter().map(|p| (p.pid, p)).collect();
    let mut instances: BTreeMap<u32, Vec<Process>> = BTreeMap::new();
    for p in processes {
        let mut root = p.pid;
        let mut cursor = p.pid;
        let mut hops = 0;
        while let Some(&parent) = all_ppids.get(&cursor) {
            if parent <= 1 || hops > 64 {
                break;
            }
            if vllm.contains_key(&parent) {
                root = parent;
            }
            cursor = parent;
            hops += 1;
        }
        instances.entry(root).or_default().push(p.clone());
    }
    instances.into_iter().filter(|(_, ps)| ps.iter().any(|p| p.role == Role::ApiServer)).collect()
}

/// The API servers' listening addresses, by pid and start time. Finding them walks the
/// kernel's whole TCP table (`/proc/PID/net/tcp` lists every bucket of the established hash, in
/// every namespace): a third of the idle agent's CPU when it was done on every scan, and more on
/// large nodes. A server's port does not change once it listens, so a found address is kept
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

/// The command name between the parentheses of a `/proc/PID/stat` line (what `comm` holds).
pub fn comm_from_stat(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// What discovery keeps between scans: what it learnt of each process, and the API servers'
/// listening addresses.
///
/// Reading every process's `stat` and `cmdline` on every scan was, after the TCP tables, the
/// agent's largest idle cost (an open and a read per file, per process, every 2 s: ~20% of the
/// agent's CPU next to a loaded vLLM on a 70-process VM, and it grows with the node's process
/// count). A process is now recognised from its /proc directory entry (pid and inode: the
/// kernel gives a new process a new inode, even under a reused pid) and read again only while
/// it is young (started less than `YOUNG_SECONDS` ago), when processes rename themselves (vLLM
/// retitles its children after they start), and on every `FULL_SCAN_EVERY`-th scan, which
/// bounds how late any other change (a late `exec` into vLLM, a parent that exited) is seen.
/// And when no task started or ended since the last scan, /proc is not even listed.
#[derive(Debug, Default)]
pub struct ScanCache {
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

impl ScanCache {
    /// Processes whose /proc files the last scan read.
    pub fn last_reads(&self) -> usize {
        self.last_reads
    }

    /// Whether the last scan listed /proc.
    pub fn last_listed(&self) -> bool {
        self.last_listed
    }

    /// Processes known.
    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }
}

/// Reads `stat` and `cmdline` of the process in `dir`.
fn read_process(dir: &Path, inode: u64) -> Option<Seen> {
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let (ppid, comm) = (ppid_from_stat(&stat)?, comm_from_stat(&stat)?);
    let cmdline = fs::read(dir.join("cmdline")).unwrap_or_default();
    let vllm = classify(&cmdline, comm).map(|role| (role, comm.to_string(), cmdline));
    let started = crate::procfs::parse_start_time(&stat).unwrap_or(0);
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
pub fn scan(root: &Path, cache: &mut ScanCache) -> Vec<Instance> {
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
            }
        })
        .collect()
}

/// TCP addresses a process listens on: its socket inodes matched in its own network namespace.
fn listening_addresses_of(proc_dir: &Path) -> BTreeSet<SocketAddr> {
    let mut listening = HashMap::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = fs::read_to_string(proc_dir.join(table)) {
            listening.extend(listening_ports(&text));
        }
    }
    let Ok(fds) = fs::read_dir(proc_dir.join("fd")) else { return BTreeSet::new() };
    fds.flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            let inode = target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok()?;
            listening.get(&inode).copied()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo xtask fuzz` (procfs): a secret flag with no value is followed by
    /// another flag, which is not its value.
    #[test]
    fn a_valueless_flag_does_not_take_the_next_flag_as_its_value() {
        let cmdline = b"pym\0--appythmodel\0\0/m\0--api-key\0\0--appythmodel\0se;i-key\0secret\0";
        let flags = redacted_flags(cmdline);
        assert_eq!(flag_value(&flags, "--api-key"), None, "{flags:?}");
        assert_eq!(flag_value(&["--port".into(), "8000".into()], "--port").as_deref(), Some("8000"));
        assert_eq!(flag_value(&["--api-key".into(), "***".into()], "--api-key").as_deref(), Some("***"));
    }

    fn nul(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    #[test]
    fn recognises_vllm_processes() {
        use Role::*;
        let cases: &[(&[&str], &str, Option<Role>)] = &[
            (
                &["venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"],
                "python",
                Some(ApiServer),
            ),
            (
                &["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "meta-llama/Llama-3.1-8B"],
                "python3",
                Some(ApiServer),
            ),
            (&["/usr/local/bin/vllm", "serve", "m"], "vllm", Some(ApiServer)),
            (&["VLLM::APIServer_1"], "VLLM::APIServer", Some(ApiServer)),
            // The launcher of several API servers, retitled by setproctitle.
            (&["vllm serve /models/tiny --api-server-count 2"], "vllm serve /mod", Some(ApiServer)),
            (&["VLLM::EngineCore"], "VLLM::EngineCor", Some(EngineCore)),
            (&["VLLM::EngineCore_DP0"], "VLLM::EngineCor", Some(EngineCore)),
            (&["VLLM::Worker_TP1"], "VLLM::Worker_TP", Some(Worker)),
            (&["python", "-m", "uvicorn", "app:app"], "python", None),
            (&["grep", "vllm serve"], "grep", None),
            (
                &["/usr/bin/python3", "-c", "from multiprocessing.resource_tracker import main"],
                "python3",
                None,
            ),
        ];
        for (args, comm, want) in cases {
            assert_eq!(classify(&nul(args), comm), *want, "{args:?}");
        }
    }

    #[test]
    fn models_from_command_lines() {
        assert_eq!(
            models_from_cmdline(&nul(&[
                "python",
                "-m",
                "x",
                "--model",
                "/srv/m",
                "--served-model-name",
                "tiny",
                "t2",
                "--port",
                "1"
            ])),
            ["tiny", "t2"]
        );
        assert_eq!(models_from_cmdline(&nul(&["python", "-m", "x", "--model=/srv/m"])), ["/srv/m"]);
        assert_eq!(
            models_from_cmdline(&nul(&["vllm", "serve", "Qwen/Qwen3-8B", "--port", "8000"])),
            ["Qwen/Qwen3-8B"]
        );
        assert!(models_from_cmdline(&nul(&["vllm", "serve", "--help"])).is_empty());
        assert_eq!(models_from_cmdline(b"vllm serve /m/tiny --served-model-name tiny --port 1"), ["tiny"]);
    }

    #[test]
    fn flags_hide_secrets() {
        let flags = redacted_flags(&nul(&[
            "vllm",
            "serve",
            "m",
            "--api-key",
            "sk-123",
            "--max-num-seqs",
            "8",
            "--hf-token=abc",
        ]));
        assert_eq!(
            flags,
            ["vllm", "serve", "m", "--api-key", "***", "--max-num-seqs", "8", "--hf-token=***"]
        );
        assert_eq!(flag_value(&flags, "--max-num-seqs").as_deref(), Some("8"));
        assert_eq!(flag_value(&["--max-num-seqs=4".to_string()], "--max-num-seqs").as_deref(), Some("4"));
        assert_eq!(flag_value(&flags, "--port"), None);
        let twice: Vec<String> = ["--max-num-seqs", "16", "--max-num-seqs", "2"].map(String::from).to_vec();
        assert_eq!(flag_value(&twice, "--max-num-seqs").as_deref(), Some("2"), "the last one wins");
    }

    #[test]
    fn parses_stat_and_net_tcp() {
        assert_eq!(ppid_from_stat("28305 (VLLM::Engine) Core) S 28276 28273 1091 0"), Some(28276));
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F4B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 45275 1 0 100 0 0 10 0\n\
   1: 0100007F:94E0 0100007F:1F4B 01 00000000:00000000 00:00000000 00000000     0        0 45999 1 0 20 4 30 10 -1\n";
        assert_eq!(listening_ports(tcp), HashMap::from([(45275, "127.0.0.1:8011".parse().unwrap())]));
        let any = "h\n 0: 00000000:1F40 00000000:0000 0A 0:0 0:0 0 0 0 7 1\n";
        assert_eq!(listening_ports(any), HashMap::from([(7, "127.0.0.1:8000".parse().unwrap())]));
        let v6 = "h\n 0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 8 1\n\
 1: 0000000000000000FFFF00000100007F:1F41 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 9 1\n";
        let ports = listening_ports(v6);
        assert_eq!(ports[&8], "[::1]:8000".parse().unwrap());
        assert_eq!(ports[&9], "[::ffff:127.0.0.1]:8001".parse().unwrap());
    }

    #[test]
    fn netstat_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 18\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(netstat_value(text, "TcpExt", "ListenOverflows"), Some(17));
        assert_eq!(netstat_value(text, "IpExt", "InNoRoutes"), Some(3));
        assert_eq!(netstat_value(text, "TcpExt", "Nope"), None);
        let own = std::fs::read_to_string("/proc/self/net/netstat").unwrap();
        assert!(netstat_value(&own, "TcpExt", "ListenOverflows").is_some());
    }

    #[test]
    fn containers_and_pods_from_cgroups() {
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2f0c6bd1_5b1e_4c4e_9a4f_1b0a6e0f7c11.slice/cri-containerd-9f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c.scope\n";
        assert_eq!(
            container_from_cgroup(systemd),
            (
                Some("9f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c".into()),
                Some("2f0c6bd1-5b1e-4c4e-9a4f-1b0a6e0f7c11".into())
            )
        );
        let cgroupfs = "12:memory:/kubepods/besteffort/pod0a1b2c3d-0000-1111-2222-333344445555/4c4b3a29180d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f\n";
        let (c, p) = container_from_cgroup(cgroupfs);
        assert_eq!(p.as_deref(), Some("0a1b2c3d-0000-1111-2222-333344445555"));
        assert_eq!(c.as_deref(), Some("4c4b3a29180d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"));
        let docker = "0::/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n";
        assert_eq!(
            container_from_cgroup(docker).0.as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert_eq!(
            container_from_cgroup("4:memory:/process_api/af73461c10a3d7fd569d48561f63d2d3\n0::/\n"),
            (None, None)
        );
    }

    #[test]
    fn groups_by_process_tree() {
        let p = |pid, ppid, role| Process { pid, ppid, role, comm: String::new() };
        // One instance with two API servers under a launcher; a second, separate instance.
        let procs = vec![
            p(100, 50, Role::ApiServer),
            p(101, 100, Role::ApiServer),
            p(102, 100, Role::ApiServer),
            p(103, 100, Role::EngineCore),
            p(104, 103, Role::Worker),
            p(200, 1, Role::ApiServer),
            p(201, 200, Role::EngineCore),
            p(300, 1, Role::EngineCore), // an orphaned engine: no API server, not an instance
        ];
        let ppids: HashMap<u32, u32> = procs.iter().map(|p| (p.pid, p.ppid)).chain([(50, 1)]).collect();
        let groups = group(&procs, &ppids);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, 100);
        assert_eq!(groups[0].1.len(), 5);
        assert_eq!(groups[1].0, 200);
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
    fn the_command_name_comes_from_stat() {
        assert_eq!(comm_from_stat("7 (VLLM::EngineCor) S 1 7"), Some("VLLM::EngineCor"));
        assert_eq!(comm_from_stat("8 (a) b) (c) R 1 8"), Some("a) b) (c"));
        assert_eq!(comm_from_stat("garbage"), None);
        assert_eq!(comm_from_stat(") 1 ("), None);
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
