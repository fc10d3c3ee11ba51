//! The operator toolkit (`inferwatch bench`, `diagnose`, `baseline`) against a real vLLM.
//! Run with `cargo xtask e2e`.

use std::{
    net::SocketAddr,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{Agent, agent_binary, http_get, require_root, vllm::Vllm};
use serde_json::Value;

const READY: Duration = Duration::from_secs(360);

fn inferwatch(args: &[&str]) -> Output {
    Command::new(agent_binary()).args(args).output().expect("run inferwatch")
}

fn bench(url: &str, extra: &[&str]) -> Output {
    let mut args = vec!["bench", "--url", url, "--model", "tiny", "--prompt-tokens", "16"];
    args.extend_from_slice(extra);
    inferwatch(&args)
}

fn vllm_totals(addr: SocketAddr) -> (f64, f64, f64, f64) {
    let (_, text) = http_get(addr, "/metrics").unwrap();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && (l.as_bytes().get(name.len()) == Some(&b'{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum("vllm:request_success_total"),
        sum("vllm:generation_tokens_total"),
        sum("vllm:e2e_request_latency_seconds_sum"),
        sum("vllm:e2e_request_latency_seconds_count"),
    )
}

fn diagnosis(agent: &Agent, window: &str) -> Value {
    let url = format!("http://{}", agent.addr);
    let out = inferwatch(&["diagnose", "--agent", &url, "--window", window, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rules(d: &Value) -> Vec<String> {
    d["findings"].as_array().unwrap().iter().map(|f| f["rule"].as_str().unwrap().to_string()).collect()
}

#[test]
fn diagnose_sees_queueing_and_stays_quiet_when_idle() {
    require_root();
    let agent = Agent::start_discovering(&["--scrape-interval", "1s"]);
    let mut vllm = Vllm::start("max-num-seqs-2", &["--max-num-seqs", "2"]);
    vllm.wait_ready(READY);
    let url = format!("http://127.0.0.1:{}", vllm.port);
    // Idle: a few scrapes, no traffic, no finding.
    thread::sleep(Duration::from_secs(5));
    let idle = diagnosis(&agent, "4s");
    assert!(rules(&idle).is_empty(), "an idle server is quiet: {idle}");
    assert!(!idle["instances"].as_array().unwrap().is_empty(), "the instance is being looked at: {idle}");

    // Eight clients against two sequences: requests wait.
    let load = {
        let url = url.clone();
        thread::spawn(move || bench(&url, &["--concurrency", "8", "--requests", "160", "--max-tokens", "48"]))
    };
    let start = Instant::now();
    let mut found = None;
    while start.elapsed() < Duration::from_secs(60) && !load.is_finished() {
        thread::sleep(Duration::from_secs(1));
        let d = diagnosis(&agent, "5s");
        if rules(&d).contains(&"queueing".to_string()) {
            found = Some(d);
            break;
        }
    }
    let out = load.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = found.expect("queueing reported while 8 clients share 2 sequences");
    let finding = d["findings"].as_array().unwrap().iter().find(|f| f["rule"] == "queueing").unwrap();
    println!("e2e: diagnose under load: {finding}");
    assert!(finding["action"].as_str().unwrap().contains("--max-num-seqs above 2"), "{finding}");
    let metrics = agent.metrics();
    assert!(metrics.contains("inferwatch_diagnosis_active{rule=\"queueing\"}"), "exported");
    assert!(agent.stop().success());
}

/// Runs `bench` in the background while a baseline is recorded from the agent.
fn baseline_under_load(agent: &Agent, url: &str, out: &std::path::Path) {
    let load = {
        let url = url.to_string();
        thread::spawn(move || bench(&url, &["--concurrency", "8", "--requests", "400", "--max-tokens", "32"]))
    };
    thread::sleep(Duration::from_millis(500));
    let rec = inferwatch(&[
        "baseline",
        "record",
        "--agent",
        &format!("http://{}", agent.addr),
        "--duration",
        "8s",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(rec.status.success(), "{}", String::from_utf8_lossy(&rec.stderr));
    let run = load.join().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
}

#[test]
fn bench_agrees_with_vllm_and_baseline_flags_a_smaller_batch() {
    require_root();
    let dir = std::env::temp_dir().join(format!("inferwatch-baselines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let agent = Agent::start_discovering(&["--scrape-interval", "1s"]);

    let mut vllm = Vllm::start("max-num-seqs-8", &["--max-num-seqs", "8"]);
    vllm.wait_ready(READY);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    let url = format!("http://{addr}");
    agent.wait_listening(vllm.port);
    // bench's numbers against vLLM's own counters and histograms for the same run.
    let before = vllm_totals(addr);
    let json = dir.join("bench.json");
    let out = bench(
        &url,
        &["--concurrency", "4", "--requests", "40", "--max-tokens", "16", "--json", json.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let after = vllm_totals(addr);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["completed"].as_f64(), Some(after.0 - before.0), "requests");
    assert_eq!(doc["failed"], 0);
    assert_eq!(doc["total_output_tokens"].as_f64(), Some(after.1 - before.1), "generated tokens");
    let vllm_e2e_ms = (after.2 - before.2) / (after.3 - before.3) * 1e3;
    let bench_e2e_ms = doc["mean_e2el_ms"].as_f64().unwrap();
    println!("e2e: mean E2E, bench {bench_e2e_ms:.2} ms vs vLLM {vllm_e2e_ms:.2} ms");
    assert!(bench_e2e_ms >= vllm_e2e_ms, "the client cannot finish before vLLM does");
    assert!(
        bench_e2e_ms - vllm_e2e_ms < 5.0_f64.max(0.3 * vllm_e2e_ms),
        "agree within the API server's overhead"
    );
    // The same 40 requests as the agent timed them: from their arrival in vLLM's socket, with the
    // wait before the API server read them as `queued`.
    let deadline = Instant::now() + Duration::from_secs(10);
    let records: Vec<Value> = loop {
        let (status, body) = agent.try_get("/api/v1/requests?limit=2048").unwrap();
        assert_eq!(status, 200);
        let records: Vec<Value> = serde_json::from_str(&body).unwrap();
        let n = records.iter().filter(|r| r["route"] == "/v1/completions" && r["status"] == 200).count();
        if n >= 40 || Instant::now() > deadline {
            break records;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let ours: Vec<&Value> =
        records.iter().filter(|r| r["route"] == "/v1/completions" && r["status"] == 200).collect();
    assert_eq!(ours.len(), 40, "every bench request recorded");
    let unknown: Vec<&&Value> = ours.iter().filter(|r| !r["queued_seconds"].is_f64()).collect();
    assert!(unknown.is_empty(), "queued, from the kernel, for every request: {unknown:#?}\n{}", agent.log());
    let queued: Vec<f64> = ours.iter().map(|r| r["queued_seconds"].as_f64().unwrap()).collect();
    let ttft = |r: &&Value| r["time_to_first_token_seconds"].as_f64().unwrap() * 1e3;
    let agent_ttft = ours.iter().map(ttft).sum::<f64>() / 40.0;
    let from_read = agent_ttft - queued.iter().sum::<f64>() / 40.0 * 1e3;
    let client_ttft = doc["mean_ttft_ms"].as_f64().unwrap();
    let max_queued = queued.iter().copied().fold(0.0, f64::max) * 1e3;
    println!(
        "e2e: mean TTFT, bench {client_ttft:.2} ms, agent from arrival {agent_ttft:.2} ms, from the first read {from_read:.2} ms; queued max {max_queued:.2} ms"
    );
    assert!(max_queued > 0.0, "requests waited before the API server read them");
    assert!(
        (client_ttft - agent_ttft).abs() <= (client_ttft - from_read).abs(),
        "timing from the arrival is closer to the client than timing from the read"
    );
    for field in [
        "mean_ttft_ms",
        "median_tpot_ms",
        "p99_itl_ms",
        "p90_e2el_ms",
        "request_throughput",
        "output_throughput",
    ] {
        assert!(doc[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {}", doc[field]);
    }

    // Baselines: the same load against 8 sequences, then against 1.
    let a = dir.join("a.json");
    baseline_under_load(&agent, &url, &a);
    vllm.kill();
    let mut vllm = Vllm::start("max-num-seqs-1", &["--max-num-seqs", "1"]);
    vllm.wait_ready(READY);
    let b = dir.join("b.json");
    baseline_under_load(&agent, &format!("http://127.0.0.1:{}", vllm.port), &b);
    let same = inferwatch(&["baseline", "compare", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert!(same.status.success(), "a baseline equals itself");
    let cmp = inferwatch(&["baseline", "compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&cmp.stdout);
    println!("e2e: baseline compare (8 → 1 sequences):\n{table}");
    assert!(!cmp.status.success(), "a regression fails the command");
    assert!(table.contains("REGRESSION"), "{table}");
    let a_doc: Value = serde_json::from_str(&std::fs::read_to_string(&a).unwrap()).unwrap();
    assert_eq!(a_doc["vllm_version"], "0.32.0");
    assert!(a_doc["flags"].as_array().unwrap().iter().any(|f| f == "--max-num-seqs"));
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux (`cargo xtask setup` installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn top_shows_a_request_with_its_waterfall() {
    require_root();
    let agent = Agent::start_discovering(&["--scrape-interval", "1s"]);
    let mut vllm = Vllm::start("top", &[]);
    vllm.wait_ready(READY);
    let session = format!("inferwatch-top-{}", std::process::id());
    let command = format!("{} top --agent http://{} --interval 500ms", agent_binary().display(), agent.addr);
    tmux(&["new-session", "-d", "-s", &session, "-x", "100", "-y", "32", &command]);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    let body = r#"{"model":"tiny","prompt":"show me in top","max_tokens":12,"stream":true}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut client = inferwatch_tests::client::Client::connect(addr);
    client.send_raw(request.as_bytes());
    assert_eq!(client.read_response(None).status, 200);
    let start = Instant::now();
    let mut screen = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(500));
        screen = tmux(&["capture-pane", "-p", "-t", &session]);
        if screen.contains(&format!("localhost:{}", vllm.port))
            && screen.contains("completions")
            && screen.contains("first token")
        {
            break;
        }
    }
    println!("e2e: inferwatch top:\n{screen}");
    tmux(&["send-keys", "-t", &session, "q"]);
    thread::sleep(Duration::from_millis(500));
    let still_there = tmux(&["has-session", "-t", &session]);
    let _ = Command::new("tmux").args(["kill-session", "-t", &session]).status();
    assert!(screen.contains(&format!("localhost:{}", vllm.port)), "the instance is listed:\n{screen}");
    assert!(screen.contains("completions") && screen.contains("tiny"), "the request is listed:\n{screen}");
    assert!(screen.contains("first token") && screen.contains('█'), "with its waterfall:\n{screen}");
    assert!(screen.contains("frontend_in"), "and its phases:\n{screen}");
    assert!(still_there.is_empty(), "q quits");
    assert!(agent.stop().success());
}
