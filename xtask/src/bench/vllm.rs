//! P1: real vLLM (CPU, the tiny model of the e2e suite) under `inferwatch bench`'s streamed
//! load, with and without the agent, in interleaved pairs.

use std::{
    fmt::Write as _,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{
    CpuMeter, flag, flag_text, mean, median, median_interval, std_dev, stop_agent, sum, values_for_half_width,
};
use crate::{
    cmd::{self, Result},
    tasks::{self, Profile},
    vllm,
};

/// One of a run's numbers.
type Measure = fn(&Run) -> f64;

/// One `inferwatch bench` run: what vLLM's clients saw.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    throughput: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    failed: f64,
}

pub fn vllm(args: &[String]) -> Result<String> {
    let pairs = flag(args, "--pairs", 6)?;
    let requests = flag(args, "--requests", 400)?;
    let concurrency = flag(args, "--concurrency", 4)?;
    let variant = match args.iter().position(|a| a == "--variant") {
        Some(i) => Variant::parse(args.get(i + 1).map(String::as_str).unwrap_or(""))?,
        None => Variant::Full,
    };
    if pairs < 5 {
        return Err("--pairs: at least 5".into());
    }
    tasks::build(Profile::Release)?;
    vllm::ensure()?;
    let dir = cmd::root().join("target/bench/vllm");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = cmd::free_port()?;
    let mut server = vllm::serve(port, &dir.join("vllm.log"))?;
    let result = (|| {
        eprintln!("bench vllm: waiting for vLLM (log in {})", dir.display());
        vllm::wait_ready(port, &mut server)?;
        // Extra agent flags (`--agent-args "--capture-bytes 256"`), to try a setting A/B.
        let extra: Vec<String> = flag_text(args, "--agent-args")
            .map(|a| a.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let agent_args = variant.agent_args(server.id()).map(|mut a| {
            a.extend(extra);
            a
        });
        measure_pairs(port, pairs, requests, concurrency, variant, agent_args, &dir)
    })();
    // SAFETY: signalling our own child's process group (vLLM and its engine process).
    unsafe { libc::kill(-(server.id() as i32), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(-(server.id() as i32), libc::SIGKILL) };
    let _ = server.wait();
    result
}

/// What runs beside vLLM in the "with" runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    /// The agent as deployed.
    Full,
    /// Only the API server's socket probes (no discovery, scraping or scheduler roles): the
    /// part that times requests, to tell the parts' costs apart.
    Sockets,
    /// The agent with its programs attached but nothing watched (`--no-discovery`, no `--pid`):
    /// every socket operation and context switch of the node runs the programs' filters, no
    /// record is made and the agent's userspace idles.
    Unwatched,
    /// Nothing: both sides without the agent, to show this machine's noise floor (A/A).
    Control,
    /// No agent, but a process with the agent's CPU pattern (wakes every 25 ms, spins ~200 µs:
    /// ~0.8% of a core): what any neighbour that small costs vLLM on this machine.
    Burn,
}

impl Variant {
    fn parse(name: &str) -> Result<Variant> {
        match name {
            "full" => Ok(Variant::Full),
            "sockets" => Ok(Variant::Sockets),
            "unwatched" => Ok(Variant::Unwatched),
            "control" => Ok(Variant::Control),
            "burn" => Ok(Variant::Burn),
            _ => Err("--variant: full, sockets, unwatched, control or burn".into()),
        }
    }

    /// The agent's arguments beyond --listen, or None when nothing is started.
    fn agent_args(self, api_server: u32) -> Option<Vec<String>> {
        match self {
            Variant::Full => Some(Vec::new()),
            Variant::Sockets => Some(vec!["--no-discovery".into(), "--pid".into(), api_server.to_string()]),
            Variant::Unwatched => Some(vec!["--no-discovery".into()]),
            Variant::Control | Variant::Burn => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Variant::Full => "the release agent as deployed (discovery, scraping, scheduler probes)",
            Variant::Sockets => {
                "the release agent watching only the API server's sockets (`--no-discovery --pid`: no scraping, no scheduler roles)"
            }
            Variant::Unwatched => {
                "the release agent with its programs attached but watching nothing (`--no-discovery`, no `--pid`: only the programs' filters run)"
            }
            Variant::Control => "nothing either (an A/A control: the ratios below are this machine's noise)",
            Variant::Burn => {
                "no agent but a Python process that wakes every 25 ms and spins 200 µs (the agent's CPU pattern, ~0.8% of a core; its CPU is in the last column)"
            }
        }
    }
}

/// Requests in the burst that precedes every measured run.
fn burst_size(requests: u64) -> u64 {
    (requests / 20).max(10)
}

fn measure_pairs(
    port: u16,
    pairs: u64,
    requests: u64,
    concurrency: u64,
    variant: Variant,
    agent_args: Option<Vec<String>>,
    dir: &std::path::Path,
) -> Result<String> {
    let agent = tasks::agent_binary(Profile::Release);
    let load = |name: &str, n: u64| -> Result<Run> {
        let json = dir.join(format!("{name}.json"));
        let out = std::process::Command::new(&agent)
            .args(["bench", "--url", &format!("http://127.0.0.1:{port}"), "--model", "tiny"])
            .args(["--requests", &n.to_string(), "--concurrency", &concurrency.to_string()])
            .args(["--prompt-tokens", "64", "--max-tokens", "32", "--json"])
            .arg(&json)
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("inferwatch bench: {e}"))?;
        if !out.status.success() {
            return Err(format!("inferwatch bench failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let doc = std::fs::read_to_string(&json).map_err(|e| format!("{}: {e}", json.display()))?;
        let get = |k: &str| json_number(&doc, k).ok_or_else(|| format!("{}: no {k}", json.display()));
        Ok(Run {
            throughput: get("request_throughput")?,
            ttft_p50_ms: get("median_ttft_ms")?,
            ttft_p99_ms: get("p99_ttft_ms")?,
            failed: get("failed")?,
        })
    };
    load("warm-up", requests / 4)?;
    // Right before every measured run, with or without the agent, a short burst: the runs with
    // an agent follow an idle gap (its start, the scrape phase) in which vLLM's threads go to
    // sleep and its caches cool, which alone made them slower; the burst puts both sides on
    // the same warm footing.
    let burst = burst_size(requests);
    let measured = |name: &str| -> Result<Run> {
        load(&format!("{name}-burst"), burst)?;
        load(name, requests)
    };
    let (mut without, mut with, mut agent_cpu) = (Vec::new(), Vec::new(), Vec::new());
    // The burst alone did not make the sides equal: a run without the agent still came right
    // after the previous run, with vLLM hot. So it now idles as long as a run with the agent
    // waits for it (its start-up, measured, plus the scrape phase): the sides differ only in
    // the agent.
    let mut start_up = Duration::from_secs(2);
    let started = Instant::now();
    for pair in 0..pairs {
        // Golden-ratio phases spread the runs evenly over the scrape interval.
        let phase = (pair as f64 * 0.618_034).fract();
        let wait = agent_args.as_deref().map_or(Ok(Duration::ZERO), |a| ready_wait(a, phase))?;
        // A B, then B A: neither side always runs first (vLLM warms, caches fill).
        let order = if pair % 2 == 0 { [false, true] } else { [true, false] };
        for attached in order {
            if attached && variant == Variant::Burn {
                let mut burner = start_burner()?;
                let cpu = CpuMeter::start(burner.id());
                let run = measured(&format!("pair{pair}-burn"));
                agent_cpu.push(cpu.percent());
                let _ = burner.kill();
                let _ = burner.wait();
                with.push(run?);
                continue;
            }
            let Some(agent_args) = agent_args.as_deref().filter(|_| attached) else {
                if agent_args.is_some() {
                    thread::sleep(start_up + wait);
                }
                let run = measured(&format!("pair{pair}-{}", if attached { "with" } else { "without" }))?;
                if attached {
                    with.push(run)
                } else {
                    without.push(run)
                }
                continue;
            };
            let starting = Instant::now();
            let (mut child, agent_port) = start_watching_agent(&agent, agent_args, wait)?;
            start_up = starting.elapsed().saturating_sub(wait);
            let cpu = CpuMeter::start(child.id());
            let run = measured(&format!("pair{pair}-with"));
            agent_cpu.push(cpu.percent());
            let counted = cmd::http_get(agent_port, "/metrics")
                .map(|(_, t)| sum(&t, "inferwatch_http_requests_total{"))
                .unwrap_or(0.0);
            stop_agent(&mut child)?;
            with.push(run?);
            eprintln!("bench vllm: pair {pair}: the agent counted {counted:.0} requests");
        }
        eprintln!(
            "bench vllm: pair {}: {:.1} req/s without, {:.1} with",
            pair + 1,
            without.last().unwrap().throughput,
            with.last().unwrap().throughput
        );
    }
    let seconds_per_pair = started.elapsed().as_secs_f64() / pairs.max(1) as f64;
    let mut md = report(&without, &with, &agent_cpu, requests, concurrency, variant, seconds_per_pair);
    if let Some(agent_args) = &agent_args {
        md.push_str(&account(&load, &agent, agent_args, requests)?);
    }
    Ok(md)
}

/// Where the CPU goes with the agent attached, from one more run with the kernel's BPF
/// statistics on: the agent's own CPU and its programs' run time against all the CPU the
/// machine used. vLLM here is CPU-bound, so that share is what the agent can take from its
/// throughput; unlike the pairs' ratios it is not drowned in run-to-run noise.
fn account(
    load: &dyn Fn(&str, u64) -> Result<Run>,
    agent: &std::path::Path,
    agent_args: &[String],
    requests: u64,
) -> Result<String> {
    let stats_flag = "/proc/sys/kernel/bpf_stats_enabled";
    let previous = std::fs::read_to_string(stats_flag).map_err(|e| format!("{stats_flag}: {e}"))?;
    std::fs::write(stats_flag, "1").map_err(|e| format!("enabling BPF statistics (root needed): {e}"))?;
    let measured = (|| {
        let (mut child, agent_port) = start_watching_agent(agent, agent_args, ready_wait(agent_args, 0.5)?)?;
        let metrics =
            || cmd::http_get(agent_port, "/metrics").map(|(_, t)| t).ok_or("the agent does not answer");
        // The agent's CPU from its own counter (getrusage: microseconds, exited threads included).
        let agent_cpu = |t: &str| sum(t, "inferwatch_agent_cpu_seconds_total");
        // The agent reads the kernel's totals every discovery tick (2 s).
        thread::sleep(Duration::from_millis(2500));
        let t0 = metrics()?;
        let busy0 = machine_busy_ticks();
        let started = Instant::now();
        let run = load("accounting", requests);
        let seconds = started.elapsed().as_secs_f64();
        let busy1 = machine_busy_ticks();
        let t1 = metrics();
        thread::sleep(Duration::from_millis(2500));
        let t2 = metrics();
        stop_agent(&mut child)?;
        let (run, t1, t2) = (run?, t1?, t2?);
        let busy_s = (busy1 - busy0) as f64 / super::clock_ticks_per_second();
        let agent_s = agent_cpu(&t1) - agent_cpu(&t0);
        let (p0, p1) = (super::kernel::program_totals(&t0), super::kernel::program_totals(&t2));
        Ok::<_, String>((run, seconds, busy_s, agent_s, p0, p1))
    })();
    let _ = std::fs::write(stats_flag, previous.trim());
    let (run, seconds, busy_s, agent_s, p0, p1) = measured?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n**CPU accounting** (one more run of {requests} requests with the agent attached and `kernel.bpf_stats_enabled=1`, {:.2} req/s, {seconds:.1} s; program times include the statistics' own overhead, and runs during the 2.5 s after the load are counted too, so both overstate):\n",
        run.throughput
    );
    let _ = writeln!(md, "| | CPU seconds | per request (ms) | share of the machine's busy CPU |");
    let _ = writeln!(md, "|---|---|---|---|");
    let n = requests as f64;
    let mut row = |name: &str, s: f64| {
        let _ = writeln!(md, "| {name} | {s:.3} | {:.3} | {:.2}% |", 1000.0 * s / n, 100.0 * s / busy_s);
    };
    row("whole machine (all processes, both CPUs)", busy_s);
    row("the agent's userspace (user + system)", agent_s);
    let mut kernel_s = 0.0;
    for (name, (ns1, _)) in &p1 {
        let ns0 = p0.get(name).map_or(0.0, |t| t.0);
        let runs = p1[name].1 - p0.get(name).map_or(0.0, |t| t.1);
        if runs <= 0.0 {
            continue;
        }
        let s = (ns1 - ns0) / 1e9;
        kernel_s += s;
        row(&format!("`{name}` ({runs:.0} runs, {:.0} ns each)", 1e9 * s / runs), s);
    }
    row("**the agent in all**", agent_s + kernel_s);
    let _ = writeln!(
        md,
        "\nWith vLLM CPU-bound, throughput with the agent can be no lower than about 1 − {:.4} = **{:.3}** of that without it, from this accounting.",
        (agent_s + kernel_s) / busy_s,
        1.0 - (agent_s + kernel_s) / busy_s
    );
    Ok(md)
}

/// CPU time the machine used since boot (all but idle, iowait and steal), in clock ticks.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq (then steal: the hypervisor's, not ours)
    fields.iter().take(7).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

/// A process that wakes every 25 ms and spins for 200 µs, like the agent's drains.
fn start_burner() -> Result<Child> {
    let script = "import time\nwhile True:\n    time.sleep(0.025)\n    t = time.perf_counter()\n    while time.perf_counter() - t < 0.0002: pass\n";
    std::process::Command::new("python3")
        .args(["-c", script])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the burner (python3): {e}"))
}

/// The interval between the agent's scrapes of vLLM, in seconds, unless `--agent-args` sets
/// one: passed explicitly, so that the run phases below follow what the agent really does.
const SCRAPE_INTERVAL_SECONDS: u64 = 15;

/// How long a run with the agent waits once the agent is ready: a second, then, as deployed
/// (discovering, so scraping), `phase` (0..1) of its scrape interval. A discovering agent
/// scrapes vLLM at once, then every scrape interval, and each scrape stalls vLLM's event loop
/// for a few milliseconds: over the pairs the runs meet scrapes as often as in steady state.
fn ready_wait(args: &[String], phase: f64) -> Result<Duration> {
    if args.iter().any(|a| a == "--no-discovery") {
        return Ok(Duration::from_secs(1));
    }
    let scrape_interval = match flag_text(args, "--scrape-interval") {
        Some(value) => {
            let seconds = value.strip_suffix('s').and_then(|v| v.parse::<f64>().ok());
            Duration::from_secs_f64(
                seconds.ok_or("--agent-args: give --scrape-interval in seconds, as in 15s")?,
            )
        }
        None => Duration::from_secs(SCRAPE_INTERVAL_SECONDS),
    };
    Ok(Duration::from_secs(1) + scrape_interval.mul_f64(phase))
}

/// Starts the agent with `args` and returns once it watches the vLLM API server (and, as
/// deployed, holds vLLM's first scrape) and `wait` (see [`ready_wait`]) has passed.
fn start_watching_agent(agent: &std::path::Path, args: &[String], wait: Duration) -> Result<(Child, u16)> {
    let port = cmd::free_port()?;
    let mut command = cmd::as_root(agent);
    command.args(["--listen", &format!("127.0.0.1:{port}"), "--log-level", "warn"]).args(args);
    let discovering = !args.iter().any(|a| a == "--no-discovery");
    if flag_text(args, "--scrape-interval").is_none() {
        command.args(["--scrape-interval", &format!("{SCRAPE_INTERVAL_SECONDS}s")]);
    }
    let mut child = command.stdout(Stdio::null()).spawn().map_err(|e| format!("starting the agent: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Ready = watching the API server and, as deployed, holding vLLM's first scrape: the
        // start-up work (program loading, first scan, first scrape) stays out of the measured run.
        let watching = args.iter().any(|a| a == "--pid") || discovering;
        let ready = cmd::http_get(port, "/metrics").is_some_and(|(_, t)| {
            (!watching || sum(&t, "inferwatch_watched_processes") >= 1.0)
                && (!discovering || sum(&t, "inferwatch_vllm_up") >= 1.0)
        });
        if ready {
            thread::sleep(wait);
            return Ok((child, port));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the agent exited ({status})"));
        }
        if Instant::now() > deadline {
            let _ = stop_agent(&mut child);
            return Err("the agent did not find vLLM within 30 s".into());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn report(
    without: &[Run],
    with: &[Run],
    agent_cpu: &[f64],
    requests: u64,
    concurrency: u64,
    variant: Variant,
    seconds_per_pair: f64,
) -> String {
    let mut md = String::new();
    let agent = variant.describe();
    let _ = writeln!(
        md,
        "vLLM 0.32 (CPU) serving the e2e suite's tiny Llama; `inferwatch bench --requests {requests} --concurrency {concurrency} --prompt-tokens 64 --max-tokens 32` (streamed completions, ignore_eos) per run, each right after a burst of {} requests (both sides: vLLM warm either way){}; {} pairs ordered A B, B A, …; \"with\" = {agent}, started and stopped outside the measured run{}.\n",
        burst_size(requests),
        if matches!(variant, Variant::Control | Variant::Burn) {
            ""
        } else {
            " and, before it, the same idle time on both sides (the agent's start-up and wait, which vLLM spends idle, measured and given to the run without it too)"
        },
        without.len(),
        if variant == Variant::Full {
            " (each run starts at a different phase of the agent's scrape interval, 15 s unless `--agent-args` sets another, spread by the golden ratio, so that runs meet vLLM scrapes as often as in steady state)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| pair | req/s without | req/s with | TTFT p50 without / with (ms) | TTFT p99 without / with (ms) | failed | agent CPU (% of a core) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for (i, (a, b)) in without.iter().zip(with).enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} / {:.0} | {} |",
            i + 1,
            a.throughput,
            b.throughput,
            a.ttft_p50_ms,
            b.ttft_p50_ms,
            a.ttft_p99_ms,
            b.ttft_p99_ms,
            a.failed,
            b.failed,
            agent_cpu.get(i).map_or("–".to_string(), |c| format!("{c:.1}"))
        );
    }
    let m = |runs: &[Run], f: Measure| median(&runs.iter().map(f).collect::<Vec<_>>());
    let ratio = |f: Measure| m(with, f) / m(without, f);
    let pair_ratios = |f: Measure| without.iter().zip(with).map(|(a, b)| f(b) / f(a)).collect::<Vec<_>>();
    let _ = writeln!(
        md,
        "\n| ratio with/without | of the medians | median of the per-pair ratios | its interval (distribution-free) | pairs where the ratio < 1 | target |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let rows: [(&str, Measure, &str); 3] = [
        ("throughput", |r| r.throughput, "≥ 0.99"),
        ("TTFT p50", |r| r.ttft_p50_ms, ""),
        ("TTFT p99", |r| r.ttft_p99_ms, "≤ 1.01"),
    ];
    for (name, f, target) in rows {
        let pairs = pair_ratios(f);
        let interval = median_interval(&pairs).map_or("– (too few pairs)".to_string(), |(lo, hi, conf)| {
            format!("{lo:.3} – {hi:.3} ({:.1}%)", 100.0 * conf)
        });
        let lower = pairs.iter().filter(|r| **r < 1.0).count();
        let _ = writeln!(
            md,
            "| {name} | **{:.3}** | {:.3} | {interval} | {lower} of {} | {target} |",
            ratio(f),
            median(&pairs),
            pairs.len()
        );
    }
    let spread = |runs: &[Run]| {
        let v: Vec<f64> = runs.iter().map(|r| r.throughput).collect();
        let (lo, hi) = (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
        100.0 * (hi - lo) / median(&v)
    };
    let _ = writeln!(
        md,
        "\nRun-to-run spread of throughput (max − min over median): without {:.1}%, with {:.1}%. The interval holds the true median of the per-pair ratios with the confidence given, whatever their distribution (order statistics, each pair independent); the A/B settles a target only when its interval lies on one side of it.",
        spread(without),
        spread(with)
    );
    let ratios = pair_ratios(|r| r.throughput);
    if let (Some(n1), Some(n05)) =
        (values_for_half_width(&ratios, 0.01), values_for_half_width(&ratios, 0.005))
    {
        let hours = |n: u64| n as f64 * seconds_per_pair / 3600.0;
        let _ = writeln!(
            md,
            "\nResolution: the per-pair throughput ratios have a standard deviation of {:.3}. A 95% interval of ±1 point around their mean would need about {n1} pairs ({:.1} h at this run's {:.0} s per pair), ±0.5 point about {n05} ({:.1} h); the median's interval needs more.",
            std_dev(&ratios),
            hours(n1),
            seconds_per_pair,
            hours(n05)
        );
    }
    if variant != Variant::Control {
        md.push_str(&against_control(&ratios));
    }
    md
}

/// This run's per-pair throughput ratios against those of the A/A control stored in
/// BENCHMARKS.md (nothing attached on either side): whether the A/B can tell the agent from
/// this machine's noise at all. Means and a normal-approximation 95% interval of their
/// difference (Welch), which needs no assumption about the noise beyond independent pairs.
fn against_control(ratios: &[f64]) -> String {
    let doc = std::fs::read_to_string(cmd::root().join("BENCHMARKS.md")).unwrap_or_default();
    let Some(control) = super::report::section(&doc, "vllm-control") else {
        return String::new();
    };
    let stamp = control.lines().find(|l| l.starts_with('_')).unwrap_or("").trim_matches('_');
    match compare_means(ratios, &table_ratios(control)) {
        Some(c) => format!(
            "\nAgainst this machine's A/A control ({stamp}; {} pairs, mean ratio {:.3}): this run's mean ratio {:.3}, difference {:+.3}, 95% interval {:+.3} to {:+.3}: {}.\n",
            c.control_pairs,
            c.control_mean,
            c.mean,
            c.difference,
            c.low,
            c.high,
            if c.low > 0.0 || c.high < 0.0 {
                "the A/B tells this run from noise"
            } else {
                "the A/B cannot tell this run from noise"
            }
        ),
        None => String::new(),
    }
}

/// The with/without throughput ratio of each pair in a stored `bench vllm` table
/// (`| pair | req/s without | req/s with | …`).
fn table_ratios(section: &str) -> Vec<f64> {
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // "", pair, without, with, …
            cells.get(1)?.parse::<u32>().ok()?;
            let (a, b): (f64, f64) = (cells.get(2)?.parse().ok()?, cells.get(3)?.parse().ok()?);
            (a > 0.0).then(|| b / a)
        })
        .collect()
}

#[derive(Debug, PartialEq)]
struct Comparison {
    mean: f64,
    control_mean: f64,
    control_pairs: usize,
    difference: f64,
    low: f64,
    high: f64,
}

/// Difference of the means of `run` and `control`, with a 95% interval (normal approximation).
fn compare_means(run: &[f64], control: &[f64]) -> Option<Comparison> {
    if run.len() < 3 || control.len() < 3 {
        return None;
    }
    let se = |v: &[f64]| std_dev(v) / (v.len() as f64).sqrt();
    let difference = mean(run) - mean(control);
    let half = 1.96 * (se(run).powi(2) + se(control).powi(2)).sqrt();
    Some(Comparison {
        mean: mean(run),
        control_mean: mean(control),
        control_pairs: control.len(),
        difference,
        low: difference - half,
        high: difference + half,
    })
}

/// The number after `"key":` in a compact JSON document.
fn json_number(doc: &str, key: &str) -> Option<f64> {
    let at = doc.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = doc[at..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ratios_are_read_from_a_stored_table() {
        let section = "_`cargo xtask bench vllm` · date_\n\n| pair | req/s without | req/s with | TTFT |\n|---|---|---|---|\n| 1 | 40.00 | 38.00 | 1 / 2 |\n| 2 | 50.00 | 55.00 | 1 / 2 |\n\n| throughput | **0.950** | 0.97 |\n";
        let r = table_ratios(section);
        assert_eq!(r.len(), 2);
        assert!((r[0] - 0.95).abs() < 1e-12 && (r[1] - 1.1).abs() < 1e-12, "{r:?}");
    }

    #[test]
    fn a_run_is_told_from_the_control_only_when_the_interval_excludes_zero() {
        let control = [0.9, 1.0, 1.1, 0.95, 1.05];
        // The same spread shifted by 0.01: inside the noise.
        let close: Vec<f64> = control.iter().map(|x| x - 0.01).collect();
        let c = compare_means(&close, &control).unwrap();
        assert!((c.difference + 0.01).abs() < 1e-12);
        assert!(c.low < 0.0 && c.high > 0.0, "{c:?}");
        // Shifted by 0.2: told apart.
        let far: Vec<f64> = control.iter().map(|x| x - 0.2).collect();
        assert!(compare_means(&far, &control).unwrap().high < 0.0);
        assert_eq!(compare_means(&[1.0, 1.0], &control), None);
    }

    #[test]
    fn numbers_are_read_from_compact_json() {
        let doc = r#"{"failed":0,"request_throughput":12.5,"p99_ttft_ms":3.25e1}"#;
        assert_eq!(json_number(doc, "request_throughput"), Some(12.5));
        assert_eq!(json_number(doc, "p99_ttft_ms"), Some(32.5));
        assert_eq!(json_number(doc, "failed"), Some(0.0));
        assert_eq!(json_number(doc, "missing"), None);
    }
}
