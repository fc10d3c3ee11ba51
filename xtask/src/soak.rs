//! `cargo xtask soak --minutes N`: the agent (release build, discovery on, as in production)
//! next to the real vLLM of the end-to-end tests under a mixed load — streamed and plain
//! completions and chats on fresh connections, a stream abandoned mid-way every 2 s, and a
//! SIGKILL + restart of vLLM every `--restart-every` minutes (default 10) — while the agent's
//! RSS, CPU and lost events are sampled every 10 s. Prints a summary (also written to
//! target/soak/summary.txt) and fails if the agent died, lost events, or grew its RSS by more
//! than 10% between the end of the first restart cycle's warm-up and the end.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    bench::{self, sum},
    cmd::{self, Result},
    tasks::{self, Profile},
    vllm,
};

const SAMPLE_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    aborted: AtomicU64,
}

struct Sample {
    at_s: f64,
    rss_mib: f64,
    cpu_s: f64,
    events: f64,
    lost: f64,
}

pub fn soak(args: &[String]) -> Result {
    let flag = |name: &str, default: f64| -> Result<f64> {
        match args.iter().position(|a| a == name) {
            Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).ok_or(format!("{name} needs a number")),
            None => Ok(default),
        }
    };
    let minutes = flag("--minutes", 30.0)?;
    let restart_every = flag("--restart-every", 10.0)?;
    tasks::build(Profile::Release)?;
    vllm::ensure()?;
    let dir = cmd::root().join("target/soak");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = cmd::free_port()?;
    let agent_port = cmd::free_port()?;
    let mut vllm_child = vllm::serve(port, &dir.join("vllm-0.log"))?;
    let agent_log = std::fs::File::create(dir.join("agent.log")).map_err(|e| e.to_string())?;
    let mut agent = cmd::as_root(&tasks::agent_binary(Profile::Release))
        .args(["--listen", &format!("127.0.0.1:{agent_port}"), "--scrape-interval", "5s"])
        .stderr(agent_log)
        .spawn()
        .map_err(|e| format!("starting the agent: {e}"))?;
    let result = drive(minutes, restart_every, port, agent_port, &mut vllm_child, &mut agent, &dir);
    for child in [&mut agent, &mut vllm_child] {
        // SAFETY: signalling our own children (vLLM: its whole process group).
        unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    for child in [&mut agent, &mut vllm_child] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn drive(
    minutes: f64,
    restart_every: f64,
    port: u16,
    agent_port: u16,
    vllm_child: &mut Child,
    agent: &mut Child,
    dir: &std::path::Path,
) -> Result {
    eprintln!("soak: waiting for vLLM (logs in {})", dir.display());
    vllm::wait_ready(port, vllm_child)?;
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..3 {
        let (load, stop) = (load.clone(), stop.clone());
        workers.push(thread::spawn(move || request_loop(port, i, &load, &stop)));
    }
    {
        let (load, stop) = (load.clone(), stop.clone());
        workers.push(thread::spawn(move || abort_loop(port, &load, &stop)));
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(minutes * 60.0);
    let mut next_restart = start + Duration::from_secs_f64(restart_every * 60.0);
    let mut next_sample = start;
    let mut samples: Vec<Sample> = Vec::new();
    let mut restarts: Vec<(f64, f64)> = Vec::new(); // (vLLM ready after s, watched again after s)
    let mut failure = None;
    eprintln!("soak: {minutes} min of mixed load; vLLM restarted every {restart_every} min");
    while Instant::now() < end {
        if let Ok(Some(status)) = agent.try_wait() {
            failure = Some(format!("the agent exited ({status})"));
            break;
        }
        if Instant::now() >= next_sample {
            if let Some(s) = sample(agent.id(), agent_port, start) {
                eprintln!(
                    "soak: {:>6.0} s  RSS {:>6.1} MiB  CPU {:>7.2} s  events {:>10.0}  lost {:>4.0}  load ok {} failed {} aborted {}",
                    s.at_s,
                    s.rss_mib,
                    s.cpu_s,
                    s.events,
                    s.lost,
                    load.ok.load(Ordering::Relaxed),
                    load.failed.load(Ordering::Relaxed),
                    load.aborted.load(Ordering::Relaxed)
                );
                samples.push(s);
            }
            next_sample += SAMPLE_EVERY;
        }
        if Instant::now() >= next_restart
            && end.saturating_duration_since(Instant::now()) > Duration::from_secs(60)
        {
            eprintln!("soak: SIGKILL vLLM (process group) and restart it");
            // SAFETY: killing our own child's process group.
            unsafe { libc::kill(-(vllm_child.id() as i32), libc::SIGKILL) };
            let _ = vllm_child.wait();
            let killed = Instant::now();
            *vllm_child = vllm::serve(port, &dir.join(format!("vllm-{}.log", restarts.len() + 1)))?;
            let new_pid = vllm_child.id();
            // Discovery finds the new processes before they listen: poll from the spawn.
            let watched = loop {
                let found = cmd::http_get(agent_port, "/api/v1/instances")
                    .is_some_and(|(_, body)| body.contains(&format!("\"root_pid\":{new_pid}")));
                if found || killed.elapsed() > Duration::from_secs(120) {
                    break if found { killed.elapsed().as_secs_f64() } else { f64::NAN };
                }
                thread::sleep(Duration::from_millis(200));
            };
            let ready = killed.elapsed().as_secs_f64() + vllm::wait_ready(port, vllm_child)?.as_secs_f64();
            eprintln!("soak: restarted vLLM watched {watched:.1} s after the kill, ready after {ready:.1} s");
            restarts.push((ready, watched));
            next_restart += Duration::from_secs_f64(restart_every * 60.0);
        }
        thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    thread::sleep(Duration::from_secs(6));
    let metrics = cmd::http_get(agent_port, "/metrics").map(|(_, m)| m).unwrap_or_default();
    if let Some(s) = sample(agent.id(), agent_port, start) {
        samples.push(s);
    }
    let summary = summarize(minutes, &samples, &restarts, &load, &metrics);
    println!("{summary}");
    std::fs::write(dir.join("summary.txt"), &summary).map_err(|e| e.to_string())?;
    if let Some(f) = failure {
        return Err(f);
    }
    verdict(&samples, &restarts)
}

/// The agent's RSS, CPU time and event counters now.
fn sample(pid: u32, agent_port: u16, start: Instant) -> Option<Sample> {
    let cpu_s = bench::cpu_ticks(pid) as f64 / bench::clock_ticks_per_second();
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let rss_mib = statm.split_whitespace().nth(1)?.parse::<f64>().ok()? * page / (1 << 20) as f64;
    let (_, metrics) = cmd::http_get(agent_port, "/metrics")?;
    Some(Sample {
        at_s: start.elapsed().as_secs_f64(),
        rss_mib,
        cpu_s,
        events: sum(&metrics, "inferwatch_agent_events_total"),
        lost: sum(&metrics, "inferwatch_agent_events_lost_total"),
    })
}

/// Sum of the samples of a series name (any labels).
fn summarize(
    minutes: f64,
    samples: &[Sample],
    restarts: &[(f64, f64)],
    load: &Load,
    metrics: &str,
) -> String {
    let mut out = String::new();
    let line = |out: &mut String, s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(&mut out, format!("soak summary ({} UTC, {minutes} min)", now_utc()));
    line(
        &mut out,
        format!(
            "load: {} requests answered, {} failed (connection refused while vLLM restarted), {} streams abandoned on purpose",
            load.ok.load(Ordering::Relaxed),
            load.failed.load(Ordering::Relaxed),
            load.aborted.load(Ordering::Relaxed)
        ),
    );
    for outcome in ["complete", "aborted"] {
        let counted: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("inferwatch_http_requests_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter(|l| l.contains("route=\"/v1/"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        line(&mut out, format!("agent: {counted} generation requests counted {outcome}"));
    }
    for (i, (ready, watched)) in restarts.iter().enumerate() {
        line(
            &mut out,
            format!("restart {}: vLLM ready after {ready:.1} s, watched again after {watched:.1} s", i + 1),
        );
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let rss: Vec<f64> = samples.iter().map(|s| s.rss_mib).collect();
        let max = rss.iter().cloned().fold(0.0, f64::max);
        let warm = warm_rss(samples);
        line(
            &mut out,
            format!(
                "agent RSS: {:.1} MiB at start, {warm:.1} MiB after 5 min, {:.1} MiB at the end, max {max:.1} MiB",
                first.rss_mib, last.rss_mib
            ),
        );
        let cpu = (last.cpu_s - first.cpu_s) / (last.at_s - first.at_s).max(1.0) * 100.0;
        let worst = samples
            .windows(2)
            .map(|w| (w[1].cpu_s - w[0].cpu_s) / (w[1].at_s - w[0].at_s).max(1.0) * 100.0)
            .fold(0.0, f64::max);
        line(
            &mut out,
            format!("agent CPU: {cpu:.2}% of one core on average, {worst:.2}% in the busiest 10 s"),
        );
        line(&mut out, format!("kernel events: {:.0} received, {:.0} lost", last.events, last.lost));
    }
    for name in [
        "inferwatch_connections_tracked",
        "inferwatch_connections_evicted_total",
        "inferwatch_http_requests_evicted_total",
    ] {
        line(&mut out, format!("{name} {}", sum(metrics, name)));
    }
    out
}

fn warm_rss(samples: &[Sample]) -> f64 {
    samples.iter().find(|s| s.at_s >= 300.0).or(samples.last()).map_or(0.0, |s| s.rss_mib)
}

fn verdict(samples: &[Sample], restarts: &[(f64, f64)]) -> Result {
    let Some(last) = samples.last() else { return Err("no samples".into()) };
    if last.lost > 0.0 {
        return Err(format!("the agent lost {} kernel events", last.lost));
    }
    let warm = warm_rss(samples);
    if last.at_s > 600.0 && last.rss_mib > warm * 1.10 {
        return Err(format!("RSS grew from {warm:.1} MiB (5 min) to {:.1} MiB", last.rss_mib));
    }
    if restarts.iter().any(|(_, watched)| watched.is_nan()) {
        return Err("a restarted vLLM was not watched again within 2 minutes".into());
    }
    Ok(())
}

fn now_utc() -> String {
    cmd::output(std::process::Command::new("date").args(["-u", "+%F %T"]))
        .unwrap_or_default()
        .trim()
        .to_string()
}

const BODIES: [(&str, &str); 4] = [
    ("/v1/completions", r#"{"model":"tiny","prompt":"soak test","max_tokens":16,"stream":true}"#),
    ("/v1/completions", r#"{"model":"tiny","prompt":"soak test","max_tokens":16}"#),
    (
        "/v1/chat/completions",
        r#"{"model":"tiny","messages":[{"role":"user","content":"soak"}],"max_tokens":16,"stream":true}"#,
    ),
    (
        "/v1/chat/completions",
        r#"{"model":"tiny","messages":[{"role":"user","content":"soak"}],"max_tokens":16}"#,
    ),
];

fn request(port: u16, path: &str, body: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(s)
}

/// Requests one after another on fresh connections (read to the end), cycling the bodies.
fn request_loop(port: u16, first: usize, load: &Load, stop: &AtomicBool) {
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        let (path, body) = BODIES[i % BODIES.len()];
        i += 1;
        let answered = request(port, path, body).and_then(|mut s| {
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            Ok(raw.starts_with(b"HTTP/1.1 200"))
        });
        match answered {
            Ok(true) => load.ok.fetch_add(1, Ordering::Relaxed),
            _ => {
                thread::sleep(Duration::from_millis(500));
                load.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Every 2 s, a long stream abandoned after its first bytes.
fn abort_loop(port: u16, load: &Load, stop: &AtomicBool) {
    let body = r#"{"model":"tiny","prompt":"abandoned","max_tokens":400,"min_tokens":400,"stream":true}"#;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = request(port, "/v1/completions", body) {
            let mut buf = [0u8; 512];
            if s.read(&mut buf).is_ok_and(|n| n > 0) {
                load.aborted.fetch_add(1, Ordering::Relaxed);
            }
            drop(s);
        }
        thread::sleep(Duration::from_secs(2));
    }
}
