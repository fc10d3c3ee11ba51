//! The agent's own surfaces, tried as a hostile neighbour on a shared node would (root): header
//! floods and slow clients against its HTTP server, its API from another host, password
//! guessing, silent TLS sockets, what capabilities it keeps while it scrapes pods in other
//! network namespaces, and tasks that die or hang.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{
    Agent, fake_vllm::FakeVllm, free_port, netns::Netns, require_root, series_value, tls_web_config,
};
use socket2::{Domain, Socket, Type};

/// A connection to `to` from the loopback address `from` (127.0.0.0/8 is all loopback: each is
/// another client address to the agent).
fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((from, 0)).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(socket.into())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap()
}

/// `GET path` with a fresh connection from `from`; the status, or None when refused or closed.
fn status_from(from: [u8; 4], to: SocketAddr, path: &str) -> Option<u16> {
    let mut s = connect_from(from, to).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Whether the agent has closed `s` (EOF or reset), waiting at most `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 431 response before the close
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn header_floods_and_slow_clients_are_bounded_while_metrics_answer() {
    require_root();
    let agent = Agent::start(&[]);
    let idle = rss_kib(agent.pid());
    let started = Instant::now();
    // 300 connections from ten addresses: half pour out a header that never ends (400 KB each),
    // half send one byte a second (slowloris).
    let floods: Vec<_> = (0..300u32)
        .map(|i| {
            let addr = agent.addr;
            thread::spawn(move || {
                let from = [127, 0, 0, 2 + (i % 10) as u8];
                let Ok(mut s) = connect_from(from, addr) else { return (true, Duration::ZERO) };
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let t0 = Instant::now();
                if i % 2 == 0 {
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nx-flood: ");
                    let chunk = [b'a'; 4096];
                    for _ in 0..100 {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                } else {
                    for b in b"GET /metrics HTTP/1.1\r\nx-slow: ".iter().chain([b'z'; 60].iter()) {
                        if s.write_all(&[*b]).is_err() || closed_within(&mut s, Duration::from_secs(1)) {
                            return (true, t0.elapsed());
                        }
                    }
                }
                (closed_within(&mut s, Duration::from_secs(30)), t0.elapsed())
            })
        })
        .collect();
    // Meanwhile Prometheus (another address) keeps getting its page, and the agent stays small.
    let mut peak = idle;
    let mut answered = 0;
    while floods.iter().any(|f| !f.is_finished()) && started.elapsed() < Duration::from_secs(45) {
        assert_eq!(
            status_from([127, 0, 0, 1], agent.addr, "/metrics"),
            Some(200),
            "/metrics during the flood"
        );
        answered += 1;
        peak = peak.max(rss_kib(agent.pid()));
        thread::sleep(Duration::from_millis(500));
    }
    let results: Vec<(bool, Duration)> = floods.into_iter().map(|f| f.join().unwrap()).collect();
    let open = results.iter().filter(|(closed, _)| !closed).count();
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap();
    let text = agent.metrics();
    let refused =
        series_value(&text, r#"inferwatch_agent_http_connections_refused_total{reason="client_limit"}"#);
    println!(
        "flood: RSS {idle} → peak {peak} KiB, {answered} /metrics answered meanwhile, slowest close {slowest:?}, \
         refused at once {refused:?}, still open {open}"
    );
    assert_eq!(open, 0, "every flooding connection is closed");
    assert!(slowest < Duration::from_secs(30), "closed within 30 s: {slowest:?}");
    assert!(peak < idle + 40 * 1024, "RSS {idle} → {peak} KiB");
    assert!(refused.is_some_and(|n| n > 0.0), "no more than 16 connections per address: {refused:?}");
    assert!(agent.stop().success());
}

#[test]
fn a_header_too_large_gets_431() {
    require_root();
    let agent = Agent::start(&[]);
    let mut s = TcpStream::connect(agent.addr).unwrap();
    let head = format!("GET /metrics HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "b".repeat(20_000));
    let _ = s.write_all(head.as_bytes());
    let mut answer = String::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(agent.stop().success());
}

/// What a client inside `ns` gets for `path` from the agent at `host:port`.
fn status_in(ns: &Netns, port: u16, path: &str) -> String {
    let out = ns
        .command("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://{}:{port}{path}", ns.host))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_api_is_for_loopback_clients_unless_opened() {
    require_root();
    let ns = Netns::new("api", 61);
    for (open, expected) in [(false, "403"), (true, "200")] {
        let port = free_port();
        let listen = format!("0.0.0.0:{port}");
        let mut extra = vec!["--no-discovery", "--listen", listen.as_str()];
        if open {
            extra.extend(["--api-access", "any"]);
        }
        let agent = Agent::start_with(&[], &extra);
        // Another host: metrics and health, but the API only once opened.
        assert_eq!(status_in(&ns, port, "/metrics"), "200");
        assert_eq!(status_in(&ns, port, "/healthz"), "200");
        for path in ["/api/v1/requests", "/api/v1/instances", "/api/v1/diagnosis"] {
            assert_eq!(status_in(&ns, port, path), expected, "{path} from another host, opened: {open}");
        }
        // This host (and kubectl port-forward, which arrives on loopback): always.
        let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(status_from([127, 0, 0, 1], local, "/api/v1/instances"), Some(200));
        if !open {
            // (The page is rendered at most every 100 ms: wait past a page from before the calls.)
            let forbidden = |t: &str| series_value(t, "inferwatch_agent_http_api_forbidden_total");
            agent.wait_for_metrics(Duration::from_secs(5), |t| forbidden(t) == Some(3.0));
        }
        assert!(agent.stop().success());
    }
}

#[test]
fn failed_logins_are_throttled_and_silent_tls_sockets_block_no_one() {
    require_root();
    let (dir, config) = tls_web_config("surfaces-tls");
    let mut agent = Agent::spawn(&[], &["--no-discovery", "--web-config-file", config.to_str().unwrap()]);
    let port = agent.addr.port();
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
    let curl = |user: &str, path: &str, from: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert"])
            .arg(dir.join("agent.crt"))
            .args(["--interface", from, "-u", user])
            .arg(url(path))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    agent.wait_until_ready(|_| curl("prom:s3cret", "/healthz", "127.0.0.1") == "200");

    // Silent sockets from many addresses: they hold no handshake permit, so a real client is
    // served at once.
    let silent: Vec<TcpStream> =
        (0..80u8).filter_map(|i| connect_from([127, 0, 1, 1 + i % 5], agent.addr).ok()).collect();
    let t0 = Instant::now();
    assert_eq!(curl("prom:s3cret", "/metrics", "127.0.0.1"), "200");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "served in {:?} next to {} silent sockets",
        t0.elapsed(),
        silent.len()
    );

    // Guessing from one address: five wrong answers, then 429 without a check; the right user
    // elsewhere is unaffected.
    let guesses: Vec<String> =
        (0..8).map(|i| curl(&format!("prom:guess{i}"), "/metrics", "127.0.0.9")).collect();
    assert_eq!(guesses[..5], ["401"; 5], "{guesses:?}");
    assert!(guesses[5..].iter().all(|s| s == "429"), "{guesses:?}");
    assert_eq!(curl("prom:guess9", "/metrics", "127.0.0.9"), "429", "the right one too, for a while");
    assert_eq!(curl("prom:s3cret", "/api/v1/instances", "127.0.0.1"), "200");
    let text = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(dir.join("agent.crt"))
        .args(["-u", "prom:s3cret"])
        .arg(url("/metrics"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(series_value(&text, "inferwatch_agent_http_auth_failed_total"), Some(5.0), "{text}");
    assert!(series_value(&text, "inferwatch_agent_http_auth_throttled_total").is_some_and(|n| n >= 4.0));
    drop(silent);
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The capability masks of a task's status file.
fn caps(status: &str) -> [u64; 5] {
    let field = |name: &str| {
        let hex = status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    [field("CapEff:"), field("CapPrm:"), field("CapBnd:"), field("CapInh:"), field("CapAmb:")]
}

const DAC_READ_SEARCH: u64 = 1 << 2;
const SYS_PTRACE: u64 = 1 << 19;
const SYS_ADMIN: u64 = 1 << 21;

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn vllm_up(agent: &Agent, port: u16) -> Option<f64> {
    series_value(&agent.metrics(), &format!(r#"inferwatch_vllm_up{{vllm_instance="localhost:{port}"}}"#))
}

#[test]
fn only_a_helper_keeps_sys_admin_and_pods_are_scraped_either_way() {
    require_root();
    // Two "pods": one whose server listens on loopback only, one on every address.
    let (a, b) = (Netns::new("lo", 62), Netns::new("all", 63));
    let (port_a, port_b) = (free_port(), free_port());
    let mut loopback_only = FakeVllm::start(a.command("python3"), "127.0.0.1", port_a, &[]);
    let mut everywhere = FakeVllm::start(b.command("python3"), "0.0.0.0", port_b, &[]);
    let probe = format!("import socket; socket.create_connection(('127.0.0.1', {port_a}), 1)");
    loopback_only
        .wait(|| a.command("python3").args(["-c", &probe]).output().is_ok_and(|o| o.status.success()));
    let inside_b: SocketAddr = (b.inside, port_b).into();
    everywhere.wait(|| TcpStream::connect_timeout(&inside_b, Duration::from_millis(200)).is_ok());
    thread::sleep(Duration::from_millis(500));

    // As root (with CAP_SYS_ADMIN at start): a helper keeps it, the agent does not.
    let mut agent = Agent::start_discovering(&["--scrape-interval", "1s"]);
    agent.wait_for_metrics(Duration::from_secs(30), |t| {
        [port_a, port_b]
            .iter()
            .all(|p| t.contains(&format!("inferwatch_vllm_up{{vllm_instance=\"localhost:{p}\"}} 1")))
    });
    for task in std::fs::read_dir(format!("/proc/{}/task", agent.pid())).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let [eff, prm, bnd, inh, amb] = caps(&status);
        assert_eq!(
            (eff, prm, bnd, inh, amb),
            (DAC_READ_SEARCH | SYS_PTRACE, DAC_READ_SEARCH | SYS_PTRACE, DAC_READ_SEARCH | SYS_PTRACE, 0, 0),
            "thread {:?}",
            task.file_name()
        );
        assert!(status.contains("NoNewPrivs:\t1"));
    }
    let helpers: Vec<u32> = children(agent.pid())
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "iw-netns-helper")
        })
        .collect();
    assert_eq!(helpers.len(), 1, "one helper");
    let helper = helpers[0];
    let status = std::fs::read_to_string(format!("/proc/{helper}/status")).unwrap();
    let [eff, prm, bnd, inh, amb] = caps(&status);
    assert_eq!(
        (eff, prm, bnd, inh, amb),
        (SYS_ADMIN | SYS_PTRACE, SYS_ADMIN | SYS_PTRACE, SYS_ADMIN | SYS_PTRACE, 0, 0)
    );
    assert!(status.contains("NoNewPrivs:\t1"));
    // Its files: the standard three, its socket to the agent, its own namespace; no BPF object.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{helper}/fd"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default())
        .collect();
    assert!(fds.len() <= 5 && !fds.iter().any(|f| f.contains("bpf")), "the helper's files: {fds:?}");
    // The helper dying ends the agent (it would otherwise scrape nothing in pods, silently).
    // SAFETY: a signal to the agent's own child.
    unsafe { libc::kill(helper as i32, libc::SIGKILL) };
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(agent.log().contains("network-namespace helper"), "{}", agent.log());

    // Without CAP_SYS_ADMIN (as the DaemonSet runs it): no helper; the pod listening everywhere
    // is scraped through its own address, the loopback-only one fails and says why.
    let no_admin = Agent::start_wrapped(
        &["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"],
        &["--scrape-interval", "1s"],
    );
    no_admin.wait_for_metrics(Duration::from_secs(30), |t| {
        t.contains(&format!("inferwatch_vllm_up{{vllm_instance=\"localhost:{port_b}\"}} 1"))
            && t.contains(&format!("inferwatch_vllm_up{{vllm_instance=\"localhost:{port_a}\"}} 0"))
    });
    assert_eq!(vllm_up(&no_admin, port_b), Some(1.0));
    assert!(children(no_admin.pid()).is_empty(), "no helper without CAP_SYS_ADMIN");
    let log = no_admin.log();
    assert!(no_admin.stop().success(), "{log}");
    drop((loopback_only, everywhere));
}

#[test]
fn a_dead_task_ends_the_agent_and_a_stuck_one_turns_health_red() {
    require_root();
    fn fault(f: &str) -> [(&'static str, &std::ffi::OsStr); 1] {
        [("INFERWATCH_TEST_FAULT", std::ffi::OsStr::new(f))]
    }
    let mut dead = Agent::start_with_env(&[], &["--no-discovery"], &fault("panic:scraper"));
    let status = dead.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "exits with a failure:\n{}", dead.log());
    assert!(dead.log().contains("panicked") && dead.log().contains("scraper"), "{}", dead.log());

    let stuck = Agent::start_with_env(
        &[],
        &["--no-discovery", "--health-stale-after", "2s"],
        &fault("stall:aggregator"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (0, String::new());
    while Instant::now() < deadline {
        last = stuck.try_get("/healthz").unwrap();
        if last.0 == 503 {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(last.0, 503, "{last:?}");
    assert!(last.1.contains("aggregator"), "{last:?}");
    assert_eq!(
        stuck.try_get("/metrics").unwrap().0,
        200,
        "the page still answers, so the probe is what tells"
    );
    drop(stuck);
}
