//! A/B benchmarks: the same workload without and with the agent, interleaved, in one run.
//! Ratios, not timed assertions: machines differ, ratios within one run do not lie as much.
//!
//!   cargo xtask bench devnull [--rounds N] [--iterations N]
//!     the cost the agent adds to `write()` on /dev/null (any process) and to socket I/O of a
//!     process it does not watch.
//!   cargo xtask bench wrk [--rounds N] [--seconds N]
//!     P2, the worst case: `wrk` at full speed against a keep-alive HTTP server the agent
//!     watches (every request parsed and timed), requests/s with the agent ÷ without.

use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cmd::{self, Result, run},
    tasks::{self, Profile},
};

const USAGE: &str = "usage: cargo xtask bench <devnull [--rounds N] [--iterations N] | events [--seconds N] [--connections N] | programs [--iterations N] | wrk [--rounds N] [--seconds N]>";

pub fn bench(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        Some("devnull") => devnull(&args[1..]),
        Some("events") => events(&args[1..]),
        Some("programs") => programs(&args[1..]),
        Some("wrk") => wrk(&args[1..]),
        _ => Err(USAGE.into()),
    }
}

/// Per-program cost from the kernel's own statistics (`kernel.bpf_stats_enabled=1`): socket
/// operations of an unwatched process, then of a watched one (payload copy included), each
/// `--iterations` 256-byte write+read pairs on a Unix socket pair.
fn programs(args: &[String]) -> Result {
    let iterations = flag(args, "--iterations", 1_000_000)?;
    tasks::build(Profile::Release)?;
    let programs = tasks::build_test_programs(&["writeloop"])?;
    let writeloop = programs.join("writeloop");
    let stats_flag = "/proc/sys/kernel/bpf_stats_enabled";
    let previous = std::fs::read_to_string(stats_flag).map_err(|e| format!("{stats_flag}: {e}"))?;
    std::fs::write(stats_flag, "1").map_err(|e| format!("enabling BPF statistics (root needed): {e}"))?;
    let result = programs_measured(&writeloop, iterations);
    let _ = std::fs::write(stats_flag, previous.trim());
    result
}

