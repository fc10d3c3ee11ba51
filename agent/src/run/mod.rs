//! `inferwatch run`: check, bind, load the programs and drop privileges while single-threaded
//! ([`prepare`]), then wire the stages together and serve until SIGINT/SIGTERM ([`run`]):
//! kernel readers, discovery, scraper and GPU collector → one channel → the aggregator → the
//! HTTP server. Every long-running task is supervised: one that ends or panics is logged and
//! ends the agent with a failure, so the kubelet restarts it. Nothing else imports this module.

mod preflight;
mod privileges;
mod supervise;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot, watch},
};

use self::supervise::Supervisor;
use crate::{
    aggregator::{Aggregator, Input, Store, families::ProbeLabels},
    cli::RunArgs,
    collect::{
        discovery::{self, DiscoveryConfig, attach::WatchMap},
        fetch, netns, nvml, scrape,
    },
    export::{
        listener::{self, Limits},
        otlp::{self, OtlpConfig},
        server::{self, ApiAccess, AppState},
        stats::ServerStats,
        webconfig::{self, AuthState, WebConfig},
    },
    kernel::{
        self,
        probes::{Outputs, Programs, WatchMaps},
        ring,
    },
    model::{
        health::Heartbeat,
        instance::Role,
        scrape::{ScrapeTarget, Target},
    },
};

/// Messages buffered between the producers and the aggregator: kernel records arrive in
/// batches of up to `ring::BATCH`, so at most 16 Ki records (a few MiB) wait; beyond that
/// the aggregator is behind for good and records are dropped and counted.
const EVENT_QUEUE: usize = 64;

/// Everything done while the process is still privileged and single-threaded.
pub struct Prepared {
    args: RunArgs,
    listener: std::net::TcpListener,
    web: WebConfig,
    explicit_urls: Vec<ScrapeTarget>,
    programs: Programs,
    watch_maps: WatchMaps,
    outputs: Outputs,
    otlp: Option<OtlpConfig>,
}

/// Checks, binds, loads and attaches, starts the network-namespace helper, then drops the
/// capabilities no longer needed. Runs before the async runtime exists, because capabilities
/// are per thread and the helper is forked.
pub(crate) fn prepare(args: RunArgs) -> Result<Prepared> {
    preflight::check()?;
    let web = match &args.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig { tls: None, auth: None },
    };
    // Bind first: a busy port should fail before anything is attached to the kernel.
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    listener.set_nonblocking(true).context("making the listening socket non-blocking")?;
    for &pid in &args.pids {
        crate::collect::procfs::comm(pid)
            .with_context(|| format!("--pid {pid}: process {pid} is not running"))?;
    }
    let explicit_urls = args.vllm_urls.iter().map(|u| vllm_url_target(u)).collect::<Result<Vec<_>>>()?;
    // A bad OTLP setting is a startup error, not a silent lack of traces.
    let otlp = OtlpConfig::from_args(&args.otlp).map_err(|e| anyhow::anyhow!("OTLP: {e}"))?;
    let (programs, watch_maps, outputs) =
        kernel::probes::load(args.capture_bytes, args.socket_hook, args.kretprobe_instances)?;
    // Scraping a vLLM that listens on loopback only inside its pod needs setns(), hence
    // CAP_SYS_ADMIN: a helper process keeps it, the agent does not. Without the capability
    // (the DaemonSet does not grant it) pods are scraped through their own address.
    if !args.no_discovery && privileges::has(privileges::CAP_SYS_ADMIN) {
        netns::start(|| {
            privileges::drop_all_but(privileges::HELPER).map(|_| ()).map_err(std::io::Error::other)
        })
        .context("starting the network-namespace helper")?;
    }
    let kept = privileges::drop_all_but(privileges::kept(privileges::kernel_version()))
        .context("dropping the capabilities no longer needed")?;
    tracing::info!(
        kept = ?privileges::names(kept),
        netns_helper = ?netns::helper_pid(),
        "programs attached; dropped every other capability"
    );
    Ok(Prepared { args, listener, web, explicit_urls, programs, watch_maps, outputs, otlp })
}

