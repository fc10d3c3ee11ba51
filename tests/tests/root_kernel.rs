//! The agent on the real kernel: real programs, real sockets, real processes. Needs root.

use std::{
    collections::BTreeSet, net::TcpListener, os::unix::process::CommandExt, process::Command, time::Duration,
};

use inferwatch_tests::{
    Agent, SockLoad, agent_binary, drain_connections, require_root, series_matching, series_value,
    tls_web_config,
};

const SOCKLOAD: &str = env!("CARGO_BIN_EXE_sockload");
const OPS: &str = "inferwatch_process_socket_ops_total";

#[test]
fn watched_process_socket_writes_are_counted_exactly_and_others_not_at_all() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    let drained = drain_connections(listener, 2);
    let (writes, sendtos, size) = (1000u32, 500u32, 64usize);
    let mut watched = SockLoad::spawn(SOCKLOAD, target, writes, sendtos, size);
    let mut unwatched = SockLoad::spawn(SOCKLOAD, target, 300, 200, size);
    let agent = Agent::start(&[watched.pid()]);
    // Everything below runs after the agent dropped its privileges: the counts prove that
    // watching, reading the ring buffer and updating maps need none of what it gave up.
    assert_only_read_capabilities_left(agent.pid());

    watched.go();
    unwatched.go();
    let (w, s) = (watched.ops_series("write"), watched.ops_series("sendto"));
    agent.wait_for_metrics(Duration::from_secs(15), |t| {
        series_value(t, &w) == Some(writes as f64) && series_value(t, &s) == Some(sendtos as f64)
    });
    // Give stragglers time to show up: the counts must stay exact, not merely reach the target.
    std::thread::sleep(Duration::from_millis(500));
    let text = agent.metrics();
    assert_eq!(series_value(&text, &w), Some(writes as f64), "{text}");
    assert_eq!(series_value(&text, &s), Some(sendtos as f64), "{text}");
    let watched_series = series_matching(&text, OPS, &format!("pid=\"{}\"", watched.pid()));
    assert_eq!(watched_series.len(), 2, "only write and sendto were made: {watched_series:?}");
    let bytes = format!(
        "inferwatch_process_socket_bytes_total{{pid=\"{}\",comm=\"sockload\",direction=\"sent\"}}",
        watched.pid()
    );
    assert_eq!(series_value(&text, &bytes), Some(((writes + sendtos) as usize * size) as f64), "{text}");
    assert!(
        series_matching(&text, "inferwatch_process_socket", &format!("pid=\"{}\"", unwatched.pid()))
            .is_empty(),
        "an unwatched process was counted:\n{text}"
    );
    assert_eq!(series_value(&text, "inferwatch_watched_processes"), Some(1.0));
    let events = series_value(&text, "inferwatch_agent_events_total").unwrap();
    assert_eq!(events, (writes + sendtos) as f64, "every event is one of the watched calls");
    // Each 64-byte transfer whole (the default capture is larger).
    let payload = series_value(&text, "inferwatch_agent_payload_bytes_total");
    assert_eq!(payload, Some(((writes + sendtos) as usize * size) as f64), "{text}");
    for reason in ["ring_buffer_full", "agent_queue_full", "malformed"] {
        let lost = format!("inferwatch_agent_events_lost_total{{reason=\"{reason}\"}}");
        assert_eq!(series_value(&text, &lost), Some(0.0), "{text}");
    }

    drop(watched);
    drop(unwatched);
    let received = drained.join().unwrap();
    assert_eq!(received, ((writes + sendtos + 300 + 200) as usize * size) as u64);
    assert!(agent.stop().success());
}

/// `--capture-bytes`: each transfer's first N bytes and, past them, its last 64 (a chunked
/// stream's terminator), counted in `inferwatch_agent_payload_bytes_total`; 0 is refused.
#[test]
fn the_capture_limit_bounds_what_is_copied() {
    require_root();
    let refused = Command::new(agent_binary()).args(["--capture-bytes", "0"]).output().unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--capture-bytes") && said.contains("1..=4096"), "{said}");
    let (writes, size) = (300u32, 200usize);
    for (capture, per_write) in [(1usize, 1 + 64), (16, 16 + 64), (150, 150 + 50), (4096, 200)] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let drained = drain_connections(listener, 1);
        let mut watched = SockLoad::spawn(SOCKLOAD, target, writes, 0, size);
        let agent = Agent::start_with(&[watched.pid()], &["--capture-bytes", &capture.to_string()]);
        watched.go();
        let w = watched.ops_series("write");
        agent.wait_for_metrics(Duration::from_secs(15), |t| series_value(t, &w) == Some(writes as f64));
        std::thread::sleep(Duration::from_millis(300));
        let text = agent.metrics();
        assert_eq!(series_value(&text, &w), Some(writes as f64), "--capture-bytes {capture}: {text}");
        assert_eq!(
            series_value(&text, "inferwatch_agent_payload_bytes_total"),
            Some((writes as usize * per_write) as f64),
            "--capture-bytes {capture}: {per_write} bytes of each {size}-byte write"
        );
        drop(watched);
        assert_eq!(drained.join().unwrap(), (writes as usize * size) as u64);
        assert!(agent.stop().success());
    }
}

/// Every thread of the agent holds CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE only (with
/// `--no-discovery`, which also gives up CAP_SYS_ADMIN), in every set, with no_new_privs.
fn assert_only_read_capabilities_left(pid: u32) {
    const KEPT: u64 = (1 << 2) | (1 << 19);
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().collect();
    assert!(tasks.len() > 1, "the runtime's threads exist by now");
    for task in tasks {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            let hex = status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim();
            u64::from_str_radix(hex, 16).unwrap()
        };
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(field(set), KEPT, "{set} of thread {:?}:\n{status}", task.file_name());
        }
        assert_eq!(field("CapInh:"), 0);
        assert_eq!(field("CapAmb:"), 0);
        assert_eq!(field("NoNewPrivs:"), 1);
    }
}

