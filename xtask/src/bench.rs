//! A/B benchmarks: the same workload without and with the agent, interleaved, in one run.
//! Ratios, not timed assertions: machines differ, ratios within one run do not lie as much.
//!
//!   cargo xtask bench devnull [--rounds N] [--iterations N]
//!     the cost the agent adds to `write()` on /dev/null (any process) and to socket I/O of a
//!     process it does not watch.

use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cmd::{self, Result, run},
    setup,
    tasks::{self, Profile},
};

pub fn bench(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        Some("devnull") => devnull(&args[1..]),
        _ => Err("usage: cargo xtask bench devnull [--rounds N] [--iterations N]".into()),
    }
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
    run(cmd::cargo(&setup::userspace_toolchain()).args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "inferwatch-tests",
        "--bin",
        "writeloop",
    ]))?;
    let writeloop = cmd::root().join("target/release/writeloop");
    let agent = tasks::agent_binary(Profile::Release);
    // Something to watch, so the kernel map holds an entry as in real use.
    let mut watched = Command::new("sleep").arg("3600").spawn().map_err(|e| format!("sleep: {e}"))?;

    let modes = ["devnull", "socketpair"];
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
        _ => "write()+read() on a socket pair, unwatched process",
    }
}

fn measure(writeloop: &Path, mode: &str, iterations: u64) -> Result<f64> {
    let out = cmd::output(Command::new(writeloop).args([mode, &iterations.to_string()]))
        .ok_or_else(|| format!("{} {mode} failed", writeloop.display()))?;
    out.trim().parse().map_err(|e| format!("writeloop printed {out:?}: {e}"))
}

fn start_agent(agent: &Path, watch: u32) -> Result<Child> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut child = cmd::as_root(agent)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--pid", &watch.to_string(), "--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the agent: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the agent exited ({status})"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("the agent did not start listening in 20 s".into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
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
