//! Finding vLLM on this node, as a chain of small stages run every `--discovery-interval`:
//! [`scan`] /proc (reading as little as it can) → [`classify`] each process's role → [`group`]
//! processes into instances → [`limit`] them to the most credible → [`attach`] the kernel's watch maps to their API servers →
//! [`describe`] each instance (`/version`, `/v1/models`) → hand the instances to the aggregator
//! and their `/metrics` to the scraper.

pub(crate) mod attach;
pub mod classify;
pub(crate) mod describe;
pub(crate) mod group;
pub(crate) mod limit;
pub(crate) mod scan;

use std::{path::Path, time::Duration};

use tokio::sync::{mpsc, oneshot, watch};

use self::{
    attach::{Attacher, ProcessTable, WatchMap},
    describe::Descriptions,
};
use crate::{
    collect::procfs::{self, net::netstat_value},
    model::{
        instance::{Instance, InstanceView, Role},
        scrape::{ScrapeTarget, Target},
    },
};

/// What discovery tells the aggregator.
#[derive(Debug, PartialEq)]
pub(crate) enum DiscoveryReport {
    /// A process is now watched by the kernel programs.
    Watched { tgid: u32, comm: String },
    /// A process is no longer watched (it exited or is no longer a vLLM API server).
    Unwatched { tgid: u32 },
    /// The vLLM instances found by the latest scan.
    Instances(Vec<InstanceView>),
    /// The instances named by `--vllm-url` (scraped, never discovered nor forgotten).
    Explicit(Vec<String>),
    /// Candidates left out by the latest scan because of the caps: instances beyond
    /// [`limit::MAX_INSTANCES`], API-server processes beyond [`attach::MAX_WATCHED`].
    LeftOut { instances: usize, processes: usize },
}

pub(crate) struct DiscoveryConfig {
    /// Whether to look for vLLM at all (`--no-discovery` leaves only `--pid` and `--vllm-url`).
    pub enabled: bool,
    pub interval: Duration,
    pub explicit_pids: Vec<u32>,
    pub explicit_urls: Vec<ScrapeTarget>,
}

/// The host's /proc.
struct HostProcs;

impl ProcessTable for HostProcs {
    fn start_time(&self, pid: u32) -> Option<u64> {
        procfs::start_time(pid)
    }
    fn comm(&self, pid: u32) -> Option<String> {
        procfs::comm(pid).ok()
    }
    fn listening_ports(&self, pid: u32) -> Vec<u16> {
        let addresses = procfs::net::listening_addresses_of(&Path::new("/proc").join(pid.to_string()));
        addresses.iter().map(|a| a.port()).collect()
    }
}

/// The discovery loop. Owns the kernel's watch maps; `first_scan_done` fires once the first
/// scan has set them up.
pub(crate) async fn run<M: From<DiscoveryReport> + Send + 'static>(
    mut map: impl WatchMap,
    config: DiscoveryConfig,
    tx: mpsc::Sender<M>,
    targets: watch::Sender<Vec<ScrapeTarget>>,
    first_scan_done: oneshot::Sender<()>,
) {
    let mut attacher = Attacher::new(&config.explicit_pids);
    let mut descriptions = Descriptions::default();
    let mut first_scan_done = Some(first_scan_done);
    let mut scan_cache = scan::ScanCache::default();
    let mut verifier = limit::Verifier::default();
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let explicit = config.explicit_urls.iter().map(|t| t.id.clone()).collect();
    let _ = tx.send(DiscoveryReport::Explicit(explicit).into()).await;
    loop {
        tick.tick().await;
        let (instances, left_out) = if config.enabled {
            let (mut cache, mut checks) = (std::mem::take(&mut scan_cache), std::mem::take(&mut verifier));
            let scanned = tokio::task::spawn_blocking(move || {
                let proc = Path::new("/proc");
                let mut instances = scan::scan(proc, &mut cache);
                let left_out = limit::rank_and_cap(
                    &mut instances,
                    |pid| procfs::start_time(pid).is_some_and(|started| checks.verified(proc, pid, started)),
                    procfs::start_time,
                );
                checks.keep_only(|pid, started| procfs::start_time(pid) == Some(started));
                (instances, left_out, cache, checks)
            })
            .await;
            match scanned {
                Ok((instances, left_out, cache, checks)) => {
                    (scan_cache, verifier) = (cache, checks);
                    (instances, left_out)
                }
                Err(_) => (Vec::new(), 0),
            }
        } else {
            (Vec::new(), 0)
        };
        let (reports, processes_left_out) = attacher.reconcile(&mut map, &HostProcs, &instances);
        for report in reports {
            let _ = tx.send(report.into()).await;
        }
        let left_out = DiscoveryReport::LeftOut { instances: left_out, processes: processes_left_out };
        let _ = tx.send(left_out.into()).await;
        // Ready once the watch maps are set up; describing (network) comes after.
        if let Some(done) = first_scan_done.take() {
            let _ = done.send(());
        }
        let described = descriptions.of(&instances).await;
        let views: Vec<InstanceView> =
            instances.into_iter().zip(described).map(|(i, d)| view(i, d)).collect();
        let mut scrape: Vec<ScrapeTarget> = views.iter().filter_map(scrape_target).collect();
        scrape.extend(config.explicit_urls.iter().cloned());
        targets.send_if_modified(|t| {
            let changed = *t != scrape;
            *t = scrape;
            changed
        });
        let _ = tx.send(DiscoveryReport::Instances(views).into()).await;
    }
}

/// An instance with its description and its network namespace's accept-queue overflows.
fn view(instance: Instance, (version, mut models): describe::Description) -> InstanceView {
    if models.is_empty() {
        models = instance.cmdline_models.clone();
    }
    let listen_overflows = instance.pids(Role::ApiServer).next().and_then(|pid| {
        netstat_value(
            &std::fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?,
            "TcpExt",
            "ListenOverflows",
        )
    });
    InstanceView { id: instance.id(), instance, version, models, listen_overflows }
}

/// Where to scrape an instance's `/metrics`: its first listening address, from inside its API
/// server's network namespace.
fn scrape_target(v: &InstanceView) -> Option<ScrapeTarget> {
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
}
