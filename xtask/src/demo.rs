//! `cargo xtask demo`: inferwatch on a machine with no vLLM of its own. Brings up the real
//! vLLM of the end-to-end tests (CPU, tiny model), the agent, and a short streamed load;
//! prints what the agent sees; serves `:9420/metrics` until Ctrl-C.

use std::{
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cmd::{self, Result},
    tasks::{self, Profile},
    vllm,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const AGENT_PORT: u16 = 9420;

pub fn demo() -> Result {
    tasks::build(Profile::Release)?;
    vllm::ensure()?;
    let programs = tasks::build_test_programs(&["sseload"])?;
    let port = cmd::free_port()?;
    let logs = cmd::root().join("target/demo");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let vllm_log = logs.join("vllm.log");
    eprintln!(
        "demo: starting vLLM {} (CPU, tiny random model) on 127.0.0.1:{port}; log: {}",
        vllm::VLLM_VERSION,
        vllm_log.display()
    );
    let mut vllm_child = vllm::serve(port, &vllm_log)?;
    let mut agent = cmd::as_root(&tasks::agent_binary(Profile::Release))
        .args(["--listen", &format!("0.0.0.0:{AGENT_PORT}"), "--scrape-interval", "2s"])
        .spawn()
        .map_err(|e| format!("starting the agent: {e}"))?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let result = show(port, &mut vllm_child, &mut agent, &vllm_log, &programs.join("sseload"));
    eprintln!("demo: stopping");
    for child in [&mut agent, &mut vllm_child] {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for child in [&mut agent, &mut vllm_child] {
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn show(
    port: u16,
    vllm_child: &mut Child,
    agent: &mut Child,
    vllm_log: &std::path::Path,
    sseload: &std::path::Path,
) -> Result {
    let deadline = Instant::now() + Duration::from_secs(600);
    eprintln!("demo: waiting for vLLM to load the model (usually under a minute)");
    while cmd::http_get(port, "/health").map(|(s, _)| s) != Some(200) {
        if let Ok(Some(status)) = vllm_child.try_wait() {
            return Err(format!("vLLM exited ({status}); see {}", vllm_log.display()));
        }
        if let Ok(Some(status)) = agent.try_wait() {
            return Err(format!("the agent exited ({status})"));
        }
        if STOP.load(Ordering::SeqCst) || Instant::now() > deadline {
            return Err("vLLM did not become ready".into());
        }
        thread::sleep(Duration::from_millis(500));
    }
    eprintln!("demo: vLLM is up; 20 s of streamed load over 4 connections");
    let load =
        cmd::output(Command::new(sseload).args([&format!("127.0.0.1:{port}"), "4", "20", "32", "tiny"]))
            .unwrap_or_default();
    thread::sleep(Duration::from_secs(3));
    let (_, instances) = cmd::http_get(AGENT_PORT, "/api/v1/instances").ok_or("the agent does not answer")?;
    let (_, metrics) = cmd::http_get(AGENT_PORT, "/metrics").ok_or("the agent does not answer")?;
    let (_, requests) =
        cmd::http_get(AGENT_PORT, "/api/v1/requests?limit=2048").ok_or("the agent does not answer")?;
    println!("\n=== what inferwatch sees ===");
    println!("load generator: {} requests, {} content events", word(&load, 0), word(&load, 1));
    println!("\nGET /api/v1/instances\n{}", instances.trim());
    println!("\nGET /metrics (selected lines)");
    for line in metrics.lines().filter(|l| {
        l.starts_with("inferwatch_http_requests_total")
            || l.starts_with("inferwatch_http_time_to_first_token_seconds_count")
            || l.starts_with("inferwatch_http_time_to_first_token_seconds_sum")
            || l.starts_with("inferwatch_vllm_up")
            || l.starts_with("inferwatch_vllm_info")
            || l.starts_with("vllm:request_success_total")
            || l.starts_with("vllm:time_to_first_token_seconds_count")
            || l.starts_with("vllm:time_to_first_token_seconds_sum")
    }) {
        println!("  {line}");
    }
    let ttft = percentiles(&requests, "time_to_first_token_seconds");
    let duration = percentiles(&requests, "duration_seconds");
    println!("\nkernel-measured, as the client sees it (from /api/v1/requests):");
    println!("  time to first token p50 {:.1} ms, p99 {:.1} ms", ttft.0 * 1e3, ttft.1 * 1e3);
    println!("  request duration    p50 {:.1} ms, p99 {:.1} ms", duration.0 * 1e3, duration.1 * 1e3);
    println!(
        "\nserving http://0.0.0.0:{AGENT_PORT}/metrics (and /api/v1/requests, /api/v1/instances) — Ctrl-C to stop"
    );
    while !STOP.load(Ordering::SeqCst) {
        if let Ok(Some(status)) = agent.try_wait() {
            return Err(format!("the agent exited ({status})"));
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn word(s: &str, i: usize) -> &str {
    s.split_whitespace().nth(i).unwrap_or("?")
}

/// p50 and p99 of a numeric field over the records of `/api/v1/requests` (a light scan: the
/// records are flat JSON objects).
fn percentiles(json: &str, field: &str) -> (f64, f64) {
    let key = format!("\"{field}\":");
    let mut values: Vec<f64> = json
        .match_indices(&key)
        .filter_map(|(i, _)| {
            let rest = &json[i + key.len()..];
            rest[..rest.find([',', '}'])?].trim().parse().ok()
        })
        .collect();
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    let at = |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    (at(0.5), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_request_records() {
        let json =
            r#"[{"a":1,"duration_seconds":0.3},{"duration_seconds":0.1},{"duration_seconds":0.2,"x":null}]"#;
        assert_eq!(percentiles(json, "duration_seconds"), (0.2, 0.3));
        assert!(percentiles(json, "missing").0.is_nan());
    }
}
