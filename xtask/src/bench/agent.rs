//! The agent's own cost: P4 (CPU and memory at fixed SSE event rates, `/metrics` render time
//! with 2k series) and P2 (`wrk` at full speed against a server it watches).

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{
    CpuMeter, flag, median, percentile, start_agent, start_agent_on, status_field, stop_agent, sum,
    wait_for_port,
};
use crate::{
    cmd::{self, Result},
    tasks::{self, Profile},
};

/// Streams paced by the server: each connection gets a content event every 10 ms.
const EVENTS_PER_STREAM: f64 = 100.0;

/// P4: a fresh agent per rate watches the Rust SSE server while `sseload` streams 64-token
/// completions at `--rates` content events per second (`0` = idle, `max` = 4 connections as
/// fast as the server writes) for `--seconds`. Reports the rate the agent counted, its CPU
/// (user+sys) during the window and its peak RSS.
pub fn events(args: &[String]) -> Result<String> {
    let seconds = flag(args, "--seconds", 20)?;
    let rates = match args.iter().position(|a| a == "--rates") {
        Some(i) => args.get(i + 1).ok_or("--rates needs a list, e.g. 0,1000,10000")?.clone(),
        None => "0,1000,10000".into(),
    };
    tasks::build(Profile::Release)?;
    let programs = tasks::build_test_programs(&["sseserver", "sseload"])?;
    let (mut server, port) = start_sseserver(&programs)?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "A fresh agent per row watches the Rust SSE server (one `writev` per event) while `sseload` streams 64-token completions for {seconds} s: rate `r` is ⌈r/100⌉ connections, each paced by the server to one content event every 10 ms; `max` is 4 connections as fast as the server writes. CPU is the agent's user+sys during the window; RSS is its peak (VmHWM).\n"
    );
    let _ = writeln!(
        md,
        "| target events/s | content events/s counted | kernel events/s | lost: ring full / agent queue full | agent CPU (% of one core) | peak RSS (MiB) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let mut result = Ok(());
    for rate in rates.split(',') {
        match events_at(rate.trim(), seconds, port, server.id(), &programs) {
            Ok(row) => md.push_str(&row),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    result.map(|()| md)
}

fn events_at(rate: &str, seconds: u64, port: u16, server: u32, programs: &std::path::Path) -> Result<String> {
    let (connections, delay_ms) = match rate {
        "max" => (4, 0.0),
        r => {
            let r: f64 = r.parse().map_err(|_| format!("--rates: {r:?} is not a number or `max`"))?;
            let c = (r / EVENTS_PER_STREAM).ceil().max(0.0) as u64;
            (c, if c == 0 { 0.0 } else { 1000.0 * c as f64 / r })
        }
    };
    let (mut agent, agent_port) = start_agent_on(&tasks::agent_binary(Profile::Release), server, &[])?;
    let metrics = || cmd::http_get(agent_port, "/metrics").map(|(_, b)| b).ok_or("the agent does not answer");
    let before = metrics()?;
    let cpu = CpuMeter::start(agent.id());
    if connections == 0 {
        thread::sleep(Duration::from_secs(seconds));
    } else {
        cmd::output(Command::new(programs.join("sseload")).args([
            &format!("127.0.0.1:{port}"),
            &connections.to_string(),
            &seconds.to_string(),
            "64",
            "load",
            &delay_ms.to_string(),
        ]))
        .ok_or("sseload failed")?;
    }
    // Let the agent drain what is queued before the window closes.
    thread::sleep(Duration::from_millis(200));
    let cpu = cpu.percent();
    let after = metrics()?;
    let peak_rss_kib = status_field(agent.id(), "VmHWM:").unwrap_or(0);
    stop_agent(&mut agent)?;
    let delta = |prefix: &str| sum(&after, prefix) - sum(&before, prefix);
    let content = super::sum_where(&after, "inferwatch_http_stream_events_total{", "kind=\"content\"")
        - super::sum_where(&before, "inferwatch_http_stream_events_total{", "kind=\"content\"");
    let row = format!(
        "| {rate} | {:.0} | {:.0} | {:.0} / {:.0} | {:.2} | {:.1} |\n",
        content / seconds as f64,
        delta("inferwatch_agent_events_total") / seconds as f64,
        delta("inferwatch_agent_events_lost_total{reason=\"ring_buffer_full\""),
        delta("inferwatch_agent_events_lost_total{reason=\"agent_queue_full\""),
        cpu,
        peak_rss_kib as f64 / 1024.0
    );
    eprintln!("bench events: {row}");
    Ok(row)
}

/// P4: time to serve `/metrics` with about 2,000 series: the agent scrapes `--pages` copies of
/// a real vLLM 0.32 page (442 samples, ~330 re-exported series each, served by Python's http.server on distinct loopback
/// addresses, so each is its own instance) and re-exports them with its own families.
pub fn render(args: &[String]) -> Result<String> {
    let pages = flag(args, "--pages", 6)?;
    let gets = flag(args, "--gets", 200)?;
    tasks::build(Profile::Release)?;
    let dir = cmd::root().join("target/bench/render");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let fixture = cmd::root().join("tests/fixtures/vllm-0.32.0-cpu/metrics.txt");
    std::fs::copy(&fixture, dir.join("metrics")).map_err(|e| format!("{}: {e}", fixture.display()))?;
    let port = cmd::free_port()?;
    let mut pages_server = Command::new("python3")
        .args(["-m", "http.server", "--bind", "0.0.0.0", "--directory"])
        .arg(&dir)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("python3 -m http.server: {e}"))?;
    wait_for_port(port, &mut pages_server)?;
    let agent_port = cmd::free_port()?;
    let mut agent = cmd::as_root(&tasks::agent_binary(Profile::Release));
    agent.args(["--listen", &format!("127.0.0.1:{agent_port}"), "--no-discovery", "--scrape-interval", "1s"]);
    agent.args(["--log-level", "warn"]).stdout(Stdio::null());
    for i in 0..pages {
        agent.args(["--vllm-url", &format!("http://127.0.0.{}:{port}", i + 1)]);
    }
    let mut agent = agent.spawn().map_err(|e| format!("starting the agent: {e}"))?;
    let result = render_measured(agent_port, pages, gets);
    let _ = stop_agent(&mut agent);
    let _ = pages_server.kill();
    let _ = pages_server.wait();
    result
}

fn render_measured(agent_port: u16, pages: u64, gets: u64) -> Result<String> {
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Some((200, text)) = cmd::http_get(agent_port, "/metrics")
            && sum(&text, "inferwatch_vllm_up") as u64 == pages
        {
            break text;
        }
        if Instant::now() > deadline {
            return Err(format!("the agent did not scrape all {pages} pages within 30 s"));
        }
        thread::sleep(Duration::from_millis(200));
    };
    let mut times = Vec::new();
    for _ in 0..gets {
        let start = Instant::now();
        cmd::http_get(agent_port, "/metrics").ok_or("the agent does not answer")?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "The agent re-exports {pages} scraped vLLM pages with its own families: {} series, {} bytes. {gets} sequential `GET /metrics` (a new connection each, timed by the client, so TCP set-up included):\n",
        series(&text),
        text.len()
    );
    let _ = writeln!(md, "| median | p99 | max |");
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(
        md,
        "| {:.2} ms | {:.2} ms | {:.2} ms |",
        median(&times),
        percentile(&times, 0.99),
        times.iter().copied().fold(0.0, f64::max)
    );
    Ok(md)
}

