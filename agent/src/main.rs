//! `inferwatch`: the host agent and its commands (the library, src/lib.rs, holds them all).

use inferwatch::{bench, cli, discover, run, toolkit, top};

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let command = cli::Cli::parse().command();
    let log_level = match &command {
        cli::Command::Run(args) => args.log_level.clone(),
        _ => "warn".to_string(),
    };
    if let Err(e) = init_tracing(&log_level) {
        eprintln!("inferwatch: {e}");
        return std::process::ExitCode::from(2);
    }
    let result = execute(command);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on: the outermost context first, causes after.
            eprintln!("inferwatch: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn execute(command: cli::Command) -> anyhow::Result<()> {
    match command {
        // Loads its programs and drops privileges while this is still the only thread.
        cli::Command::Run(args) => {
            let prepared = run::prepare(args)?;
            runtime()?.block_on(run::run(prepared))
        }
        cli::Command::Discover(args) => runtime()?.block_on(discover::print(args)),
        cli::Command::Bench(args) => runtime()?.block_on(bench::run(args.normalized())),
        cli::Command::Diagnose(args) => runtime()?.block_on(toolkit::diagnose(args)),
        cli::Command::Baseline(cmd) => runtime()?.block_on(toolkit::baseline(cmd)),
        cli::Command::Top(args) => runtime()?.block_on(top::run(args)),
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
