//! The agent's kernel checks as one program, to run where `cargo test` cannot: inside the
//! virtual machines of `cargo xtask test`'s kernel matrix (Debian's 5.10, 6.1 and 6.12 kernels,
//! x86-64 and arm64), as root, with everything it needs beside it.
//!
//! `kernelcheck AGENT SOCKLOAD SSESERVER [--socket-hook auto|tracepoint|fexit|kprobe | --expect ATTACH]`
//!
//! 1. Exact counts: a watched process's 200 `write`s and 100 `sendto`s on a TCP socket are
//!    counted exactly, an unwatched one's not at all; and a watched process's on a Unix stream
//!    socket (what vLLM's API server and engine talk over).
//!    Where socket I/O is hooked with kprobes, more tasks of another process blocked inside
//!    `inet_sendmsg` than the kernel's default kretprobe instances: with the agent's own
//!    (tracefs, 4,096) every watched send is still seen; with the kernel's default (the forced
//!    `kprobe` run passes `--kretprobe-instances 0`) each is counted lost (`kretprobe_missed`),
//!    none silently gone.
//!    Where the kernel preempts kernel code (`preempt=full`, booted so for Debian 12's 6.1) and
//!    socket I/O is hooked with fexit, whose programs may be preempted: two watched processes
//!    writing on one CPU, every write seen or counted lost (`preempted`), none mixed or gone.
//! 2. One streamed HTTP request to a watched server is timed end to end: status, outcome, its
//!    content events, and a TTFT and duration within what the client saw.
//! 3. The hooks: `inferwatch_probe_info` says how each is attached; the scheduler and TCP
//!    programs that are attached run (`kernel.bpf_stats_enabled`), and arrivals are stamped
//!    exactly where the kernel has `sk_data_ready`.
//!
//! Prints `KERNELCHECK ok: …` per check and `KERNELCHECK PASS` at the end; any failure panics
//! with the agent's log (a non-zero exit).
use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    os::unix::net::UnixListener,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use inferwatch_tests::{
    Agent, SockLoad,
    client::{Client, Completion},
    drain_connections, drain_unix_connections, require_root, series_matching, series_value,
    servers::Server,
};

