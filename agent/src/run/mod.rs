//! `inferwatch run`: check, bind, load the programs and drop privileges while single-threaded
//! ([`prepare`]), then wire the stages together and serve until SIGINT/SIGTERM ([`run`]):
//! kernel readers, discovery, scraper and GPU collector → one channel → the aggregator → the
//! HTTP server. Nothing else imports this module.

mod preflight;
mod privileges;

use std::sync::{Arc, atomic::AtomicU64};

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    aggregator::{Aggregator, Input, Store},
    cli::RunArgs,
    collect::{
        discovery::{self, DiscoveryConfig, attach::WatchMap},
        fetch, nvml, scrape,
    },
    export::{
        server,
        webconfig::{self, TlsListener, WebConfig},
    },
    kernel::{
        self,
        probes::{Outputs, Programs, WatchMaps},
        ring,
    },
    model::{
        instance::Role,
        scrape::{ScrapeTarget, Target},
    },
};

/// Messages buffered between the producers and the aggregator: kernel records arrive in
/// batches of up to `probes::BATCH`, so at most 16 Ki records (a few MiB) wait; beyond that
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
}

/// Checks, binds, loads and attaches, then drops the capabilities no longer needed. Runs
/// before the async runtime exists, because capabilities are per thread.
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
    let (programs, watch_maps, outputs) = kernel::probes::load(args.capture_bytes)?;
    let kept = privileges::drop_all_but(privileges::kept(!args.no_discovery, privileges::kernel_version()))
        .context("dropping the capabilities no longer needed")?;
    tracing::info!(kept = ?privileges::names(kept), "programs attached; dropped every other capability");
    Ok(Prepared { args, listener, web, explicit_urls, programs, watch_maps, outputs })
}

pub(crate) async fn run(prepared: Prepared) -> Result<()> {
    let Prepared { args, listener, web, explicit_urls, programs, watch_maps, outputs } = prepared;
    let listener = TcpListener::from_std(listener).context("registering the listening socket")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let store = Arc::new(Store::new());
    let (tx, rx) = mpsc::channel::<Input>(EVENT_QUEUE);
    ring::spawn_kernel_log(outputs.kernel_log);
    tokio::spawn(Aggregator::new(store.clone(), args.max_connections, args.max_series_per_family).run(rx));
    nvml::spawn(nvml::GpuConfig { interval: args.gpu_interval, library: args.nvml_lib.clone() }, tx.clone());
    let dropped = Arc::new(AtomicU64::new(0));
    let reader =
        tokio::spawn(ring::read_events(outputs.events, tx.clone(), dropped.clone(), args.drain_interval));
    tokio::spawn(ring::report_losses(outputs.lost, tx.clone(), dropped));
    tokio::spawn(ring::report_sched(outputs.sched, tx.clone()));
    tokio::spawn(ring::report_programs(programs, tx.clone(), args.discovery_interval));
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    tokio::spawn(scrape::run(targets_rx, tx.clone(), args.scrape_interval, args.scrape_timeout));
    let config = DiscoveryConfig {
        enabled: !args.no_discovery,
        interval: args.discovery_interval,
        explicit_pids: args.pids.clone(),
        explicit_urls,
    };
    let (scanned_tx, scanned_rx) = oneshot::channel();
    tokio::spawn(discovery::run(watch_maps, config, tx, targets_tx, scanned_tx));
    // Serve only once the first scan has set up the watch map: from then on, nothing is missed.
    let _ = scanned_rx.await;
    if args.no_discovery && args.pids.is_empty() {
        tracing::warn!("--no-discovery and no --pid: nothing is watched");
    }

    let mut app = server::router(store);
    if let Some(auth) = web.auth {
        app = app.layer(axum::middleware::from_fn_with_state(auth, webconfig::require_basic_auth));
    }
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %args.listen, scheme, "serving /metrics, /healthz and /api/v1/*");
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: detaching and exiting"),
            _ = sigint.recv() => tracing::info!("SIGINT: detaching and exiting"),
        }
    };
    let serving = async move {
        match web.tls {
            Some(tls) => {
                let listener = TlsListener::new(listener, tls).context("TLS listener")?;
                axum::serve(listener, app).with_graceful_shutdown(shutdown).await
            }
            None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        }
        .context("HTTP server")
    };
    let served = tokio::select! {
        served = serving => served,
        failed = reader => Err(match failed {
            Ok(Err(e)) => e.into(),
            Ok(Ok(())) => anyhow::anyhow!("the ring-buffer reader stopped"),
            Err(e) => anyhow::anyhow!("the ring-buffer reader crashed: {e}"),
        }),
    };
    // The programs are dropped with their task when the runtime ends: every program detaches,
    // and nothing was pinned, so nothing remains.
    served
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
}
