//! `inferwatch run`: load the probes, start the pipeline, serve until SIGINT/SIGTERM.

use std::sync::{Arc, atomic::AtomicU64};

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    aggregator::{Aggregator, Shared},
    cli::RunArgs,
    events::AgentEvent,
    preflight,
    probes::{self, Probes},
    server,
};

/// Events buffered between the ring-buffer reader and the aggregator.
const EVENT_QUEUE: usize = 64 * 1024;

pub async fn run(args: RunArgs) -> Result<()> {
    preflight::check()?;
    // Bind first: a busy port should fail before anything is attached to the kernel.
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let shared = Arc::new(Shared::new());
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let (mut probes, outputs) = Probes::load(args.capture_bytes)?;
    for &pid in &args.pids {
        let comm = probes.watch(pid).with_context(|| format!("--pid {pid}"))?;
        tracing::info!(pid, comm, "watching");
        tx.send(AgentEvent::Watched { tgid: pid, comm }).await?;
    }
    if args.pids.is_empty() {
        tracing::warn!("no --pid given: nothing is watched yet");
    }

    tokio::spawn(Aggregator::new(shared.clone(), args.max_connections).run(rx));
    let dropped = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(probes::read_events(outputs.events, tx.clone(), dropped.clone()));
    tokio::spawn(probes::report_losses(outputs.lost, tx, dropped));

    tracing::info!(listen = %args.listen, "serving /metrics, /healthz and /api/v1/requests");
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: detaching and exiting"),
            _ = sigint.recv() => tracing::info!("SIGINT: detaching and exiting"),
        }
    };
    let served = tokio::select! {
        served = axum::serve(listener, server::router(shared)).with_graceful_shutdown(shutdown) => {
            served.context("HTTP server")
        }
        failed = reader => Err(match failed {
            Ok(Err(e)) => e,
            Ok(Ok(())) => anyhow::anyhow!("the ring-buffer reader stopped"),
            Err(e) => anyhow::anyhow!("the ring-buffer reader crashed: {e}"),
        }),
    };
    // Dropping the probes detaches every program; nothing was pinned, so nothing remains.
    drop(probes);
    served
}
