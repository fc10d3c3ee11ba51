//! A/B benchmarks: the same workload without and with the agent, interleaved, in one run.
//! Ratios, not timed assertions: machines differ, ratios within one run do not lie as much.
//! Each benchmark writes its section of BENCHMARKS.md (see report.rs); `cargo xtask bench`
//! alone runs them all.
//!
//!   devnull [--rounds N] [--iterations N]   P3: what the probes add to `write()` on /dev/null
//!                                           and to socket I/O of an unwatched process
//!   programs [--iterations N] [--transport unix|tcp] [--agent-args "--capture-bytes 256"]
//!                                           P3: each program's run time (kernel statistics)
//!   events [--rates 0,1000,10000] [--seconds N]
//!                                           P4: agent CPU and RSS at fixed SSE event rates
//!   render [--pages N] [--gets N]           P4: `/metrics` render time with ~2,000 series
//!   wrk [--rounds N] [--seconds N]          P2: `wrk` at full speed, requests/s ratio
//!   vllm [--pairs N] [--requests N] [--concurrency N]
//!                                           P1: real vLLM throughput and TTFT ratios

mod agent;
mod kernel;
mod report;
mod vllm;

use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::cmd::{self, Result, run};

const USAGE: &str = "usage: cargo xtask bench [all | devnull [--rounds N] [--iterations N] | programs [--iterations N] | events [--rates LIST] [--seconds N] | render [--pages N] [--gets N] | wrk [--rounds N] [--seconds N] | vllm [--pairs N] [--requests N] [--concurrency N]]";

/// In the order `all` runs them: cheapest first, real vLLM last.
const ALL: [&str; 6] = ["devnull", "programs", "events", "render", "wrk", "vllm"];

pub fn bench(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        None | Some("all") => {
            let mut failed = Vec::new();
            for name in ALL {
                if let Err(e) = one(name, &[]) {
                    eprintln!("bench {name}: {e}");
                    failed.push(name);
                }
            }
            if failed.is_empty() { Ok(()) } else { Err(format!("failed: {}", failed.join(", "))) }
        }
        Some(name) if ALL.contains(&name) => one(name, &args[1..]),
        _ => Err(USAGE.into()),
    }
}

fn one(name: &str, args: &[String]) -> Result {
    let body = match name {
        "devnull" => kernel::devnull(args)?,
        "programs" => kernel::programs(args)?,
        "events" => agent::events(args)?,
        "render" => agent::render(args)?,
        "wrk" => agent::wrk(args)?,
        _ => vllm::vllm(args)?,
    };
    report::record(name, &section_name(name, args), args, &body)
}

/// The section a run writes: a variant, or extra agent flags, keep their own next to the
/// default run's (`vllm-sockets-capture-bytes-256`), so trying a setting never overwrites it.
fn section_name(name: &str, args: &[String]) -> String {
    let mut section = name.to_string();
    for flag in ["--variant", "--agent-args", "--transport"] {
        if let Some(text) = flag_text(args, flag) {
            let slug = text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty());
            for word in slug {
                section.push('-');
                section.push_str(word);
            }
        }
    }
    section
}

fn wait_for_port(port: u16, child: &mut Child) -> Result {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited before listening ({status})"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("nothing listened on port {port} within 20 s"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

pub(crate) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// A process's CPU use (user + system) from its start on, as a percentage of one core.
struct CpuMeter {
    pid: u32,
    ticks: u64,
    at: Instant,
}

impl CpuMeter {
    fn start(pid: u32) -> Self {
        Self { pid, ticks: cpu_ticks(pid), at: Instant::now() }
    }

    fn percent(&self) -> f64 {
        let seconds = cpu_ticks(self.pid).saturating_sub(self.ticks) as f64 / clock_ticks_per_second();
        100.0 * seconds / self.at.elapsed().as_secs_f64()
    }
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok())
}

fn flag(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => {
            args.get(i + 1).and_then(|v| v.parse().ok()).ok_or_else(|| format!("{name} needs a number"))
        }
    }
}

/// The text after `name` in `args`, if both are there.
fn flag_text<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn start_agent(agent: &Path, watch: u32) -> Result<Child> {
    start_agent_on(agent, watch, &[]).map(|(child, _)| child)
}

