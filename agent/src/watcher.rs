//! The discovery loop: finds vLLM instances, keeps the kernel's watch map in step with their
//! API servers (and the `--pid` overrides), describes each instance (`/version`,
//! `/v1/models`), and hands scrape targets to the scraper. It owns the probes' watch map.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::{
    discovery::{self, Instance, Role},
    events::AgentEvent,
    httpclient::{self, Target},
    probes::Probes,
    procfs,
    scraper::ScrapeTarget,
};

/// An instance as the agent describes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceView {
    pub id: String,
    #[serde(flatten)]
    pub instance: Instance,
    pub version: Option<String>,
    /// From `/v1/models` when it answered, else from the command line.
    pub models: Vec<String>,
    /// `ListenOverflows` of the instance's network namespace (/proc/PID/net/netstat).
    pub listen_overflows: Option<u64>,
}

/// An instance's root process and listening addresses: a restart changes it.
type InstanceKey = (u32, Vec<std::net::SocketAddr>);
/// `/version` and `/v1/models` of an instance.
type Description = (Option<String>, Vec<String>);

pub struct WatchConfig {
    pub discovery: bool,
    pub interval: Duration,
    pub explicit_pids: Vec<u32>,
    pub explicit_urls: Vec<ScrapeTarget>,
}

pub async fn run(
    mut probes: Probes,
    config: WatchConfig,
    tx: mpsc::Sender<AgentEvent>,
    targets: watch::Sender<Vec<ScrapeTarget>>,
    first_scan_done: tokio::sync::oneshot::Sender<()>,
) {
    // Watched processes by pid, with their start time: a pid that now names another process
    // (reuse) is unwatched and, if still wanted, watched again as a new process.
    let mut watched: BTreeMap<u32, u64> = BTreeMap::new();
    // `--pid` values name the process running when the agent started, not their pid's later owners.
    let mut explicit: HashMap<u32, Option<u64>> = config.explicit_pids.iter().map(|&p| (p, None)).collect();
    let mut roles: HashMap<u32, Role> = HashMap::new();
    let mut described: HashMap<InstanceKey, Description> = HashMap::new();
    let mut first_scan_done = Some(first_scan_done);
    let mut scan_cache = discovery::ScanCache::default();
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let instances = if config.discovery {
            let mut cache = std::mem::take(&mut scan_cache);
            let scanned = tokio::task::spawn_blocking(move || {
                let instances = discovery::scan(Path::new("/proc"), &mut cache);
                (instances, cache)
            })
            .await;
            match scanned {
                Ok((instances, cache)) => {
                    scan_cache = cache;
                    instances
                }
                Err(_) => Vec::new(),
            }
        } else {
            Vec::new()
        };
        let mut desired: BTreeMap<u32, u64> = BTreeMap::new();
        explicit.retain(|&pid, started| match (procfs::start_time(pid), *started) {
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
        for i in &instances {
            for pid in i.pids(Role::ApiServer) {
                if let Some(started) = procfs::start_time(pid) {
                    desired.insert(pid, started);
                }
            }
        }
        for (&pid, &started) in &watched.clone() {
            if desired.get(&pid) == Some(&started) {
                continue;
            }
            if let Err(e) = probes.unwatch(pid) {
                tracing::debug!("unwatching {pid}: {e:#}");
            }
            tracing::info!(pid, "process gone or no longer vLLM: unwatched");
            watched.remove(&pid);
            let _ = tx.send(AgentEvent::Unwatched { tgid: pid }).await;
        }
        for (&pid, &started) in &desired {
            if watched.contains_key(&pid) {
                continue;
            }
            match probes.watch(pid) {
                Ok(comm) => {
                    tracing::info!(pid, comm, "watching");
                    watched.insert(pid, started);
                    let _ = tx.send(AgentEvent::Watched { tgid: pid, comm }).await;
                }
                Err(e) => tracing::warn!("cannot watch {pid}: {e:#}"),
            }
        }

        // Scheduler statistics follow every vLLM process, whatever its role.
        let desired_roles: HashMap<u32, Role> =
            instances.iter().flat_map(|i| i.processes.iter().map(|p| (p.pid, p.role))).collect();
        for (&pid, &role) in &desired_roles {
            if roles.get(&pid) != Some(&role) {
                match probes.set_sched_role(pid, Some(role.sched_index())) {
                    Ok(()) => {
                        roles.insert(pid, role);
                    }
                    Err(e) => tracing::warn!("{e:#}"),
                }
            }
        }
        let gone: Vec<u32> = roles.keys().filter(|p| !desired_roles.contains_key(p)).copied().collect();
        for pid in gone {
            let _ = probes.set_sched_role(pid, None);
            roles.remove(&pid);
        }

        let mut views = Vec::new();
        described.retain(|k, _| instances.iter().any(|i| (i.root_pid, i.listen.clone()) == *k));
        for i in instances {
            let key = (i.root_pid, i.listen.clone());
            let entry = match described.get(&key) {
                Some(d) if d.0.is_some() => d.clone(),
                _ => {
                    let d = describe(&i).await;
                    described.insert(key, d.clone());
                    d
                }
            };
            let (version, mut models) = entry;
            if models.is_empty() {
                models = i.cmdline_models.clone();
            }
            let listen_overflows = i.pids(Role::ApiServer).next().and_then(|pid| {
                discovery::netstat_value(
                    &std::fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?,
                    "TcpExt",
                    "ListenOverflows",
                )
            });
            views.push(InstanceView { id: i.id(), instance: i, version, models, listen_overflows });
        }
        let mut scrape: Vec<ScrapeTarget> = views
            .iter()
            .filter_map(|v| {
                let addr = *v.instance.listen.first()?;
                let api = v.instance.pids(Role::ApiServer).next()?;
                let mut labels = vec![("vllm_instance".to_string(), v.id.clone())];
                if let Some(c) = &v.instance.container_id {
                    labels.push(("container_id".into(), c.clone()));
                }
                if let Some(p) = &v.instance.pod_uid {
                    labels.push(("pod_uid".into(), p.clone()));
                }
                Some(ScrapeTarget { id: v.id.clone(), target: Target { addr, netns_of: Some(api) }, labels })
            })
            .collect();
        scrape.extend(config.explicit_urls.iter().cloned());
        targets.send_if_modified(|t| {
            let changed = *t != scrape;
            *t = scrape;
            changed
        });
        let _ = tx.send(AgentEvent::Instances(views)).await;
        let _ = tx.send(AgentEvent::ProgramStats(probes.program_stats())).await;
        if let Some(done) = first_scan_done.take() {
            let _ = done.send(());
        }
    }
}

/// `/version` and `/v1/models` of an instance (empty when it does not answer yet).
pub async fn describe(i: &Instance) -> Description {
    let (Some(addr), Some(api)) = (i.listen.first().copied(), i.pids(Role::ApiServer).next()) else {
        return (None, Vec::new());
    };
    let target = Target { addr, netns_of: Some(api) };
    let timeout = Duration::from_secs(2);
    let version = httpclient::get(&target, "/version", timeout, 1 << 16)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    let models = httpclient::get(&target, "/v1/models", timeout, 1 << 20)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["data"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect())
        })
        .unwrap_or_default();
    (version, models)
}
