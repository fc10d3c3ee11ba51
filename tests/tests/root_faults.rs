//! Faults on real processes (root): a server killed mid-stream, a /metrics that hangs or lies,
//! no NVML, a storm of abandoned connections, fd reuse, pid reuse. The agent must keep serving,
//! free what it held, never merge or invent, and count what it dropped.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{
    Agent, SockLoad,
    client::{Client, Completion},
    drain_connections, require_root, series_value,
    servers::Server,
    sum_matching,
};

const SSESERVER: &str = env!("CARGO_BIN_EXE_sseserver");
const SOCKLOAD: &str = env!("CARGO_BIN_EXE_sockload");

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn requests(text: &str, outcome: &str) -> f64 {
    sum_matching(text, "inferwatch_http_requests_total{", &format!("outcome=\"{outcome}\""))
}

fn stream(tokens: u32, delay_ms: f64) -> Completion {
    Completion { model: "m".into(), pad: 0, max_tokens: tokens, delay_ms, stream: true }
}

#[test]
fn a_server_killed_mid_stream_ends_its_requests_aborted_and_frees_them() {
    require_root();
    let mut server = Server::rust(SSESERVER);
    let pid = server.pid();
    let agent = Agent::start(&[pid]);
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(server.addr)).collect();
    for c in &mut clients {
        c.send_raw(&stream(100_000, 10.0).bytes());
        let _ = c.read_response(Some(2));
    }
    // Without discovery the agent does not know what the server serves: a model name becomes a
    // label only once the server has accepted a request for it, so these first three streams
    // are in flight as `other` (issue #23). Counted over every label.
    let in_flight =
        |t: &str| sum_matching(t, "inferwatch_http_requests_in_flight{", "route=\"/v1/completions\"");
    let text = agent.wait_for_metrics(Duration::from_secs(10), |t| in_flight(t) == 3.0);
    assert!(text.contains("inferwatch_http_requests_in_flight{model=\"other\""), "{text}");
    server.kill();
    let text = agent.wait_for_metrics(Duration::from_secs(10), |t| requests(t, "aborted") == 3.0);
    assert_eq!(in_flight(&text), 0.0, "{text}");
    assert_eq!(requests(&text, "complete"), 0.0);
    assert_eq!(series_value(&text, "inferwatch_connections_tracked"), Some(0.0), "state freed");
    // The next discovery pass sees the process gone: unwatched, its per-pid series removed.
    let text = agent.wait_for_metrics(Duration::from_secs(10), |t| {
        series_value(t, "inferwatch_watched_processes") == Some(0.0)
    });
    assert!(!text.contains(&format!("pid=\"{pid}\"")), "series of a dead process remain:\n{text}");
    assert!(agent.stop().success());
}

/// A fake vLLM `/metrics`: `reply` is written to every connection (None: accept and hang).
fn fake_metrics(reply: Option<&'static str>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            match reply {
                Some(body) => {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
                None => held.push(conn), // never answers, never closes
            }
        }
    });
    addr
}

