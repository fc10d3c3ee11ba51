//! P3, the kernel side: what the programs add to system calls, and their own run time.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use super::{flag, median, start_agent, start_agent_on, stop_agent};
use crate::{
    cmd::{self, Result},
    tasks::{self, Profile},
};

/// Tight loops without / with the agent attached, interleaved: `write()` to /dev/null (no hook
/// fires), socket I/O of a process the agent does not watch, and a thread ping-pong.
pub fn devnull(args: &[String]) -> Result<String> {
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
            // A ping-pong round trip takes ~45 µs, a /dev/null write ~0.1: fewer of them.
            let n = if mode == "pingpong" { iterations / 30 } else { iterations };
            without.push(measure(&writeloop, mode, &[n.to_string()])?);
            let mut child = start_agent(&agent, watched.id())?;
            let measured = measure(&writeloop, mode, &[n.to_string()]);
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

    let mut out = String::new();
    let _ = writeln!(
        out,
        "{rounds} interleaved rounds of {iterations} iterations ({} for the ping-pong), agent attached vs not:\n",
        iterations / 30
    );
    let _ = writeln!(out, "| workload | without (median ns) | with (median ns) | added (ns) | ratio |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (mode, without, with) in &results {
        let (a, b) = (median(without), median(with));
        let _ = writeln!(out, "| {} | {a:.1} | {b:.1} | {:+.1} | {:.3} |", describe(mode), b - a, b / a);
    }
    let _ = writeln!(out, "\nRaw rounds (ns per iteration):\n");
    for (mode, without, with) in &results {
        let _ = writeln!(out, "- {mode} without: {without:.1?}");
        let _ = writeln!(out, "- {mode} with: {with:.1?}");
    }
    Ok(out)
}

fn describe(mode: &str) -> &'static str {
    match mode {
        "devnull" => "`write()` to /dev/null, any process (no hook fires)",
        "socketpair" => "`write()`+`read()` of 1 byte on a socket pair, unwatched process",
        _ => "pipe round trip between two threads (2 switches, 2 wakeups), unwatched process",
    }
}

/// Per-program cost from the kernel's statistics (`kernel.bpf_stats_enabled=1`): socket
/// operations of an unwatched process, then of a watched one (payload copy included), each
/// `--iterations` 256-byte write+read pairs on a Unix socket pair, or with `--transport tcp` on
/// a loopback TCP connection (the case that matters for vLLM).
pub fn programs(args: &[String]) -> Result<String> {
    let iterations = flag(args, "--iterations", 1_000_000)?;
    let mode = match super::flag_text(args, "--transport").unwrap_or("unix") {
        "unix" => "socketpair",
        "tcp" => "tcp",
        other => return Err(format!("--transport {other}: unix or tcp")),
    };
    // Extra agent flags (`--agent-args "--capture-bytes 256"`), to price a setting against the
    // default's run.
    let agent_args: Vec<String> = super::flag_text(args, "--agent-args")
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    tasks::build(Profile::Release)?;
    let programs = tasks::build_test_programs(&["writeloop"])?;
    let writeloop = programs.join("writeloop");
    let stats_flag = "/proc/sys/kernel/bpf_stats_enabled";
    let previous = std::fs::read_to_string(stats_flag).map_err(|e| format!("{stats_flag}: {e}"))?;
    std::fs::write(stats_flag, "1").map_err(|e| format!("enabling BPF statistics (root needed): {e}"))?;
    let result = programs_measured(&writeloop, iterations, mode, &agent_args);
    let _ = std::fs::write(stats_flag, previous.trim());
    result
}

pub(super) type Totals = std::collections::BTreeMap<String, (f64, f64)>;

