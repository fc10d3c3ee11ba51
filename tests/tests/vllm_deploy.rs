//! The dashboard and the alert rules against real data: a real vLLM (CPU, tiny model) under
//! load, the agent watching it, and a real Prometheus (Debian's package) scraping the agent with
//! deploy/prometheus/alerts.yml loaded. Every dashboard query must parse and return at least one
//! series; every alert rule must evaluate without error. Run by `cargo xtask e2e`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{
    Agent,
    client::Client,
    free_port,
    prometheus::{Prometheus, dashboard_queries, grafana_expr},
    require_root, series_value,
    vllm::{Vllm, chat, completion, long_completion},
};

const READY: Duration = Duration::from_secs(360);

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// Streams, non-streamed requests and chats on one keep-alive connection for `seconds`.
fn load(addr: SocketAddr, seconds: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut client = Client::connect(addr);
    let mut sent = 0;
    while Instant::now() < deadline {
        for request in [completion(true, sent), completion(false, sent), chat(true, sent)] {
            client.send_raw(&request);
            assert_eq!(client.read_response(None).status, 200);
            sent += 1;
        }
    }
    sent
}

#[test]
fn dashboard_queries_and_alert_rules_work_on_real_data() {
    require_root();
    let mut vllm = Vllm::start("deploy", &[]);
    vllm.wait_ready(READY);
    let vllm_addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    // A --vllm-url nobody listens on: the scrape-error series of the agent-health panel.
    let refused = format!("http://127.0.0.1:{}", free_port());
    let agent = Agent::start_discovering(&["--scrape-interval", "1s", "--vllm-url", &refused]);
    agent.wait_for_metrics(Duration::from_secs(30), |t| t.contains("vllm:num_requests_running{"));

    let rules = deploy("prometheus/alerts.yml").canonicalize().unwrap();
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: inferwatch\n    static_configs:\n      - targets: ['{}']\n",
        rules.display(),
        agent.addr
    ));
    let loaders: Vec<_> = (0..2).map(|_| thread::spawn(move || load(vllm_addr, 12))).collect();
    // One request abandoned mid-stream (client reset): the aborts and resets panels.
    thread::sleep(Duration::from_secs(3));
    let mut client = Client::connect(vllm_addr);
    client.send_raw(&long_completion(1));
    let _ = client.read_response(Some(1));
    client.reset();
    let sent: usize = loaders.into_iter().map(|l| l.join().unwrap()).sum();
    eprintln!("load: {sent} requests + 1 aborted");
    // Let Prometheus scrape the final state twice and evaluate the rules.
    thread::sleep(Duration::from_secs(4));

    let collector_up = prometheus.query("inferwatch_gpu_collector_up").unwrap();
    assert_eq!(collector_up.len(), 1, "the GPU collector always reports its state");
    let gpu_up = collector_up[0]["value"][1] == "1";
    let text = agent.metrics();
    assert_eq!(series_value(&text, "inferwatch_gpu_collector_up"), Some(if gpu_up { 1.0 } else { 0.0 }));

    let mut failures = Vec::new();
    let mut gpu_skipped = 0;
    let queries = dashboard_queries(&deploy("grafana/dashboards/inferwatch.json"));
    for (title, expr) in &queries {
        let promql = grafana_expr(expr, "1m");
        match prometheus.query(&promql) {
            Err(e) => failures.push(format!("{title}: {promql}: {e}")),
            Ok(series) if series.is_empty() => {
                if expr.contains("inferwatch_gpu_") && !gpu_up {
                    gpu_skipped += 1; // parses; no GPU on this machine (checked on the H100 by gpu-check)
                } else {
                    failures.push(format!("{title}: no series for {promql}"));
                }
            }
            Ok(series) => eprintln!("{:>3} series  {title}", series.len()),
        }
    }
    eprintln!("{} queries, {gpu_skipped} GPU queries empty because this machine has no GPU", queries.len());
    // The dashboard's variables.
    for (selector, label) in [
        ("inferwatch_build_info", "instance"),
        ("inferwatch_vllm_info", "vllm_instance"),
        ("inferwatch_http_requests_total", "model"),
    ] {
        let series = prometheus.query(selector).unwrap();
        if !series.iter().any(|s| s["metric"][label].is_string()) {
            failures.push(format!("variable {label}: no {label} label on {selector}"));
        }
    }
    // The alert rules: loaded, evaluated, and no evaluation error on real series.
    let rules = prometheus.api("/api/v1/rules");
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            evaluated += 1;
            if rule["health"] != "ok" {
                failures
                    .push(format!("alert {}: health {} {}", rule["name"], rule["health"], rule["lastError"]));
            }
        }
    }
    assert_eq!(evaluated, 11, "every rule of alerts.yml is loaded: {rules}");
    assert!(
        failures.is_empty(),
        "{} failed:\n{}\n\nprometheus log:\n{}",
        failures.len(),
        failures.join("\n"),
        prometheus.log()
    );
    assert!(agent.stop().success());
}