#[test]
fn a_hanging_or_malformed_metrics_page_is_an_error_and_nothing_half_parsed_is_exported() {
    require_root();
    let hang = fake_metrics(None);
    let bad = fake_metrics(Some("# TYPE vllm:good gauge\nvllm:good 1\nvllm:bad{x=\"1} 2\n"));
    let good = fake_metrics(Some("# TYPE vllm:fine gauge\nvllm:fine 7\n"));
    let urls: Vec<String> = [hang, bad, good].iter().map(|a| format!("http://{a}")).collect();
    let agent = Agent::start_with(
        &[],
        &[
            "--no-discovery",
            "--scrape-interval",
            "1s",
            "--scrape-timeout",
            "1s",
            "--vllm-url",
            &urls[0],
            "--vllm-url",
            &urls[1],
            "--vllm-url",
            &urls[2],
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
        ],
    );
    let up = |a: SocketAddr| format!("inferwatch_vllm_up{{vllm_instance=\"{a}\"}}");
    let errors = |a: SocketAddr, reason: &str| {
        format!("inferwatch_vllm_scrape_errors_total{{vllm_instance=\"{a}\",reason=\"{reason}\"}}")
    };
    let text = agent.wait_for_metrics(Duration::from_secs(15), |t| {
        series_value(t, &errors(hang, "timeout")).unwrap_or(0.0) >= 2.0
            && series_value(t, &errors(bad, "parse")).unwrap_or(0.0) >= 2.0
            && series_value(t, &up(good)) == Some(1.0)
    });
    assert_eq!(series_value(&text, &up(hang)), Some(0.0), "{text}");
    assert_eq!(series_value(&text, &up(bad)), Some(0.0), "{text}");
    assert!(!text.contains("vllm:good"), "half of a malformed page was exported:\n{text}");
    assert!(text.contains(&format!("vllm:fine{{vllm_instance=\"{good}\"}} 7")), "{text}");
    // No NVML: the collector says so once, and everything above worked regardless.
    assert_eq!(series_value(&text, "inferwatch_gpu_collector_up"), Some(0.0), "{text}");
    let log = agent.log();
    assert_eq!(log.matches("GPU metrics off").count(), 1, "{log}");
    assert!(log.contains("/nonexistent/libnvidia-ml.so.1: not found"), "{log}");
    assert!(agent.stop().success());
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

/// Entries in the agent's kernel map `name` (found through the map ids in its fdinfo).
fn kernel_map_entries(agent_pid: u32, name: &str) -> usize {
    let ids: Vec<u32> = std::fs::read_dir(format!("/proc/{agent_pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("map_id:")?.trim().parse().ok()))
        .collect();
    for id in ids {
        let map = aya::maps::MapData::from_id(id).unwrap();
        let info = map.info().unwrap();
        if info.name_as_str() != Some(name) {
            continue;
        }
        let key_size = info.key_size() as usize;
        let fd = map.fd().as_fd().as_raw_fd();
        let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
        let mut count = 0;
        let mut first = true;
        loop {
            // union bpf_attr for BPF_MAP_GET_NEXT_KEY: map_fd, pad, key, next_key.
            let attr: [u64; 3] =
                [fd as u64, if first { 0 } else { key.as_ptr() as u64 }, next.as_mut_ptr() as u64];
            // SAFETY: a valid attr for BPF_MAP_GET_NEXT_KEY (4), pointing to live buffers.
            let rc = unsafe { libc::syscall(libc::SYS_bpf, 4, attr.as_ptr(), std::mem::size_of_val(&attr)) };
            if rc != 0 {
                return count;
            }
            count += 1;
            first = false;
            key.copy_from_slice(&next);
        }
    }
    panic!("the agent holds no map {name}");
}

#[test]
fn ten_thousand_abandoned_connections_leave_nothing_behind() {
    require_root();
    let server = Server::rust(SSESERVER);
    let agent = Agent::start(&[server.pid()]);
    // Warm up with finished requests so that the baseline includes the steady allocations.
    for _ in 0..4 {
        let mut c = Client::connect(server.addr);
        for _ in 0..50 {
            assert_eq!(c.request(&stream(4, 0.0)).status, 200);
        }
    }
    thread::sleep(Duration::from_secs(1));
    let baseline = rss_kib(agent.pid());
    let sockets_before = kernel_map_entries(agent.pid(), "TRACKED_SOCKS");
    // 10,000 connections, 200 open at a time, each abandoned mid-request.
    let partial = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\n\r\n{\"model\":";
    let mut tracked_while_open = 0;
    for round in 0..50 {
        let batch: Vec<TcpStream> = (0..200)
            .map(|_| {
                let mut s = TcpStream::connect(server.addr).unwrap();
                s.write_all(partial).unwrap();
                s
            })
            .collect();
        thread::sleep(Duration::from_millis(20));
        if round == 49 {
            thread::sleep(Duration::from_millis(500));
            tracked_while_open = kernel_map_entries(agent.pid(), "TRACKED_SOCKS");
        }
        drop(batch);
    }
    assert!(tracked_while_open >= 200, "the kernel tracks the open connections: {tracked_while_open}");
    let text = agent.wait_for_metrics(Duration::from_secs(30), |t| {
        series_value(t, "inferwatch_connections_tracked") == Some(0.0)
    });
    thread::sleep(Duration::from_secs(2));
    let after = rss_kib(agent.pid());
    let sockets_after = kernel_map_entries(agent.pid(), "TRACKED_SOCKS");
    eprintln!(
        "agent RSS {baseline} KiB before, {after} KiB after 10,000 abandoned connections; TRACKED_SOCKS {sockets_before} before, {tracked_while_open} with 200 open, {sockets_after} after"
    );
    assert!(after as f64 <= baseline as f64 * 1.10, "RSS {baseline} -> {after} KiB");
    assert!(sockets_after <= sockets_before + 2, "the kernel map kept closed sockets: {sockets_after}");
    for reason in ["ring_buffer_full", "agent_queue_full", "malformed"] {
        let lost = format!("inferwatch_agent_events_lost_total{{reason=\"{reason}\"}}");
        assert_eq!(series_value(&text, &lost), Some(0.0), "{text}");
    }
    assert_eq!(series_value(&text, "inferwatch_connections_evicted_total"), Some(0.0));
    assert_eq!(requests(&text, "complete"), 200.0, "only the warm-up requests completed");
    assert!(agent.stop().success());
}

#[test]
fn more_open_connections_than_the_table_holds_are_evicted_and_counted() {
    require_root();
    let server = Server::rust(SSESERVER);
    let agent = Agent::start_with(&[server.pid()], &["--no-discovery", "--max-connections", "100"]);
    let partial = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n";
    let open: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(partial).unwrap();
            s
        })
        .collect();
    let text = agent.wait_for_metrics(Duration::from_secs(15), |t| {
        series_value(t, "inferwatch_connections_evicted_total").unwrap_or(0.0) >= 200.0
    });
    assert_eq!(series_value(&text, "inferwatch_connections_tracked"), Some(100.0), "{text}");
    assert_eq!(series_value(&text, "inferwatch_connections_evicted_total"), Some(200.0), "{text}");
    drop(open);
    // A connection that was evicted and then speaks again is followed afresh, not merged.
    let mut c = Client::connect(server.addr);
    assert_eq!(c.request(&stream(3, 0.0)).status, 200);
    agent.wait_for_metrics(Duration::from_secs(10), |t| requests(t, "complete") == 1.0);
    assert!(agent.stop().success());
}

/// Socket fds the server process holds now.
fn socket_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}

#[test]
fn a_reused_fd_never_merges_two_connections() {
    require_root();
    let server = Server::rust(SSESERVER);
    let agent = Agent::start(&[server.pid()]);
    let listening = socket_fds(server.pid());
    // A: half a request, then gone. The server closes its fd.
    let mut a = TcpStream::connect(server.addr).unwrap();
    a.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 400\r\n\r\n{\"model\":\"m\",")
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    let fd_of_a: Vec<String> =
        socket_fds(server.pid()).into_iter().filter(|f| !listening.contains(f)).collect();
    drop(a);
    wait_until("the server to close A", Duration::from_secs(5), || {
        socket_fds(server.pid()).len() == listening.len()
    });
    // B: a whole request on the same fd number.
    let mut b = Client::connect(server.addr);
    let request = stream(5, 0.0);
    let bytes = request.bytes().len() as u64;
    thread::sleep(Duration::from_millis(100));
    let fd_of_b: Vec<String> =
        socket_fds(server.pid()).into_iter().filter(|f| !listening.contains(f)).collect();
    assert!(
        fd_of_b.iter().any(|fd| fd_of_a.contains(fd)),
        "the test needs the kernel to reuse an fd number: A had {fd_of_a:?}, B has {fd_of_b:?}"
    );
    assert_eq!(b.request(&request).status, 200);
    let text = agent.wait_for_metrics(Duration::from_secs(10), |t| requests(t, "complete") == 1.0);
    let records = agent.json("/api/v1/requests");
    let complete: Vec<_> =
        records.as_array().unwrap().iter().filter(|r| r["outcome"] == "complete").collect();
    assert_eq!(complete.len(), 1, "{records}");
    assert_eq!(complete[0]["request_bytes"], bytes, "B's bytes only: {records}");
    assert_eq!(complete[0]["content_events"], 5, "{records}");
    assert_eq!(requests(&text, "complete"), 1.0);
    assert!(agent.stop().success());
}

/// Spawns `sockload` so that it gets `pid` (via ns_last_pid), or None if another process took it.
fn sockload_with_pid(pid: u32, target: SocketAddr) -> Option<SockLoad> {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
    let load = SockLoad::spawn(SOCKLOAD, target, 100, 0, 32);
    (load.pid() == pid).then_some(load)
}

#[test]
fn a_reused_pid_is_not_the_process_that_was_watched() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    let drained = drain_connections(listener, 2);
    let mut first = SockLoad::spawn(SOCKLOAD, target, 100, 0, 32);
    let pid = first.pid();
    let agent = Agent::start(&[pid]);
    first.go();
    let writes = first.ops_series("write");
    agent.wait_for_metrics(Duration::from_secs(10), |t| series_value(t, &writes) == Some(100.0));
    drop(first);
    // A new process with the same pid, made before the agent's next scan could notice.
    let mut second = None;
    for _ in 0..20 {
        if let Some(s) = sockload_with_pid(pid, target) {
            second = Some(s);
            break;
        }
    }
    let mut second = second.expect("could not get the same pid again (the machine is too busy)");
    // Three scans later, the new owner of the pid is not watched.
    let text = agent.wait_for_metrics(Duration::from_secs(10), |t| {
        series_value(t, "inferwatch_watched_processes") == Some(0.0)
    });
    assert!(agent.log().contains(&format!("--pid {pid} exited")), "{}", agent.log());
    thread::sleep(Duration::from_secs(5));
    second.go();
    thread::sleep(Duration::from_secs(1));
    let text_after = agent.metrics();
    assert_eq!(series_value(&text_after, "inferwatch_watched_processes"), Some(0.0), "{text}");
    assert_eq!(series_value(&text_after, &writes), None, "the new process was counted:\n{text_after}");
    drop(second);
    drained.join().unwrap();
    assert!(agent.stop().success());
}
