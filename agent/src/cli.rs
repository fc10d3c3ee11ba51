//! Command line. `inferwatch` alone is `inferwatch run`.
use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "inferwatch", version, about, args_conflicts_with_subcommands = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
#[expect(clippy::large_enum_variant, reason = "parsed once at startup; `run`'s flags are most of it")]
pub(crate) enum Command {
    /// Watch processes from the kernel and serve metrics (the default).
    Run(RunArgs),
    /// Print the vLLM instances on this node and exit.
    Discover(DiscoverArgs),
    /// Load-test an OpenAI-compatible server and report like `vllm bench serve`.
    Bench(BenchArgs),
    /// Evaluate the troubleshooting rules on a running agent's live data.
    Diagnose(DiagnoseArgs),
    /// Record a performance baseline from a running agent, or compare two.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// A live terminal view of the node's vLLM, from the agent's HTTP API.
    Top(TopArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct TopArgs {
    /// The agent to show.
    #[arg(long, default_value = "http://127.0.0.1:9420")]
    pub agent: String,
    /// Refresh period.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct DiagnoseArgs {
    /// The agent to ask.
    #[arg(long, default_value = "http://127.0.0.1:9420")]
    pub agent: String,
    /// How far back to look.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub window: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum BaselineCommand {
    /// Watch the agent for a while and write what it saw.
    Record {
        #[arg(long, default_value = "http://127.0.0.1:9420")]
        agent: String,
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Compare baseline B against A; exits non-zero on a regression beyond the threshold.
    Compare {
        a: std::path::PathBuf,
        b: std::path::PathBuf,
        /// Percent worse that counts as a regression.
        #[arg(long, default_value_t = 10.0)]
        threshold: f64,
    },
}

#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// The server, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: String,
    /// Model name (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// `completions` or `chat`.
    #[arg(long, default_value = "completions", value_parser = ["completions", "chat"])]
    pub endpoint: String,
    /// Requests in flight at once (closed loop, with --requests).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in all (closed loop).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Requests per second, Poisson arrivals (open loop, with --duration).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long the open loop runs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate per request (generation ignores EOS, as vllm bench serve does).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Stream the responses (the default).
    #[arg(long, overrides_with = "no_stream", default_value_t = true)]
    pub stream: bool,
    /// Do not stream: TTFT is then the whole response.
    #[arg(long = "no-stream", overrides_with = "stream")]
    pub no_stream: bool,
    /// Write the result with `vllm bench serve --save-result`'s field names.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// The inferwatch agent (e.g. http://127.0.0.1:9420): also print its view of the requests.
    #[arg(long)]
    pub agent: Option<String>,
}

impl BenchArgs {
    /// `--no-stream` wins over the default.
    pub fn normalized(mut self) -> Self {
        if self.no_stream {
            self.stream = false;
        }
        self
    }

    #[cfg(test)]
    pub fn for_tests() -> Self {
        Cli::try_parse_from(["inferwatch", "bench", "--url", "http://127.0.0.1:1"])
            .map(|c| match c.command() {
                Command::Bench(b) => b,
                _ => unreachable!(),
            })
            .unwrap()
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct DiscoverArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub(crate) use crate::model::duration::parse_duration;

fn parse_drain_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(1) {
        return Err(format!("{s:?}: the drain interval must be between 1ms and 1s"));
    }
    Ok(d)
}

#[derive(Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Address for the HTTP endpoints (/metrics, /healthz).
    #[arg(long, default_value = "0.0.0.0:9420", env = "INFERWATCH_LISTEN")]
    pub listen: SocketAddr,
    /// Watch this process (its whole thread group) as well as what discovery finds. Repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Scrape this vLLM (`http://HOST:PORT`) as well as what discovery finds. Repeatable.
    #[arg(long = "vllm-url", value_name = "URL")]
    pub vllm_urls: Vec<String>,
    /// Do not look for vLLM processes: watch only `--pid`, scrape only `--vllm-url`.
    #[arg(long)]
    pub no_discovery: bool,
    /// How often /proc is scanned for vLLM processes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub discovery_interval: Duration,
    /// How often each instance's /metrics is scraped. Each scrape stalls vLLM's API server: its
    /// event loop renders the page (5–15 ms under load, measured on vLLM 0.32), delaying every
    /// stream it serves meanwhile; 15 s is Prometheus's own default interval.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub scrape_interval: Duration,
    /// Longest a scrape may take.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub scrape_timeout: Duration,
    /// Payload bytes copied from the start of each socket transfer (request heads, SSE events,
    /// vLLM's engine IPC), 1 to 4096; of a longer transfer its last 64 bytes too (where a
    /// stream's end is). Only bytes actually moved are copied; they never leave the agent.
    /// Not 0: following requests needs their bytes, and the last ones are copied regardless.
    #[arg(long, default_value_t = inferwatch_common::sock::DEFAULT_CAPTURE as u32,
          value_parser = clap::value_parser!(u32).range(1..=inferwatch_common::sock::MAX_CAPTURE as i64))]
    pub capture_bytes: u32,
    /// How socket I/O is watched: the socket tracepoints where the kernel has them (Linux 6.3+)
    /// else fexit on the protocols' sendmsg/recvmsg (`auto`), or one of the two. There is no
    /// system call tracepoint mode: it would tax every system call of every process.
    #[arg(long, value_enum, default_value_t)]
    pub socket_hook: crate::model::probe::SocketHook,
    /// Where socket I/O is hooked with kprobes (arm64 before Linux 6.4): instances of each
    /// kretprobe, i.e. tasks of the node (any process) inside one hooked function at once
    /// before a return is missed (and counted lost). Up to 4096, ~100 bytes each, made through
    /// tracefs; 0 leaves the kernel's default (the CPUs, or max(10, 2 x CPUs) on preemptible kernels).
    #[arg(long, default_value_t = crate::model::probe::MAX_KRETPROBE_INSTANCES,
          value_parser = clap::value_parser!(u32).range(0..=crate::model::probe::MAX_KRETPROBE_INSTANCES as i64))]
    pub kretprobe_instances: u32,
    /// How often the kernel's records are read while they flow (1ms to 1s); up to 8× that while
    /// none come, and at once when a burst fills a sixteenth of the ring. Records carry the
    /// kernel's timestamps, so this delays only when counters move, not what they measure.
    /// Longer means fewer wakeups but bigger bursts of work (next to vLLM, 10ms → 50ms saved
    /// ~0.05% of a core).
    #[arg(long, default_value = "10ms", value_parser = parse_drain_interval)]
    pub drain_interval: Duration,
    /// Connections followed at once; beyond it the least recently used is dropped and counted.
    #[arg(long, default_value_t = crate::requests::connections::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Series per metric family whose labels come from outside (status codes, pids); beyond
    /// it new series are refused and counted in inferwatch_series_refused_total.
    #[arg(long, default_value_t = crate::aggregator::cardinality::DEFAULT_MAX_SERIES_PER_FAMILY)]
    pub max_series_per_family: usize,
    /// How often the GPUs are sampled through NVML.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub gpu_interval: Duration,
    /// NVML library to load (default: `libnvidia-ml.so.1` on the loader's path, then the usual
    /// driver folders such as /usr/local/nvidia/lib64).
    #[arg(long, value_name = "PATH", env = "INFERWATCH_NVML_LIB")]
    pub nvml_lib: Option<std::path::PathBuf>,
    /// TLS and basic auth for the HTTP endpoints: a file in the format of the Prometheus
    /// exporters' `--web.config.file` (`tls_server_config`, `basic_auth_users`).
    #[arg(long, value_name = "FILE", env = "INFERWATCH_WEB_CONFIG_FILE")]
    pub web_config_file: Option<std::path::PathBuf>,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives.
    #[arg(long, default_value = "info", env = "INFERWATCH_LOG")]
    pub log_level: String,
    /// Who may read /api/v1/* (recent requests, instances with their command lines, diagnosis):
    /// `loopback` clients only (this host, `kubectl port-forward`, `kubectl exec`), or `any`.
    /// Basic auth in --web-config-file opens it to clients that authenticate.
    #[arg(long, value_enum, default_value = "loopback")]
    pub api_access: crate::export::server::ApiAccess,
    /// HTTP connections served at once; more are closed at once and counted.
    #[arg(long, default_value_t = 512)]
    pub http_max_connections: usize,
    /// HTTP connections served at once from one client address (so that one address cannot
    /// take them all).
    #[arg(long, default_value_t = 16)]
    pub http_max_connections_per_client: usize,
    /// Longest a client may take to send a request head, or to start its next one on a kept-alive
    /// connection, before the connection is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// /healthz answers 503 once the ring-buffer reader or the aggregator has made no progress
    /// for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub health_stale_after: Duration,
    #[command(flatten)]
    pub otlp: crate::export::otlp::OtlpArgs,
}