/// TCG emulation is some 10-50× slower than the host: generous deadlines.
const PATIENCE: Duration = Duration::from_secs(120);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent_bin, sockload, sseserver, rest @ ..] = args.as_slice() else {
        eprintln!("usage: kernelcheck AGENT SOCKLOAD SSESERVER [--socket-hook HOOK | --expect ATTACH]");
        std::process::exit(2);
    };
    // `--expect ATTACH`: how the agent must attach the socket programs on its own here (a
    // program the kernel's verifier refuses would otherwise pass through a fallback unseen).
    let (hook, expected) = match rest {
        [flag, hook] if flag == "--socket-hook" => (hook.as_str(), None),
        [flag, attach] if flag == "--expect" => ("auto", Some(attach.as_str())),
        [] => ("auto", None),
        _ => panic!("unexpected arguments {rest:?}"),
    };
    require_root();
    // SAFETY: set before any thread starts; the test library reads them (the agent, and how
    // long its start may take: verifying the programs takes seconds under emulation).
    unsafe {
        std::env::set_var("INFERWATCH_BIN", agent_bin);
        std::env::set_var("INFERWATCH_READY_SECONDS", PATIENCE.as_secs().to_string());
    }
    // Program run counts: the kernel keeps them only while this is on.
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enabling kernel.bpf_stats_enabled");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    let drained = drain_connections(listener, 2);
    let (writes, sendtos) = (200u32, 100u32);
    let mut watched = SockLoad::spawn(sockload, target, writes, sendtos, 64);
    let mut unwatched = SockLoad::spawn(sockload, target, 50, 50, 64);
    let unix_path = std::env::temp_dir().join(format!("kernelcheck-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&unix_path);
    let unix_listener = UnixListener::bind(&unix_path).unwrap();
    let unix_drained = drain_unix_connections(unix_listener, 1);
    let (unix_writes, unix_sendtos) = (60u32, 40u32);
    let mut unix_watched =
        SockLoad::spawn_at(sockload, &format!("unix:{}", unix_path.display()), unix_writes, unix_sendtos, 64);
    // IPv6 goes through its own functions where socket I/O is hooked per protocol (inet6_*).
    let v6 = TcpListener::bind("[::1]:0").ok().map(|listener| {
        let target = listener.local_addr().unwrap();
        (drain_connections(listener, 1), SockLoad::spawn(sockload, target, 30, 20, 64))
    });
    // Two writers for one CPU, one on TCP and one on a Unix socket: two fexit programs sharing
    // the CPU's record slot.
    let crowd_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let crowd_target = crowd_listener.local_addr().unwrap();
    let crowd_path = std::env::temp_dir().join(format!("kernelcheck-crowd-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&crowd_path);
    let crowd_unix = UnixListener::bind(&crowd_path).unwrap();
    let crowd_drained = [drain_connections(crowd_listener, 1), drain_unix_connections(crowd_unix, 1)];
    let crowd_writes = 3000u32;
    let mut crowd = [
        SockLoad::spawn(sockload, crowd_target, crowd_writes, 0, 64),
        SockLoad::spawn_at(sockload, &format!("unix:{}", crowd_path.display()), crowd_writes, 0, 64),
    ];
    let starved_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let starved_target = starved_listener.local_addr().unwrap();
    let starved_drained = drain_connections(starved_listener, 1);
    let starved_writes = 20u32;
    let mut starved = SockLoad::spawn(sockload, starved_target, starved_writes, 0, 64);
    let server = Server::rust(sseserver);
    // The forced kprobe run proves the counting of missed returns: the kernel's few instances.
    let mut flags = vec!["--no-discovery", "--socket-hook", hook];
    if hook == "kprobe" {
        flags.extend(["--kretprobe-instances", "0"]);
    }
    let mut pids =
        vec![watched.pid(), unix_watched.pid(), starved.pid(), server.pid(), crowd[0].pid(), crowd[1].pid()];
    pids.extend(v6.as_ref().map(|(_, load)| load.pid()));
    let agent = Agent::start_with(&pids, &flags);
    let text = agent.metrics();
    let probes = series_matching(&text, "inferwatch_probe_info{", "");
    for p in &probes {
        println!("KERNELCHECK probe: {p}");
    }
    // What the agent said it cannot do on this kernel, once each.
    // (A warning's continuation lines, a verifier's log, go with it.)
    let log = agent.log();
    let mut in_warning = false;
    for line in log.lines() {
        let new_entry = line.contains(" INFO") || line.contains(" WARN") || line.contains(" ERROR");
        in_warning = if new_entry { line.contains(" WARN") } else { in_warning };
        if in_warning {
            println!("KERNELCHECK agent: {line}");
        }
    }
    let attached = |hook: &str| -> Option<String> {
        let needle = format!("hook=\"{hook}\"");
        let line = probes.iter().find(|l| l.contains(&needle))?;
        Some(line.split("attach=\"").nth(1)?.split('"').next()?.to_string())
    };

    if let Some(expected) = expected {
        assert_eq!(
            attached("socket_io").as_deref(),
            Some(expected),
            "the agent's own choice of socket hooks on this kernel (its warnings above say why)"
        );
        println!("KERNELCHECK ok: the socket programs attached as {expected}, the agent's own choice");
    }
    counts_exactly(&agent, &mut watched, Some(&mut unwatched), writes, sendtos);
    println!(
        "KERNELCHECK ok: {writes} writes and {sendtos} sendtos on TCP counted exactly, the unwatched process not at all"
    );
    drop((watched, unwatched));
    assert_eq!(drained.join().unwrap(), (writes + sendtos + 100) as u64 * 64, "the sink got every byte");
    counts_exactly(&agent, &mut unix_watched, None, unix_writes, unix_sendtos);
    println!(
        "KERNELCHECK ok: {unix_writes} writes and {unix_sendtos} sendtos on a Unix socket counted exactly"
    );
    drop(unix_watched);
    assert_eq!(
        unix_drained.join().unwrap(),
        (unix_writes + unix_sendtos) as u64 * 64,
        "the Unix sink got every byte"
    );
    let _ = std::fs::remove_file(&unix_path);
    match v6 {
        Some((drained, mut load)) => {
            counts_exactly(&agent, &mut load, None, 30, 20);
            println!("KERNELCHECK ok: 30 writes and 20 sendtos on IPv6 TCP counted exactly");
            drop(load);
            assert_eq!(drained.join().unwrap(), 50 * 64, "the IPv6 sink got every byte");
        }
        None => println!("KERNELCHECK note: no IPv6 loopback here"),
    }

    let full_preemption =
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default().contains("preempt=full");
    if full_preemption && attached("socket_io").as_deref() == Some("fexit") {
        preempted_programs_lose_nothing_silently(&agent, &mut crowd, crowd_writes);
    } else {
        for load in &mut crowd {
            load.go();
        }
    }
    drop(crowd);
    for drained in crowd_drained {
        assert_eq!(drained.join().unwrap(), crowd_writes as u64 * 64);
    }
    let _ = std::fs::remove_file(&crowd_path);

    if attached("socket_io").as_deref() == Some("kprobe") {
        let raised = attached("kretprobe_instances").as_deref() == Some("tracefs");
        // tracefs is mounted here: only the forced run (`--kretprobe-instances 0`) may fall back.
        assert_eq!(raised, hook != "kprobe", "kretprobes made through tracefs unless told not to");
        starved_kretprobes(&agent, &mut starved, starved_writes, raised);
    } else {
        println!("KERNELCHECK note: socket I/O is not hooked with kprobes here: no kretprobe to miss");
        starved.go();
    }
    drop(starved);
    assert_eq!(starved_drained.join().unwrap(), starved_writes as u64 * 64);

    times_a_stream(&agent, &server, attached("arrival").as_deref() == Some("tp_btf"));

    let runs = |text: &str, program: &str| {
        series_value(text, &format!("inferwatch_bpf_program_runs_total{{program=\"{program}\"}}"))
            .unwrap_or(0.0)
    };
    for (hook, program) in [("sched", "sched_switch"), ("tcp_state", "inet_sock_set_state")] {
        match attached(hook).as_deref() {
            Some("tp_btf") => {
                // Run counts reach the metrics every few seconds.
                let deadline = std::time::Instant::now() + PATIENCE;
                let text = loop {
                    let text = agent.metrics();
                    if runs(&text, program) > 0.0 || std::time::Instant::now() > deadline {
                        break text;
                    }
                    thread::sleep(Duration::from_millis(500));
                };
                let stats = series_matching(&text, "inferwatch_bpf_program_run", "");
                assert!(runs(&text, program) > 0.0, "{program} is attached but never ran: {stats:#?}");
                println!(
                    "KERNELCHECK ok: {hook} attached and running ({} runs of {program})",
                    runs(&text, program)
                );
            }
            other => println!("KERNELCHECK note: {hook} is {other:?} on this kernel"),
        }
    }
    assert!(agent.stop().success());
    // The kretprobes made through tracefs go with the agent.
    for tracefs in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let events = std::fs::read_to_string(format!("{tracefs}/kprobe_events")).unwrap_or_default();
        assert!(!events.contains("inferwatch/"), "the agent left kprobe events behind:\n{events}");
    }
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0").ok();
    println!("KERNELCHECK PASS");
}

fn counts_exactly(
    agent: &Agent,
    watched: &mut SockLoad,
    mut unwatched: Option<&mut SockLoad>,
    writes: u32,
    sendtos: u32,
) {
    watched.go();
    if let Some(u) = unwatched.as_deref_mut() {
        u.go();
    }
    let (w, s) = (watched.ops_series("write"), watched.ops_series("sendto"));
    agent.wait_for_metrics(PATIENCE, |t| {
        series_value(t, &w) == Some(writes as f64) && series_value(t, &s) == Some(sendtos as f64)
    });
    // Stragglers would show up by now: the counts must stay exact, not merely reach the target.
    thread::sleep(Duration::from_secs(1));
    let text = agent.metrics();
    assert_eq!(series_value(&text, &w), Some(writes as f64), "{text}");
    assert_eq!(series_value(&text, &s), Some(sendtos as f64), "{text}");
    let own =
        series_matching(&text, "inferwatch_process_socket_ops_total", &format!("pid=\"{}\"", watched.pid()));
    assert_eq!(own.len(), 2, "only write and sendto were made: {own:?}");
    if let Some(u) = unwatched {
        let other = format!("pid=\"{}\"", u.pid());
        assert!(
            series_matching(&text, "inferwatch_process_socket", &other).is_empty(),
            "an unwatched process was counted:\n{text}"
        );
    }
}

fn times_a_stream(agent: &Agent, server: &Server, arrivals: bool) {
    let mut client = Client::connect(server.addr);
    let request =
        Completion { model: "vm-model".into(), pad: 321, max_tokens: 6, delay_ms: 20.0, stream: true };
    let truth = client.request(&request);
    assert_eq!(truth.status, 200);
    let deadline = std::time::Instant::now() + PATIENCE;
    let record = loop {
        let list = agent.json("/api/v1/requests?limit=16");
        let found = list.as_array().into_iter().flatten().find(|r| r["request_bytes"] == truth.request_bytes);
        if let Some(r) = found {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request was never reported:\n{list}\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(200));
    };
    let seconds = |field: &str| record[field].as_f64().unwrap_or_else(|| panic!("no {field}: {record}"));
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["outcome"], "complete", "{record}");
    assert_eq!(record["route"], "/v1/completions", "{record}");
    assert_eq!(record["content_events"].as_u64(), Some(truth.content_events as u64), "{record}");
    let (ttft, duration) = (seconds("time_to_first_token_seconds"), seconds("duration_seconds"));
    // The server's clock starts after the client's send and ends before the client's last read.
    let client_ttft = truth.ttft_seconds().unwrap();
    assert!(ttft > 0.0 && ttft <= client_ttft, "TTFT {ttft} s, the client saw {client_ttft} s: {record}");
    assert!(
        duration >= ttft && duration <= truth.duration_seconds(),
        "duration {duration} s, the client saw {} s: {record}",
        truth.duration_seconds()
    );
    assert_eq!(
        record["queued_seconds"].is_number(),
        arrivals,
        "queued phase iff arrivals are stamped: {record}"
    );
    println!(
        "KERNELCHECK ok: a streamed request timed: TTFT {ttft:.4} s (client {client_ttft:.4} s), duration {duration:.4} s (client {:.4} s), {} content events",
        truth.duration_seconds(),
        truth.content_events
    );
}

/// More of this (unwatched) process's tasks blocked inside `inet_sendmsg` than the kernel's
/// default kretprobe instances, then the watched `starved` process's sends. With the agent's
/// instances (`raised`), each is seen. With the kernel's, they return unseen and each must be
/// counted lost when its next call finds it open (the last one has no next call).
fn starved_kretprobes(agent: &Agent, starved: &mut SockLoad, writes: u32, raised: bool) {
    // The kernel's instances per kretprobe: the possible CPUs, or max(10, 2 × them) on
    // preemptible kernels; more blockers than either.
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let cpus = possible.trim().rsplit(['-', ',']).next().unwrap().parse::<usize>().unwrap() + 1;
    let blockers = (2 * cpus).max(10) + 8;
    let (holders, tids) = block_in_sendmsg(blockers);
    starved.go();
    let lost = "inferwatch_agent_events_lost_total{reason=\"kretprobe_missed\"}";
    let ops = starved.ops_series("write");
    let value = |t: &str, s: &str| series_value(t, s).unwrap_or(0.0);
    let text = if raised {
        agent.wait_for_metrics(PATIENCE, |t| value(t, &ops) >= writes as f64)
    } else {
        agent.wait_for_metrics(PATIENCE, |t| value(t, &ops) + value(t, lost) >= (writes - 1) as f64)
    };
    // Stragglers would show by now.
    thread::sleep(Duration::from_secs(1));
    let text = if raised { agent.metrics() } else { text };
    let (lost, seen) = (value(&text, lost), value(&text, &ops));
    if raised {
        assert_eq!(
            (seen, lost),
            (writes as f64, 0.0),
            "{blockers} senders blocked: every watched write is seen"
        );
    } else {
        // Every call either seen or counted lost, but the last, whose loss no later call reveals.
        assert!(
            seen + lost == (writes - 1) as f64 || seen + lost == writes as f64,
            "{writes} writes with the kernel's kretprobe instances all held: {seen} seen, {lost} counted lost"
        );
        assert!(lost > 0.0, "the kernel's instances were all held, yet no return was missed");
    }
    // Released: the blocked senders fail with a reset and return.
    drop(holders);
    for t in tids {
        t.join().unwrap();
    }
    let instances =
        if raised { "the agent's kretprobe instances" } else { "the kernel's default kretprobe instances" };
    println!(
        "KERNELCHECK ok: {blockers} senders blocked in inet_sendmsg, {instances}: {writes} watched writes, {seen} seen, {lost} counted lost (kretprobe_missed)"
    );
}

/// `n` threads blocked inside `inet_sendmsg` (a loopback peer that never reads, small buffers),
/// each holding one of its kretprobe instances until the returned sockets are dropped.
fn block_in_sendmsg(n: usize) -> (Vec<TcpStream>, Vec<thread::JoinHandle<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    let blocked = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..n {
        let blocked = blocked.clone();
        threads.push(thread::spawn(move || {
            let mut s = TcpStream::connect(target).unwrap();
            // SAFETY: gettid has no preconditions.
            blocked.lock().unwrap().push(unsafe { libc::gettid() });
            let chunk = vec![0u8; 1 << 20];
            // Blocks once the peer's window and our buffer are full; fails when the peer goes.
            while s.write_all(&chunk).is_ok() {}
        }));
        peers.push(listener.accept().unwrap().0);
    }
    // Each thread is asleep in its write (the kernel's `wchan` for it is a stream wait).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let tids = blocked.lock().unwrap().clone();
        let sleeping = tids
            .iter()
            .filter(|tid| {
                let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
                let syscall =
                    std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
                // The state follows the command's closing parenthesis. Rust's `write` on a socket
                // is `sendto` (x86-64 44, arm64 206); `write` is 1 and 64.
                let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
                let nr = syscall.split_whitespace().next();
                state == Some("S") && matches!(nr, Some("1" | "44" | "64" | "206"))
            })
            .count();
        if sleeping == n {
            break;
        }
        if std::time::Instant::now() > deadline {
            let first = tids.first().map(|tid| {
                let read = |f: &str| {
                    std::fs::read_to_string(format!("/proc/self/task/{tid}/{f}")).unwrap_or_default()
                };
                (read("stat"), read("syscall"))
            });
            panic!("only {sleeping} of {n} senders blocked ({} started; the first: {first:?})", tids.len());
        }
        thread::sleep(Duration::from_millis(200));
    }
    (peers, threads)
}

