//! Command line. `inferwatch` alone is `inferwatch run`.
use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "inferwatch", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Watch processes from the kernel and serve metrics (the default).
    Run(RunArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address for the HTTP endpoints (/metrics, /healthz).
    #[arg(long, default_value = "0.0.0.0:9420", env = "INFERWATCH_LISTEN")]
    pub listen: SocketAddr,
    /// Watch this process (its whole thread group). Repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Payload bytes copied from each socket transfer (request heads, SSE events), at most
    /// 4096. Only bytes actually moved are copied; they never leave the agent.
    #[arg(long, default_value_t = inferwatch_common::DEFAULT_CAPTURE as u32,
          value_parser = clap::value_parser!(u32).range(0..=inferwatch_common::MAX_CAPTURE as i64))]
    pub capture_bytes: u32,
    /// Connections followed at once; beyond it the least recently used is dropped and counted.
    #[arg(long, default_value_t = crate::connections::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives.
    #[arg(long, default_value = "info", env = "INFERWATCH_LOG")]
    pub log_level: String,
}

impl Cli {
    pub fn run_args(self) -> RunArgs {
        match self.command {
            Some(Command::Run(args)) => args,
            None => self.run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_command_is_run_with_defaults() {
        let args = Cli::try_parse_from(["inferwatch"]).unwrap().run_args();
        assert_eq!(args.listen, "0.0.0.0:9420".parse().unwrap());
        assert!(args.pids.is_empty());
        assert_eq!(args.log_level, "info");
        assert_eq!(args.capture_bytes, 1024);
    }

    #[test]
    fn run_subcommand_and_top_level_flags_agree() {
        let a = Cli::try_parse_from(["inferwatch", "run", "--pid", "7", "--pid", "9"]).unwrap();
        let b = Cli::try_parse_from(["inferwatch", "--pid", "7", "--pid", "9"]).unwrap();
        assert_eq!(a.run_args().pids, vec![7, 9]);
        assert_eq!(b.run_args().pids, vec![7, 9]);
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Cli::try_parse_from(["inferwatch", "--pid", "abc"]).is_err());
        assert!(Cli::try_parse_from(["inferwatch", "--capture-bytes", "4097"]).is_err());
        assert!(Cli::try_parse_from(["inferwatch", "--capture-bytes", "4096"]).is_ok());
    }
}