impl Cli {
    /// The command to run: `run` with the top-level flags when none is named.
    pub fn command(self) -> Command {
        self.command.unwrap_or(Command::Run(self.run))
    }

    #[cfg(test)]
    fn run_args(self) -> RunArgs {
        match self.command() {
            Command::Run(args) => args,
            other => panic!("not run: {other:?}"),
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
        assert_eq!(args.capture_bytes, 4096);
        assert_eq!(args.drain_interval, Duration::from_millis(10));
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
        assert!(Cli::try_parse_from(["inferwatch", "--capture-bytes", "0"]).is_err());
        assert!(Cli::try_parse_from(["inferwatch", "--capture-bytes", "1"]).is_ok());
        assert!(Cli::try_parse_from(["inferwatch", "--scrape-interval", "0s"]).is_err());
        assert!(Cli::try_parse_from(["inferwatch", "--drain-interval", "0.5ms"]).is_err());
        assert!(Cli::try_parse_from(["inferwatch", "--drain-interval", "2s"]).is_err());
        assert!(Cli::try_parse_from(["inferwatch", "--drain-interval", "10ms"]).is_ok());
        assert!(Cli::try_parse_from(["inferwatch", "--scrape-timeout", "soon"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn bench_flags() {
        let b = BenchArgs::for_tests();
        assert!(b.stream && b.rate.is_none());
        assert_eq!((b.concurrency, b.requests, b.endpoint.as_str()), (8, 100, "completions"));
        let cli = Cli::try_parse_from([
            "inferwatch",
            "bench",
            "--url",
            "http://x:1",
            "--no-stream",
            "--rate",
            "2.5",
        ])
        .unwrap();
        let Command::Bench(b) = cli.command() else { panic!() };
        let b = b.normalized();
        assert!(!b.stream);
        assert_eq!(b.rate, Some(2.5));
        assert!(Cli::try_parse_from(["inferwatch", "bench", "--url", "u", "--endpoint", "embed"]).is_err());
    }

    #[test]
    fn discover_subcommand() {
        let cli = Cli::try_parse_from(["inferwatch", "discover", "--json"]).unwrap();
        assert!(matches!(cli.command(), Command::Discover(DiscoverArgs { json: true })));
        let args = Cli::try_parse_from(["inferwatch"]).unwrap().run_args();
        assert_eq!(args.scrape_interval, Duration::from_secs(15));
        assert_eq!(args.discovery_interval, Duration::from_secs(2));
        assert!(!args.no_discovery);
    }
}