fn programs_measured(writeloop: &Path, iterations: u64) -> Result {
    use std::io::Write as _;
    // The watched process: a shell that waits for a line, then becomes writeloop (same pid).
    let mut watched = Command::new("sh")
        .args(["-c", &format!("read go; exec {} socketpair {iterations} 256", writeloop.display())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("sh: {e}"))?;
    let (mut agent, port) = start_agent_on(&tasks::agent_binary(Profile::Release), watched.id())?;
    let stats = |port: u16| -> Result<std::collections::BTreeMap<String, (f64, f64)>> {
        let (_, text) = cmd::http_get(port, "/metrics").ok_or("the agent does not answer")?;
        let mut out = std::collections::BTreeMap::new();
        for line in text.lines() {
            for (prefix, second) in [
                ("inferwatch_bpf_program_run_nanoseconds_total{program=\"", false),
                ("inferwatch_bpf_program_runs_total{program=\"", true),
            ] {
                if let Some(rest) = line.strip_prefix(prefix)
                    && let Some((name, value)) = rest.split_once("\"} ")
                {
                    let e = out.entry(name.to_string()).or_insert((0.0, 0.0));
                    let v: f64 = value.parse().unwrap_or(0.0);
                    if second { e.1 = v } else { e.0 = v }
                }
            }
        }
        Ok(out)
    };
    // The agent reads the kernel's totals every discovery tick (2 s).
    let settle = || thread::sleep(Duration::from_millis(2500));
    settle();
    let s0 = stats(port)?;
    let unwatched = measure_sized(writeloop, iterations)?;
    settle();
    let s1 = stats(port)?;
    watched.stdin.as_mut().ok_or("no stdin")?.write_all(b"go\n").map_err(|e| e.to_string())?;
    let out = watched.wait_with_output().map_err(|e| e.to_string())?;
    settle();
    let s2 = stats(port)?;
    stop_agent(&mut agent)?;
    let per_run = |a: &std::collections::BTreeMap<String, (f64, f64)>,
                   b: &std::collections::BTreeMap<String, (f64, f64)>,
                   p: &str| {
        let (x, y) = (a.get(p).copied().unwrap_or_default(), b.get(p).copied().unwrap_or_default());
        let runs = y.1 - x.1;
        (runs, if runs > 0.0 { (y.0 - x.0) / runs } else { f64::NAN })
    };
    println!(
        "\n## programs: kernel statistics per run (kernel.bpf_stats_enabled=1), {iterations} × (256-byte write + read) on a Unix socket pair"
    );
    println!("kernel: {}", cmd::output(Command::new("uname").arg("-r")).unwrap_or_default().trim());
    println!(
        "loop: unwatched {unwatched:.1} ns/iteration, watched {} ns/iteration",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    println!("| program | phase | runs | ns per run (stats overhead of ~100 ns included) |");
    println!("|---|---|---|---|");
    for program in ["sock_send_length", "sock_recv_length", "sched_switch", "sched_wakeup"] {
        for (phase, a, b) in [("unwatched process", &s0, &s1), ("watched process", &s1, &s2)] {
            let (runs, ns) = per_run(a, b, program);
            println!("| {program} | {phase} | {runs:.0} | {ns:.0} |");
        }
    }
    Ok(())
}

fn measure_sized(writeloop: &Path, iterations: u64) -> Result<f64> {
    let out = cmd::output(Command::new(writeloop).args(["socketpair", &iterations.to_string(), "256"]))
        .ok_or("writeloop failed")?;
    out.trim().parse().map_err(|e| format!("writeloop printed {out:?}: {e}"))
}

/// The agent under a stream of SSE events as fast as a local server can write them: events per
/// second it keeps up with, losses, its CPU and peak memory.
fn events(args: &[String]) -> Result {
    let seconds = flag(args, "--seconds", 10)?;
    let connections = flag(args, "--connections", 4)?;
    tasks::build(Profile::Release)?;
    let programs = tasks::build_test_programs(&["sseserver", "sseload"])?;
    let bin = |name: &str| programs.join(name);
    let port = cmd::free_port()?;
    let mut server = Command::new(bin("sseserver"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("sseserver: {e}"))?;
    wait_for_port(port, &mut server)?;
    let (mut agent, agent_port) = start_agent_on(&tasks::agent_binary(Profile::Release), server.id())?;
    let cpu_before = cpu_ticks(agent.id());
    let out = cmd::output(Command::new(bin("sseload")).args([
        &format!("127.0.0.1:{port}"),
        &connections.to_string(),
        &seconds.to_string(),
        "64",
    ]))
    .ok_or("sseload failed")?;
    // Let the agent finish what is queued: read once its event count stops moving.
    let get =
        |path: &str| cmd::http_get(agent_port, path).map(|(_, body)| body).ok_or("the agent does not answer");
    let mut metrics = get("/metrics")?;
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(200));
        let now = get("/metrics")?;
        let settled = now.lines().find(|l| l.starts_with("inferwatch_agent_events_total"))
            == metrics.lines().find(|l| l.starts_with("inferwatch_agent_events_total"));
        metrics = now;
        if settled {
            break;
        }
    }
    let cpu = cpu_ticks(agent.id()).saturating_sub(cpu_before) as f64 / clock_ticks_per_second();
    let peak_rss_kib = status_field(agent.id(), "VmHWM:").unwrap_or(0);
    stop_agent(&mut agent)?;
    let _ = server.kill();
    let _ = server.wait();

    let mut parts = out.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    let (requests, content_events) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let kernel_events = sum("inferwatch_agent_events_total");
    let lost = sum("inferwatch_agent_events_lost_total");
    let counted = sum("inferwatch_http_requests_total");
    let agent_content = sum("inferwatch_http_stream_events_total{");
    println!("\n## events: {connections} connections streaming 64-token completions for {seconds} s");
    println!("kernel: {}", cmd::output(Command::new("uname").arg("-r")).unwrap_or_default().trim());
    println!("| measure | value |");
    println!("|---|---|");
    println!("| requests sent / counted by the agent | {requests} / {counted} |");
    println!(
        "| client content events | {content_events} ({:.0}/s) |",
        content_events as f64 / seconds as f64
    );
    println!("| SSE events counted by the agent (all kinds) | {agent_content} |");
    println!(
        "| kernel events received by the agent | {kernel_events} ({:.0}/s) |",
        kernel_events / seconds as f64
    );
    println!("| events lost | {lost} |");
    for reason in ["ring_buffer_full", "agent_queue_full", "malformed"] {
        println!(
            "| … {reason} | {} |",
            sum(&format!("inferwatch_agent_events_lost_total{{reason=\"{reason}\"}}"))
        );
    }
    println!("| agent CPU | {cpu:.2} s ({:.1}% of one core) |", 100.0 * cpu / seconds as f64);
    println!("| agent peak RSS | {:.1} MiB |", peak_rss_kib as f64 / 1024.0);
    Ok(())
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
    cmd::output(Command::new("getconf").arg("CLK_TCK")).and_then(|v| v.trim().parse().ok()).unwrap_or(100.0)
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

fn devnull(args: &[String]) -> Result {
    let rounds = flag(args, "--rounds", 7)?;
    let iterations = flag(args, "--iterations", 3_000_000)?;
    tasks::build(Profile::Release)?;
    let programs = tasks::build_test_programs(&["writeloop"])?;
    let writeloop = programs.join("writeloop");
    let agent = tasks::agent_binary(Profile::Release);
    // Something to watch, so the kernel map holds an entry as in real use.
    let mut watched = Command::new("sleep").arg("3600").spawn().map_err(|e| format!("sleep: {e}"))?;

    let modes = ["devnull", "socketpair", "pingpong"];
    let mut results: Vec<(String, Vec<f64>, Vec<f64>)> =
        modes.iter().map(|m| (m.to_string(), Vec::new(), Vec::new())).collect();
    for round in 1..=rounds {
        for (mode, without, with) in results.iter_mut() {
            without.push(measure(&writeloop, mode, iterations)?);
            let mut child = start_agent(&agent, watched.id())?;
            let measured = measure(&writeloop, mode, iterations);
            stop_agent(&mut child)?;
            with.push(measured?);
            eprintln!(
                "bench: round {round}/{rounds} {mode}: without {:.1} ns, with {:.1} ns",
                without.last().unwrap(),
                with.last().unwrap()
            );
        }
    }
    let _ = watched.kill();
    let _ = watched.wait();

    println!("\n## devnull: agent attached vs not, {rounds} interleaved rounds of {iterations} iterations");
    println!("kernel: {}", cmd::output(Command::new("uname").arg("-r")).unwrap_or_default().trim());
    println!("| workload | without (median ns) | with (median ns) | added (ns) | ratio |");
    println!("|---|---|---|---|---|");
    for (mode, without, with) in &results {
        let (a, b) = (median(without), median(with));
        println!("| {} | {a:.1} | {b:.1} | {:+.1} | {:.3} |", describe(mode), b - a, b / a);
    }
    println!("raw (ns/iteration):");
    for (mode, without, with) in &results {
        println!("  {mode} without: {without:.1?}");
        println!("  {mode} with:    {with:.1?}");
    }
    Ok(())
}

fn describe(mode: &str) -> &'static str {
    match mode {
        "devnull" => "write() to /dev/null, any process",
        "socketpair" => "write()+read() on a socket pair, unwatched process",
        _ => "pipe round trip between two threads (2 switches, 2 wakeups), unwatched process",
    }
}

/// P2: `wrk -t1 -c8` against the Rust test server (keep-alive; every request a complete HTTP
/// exchange for the agent to follow), rounds alternating without and with the agent watching it.
fn wrk(args: &[String]) -> Result {
    let rounds = flag(args, "--rounds", 5)?;
    let seconds = flag(args, "--seconds", 10)?;
    tasks::build(Profile::Release)?;
    if cmd::output(Command::new("wrk").arg("--version")).is_none()
        && Command::new("wrk").arg("--version").output().is_err()
    {
        run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "wrk"]))?;
    }
    let programs = tasks::build_test_programs(&["sseserver"])?;
    let port = cmd::free_port()?;
    let mut server = Command::new(programs.join("sseserver"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("sseserver: {e}"))?;
    wait_for_port(port, &mut server)?;
    let agent = tasks::agent_binary(Profile::Release);
    let url = format!("http://127.0.0.1:{port}/health");
    let once = |secs: u64| -> Result<f64> {
        let out = Command::new("wrk")
            .args(["-t1", "-c8", &format!("-d{secs}s"), &url])
            .output()
            .map_err(|e| format!("wrk: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no Requests/sec in wrk's output:\n{text}"))
    };
    once(2)?; // warm-up
    let (mut without, mut with, mut agent_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        without.push(once(seconds)?);
        let mut child = start_agent(&agent, server.id())?;
        let (ticks, at) = (cpu_ticks(child.id()), Instant::now());
        with.push(once(seconds)?);
        // The agent's own CPU while wrk ran: what it takes from the two saturated cores.
        let cores =
            (cpu_ticks(child.id()) - ticks) as f64 / clock_ticks_per_second() / at.elapsed().as_secs_f64();
        agent_cpu.push(cores * 100.0);
        stop_agent(&mut child)?;
        eprintln!(
            "bench wrk: round {}: {:.0} req/s without, {:.0} with (agent {:.0}% of a core)",
            round + 1,
            without.last().unwrap(),
            with.last().unwrap(),
            agent_cpu.last().unwrap()
        );
    }
    let _ = server.kill();
    let _ = server.wait();
    let (a, b) = (median(&without), median(&with));
    println!(
        "P2 wrk -t1 -c8 -d{seconds}s, {rounds} interleaved rounds against a keep-alive server (404 on /health)"
    );
    println!("  without the agent: median {a:.0} req/s  {without:.0?}");
    println!("  with the agent:    median {b:.0} req/s  {with:.0?}");
    println!("  ratio with/without: {:.3} (target >= 0.97)", b / a);
    println!(
        "  the agent's CPU during the rounds with it: median {:.0}% of one core  {agent_cpu:.0?}",
        median(&agent_cpu)
    );
    Ok(())
}

fn measure(writeloop: &Path, mode: &str, iterations: u64) -> Result<f64> {
    let out = cmd::output(Command::new(writeloop).args([mode, &iterations.to_string()]))
        .ok_or_else(|| format!("{} {mode} failed", writeloop.display()))?;
    out.trim().parse().map_err(|e| format!("writeloop printed {out:?}: {e}"))
}

fn start_agent(agent: &Path, watch: u32) -> Result<Child> {
    start_agent_on(agent, watch).map(|(child, _)| child)
}

/// Starts the agent watching `watch`; returns it with the port it serves on.
fn start_agent_on(agent: &Path, watch: u32) -> Result<(Child, u16)> {
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

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