pub(crate) async fn run(prepared: Prepared) -> Result<()> {
    let Prepared { args, listener, web, explicit_urls, programs, watch_maps, outputs, otlp } = prepared;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let store = Arc::new(Store::new());
    for &(hook, attach) in &programs.choices {
        store.metrics.probe_info.get_or_create(&ProbeLabels { hook, attach }).set(1);
    }
    let ring_heartbeat = Arc::new(Heartbeat::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Input>(EVENT_QUEUE);
    let mut tasks = Supervisor::from_env();
    ring::spawn_kernel_log(outputs.kernel_log);
    let spans = otlp::start(otlp, store.otlp.clone()).map_err(|e| anyhow::anyhow!("OTLP: {e}"))?;
    let aggregator =
        Aggregator::new(store.clone(), args.max_connections, args.max_series_per_family).with_spans(spans);
    tasks.spawn("aggregator", async move {
        aggregator.run(rx).await;
        Err("its input channel closed".to_string())
    });
    nvml::spawn(nvml::GpuConfig { interval: args.gpu_interval, library: args.nvml_lib.clone() }, tx.clone());
    let dropped = Arc::new(AtomicU64::new(0));
    let reader = ring::read_events(
        outputs.events,
        tx.clone(),
        dropped.clone(),
        args.drain_interval,
        ring_heartbeat.clone(),
    );
    tasks.spawn("ring", async move { reader.await.map_err(|e| e.to_string()) });
    tasks.spawn_forever("losses", ring::report_losses(outputs.lost, tx.clone(), dropped));
    tasks.spawn_forever("sched", ring::report_sched(outputs.sched, tx.clone()));
    tasks.spawn_forever("programs", ring::report_programs(programs, tx.clone(), args.discovery_interval));
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    tasks.spawn_forever(
        "scraper",
        scrape::run(targets_rx, tx.clone(), args.scrape_interval, args.scrape_timeout),
    );
    let config = DiscoveryConfig {
        enabled: !args.no_discovery,
        interval: args.discovery_interval,
        explicit_pids: args.pids.clone(),
        explicit_urls,
    };
    let (scanned_tx, scanned_rx) = oneshot::channel();
    tasks.spawn_forever("discovery", discovery::run(watch_maps, config, tx, targets_tx, scanned_tx));
    // /readyz turns ready once the first scan has set up the watch maps: from then on, nothing
    // of a watched process is missed. /metrics and /healthz answer from the start.
    let readiness = ready.clone();
    tokio::spawn(async move {
        if scanned_rx.await.is_ok() {
            readiness.store(true, Ordering::Relaxed);
        }
    });
    if args.no_discovery && args.pids.is_empty() {
        tracing::warn!("--no-discovery and no --pid: nothing is watched");
    }

    let stats = Arc::new(ServerStats::default());
    let api_open = args.api_access == ApiAccess::Any || web.auth.is_some();
    let state = AppState::new(store, stats.clone(), ring_heartbeat, args.health_stale_after, ready);
    let mut app = server::router(state, api_open);
    if let Some(auth) = web.auth {
        let auth = AuthState { auth, stats: stats.clone() };
        app = app.layer(axum::middleware::from_fn_with_state(auth, webconfig::require_basic_auth));
    }
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %args.listen, scheme, api_open, "serving /metrics, /healthz, /readyz and /api/v1/*");
    let limits = Limits {
        max_connections: args.http_max_connections.max(1),
        max_per_client: args.http_max_connections_per_client.max(1),
        header_timeout: args.http_header_timeout,
    };
    // The HTTP server runs on a thread and runtime of its own: a task of the pipeline that hangs
    // (a worker thread stuck in a loop or a lock) cannot delay /healthz, which must answer — and
    // say what is stuck — for the probe to restart the agent.
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (served_tx, served_rx) = oneshot::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the HTTP server's runtime")
                .and_then(|rt| {
                    rt.block_on(async move {
                        let listener =
                            TcpListener::from_std(listener).context("registering the listening socket")?;
                        let shutdown = async move {
                            let _ = stop_rx.await;
                        };
                        listener::serve(listener, app, web.tls, limits, stats, shutdown).await;
                        Ok(())
                    })
                });
            let _ = served_tx.send(served);
        })
        .context("starting the HTTP server's thread")?;
    let outcome = tokio::select! {
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM: detaching and exiting");
            Ok(())
        }
        _ = sigint.recv() => {
            tracing::info!("SIGINT: detaching and exiting");
            Ok(())
        }
        served = served_rx => match served {
            Ok(Err(e)) => Err(e),
            _ => Err(anyhow::anyhow!("the HTTP server stopped")),
        },
        failure = tasks.first_failure() => Err(anyhow::anyhow!("{failure}; exiting so that it is restarted")),
        failure = netns::helper_exit() => Err(anyhow::anyhow!("{failure}; exiting so that it is restarted")),
    };
    // The programs are dropped with their task when the runtime ends: every program detaches,
    // and nothing was pinned, so nothing remains.
    let _ = stop_tx.send(());
    outcome
}

/// A `--vllm-url` as a scrape target.
fn vllm_url_target(url: &str) -> Result<ScrapeTarget> {
    let (addr, authority) = fetch::http_url(url).with_context(|| format!("--vllm-url {url}"))?;
    Ok(ScrapeTarget {
        id: authority.clone(),
        target: Target { addr, netns_of: None },
        labels: vec![("vllm_instance".to_string(), authority)],
    })
}

/// The kernel's watch maps, as discovery's attach stage drives them.
impl WatchMap for WatchMaps {
    type Error = kernel::Error;

    fn watch(&mut self, tgid: u32) -> Result<(), Self::Error> {
        WatchMaps::watch(self, tgid)
    }

    fn unwatch(&mut self, tgid: u32) -> Result<(), Self::Error> {
        WatchMaps::unwatch(self, tgid)
    }

    fn set_sched_role(&mut self, tgid: u32, role: Option<Role>) -> Result<(), Self::Error> {
        WatchMaps::set_sched_role(self, tgid, role.map(Role::sched_index))
    }

    fn set_listen_port(&mut self, port: u16, tgid: Option<u32>) -> Result<(), Self::Error> {
        WatchMaps::set_listen_port(self, port, tgid)
    }
}
