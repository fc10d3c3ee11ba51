//! The attach stage: the kernel's watch maps kept in step with what discovery found (and the
//! `--pid` overrides). Pure bookkeeping over a [`WatchMap`], so it is tested without a kernel.

use std::collections::{BTreeMap, HashMap};

use super::DiscoveryReport;
use crate::model::instance::{Instance, Role};

/// The kernel maps that say which processes are watched and measured (see `kernel::probes`).
/// Processes watched at most, well under the kernel map's size so that adding one never fails
/// for lack of room.
pub(crate) const MAX_WATCHED: usize = 1024;
const _: () = assert!(MAX_WATCHED < inferwatch_common::maps::MAX_WATCHED_TGIDS as usize);

pub(crate) trait WatchMap {
    type Error: std::fmt::Display;
    fn watch(&mut self, tgid: u32) -> Result<(), Self::Error>;
    fn unwatch(&mut self, tgid: u32) -> Result<(), Self::Error>;
    /// Measures a process's scheduling under `role`, or stops.
    fn set_sched_role(&mut self, tgid: u32, role: Option<Role>) -> Result<(), Self::Error>;
    /// Tracks the connections accepted on a TCP port from their establishment (for `tgid`),
    /// or stops.
    fn set_listen_port(&mut self, port: u16, tgid: Option<u32>) -> Result<(), Self::Error>;
}

/// Ports followed at most (the kernel map's size).
const MAX_LISTEN_PORTS: usize = inferwatch_common::maps::MAX_LISTEN_PORTS as usize;

/// How a process is identified across scans: a pid and its start time (a reused pid has
/// another), and its command name.
pub(crate) trait ProcessTable {
    fn start_time(&self, pid: u32) -> Option<u64>;
    fn comm(&self, pid: u32) -> Option<String>;
    /// The TCP ports a process listens on (read for `--pid` processes; discovered instances
    /// come with theirs).
    fn listening_ports(&self, pid: u32) -> Vec<u16>;
}

/// What is attached, and what was asked for.
pub(crate) struct Attacher {
    /// Watched processes by pid, with their start time: a pid that now names another process
    /// (reuse) is unwatched and, if still wanted, watched again as a new process.
    watched: BTreeMap<u32, u64>,
    /// `--pid` values name the process running when the agent started, not their pid's later
    /// owners.
    explicit: HashMap<u32, Option<u64>>,
    roles: HashMap<u32, Role>,
    /// Listening ports in the kernel's map, with the watched process they belong to.
    ports: BTreeMap<u16, u32>,
    /// The ports of each `--pid` process (with its start time), once it listens.
    explicit_ports: HashMap<u32, (u64, Vec<u16>)>,
}

impl Attacher {
    pub(crate) fn new(explicit_pids: &[u32]) -> Self {
        Self {
            watched: BTreeMap::new(),
            explicit: explicit_pids.iter().map(|&p| (p, None)).collect(),
            roles: HashMap::new(),
            ports: BTreeMap::new(),
            explicit_ports: HashMap::new(),
        }
    }

    /// Brings the maps in step with `instances`; returns what changed, for the aggregator.
    /// Brings the watch maps to the API servers of `instances` (and `--pid`s); returns what
    /// changed and how many API servers were left out by [`MAX_WATCHED`].
    pub(crate) fn reconcile(
        &mut self,
        map: &mut impl WatchMap,
        procs: &impl ProcessTable,
        instances: &[Instance],
    ) -> (Vec<DiscoveryReport>, usize) {
        let mut reports = Vec::new();
        let mut desired: BTreeMap<u32, u64> = BTreeMap::new();
        self.explicit.retain(|&pid, started| match (procs.start_time(pid), *started) {
            (Some(now), None) => {
                *started = Some(now);
                desired.insert(pid, now);
                true
            }
            (Some(now), Some(then)) if now == then => {
                desired.insert(pid, now);
                true
            }
            _ => {
                tracing::info!(pid, "--pid {pid} exited: no longer watched (its pid may be reused)");
                false
            }
        });
        // Instances come ranked (most credible first): the cap leaves out the last ones.
        let mut left_out = 0;
        for pid in instances.iter().flat_map(|i| i.pids(Role::ApiServer)) {
            if desired.len() >= MAX_WATCHED {
                left_out += 1;
            } else if let Some(started) = procs.start_time(pid) {
                desired.insert(pid, started);
            }
        }
        let stale: Vec<u32> = self
            .watched
            .iter()
            .filter(|(pid, started)| desired.get(pid) != Some(started))
            .map(|(p, _)| *p)
            .collect();
        for pid in stale {
            if let Err(e) = map.unwatch(pid) {
                tracing::debug!("unwatching {pid}: {e}");
            }
            tracing::info!(pid, "process gone or no longer vLLM: unwatched");
            self.watched.remove(&pid);
            reports.push(DiscoveryReport::Unwatched { tgid: pid });
        }
        for (&pid, &started) in &desired {
            if self.watched.contains_key(&pid) {
                continue;
            }
            let Some(comm) = procs.comm(pid) else {
                tracing::warn!("cannot watch {pid}: process {pid} is not running");
                continue;
            };
            match map.watch(pid) {
                Ok(()) => {
                    tracing::info!(pid, comm, "watching");
                    self.watched.insert(pid, started);
                    reports.push(DiscoveryReport::Watched { tgid: pid, comm });
                }
                Err(e) => tracing::warn!("cannot watch {pid}: adding process {pid} to the watch map: {e}"),
            }
        }

        self.follow_listen_ports(map, procs, instances);

        // Scheduler statistics follow every vLLM process, whatever its role.
        let desired_roles: HashMap<u32, Role> =
            instances.iter().flat_map(|i| i.processes.iter().map(|p| (p.pid, p.role))).collect();
        for (&pid, &role) in &desired_roles {
            if self.roles.get(&pid) != Some(&role) {
                match map.set_sched_role(pid, Some(role)) {
                    Ok(()) => {
                        self.roles.insert(pid, role);
                    }
                    Err(e) => tracing::warn!("updating the scheduler role of {pid}: {e}"),
                }
            }
        }
        let gone: Vec<u32> = self.roles.keys().filter(|p| !desired_roles.contains_key(p)).copied().collect();
        for pid in gone {
            let _ = map.set_sched_role(pid, None);
            self.roles.remove(&pid);
        }
        (reports, left_out)
    }