fn programs_measured(writeloop: &Path, iterations: u64, mode: &str, agent_args: &[String]) -> Result<String> {
    let transport = if mode == "tcp" { "a loopback TCP connection" } else { "a Unix socket pair" };
    use std::io::Write as _;
    // The watched process: a shell that waits for a line, then becomes writeloop (same pid).
    let mut watched = Command::new("sh")
        .args(["-c", &format!("read go; exec {} {mode} {iterations} 256", writeloop.display())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("sh: {e}"))?;
    let (mut agent, port) = start_agent_on(&tasks::agent_binary(Profile::Release), watched.id(), agent_args)?;
    let metrics =
        |port: u16| cmd::http_get(port, "/metrics").map(|(_, t)| t).ok_or("the agent does not answer");
    // The agent reads the kernel's totals every discovery tick (2 s).
    let settle = || thread::sleep(Duration::from_millis(2500));
    settle();
    let s0 = program_totals(&metrics(port)?);
    let unwatched = measure(writeloop, mode, &[iterations.to_string(), "256".into()])?;
    settle();
    let s1 = program_totals(&metrics(port)?);
    watched.stdin.as_mut().ok_or("no stdin")?.write_all(b"go\n").map_err(|e| e.to_string())?;
    let out = watched.wait_with_output().map_err(|e| e.to_string())?;
    settle();
    let text = metrics(port)?;
    let s2 = program_totals(&text);
    stop_agent(&mut agent)?;
    let lost = super::sum(&text, "inferwatch_agent_events_lost_total");
    let events = super::sum(&text, "inferwatch_agent_events_total");
    let per_run = |a: &Totals, b: &Totals, p: &str| {
        let (x, y) = (a.get(p).copied().unwrap_or_default(), b.get(p).copied().unwrap_or_default());
        let runs = y.1 - x.1;
        (runs, if runs > 0.0 { (y.0 - x.0) / runs } else { f64::NAN })
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "`kernel.bpf_stats_enabled=1` during the run (restored after); {iterations} × (256-byte `write` + `read`) on {transport} by an unwatched process, then by a watched one ({}). Run times include the statistics' own overhead.\n",
        if agent_args.is_empty() {
            "each payload prefix copied and sent to the agent".to_string()
        } else {
            format!("the agent run with `{}`", agent_args.join(" "))
        }
    );
    let _ = writeln!(md, "| program | process | runs | ns per run |");
    let _ = writeln!(md, "|---|---|---|---|");
    for program in [
        "sock_send_length",
        "sock_recv_length",
        "sk_data_ready",
        "inet_sock_set_state",
        "sched_switch",
        "sched_wakeup",
    ] {
        for (phase, a, b) in [("unwatched", &s0, &s1), ("watched", &s1, &s2)] {
            let (runs, ns) = per_run(a, b, program);
            let _ = writeln!(md, "| `{program}` | {phase} | {runs:.0} | {ns:.0} |");
        }
    }
    let watched_ns: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "\nLoop time per write+read pair: unwatched {unwatched:.1} ns, watched {watched_ns:.1} ns ({:+.1} ns for 2 watched socket operations, the agent's userspace sharing the CPUs). The agent received {events:.0} events, lost {lost:.0}.",
        watched_ns - unwatched
    );
    Ok(md)
}

/// (run time ns, runs) per program from the agent's `inferwatch_bpf_program_*` counters.
pub(super) fn program_totals(text: &str) -> Totals {
    let mut out = Totals::new();
    for line in text.lines() {
        for (prefix, runs) in [
            ("inferwatch_bpf_program_run_nanoseconds_total{program=\"", false),
            ("inferwatch_bpf_program_runs_total{program=\"", true),
        ] {
            if let Some(rest) = line.strip_prefix(prefix)
                && let Some((name, value)) = rest.split_once("\"} ")
            {
                let e = out.entry(name.to_string()).or_insert((0.0, 0.0));
                let v: f64 = value.parse().unwrap_or(0.0);
                if runs { e.1 = v } else { e.0 = v }
            }
        }
    }
    out
}

/// Runs `writeloop MODE ARGS…`, which prints nanoseconds per iteration.
fn measure(writeloop: &Path, mode: &str, args: &[String]) -> Result<f64> {
    let out = cmd::output(Command::new(writeloop).arg(mode).args(args))
        .ok_or_else(|| format!("{} {mode} failed", writeloop.display()))?;
    out.trim().parse().map_err(|e| format!("writeloop printed {out:?}: {e}"))
}
