//! The inferwatch agent. Its rooms follow the data flow (see README, "How it works"):
//!
//! ```text
//! kernel/  ──▶ records ─┐
//! collect/ ──▶ instances, scrapes, GPU rounds ─┼─▶ one channel ─▶ aggregator/ ─▶ export/
//!                        (requests/ turns records into requests, inside the aggregator)
//! ```
//!
//! - [`model`]: the types that cross stages; imports nothing else of the agent.
//! - [`kernel`]: loading and attaching the programs, reading the ring, decoding records.
//! - [`requests`]: connections, HTTP/SSE reassembly, the engine hand-off (pure).
//! - [`collect`]: discovery (scan → classify → group → attach → describe), /proc parsers,
//!   vLLM's `/metrics`, NVML.
//! - [`aggregator`]: the one owner of state, and its input message type.
//! - [`export`]: the `/metrics` page, the HTTP server, TLS and auth.
//! - [`api`]: the agent's API as its clients see it (types and a client).
//! - [`commands`]: `top`, `diagnose`, `baseline`, `bench`, `discover` — clients of `api`.
//! - `run`: `inferwatch run`, which wires the stages; `cli`: the command line.
//!
//! Imports run one way: `kernel`, `collect` → `aggregator` → `export`; every module may use
//! `model`; nothing imports `run` or `commands`. Modules are `pub` only where the fuzz targets
//! (agent/fuzz) or the frame test (agent/tests) reach in.

pub(crate) mod aggregator;
pub(crate) mod api;
pub(crate) mod cli;
pub mod collect;
pub mod commands;
pub mod export;
pub mod kernel;
pub mod model;
pub mod requests;
mod run;

use std::process::ExitCode;

use clap::Parser as _;

/// The `inferwatch` binary (src/main.rs calls only this).
pub fn main() -> ExitCode {
    let command = cli::Cli::parse().command();
    let log_level = match &command {
        cli::Command::Run(args) => args.log_level.clone(),
        _ => "warn".to_string(),
    };
    if let Err(e) = init_tracing(&log_level) {
        eprintln!("inferwatch: {e}");
        return ExitCode::from(2);
    }
    match execute(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on: the outermost context first, causes after.
            eprintln!("inferwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: cli::Command) -> anyhow::Result<()> {
    match command {
        // Loads its programs and drops privileges while this is still the only thread.
        cli::Command::Run(args) => {
            let prepared = run::prepare(args)?;
            let runtime = runtime()?;
            let result = runtime.block_on(run::run(prepared));
            // Blocking threads (a wait on the namespace helper, a parse in flight) must not hold
            // up the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            result
        }
        cli::Command::Discover(args) => runtime()?.block_on(commands::discover::run(args)),
        cli::Command::Bench(args) => runtime()?.block_on(commands::bench::run(args.normalized())),
        cli::Command::Diagnose(args) => runtime()?.block_on(commands::diagnose::run(args)),
        cli::Command::Baseline(cmd) => runtime()?.block_on(commands::baseline::run(cmd)),
        cli::Command::Top(args) => runtime()?.block_on(commands::top::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

fn init_tracing(level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("--log-level {level:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}
