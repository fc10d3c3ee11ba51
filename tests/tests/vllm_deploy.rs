//! The dashboard and the alert rules against real data: a real vLLM (CPU, tiny model) under
//! load, the agent watching it, and a real Prometheus (Debian's package) scraping the agent with
//! deploy/prometheus/alerts.yml loaded. Every dashboard query must parse and return at least one
//! series; every alert rule must evaluate without error. GPUs come from the NVML STAND-IN
//! (tests/nvml-standin: this machine has none): a busy H100 holding vLLM's engine core, which
//! then reports an XID error, and a second H100 that is lost — GPUXidErrors and GPULost must
//! fire. Run by `cargo xtask e2e`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{
    Agent,
    client::Client,
    free_port, nvml_standin,
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
    let scenario = std::env::temp_dir().join(format!("inferwatch-deploy-nvml-{}.json", std::process::id()));
    let write_scenario = |engine: u32, xid: &str, lost: bool| {
        let text = format!(
            r#"{{"gpus": [{{"load": "busy", "processes": [{{"pid": {engine}, "used_memory_bytes": 21474836480}}]{xid}}},
                          {{"uuid": "GPU-lost", "lost": {lost}}}]}}"#
        );
        std::fs::write(scenario.with_extension("tmp"), text).unwrap();
        std::fs::rename(scenario.with_extension("tmp"), &scenario).unwrap();
    };
    write_scenario(0, "", false);
    let standin = nvml_standin();
    let agent = Agent::start_with_env(
        &[],
        &["--scrape-interval", "1s", "--vllm-url", &refused, "--nvml-lib", standin.to_str().unwrap()],
        &[("INFERWATCH_NVML_SCENARIO", scenario.as_os_str())],
    );
    agent.wait_for_metrics(Duration::from_secs(30), |t| t.contains("vllm:num_requests_running{"));
    // The engine core holds the (stand-in) GPU, as it does on a real node at TP=PP=1.
    let instances = agent.json("/api/v1/instances");
    let engine = instances[0]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "engine_core")
        .and_then(|p| p["pid"].as_u64())
        .expect("vLLM's engine core is discovered") as u32;
    // The second GPU, seen up once, is lost from now on.
    write_scenario(engine, "", true);
    let joined = agent.wait_for_metrics(Duration::from_secs(20), |t| {
        t.contains(&format!("inferwatch_gpu_process_memory_bytes{{gpu=\"0\",uuid=\"GPU-5fa1c0de-0000-4000-8000-000000000000\",pid=\"{engine}\",model=\"tiny\",role=\"engine_core\"}}"))
    });
    assert_eq!(
        series_value(&joined, r#"inferwatch_gpu_model_memory_bytes{model="tiny"}"#),
        Some(20.0 * (1u64 << 30) as f64)
    );
    let lost = r#"inferwatch_gpu_up{gpu="1",uuid="GPU-lost",name="NVIDIA H100 80GB HBM3"}"#;
    agent.wait_for_metrics(Duration::from_secs(10), |t| series_value(t, lost) == Some(0.0));

    let rules = deploy("prometheus/alerts.yml").canonicalize().unwrap();
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: inferwatch\n    static_configs:\n      - targets: ['{}']\n",
        rules.display(),
        agent.addr
    ));
    let loaders: Vec<_> = (0..2).map(|_| thread::spawn(move || load(vllm_addr, 12))).collect();
    // A critical XID on the engine core's GPU, mid-load, once Prometheus has seen the counter at 0
    // (`increase` cannot count a counter whose first sample is already 1).
    let deadline = Instant::now() + Duration::from_secs(20);
    while prometheus.query(r#"inferwatch_gpu_xid_errors_total{gpu="0"} == 0"#).map_or(true, |s| s.is_empty())
    {
        assert!(Instant::now() < deadline, "Prometheus never scraped the XID counters");
        thread::sleep(Duration::from_millis(200));
    }
    write_scenario(engine, r#", "xid": [{"id": 1, "code": 79}]"#, true);
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
    assert_eq!(collector_up[0]["value"][1], "1", "the stand-in's GPUs are seen");
    let text = agent.metrics();
    assert_eq!(
        series_value(
            &text,
            r#"inferwatch_gpu_xid_errors_total{gpu="0",uuid="GPU-5fa1c0de-0000-4000-8000-000000000000"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        series_value(
            &text,
            r#"inferwatch_gpu_last_xid{gpu="0",uuid="GPU-5fa1c0de-0000-4000-8000-000000000000"}"#
        ),
        Some(79.0)
    );

    let mut failures = Vec::new();
    let queries = dashboard_queries(&deploy("grafana/dashboards/inferwatch.json"));
    for (title, expr) in &queries {
        let promql = grafana_expr(expr, "1m");
        match prometheus.query(&promql) {
            Err(e) => failures.push(format!("{title}: {promql}: {e}")),
            // GPU panels too: the stand-in's GPUs answer them.
            Ok(series) if series.is_empty() => failures.push(format!("{title}: no series for {promql}")),
            Ok(series) => eprintln!("{:>3} series  {title}", series.len()),
        }
    }
    eprintln!("{} queries, all with data", queries.len());
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
    // The GPU alerts fire: the XID at once, the lost GPU after its `for: 1m`.
    let firing = |alert: &str| {
        prometheus
            .query(&format!(r#"ALERTS{{alertname="{alert}",alertstate="firing"}}"#))
            .is_ok_and(|series| !series.is_empty())
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !(firing("GPUXidErrors") && firing("GPULost")) && Instant::now() < deadline {
        thread::sleep(Duration::from_secs(2));
    }
    for alert in ["GPUXidErrors", "GPULost"] {
        if !firing(alert) {
            failures.push(format!("alert {alert} did not fire: {}", prometheus.api("/api/v1/alerts")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}\n\nprometheus log:\n{}",
        failures.len(),
        failures.join("\n"),
        prometheus.log()
    );
    assert!(agent.stop().success());
}