    /// The ports watched processes listen on, so that their connections are tracked from the
    /// handshake: a request that waits in the accept queue is timed from its arrival. Keyed by
    /// port alone (the kernel side reads no namespace): a port shared across network namespaces
    /// tracks the other namespaces' connections too, until they close, at no other cost.
    fn follow_listen_ports(
        &mut self,
        map: &mut impl WatchMap,
        procs: &impl ProcessTable,
        instances: &[Instance],
    ) {
        let mut desired: BTreeMap<u16, u32> = BTreeMap::new();
        for instance in instances {
            let Some(pid) = instance.pids(Role::ApiServer).find(|p| self.watched.contains_key(p)) else {
                continue;
            };
            for addr in &instance.listen {
                desired.entry(addr.port()).or_insert(pid);
            }
        }
        // A `--pid` process's ports, read until it listens, then kept while it lives (a server's
        // port does not change; reading /proc/PID/net/tcp is costly with many connections).
        self.explicit_ports.retain(|pid, (started, _)| self.watched.get(pid) == Some(started));
        for (&pid, &started) in self.watched.iter().filter(|(p, _)| self.explicit.contains_key(p)) {
            let known = self.explicit_ports.entry(pid).or_insert((started, Vec::new()));
            if known.1.is_empty() {
                known.1 = procs.listening_ports(pid);
            }
            for &port in &known.1 {
                desired.entry(port).or_insert(pid);
            }
        }
        let stale: Vec<u16> = self.ports.keys().filter(|p| !desired.contains_key(p)).copied().collect();
        for port in stale {
            let _ = map.set_listen_port(port, None);
            self.ports.remove(&port);
        }
        for (port, pid) in desired {
            if self.ports.get(&port) == Some(&pid)
                || (self.ports.len() >= MAX_LISTEN_PORTS && !self.ports.contains_key(&port))
            {
                continue;
            }
            match map.set_listen_port(port, Some(pid)) {
                Ok(()) => {
                    self.ports.insert(port, pid);
                }
                Err(e) => tracing::warn!("following port {port} of {pid}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::instance::Process;

    #[derive(Default)]
    struct FakeMap {
        watched: Vec<u32>,
        roles: HashMap<u32, Role>,
        ports: BTreeMap<u16, u32>,
    }

    impl WatchMap for FakeMap {
        type Error = &'static str;
        fn watch(&mut self, tgid: u32) -> Result<(), Self::Error> {
            self.watched.push(tgid);
            Ok(())
        }
        fn unwatch(&mut self, tgid: u32) -> Result<(), Self::Error> {
            self.watched.retain(|p| *p != tgid);
            Ok(())
        }
        fn set_sched_role(&mut self, tgid: u32, role: Option<Role>) -> Result<(), Self::Error> {
            match role {
                Some(r) => self.roles.insert(tgid, r),
                None => self.roles.remove(&tgid),
            };
            Ok(())
        }
        fn set_listen_port(&mut self, port: u16, tgid: Option<u32>) -> Result<(), Self::Error> {
            match tgid {
                Some(t) => self.ports.insert(port, t),
                None => self.ports.remove(&port),
            };
            Ok(())
        }
    }

    /// pid → start time.
    struct Procs(HashMap<u32, u64>);

    impl ProcessTable for Procs {
        fn start_time(&self, pid: u32) -> Option<u64> {
            self.0.get(&pid).copied()
        }
        fn comm(&self, pid: u32) -> Option<String> {
            self.0.contains_key(&pid).then(|| format!("p{pid}"))
        }
        fn listening_ports(&self, pid: u32) -> Vec<u16> {
            if self.0.contains_key(&pid) { vec![9000 + pid as u16] } else { vec![] }
        }
    }

    fn instance(api: u32, engine: u32) -> Instance {
        let p = |pid, role| Process { pid, ppid: 1, role, comm: String::new() };
        Instance {
            root_pid: api,
            processes: vec![p(api, Role::ApiServer), p(engine, Role::EngineCore)],
            listen: vec![],
            cmdline_models: vec![],
            flags: vec![],
            container_id: None,
            pod_uid: None,
            verified: false,
        }
    }

    #[test]
    fn the_listening_ports_of_watched_processes_are_followed() {
        let mut map = FakeMap::default();
        let mut attacher = Attacher::new(&[42]);
        let procs = Procs(HashMap::from([(10, 100), (11, 101), (42, 1)]));
        let mut vllm = instance(10, 11);
        vllm.listen = vec!["0.0.0.0:8000".parse().unwrap(), "[::]:8000".parse().unwrap()];
        attacher.reconcile(&mut map, &procs, &[vllm.clone()]);
        // The instance's port, and the --pid process's own (9042 in this fake /proc).
        assert_eq!(map.ports, BTreeMap::from([(8000, 10), (9042, 42)]));
        attacher.reconcile(&mut map, &procs, &[]);
        assert_eq!(map.ports, BTreeMap::from([(9042, 42)]), "an instance gone takes its port along");
    }

    #[test]
    fn api_servers_are_watched_every_process_is_measured_and_reuse_is_noticed() {
        let mut map = FakeMap::default();
        let mut attacher = Attacher::new(&[]);
        let mut procs = Procs(HashMap::from([(10, 100), (11, 101)]));
        let reports = attacher.reconcile(&mut map, &procs, &[instance(10, 11)]).0;
        assert_eq!(reports, [DiscoveryReport::Watched { tgid: 10, comm: "p10".into() }]);
        assert_eq!(map.watched, [10]);
        assert_eq!(map.roles, HashMap::from([(10, Role::ApiServer), (11, Role::EngineCore)]));
        assert!(attacher.reconcile(&mut map, &procs, &[instance(10, 11)]).0.is_empty(), "nothing changed");

        // Pid 10 now names another process: unwatched, then watched afresh.
        procs.0.insert(10, 555);
        let reports = attacher.reconcile(&mut map, &procs, &[instance(10, 11)]).0;
        assert_eq!(
            reports,
            [
                DiscoveryReport::Unwatched { tgid: 10 },
                DiscoveryReport::Watched { tgid: 10, comm: "p10".into() }
            ]
        );
        // Gone: unwatched and no longer measured.
        let reports = attacher.reconcile(&mut map, &procs, &[]).0;
        assert_eq!(reports, [DiscoveryReport::Unwatched { tgid: 10 }]);
        assert!(map.watched.is_empty() && map.roles.is_empty());
    }

    #[test]
    fn an_explicit_pid_is_watched_until_it_exits_and_not_its_successor() {
        let mut map = FakeMap::default();
        let mut attacher = Attacher::new(&[42]);
        let mut procs = Procs(HashMap::from([(42, 7)]));
        attacher.reconcile(&mut map, &procs, &[]);
        assert_eq!(map.watched, [42]);
        procs.0.insert(42, 8); // exited, and its pid reused
        assert_eq!(attacher.reconcile(&mut map, &procs, &[]).0, [DiscoveryReport::Unwatched { tgid: 42 }]);
        assert!(attacher.reconcile(&mut map, &procs, &[]).0.is_empty(), "the new owner is not watched");
        assert!(map.watched.is_empty());
    }

    #[test]
    fn watched_processes_are_capped_keeping_the_first_ranked_and_explicit_pids() {
        let mut map = FakeMap::default();
        let mut attacher = Attacher::new(&[7]);
        let n = MAX_WATCHED as u32 + 100;
        let procs = Procs((0..n).map(|i| (1000 + 2 * i, 1)).chain([(7, 1)]).collect());
        let instances: Vec<Instance> = (0..n).map(|i| instance(1000 + 2 * i, 1001 + 2 * i)).collect();
        let (_, left_out) = attacher.reconcile(&mut map, &procs, &instances);
        assert_eq!(map.watched.len(), MAX_WATCHED);
        assert_eq!(left_out, 101, "100 over the cap, plus the room the explicit pid took");
        assert!(map.watched.contains(&7) && map.watched.contains(&1000));
        assert!(!map.watched.contains(&(1000 + 2 * (n - 1))), "the last ranked is left out");
    }
}