/// P2: `wrk -t1 -c8` against the Rust test server (keep-alive; every request a complete HTTP
/// exchange for the agent to follow), rounds alternating without and with the agent watching it.
pub fn wrk(args: &[String]) -> Result<String> {
    let rounds = flag(args, "--rounds", 5)?;
    let seconds = flag(args, "--seconds", 10)?;
    tasks::build(Profile::Release)?;
    if Command::new("wrk").arg("--version").output().is_err() {
        cmd::run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "wrk"]))?;
    }
    let programs = tasks::build_test_programs(&["sseserver"])?;
    let (mut server, port) = start_sseserver(&programs)?;
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
        let cpu = CpuMeter::start(child.id());
        with.push(once(seconds)?);
        // The agent's own CPU while wrk ran: what it takes from the two saturated cores.
        agent_cpu.push(cpu.percent());
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
    let mut md = String::new();
    let _ = writeln!(
        md,
        "`wrk -t1 -c8 -d{seconds}s` against the Rust test server (keep-alive, a 404 with a body for each `GET /health`), {rounds} rounds alternating without and with the agent watching the server (started and stopped between rounds, outside the measured window):\n"
    );
    let _ = writeln!(md, "| | req/s per round | median |");
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(md, "| without the agent | {} | {a:.0} |", join(&without, 0));
    let _ = writeln!(md, "| with the agent | {} | {b:.0} |", join(&with, 0));
    let _ = writeln!(
        md,
        "| the agent's CPU during the rounds with it (% of one core) | {} | {:.1} |",
        join(&agent_cpu, 1),
        median(&agent_cpu)
    );
    let _ = writeln!(md, "\n**Ratio with/without: {:.3}** (target ≥ 0.97).", b / a);
    Ok(md)
}

/// The Rust SSE test server on a free port, once it listens.
fn start_sseserver(programs: &std::path::Path) -> Result<(std::process::Child, u16)> {
    let port = cmd::free_port()?;
    let mut server = Command::new(programs.join("sseserver"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("sseserver: {e}"))?;
    wait_for_port(port, &mut server)?;
    Ok((server, port))
}

fn join(v: &[f64], decimals: usize) -> String {
    v.iter().map(|x| format!("{x:.decimals$}")).collect::<Vec<_>>().join(" · ")
}