/// Starts the agent watching `watch`; returns it with the port it serves on.
fn start_agent_on(agent: &Path, watch: u32, extra: &[String]) -> Result<(Child, u16)> {
    let port = cmd::free_port()?;
    let mut child = cmd::as_root(agent)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--pid",
            &watch.to_string(),
            "--log-level",
            "warn",
            "--no-discovery",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the agent: {e}"))?;
    // /healthz answers once the programs are attached (the port itself is bound earlier).
    let deadline = Instant::now() + Duration::from_secs(20);
    while cmd::http_get(port, "/healthz").is_none_or(|(_, b)| b != "ok\n") {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the agent exited ({status})"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("the agent did not answer /healthz in 20 s".into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok((child, port))
}

fn stop_agent(child: &mut Child) -> Result {
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    child.wait().map_err(|e| format!("waiting for the agent: {e}"))?;
    Ok(())
}

/// The sum of the samples whose line starts with `prefix` in a Prometheus text page.
/// `series` is a metric name (that name exactly, any labels) or a name with the start of its
/// labels (`x_total{reason="a"`).
pub(crate) fn sum(text: &str, series: &str) -> f64 {
    sum_where(text, series, "")
}

/// Like [`sum`], over the lines that also contain `label` (e.g. `kind="content"`).
fn sum_where(text: &str, series: &str, label: &str) -> f64 {
    let selects = |l: &str| {
        l.starts_with(series)
            && (series.contains('{') || matches!(l.as_bytes().get(series.len()), Some(b'{' | b' ')))
    };
    text.lines()
        .filter(|l| selects(l) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Nearest-rank percentile, `q` in 0..=1.
fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// A distribution-free interval for the median of `v` with at least 95% confidence, and the
/// confidence it has: the k-th smallest and k-th largest values, with k the largest rank such
/// that fewer than k of n values fall below the true median with probability ≤ 2.5% (each value
/// is below it with probability ½, whatever the distribution). None below 6 values, where even
/// the extremes give less than 95%.
fn median_interval(v: &[f64]) -> Option<(f64, f64, f64)> {
    let n = v.len();
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    // `term` = P(X = j) and `cumulative` = P(X <= j) for X ~ Binomial(n, 1/2); `tail` keeps
    // P(X <= k - 1) for the rank k chosen.
    let mut term = 0.5f64.powi(n as i32);
    let (mut cumulative, mut tail) = (0.0, 0.0);
    let mut k = 0;
    for j in 0..n {
        cumulative += term;
        if cumulative > 0.025 {
            break;
        }
        (k, tail) = (j + 1, cumulative);
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return None;
    }
    Some((s[k - 1], s[n - k], 1.0 - 2.0 * tail))
}

/// About how many independent values a 95% interval of `± half_width` around their mean needs,
/// from the spread of `v` (normal approximation: n = (1.96·sd / half_width)²). The median's
/// interval needs more (π/2 times for normal data), so this is a lower bound for it. None
/// below 3 values, where a standard deviation says little.
fn values_for_half_width(v: &[f64], half_width: f64) -> Option<u64> {
    if v.len() < 3 {
        return None;
    }
    Some(((1.96 * std_dev(v) / half_width).powi(2)).ceil().max(1.0) as u64)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The sample standard deviation of `v`.
fn std_dev(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_needed_for_an_interval_of_given_width() {
        assert_eq!(values_for_half_width(&[1.0, 1.0], 0.01), None);
        // sd = 0.1 (values 0.9, 1.0, 1.1): (1.96 * 0.1 / 0.01)² = 384.16 → 385.
        assert_eq!(values_for_half_width(&[0.9, 1.0, 1.1], 0.01), Some(385));
        // Halving the width quadruples the count.
        assert_eq!(values_for_half_width(&[0.9, 1.0, 1.1], 0.005), Some(1537));
        assert_eq!(values_for_half_width(&[1.0, 1.0, 1.0], 0.01), Some(1));
        assert!((std_dev(&[0.9, 1.0, 1.1]) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn variants_and_agent_flags_get_sections_of_their_own() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(section_name("vllm", &args(&["--pairs", "10"])), "vllm");
        assert_eq!(section_name("vllm", &args(&["--variant", "sockets"])), "vllm-sockets");
        assert_eq!(
            section_name("vllm", &args(&["--variant", "sockets", "--agent-args", "--capture-bytes 256"])),
            "vllm-sockets-capture-bytes-256"
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn median_interval_by_order_statistics() {
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]), None, "5 values cannot give 95%");
        // n = 6: the extremes, 1 - 2/64.
        let (lo, hi, conf) = median_interval(&[6.0, 1.0, 5.0, 2.0, 4.0, 3.0]).unwrap();
        assert_eq!((lo, hi), (1.0, 6.0));
        assert!((conf - 0.96875).abs() < 1e-9);
        // n = 10: 2nd and 9th, 1 - 2 * 11/1024 = 97.9%.
        let v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let (lo, hi, conf) = median_interval(&v).unwrap();
        assert_eq!((lo, hi), (2.0, 9.0));
        assert!((conf - (1.0 - 22.0 / 1024.0)).abs() < 1e-9);
        // n = 30: 10th and 21st (P(X <= 9) = 2.14%, P(X <= 10) = 4.94%).
        let v: Vec<f64> = (1..=30).map(f64::from).collect();
        let (lo, hi, conf) = median_interval(&v).unwrap();
        assert_eq!((lo, hi), (10.0, 21.0));
        assert!(conf > 0.95 && conf < 0.96, "{conf}");
    }

    #[test]
    fn nearest_rank_percentile_and_prefix_sums() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[5.0], 0.99), 5.0);
        let page = "# HELP x_total x\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3.5\ny 9\n";
        assert_eq!(sum(page, "x_total"), 5.5);
        assert_eq!(sum(page, "x"), 0.0, "a name selects that metric only, not x_total");
        assert_eq!(sum(page, "x_total{a=\"2\""), 3.5);
    }
}
