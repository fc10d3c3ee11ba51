//! What processes and clients on the node can do to the agent through what it watches (root):
//! unprivileged impersonators of vLLM's API server, a hostile `/metrics` page, storms of
//! connections over the connection table, and the memory the agent needs per connection.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{
    Agent,
    client::{Client, Completion},
    fake_vllm::FakeVllm,
    free_port, require_root, series_value,
    servers::{Server, python},
    sum_matching,
};

const NOBODY: u32 = 65534;

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// How long the agent takes to answer `path`, asserting it answers `status`.
fn answer_time(agent: &Agent, path: &str, status: u16) -> Duration {
    let t = Instant::now();
    let (got, _) = agent.try_get(path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(got, status, "GET {path}");
    t.elapsed()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn impersonators_as_nobody_neither_stall_the_agent_nor_exceed_its_caps() {
    require_root();
    // 70 processes of an unprivileged user, titled like vLLM's API server, listening and never
    // answering: more than the agent follows (64).
    let fakes = FakeVllm::impostors(70, NOBODY);
    let started = Instant::now();
    let mut agent = Agent::spawn(&[], &["--discovery-interval", "1s", "--scrape-interval", "1s"]);
    // Health answers from the start, before the first scan (so no liveness probe restarts an
    // agent that a node full of impostors slows down); ready once the first scan is done.
    agent.wait_until_ready(|a| matches!(a.try_get("/healthz"), Ok((200, _))));
    let healthy = started.elapsed();
    agent.wait_until_ready(|a| matches!(a.try_get("/readyz"), Ok((200, _))));
    let ready = started.elapsed();
    println!("hostile: healthy {healthy:?}, ready {ready:?} after start with 70 silent impersonators");
    assert!(healthy < Duration::from_secs(5), "healthy only after {healthy:?}");

    // Every round describes them all again, each stalling; the agent keeps answering at once.
    let mut worst = Duration::ZERO;
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        worst = worst.max(answer_time(&agent, "/healthz", 200)).max(answer_time(&agent, "/metrics", 200));
        thread::sleep(Duration::from_millis(200));
    }
    println!("hostile: slowest /healthz or /metrics answer {worst:?}");
    assert!(worst < Duration::from_secs(1), "an answer took {worst:?}");

    let text = agent.metrics();
    assert_eq!(
        series_value(&text, r#"inferwatch_discovery_left_out{what="instances"}"#),
        Some(6.0),
        "{text}"
    );
    let instances = agent.json("/api/v1/instances");
    let instances = instances.as_array().unwrap();
    assert_eq!(instances.len(), 64);
    assert!(instances.iter().all(|i| i["verified"] == false), "a title alone does not verify");
    assert_eq!(series_value(&text, "inferwatch_watched_processes"), Some(64.0));
    drop(fakes);
    // Gone with their processes: nothing left out, nothing watched.
    wait_for("the impostors forgotten", Duration::from_secs(10), || {
        let text = agent.metrics();
        series_value(&text, "inferwatch_watched_processes") == Some(0.0)
            && series_value(&text, r#"inferwatch_discovery_left_out{what="instances"}"#) == Some(0.0)
    });
    assert!(agent.stop().success());
}

#[test]
fn hostile_pages_are_capped_and_the_agent_keeps_answering() {
    require_root();
    // 300,000 samples (~10 MiB): over the page cap. 120,000 (~4 MiB): under it, over the
    // sample cap (50,000).
    let (big_port, many_port) = (free_port(), free_port());
    let mut big = FakeVllm::start(Command::new("python3"), "127.0.0.1", big_port, &["--mode", "huge"]);
    let mut many = FakeVllm::start(
        Command::new("python3"),
        "127.0.0.1",
        many_port,
        &["--mode", "huge", "--samples", "120000"],
    );
    for (f, port) in [(&mut big, big_port), (&mut many, many_port)] {
        f.wait(|| TcpStream::connect(("127.0.0.1", port)).is_ok());
    }
    let agent = Agent::start_discovering(&["--discovery-interval", "1s", "--scrape-interval", "1s"]);
    let (big_id, many_id) = (format!("localhost:{big_port}"), format!("localhost:{many_port}"));
    let mut worst = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        worst = worst.max(answer_time(&agent, "/healthz", 200));
        let t = Instant::now();
        let text = agent.metrics();
        worst = worst.max(t.elapsed());
        let errors = series_value(
            &text,
            &format!(r#"inferwatch_vllm_scrape_errors_total{{vllm_instance="{big_id}",reason="too_large"}}"#),
        )
        .unwrap_or(0.0);
        let up = series_value(&text, &format!(r#"inferwatch_vllm_up{{vllm_instance="{many_id}"}}"#));
        if errors >= 2.0 && up == Some(1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "both pages scraped within 30 s:\n{text}");
        thread::sleep(Duration::from_millis(200));
    };
    println!("hostile: slowest answer while scraping both pages {worst:?}");
    assert!(worst < Duration::from_secs(1), "an answer took {worst:?}");
    assert_eq!(series_value(&text, &format!(r#"inferwatch_vllm_up{{vllm_instance="{big_id}"}}"#)), Some(0.0));
    // The capped page: 50,000 samples kept, the rest counted, never exported.
    let refused = series_value(&text, r#"inferwatch_series_refused_total{family="vllm"}"#).unwrap_or(0.0);
    assert!(refused >= 70_000.0, "refused {refused}");
    let flood = text.lines().filter(|l| l.starts_with("vllm:flood_total")).count();
    assert!(flood <= 50_000, "{flood} samples of the flood exported");
    let rss = rss_kib(agent.pid());
    println!("hostile: agent RSS {rss} KiB after scraping both pages");
    assert!(rss < 200 * 1024, "RSS {rss} KiB");
    assert!(agent.stop().success());
}

#[test]
fn an_eviction_storm_leaves_nothing_in_flight() {
    require_root();
    let server = Server::uvicorn();
    let agent = Agent::start_with(&[server.pid()], &["--no-discovery", "--max-connections", "100"]);
    // 300 streams at once over a table of 100: 200 connections evicted mid-request.
    let slow = Completion { model: "storm".into(), pad: 1, max_tokens: 1000, delay_ms: 20.0, stream: true };
    let clients: Vec<Client> = (0..300)
        .map(|_| {
            let mut c = Client::connect(server.addr);
            c.send_raw(&slow.bytes());
            c
        })
        .collect();
    let clients: Vec<Client> = clients
        .into_iter()
        .map(|mut c| {
            assert_eq!(c.read_response(Some(1)).content_events, 1);
            c
        })
        .collect();
    let text = agent.metrics();
    println!(
        "hostile: mid-storm in flight {}, tracked {}",
        sum_matching(&text, "inferwatch_http_requests_in_flight", ""),
        sum_matching(&text, "inferwatch_connections_tracked", "")
    );
    for c in clients {
        c.abort();
    }
    wait_for("in-flight and tracked back to 0", Duration::from_secs(20), || {
        let text = agent.metrics();
        let (in_flight, tracked) = (
            sum_matching(&text, "inferwatch_http_requests_in_flight", ""),
            sum_matching(&text, "inferwatch_connections_tracked", ""),
        );
        println!("hostile: after the storm in flight {in_flight}, tracked {tracked}");
        in_flight == 0.0 && tracked == 0.0
    });
    let text = agent.metrics();
    let evicted = sum_matching(&text, "inferwatch_connections_evicted_total", "");
    let by_outcome =
        |o: &str| sum_matching(&text, "inferwatch_http_requests_total{", &format!("outcome=\"{o}\""));
    let (ev, ab) = (by_outcome("evicted"), by_outcome("aborted"));
    println!("hostile: {evicted} connections evicted; requests evicted {ev}, aborted {ab}");
    assert!(evicted >= 200.0, "{evicted}");
    assert_eq!(ev + ab, 300.0, "every request ended, evicted or aborted");
    assert!(agent.stop().success());
}

/// RLIMIT_NOFILE of this process, raised to at least `n`.
fn allow_files(n: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointers for the duration of the calls.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        assert!(limit.rlim_max >= n, "RLIMIT_NOFILE's hard limit {} is under {n}", limit.rlim_max);
        limit.rlim_cur = limit.rlim_cur.max(n);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "raising RLIMIT_NOFILE");
    }
}

struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent's memory with its whole connection table (16,384) mid-request: each connection
/// has sent its request and received the head and a first event, and stays open.
#[test]
fn memory_with_16384_connections_mid_request() {
    require_root();
    const CONNECTIONS: usize = 16_384;
    allow_files(CONNECTIONS as u64 + 512);
    let port = free_port();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("servers/hold_streams.py");
    let mut child =
        Command::new(python()).arg(script).arg(port.to_string()).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    assert_eq!(line, "listening\n");
    let holder = Holder(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = Agent::start(&[holder.0.id()]);
    let idle = rss_kib(agent.pid());
    let request = Completion { model: "hold".into(), pad: 64, max_tokens: 1, delay_ms: 0.0, stream: true };
    let started = Instant::now();
    // One descriptor per connection (the limit is 20,000 here): plain sockets, not `Client`s.
    let bytes = request.bytes();
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(&bytes).unwrap();
        clients.push(c);
    }
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\n\n\r\n") {
            let n = c.read(&mut buf).expect("the first event");
            assert!(n > 0, "closed before the first event");
            seen.extend_from_slice(&buf[..n]);
        }
    }
    println!("hostile: {CONNECTIONS} streams open in {:?}", started.elapsed());
    wait_for("every stream in flight", Duration::from_secs(60), || {
        sum_matching(&agent.metrics(), "inferwatch_http_requests_in_flight", "") >= CONNECTIONS as f64 - 16.0
    });
    let text = agent.metrics();
    let full = rss_kib(agent.pid());
    let per = (full.saturating_sub(idle)) as f64 * 1024.0 / CONNECTIONS as f64;
    println!(
        "hostile: agent RSS idle {idle} KiB, with {} connections tracked and {} in flight {full} KiB ({per:.0} B per connection)",
        sum_matching(&text, "inferwatch_connections_tracked", ""),
        sum_matching(&text, "inferwatch_http_requests_in_flight", ""),
    );
    // The DaemonSet's limit is 256 MiB: well within it.
    assert!(full < 160 * 1024, "RSS {full} KiB with {CONNECTIONS} connections");
    drop(clients);
    wait_for("in flight back to 0", Duration::from_secs(60), || {
        sum_matching(&agent.metrics(), "inferwatch_http_requests_in_flight", "") == 0.0
    });
    assert!(agent.stop().success());
}