/// Ids of the BPF programs a process holds (from the `prog_id:` lines of its fdinfo).
fn program_ids_held_by(pid: u32) -> BTreeSet<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok()))
        .collect()
}

/// Names of the loaded programs among `ids` (names are cut to 15 bytes by the kernel).
fn loaded_program_names(ids: &BTreeSet<u32>) -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .map(|p| p.name_as_str().unwrap_or("?").to_string())
        .collect()
}

/// Waits for the kernel to free `ids` (it does so asynchronously after the last fd closes).
fn assert_programs_freed(ids: &BTreeSet<u32>, what: &str) {
    for _ in 0..200 {
        if loaded_program_names(ids).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what}: programs still loaded 5 s after exit: {:?}", loaded_program_names(ids));
}

#[test]
fn starts_serves_and_detaches_everything_on_sigterm() {
    require_root();
    let agent = Agent::start(&[]);
    let ids = program_ids_held_by(agent.pid());
    let mut names = loaded_program_names(&ids);
    names.sort();
    assert_eq!(
        names,
        [
            "inet_sock_set_s",
            "sched_switch",
            "sched_wakeup",
            "sched_wakeup_ne",
            "sk_data_ready",
            "sock_recv_lengt",
            "sock_send_lengt",
            "tcp_receive_res",
            "tcp_retransmit_",
            "tcp_send_reset"
        ],
        "every BTF tracepoint is attached"
    );
    let (status, body) = agent.try_get("/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = agent.try_get("/nope").unwrap();
    assert_eq!(status, 404);
    let text = agent.metrics();
    assert!(text.contains("inferwatch_build_info{version=\""), "{text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    let log = agent.log();
    let status = agent.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0:\n{log}");
    assert_programs_freed(&ids, "SIGTERM");

    let agent = Agent::start(&[]);
    let ids = program_ids_held_by(agent.pid());
    assert_eq!(loaded_program_names(&ids).len(), 10);
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGINT) };
    assert_programs_freed(&ids, "SIGINT");
}

#[test]
fn a_pid_that_does_not_exist_is_a_clear_error() {
    require_root();
    let out = Command::new(agent_binary())
        .args(["--listen", "127.0.0.1:0", "--pid", "999999999"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("inferwatch: --pid 999999999: process 999999999 is not running"), "{stderr}");
}

#[test]
fn without_privileges_it_says_what_is_missing() {
    require_root();
    // Copy the binary where an unprivileged user can run it, whatever the checkout's permissions.
    let dir = std::env::temp_dir().join(format!("inferwatch-nopriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("inferwatch");
    std::fs::copy(agent_binary(), &bin).unwrap();
    Command::new("chmod").args(["-R", "a+rx"]).arg(&dir).status().unwrap();
    let out = Command::new(&bin)
        .args(["--listen", "127.0.0.1:0"])
        .uid(65534)
        .gid(65534)
        .current_dir(&dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("needs root, or the capabilities CAP_BPF and CAP_PERFMON"), "{stderr}");
}

/// `--web-config-file` with TLS and basic auth, checked with curl as a client would.
#[test]
fn tls_and_basic_auth_from_a_web_config_file() {
    require_root();
    let (dir, config) = tls_web_config("tls");
    let mut agent = Agent::spawn(&[], &["--no-discovery", "--web-config-file", config.to_str().unwrap()]);
    let ca = dir.join("agent.crt");
    // (HTTP status, body) of an HTTPS GET, or None when curl could not get a response.
    let get = |agent: &Agent, path: &str, user: Option<&str>| -> Option<(u16, String)> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"]).arg(&ca);
        if let Some(user) = user {
            curl.args(["-u", user]);
        }
        let out = curl.arg(format!("https://{}{path}", agent.addr)).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n')?;
        out.status.success().then(|| (code.parse().unwrap(), body.to_string()))
    };
    agent.wait_until_ready(|agent| get(agent, "/healthz", None).is_some());
    assert_eq!(get(&agent, "/healthz", None).unwrap(), (200, "ok\n".to_string()), "liveness stays open");
    assert_eq!(get(&agent, "/metrics", None).unwrap().0, 401);
    assert_eq!(get(&agent, "/metrics", Some("prom:wrong")).unwrap().0, 401);
    assert_eq!(get(&agent, "/metrics", Some("nobody:s3cret")).unwrap().0, 401);
    assert_eq!(get(&agent, "/api/v1/instances", None).unwrap().0, 401, "the API is protected too");
    for _ in 0..2 {
        let (status, body) = get(&agent, "/metrics", Some("prom:s3cret")).unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("inferwatch_build_info{"), "{body}");
    }
    let plain = agent.try_get("/metrics");
    assert!(!matches!(plain, Ok((200, _))), "plain HTTP must not be served: {plain:?}");
    assert_eq!(get(&agent, "/healthz", None).unwrap().0, 200, "a bad client harms no one");
    assert!(agent.stop().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_broken_web_config_file_is_a_clear_error() {
    require_root();
    let config = std::env::temp_dir().join(format!("inferwatch-web-{}.yml", std::process::id()));
    std::fs::write(&config, "tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /x.key\n")
        .unwrap();
    let out = Command::new(agent_binary())
        .args(["--listen", "127.0.0.1:0", "--no-discovery", "--web-config-file"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tls_server_config.cert_file /nonexistent.crt"), "{stderr}");
    std::fs::remove_file(&config).unwrap();
}