/// Two watched processes writing at once on CPU 0 of a kernel that preempts kernel code, with
/// socket I/O hooked by fexit programs, which run preemptible. A task preempted inside one makes
/// the kernel skip that program for the CPU's other tasks (counted per program:
/// `inferwatch_bpf_program_misses_total`, whoever's calls), and a program finding the CPU's
/// record slot held by another it preempted drops its record (`lost{reason="preempted"}`). Each
/// write must be seen or counted one of these ways; none mixed into another's record or gone.
fn preempted_programs_lose_nothing_silently(agent: &Agent, crowd: &mut [SockLoad; 2], writes: u32) {
    const PROGRAMS: [&str; 2] = ["inet_sendmsg_exit", "unix_stream_sendmsg_exit"];
    let misses = |t: &str| {
        PROGRAMS
            .iter()
            .map(|p| {
                series_value(t, &format!("inferwatch_bpf_program_misses_total{{program=\"{p}\"}}"))
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let lost = "inferwatch_agent_events_lost_total{reason=\"preempted\"}";
    // Misses reach the metrics every few seconds: a settled starting point.
    thread::sleep(Duration::from_secs(6));
    let before = agent.metrics();
    let (missed_before, dropped_before) = (misses(&before), series_value(&before, lost).unwrap_or(0.0));
    for load in crowd.iter() {
        // SAFETY: a CPU set on the stack, for the call.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(libc::sched_setaffinity(load.pid() as i32, size_of::<libc::cpu_set_t>(), &set), 0);
        }
    }
    for load in crowd.iter_mut() {
        load.start();
    }
    for load in crowd.iter_mut() {
        load.finish();
    }
    let seen =
        |t: &str| crowd.iter().map(|l| series_value(t, &l.ops_series("write")).unwrap_or(0.0)).sum::<f64>();
    let dropped = |t: &str| series_value(t, lost).unwrap_or(0.0) - dropped_before;
    let skipped = |t: &str| misses(t) - missed_before;
    let total = |t: &str| seen(t) + dropped(t) + skipped(t);
    agent.wait_for_metrics(PATIENCE, |t| total(t) >= (2 * writes) as f64);
    thread::sleep(Duration::from_secs(6));
    let text = agent.metrics();
    // Seen and dropped are the watched writes' own; the kernel's skips count any process's calls
    // on that CPU, so they may only add.
    // A record overwritten by another process's would show as that process's: neither may
    // exceed its own writes.
    for load in crowd.iter() {
        let own = series_value(&text, &load.ops_series("write")).unwrap_or(0.0);
        assert!(own <= writes as f64, "{own} writes seen of process {}, which made {writes}", load.pid());
    }
    let accounted = seen(&text) + dropped(&text);
    assert!(
        accounted <= (2 * writes) as f64 && total(&text) >= (2 * writes) as f64,
        "every write seen or counted, once: {} seen, {} dropped (slot busy), {} skipped (program busy)",
        seen(&text),
        dropped(&text),
        skipped(&text)
    );
    println!(
        "KERNELCHECK ok: preempt=full, fexit: 2 × {writes} watched writes on one CPU: {} seen, {} dropped as preempted (slot busy), {} skipped by the kernel (program busy)",
        seen(&text),
        dropped(&text),
        skipped(&text)
    );
}
