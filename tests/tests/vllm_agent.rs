//! End to end on a real vLLM (CPU, tiny random model): discovery with no flags, request
//! timing, the re-export of vLLM's own metrics, crashes and restarts, several API servers.
//! Run with `cargo xtask e2e` (part of `cargo xtask test`), which provisions vLLM.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{
    Agent,
    client::Client,
    http_get, require_root, series_value,
    vllm::{Vllm, chat, completion, long_completion},
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(360);

/// Sends the requests on one keep-alive connection; all must succeed.
fn send(addr: SocketAddr, requests: &[Vec<u8>]) {
    let mut client = Client::connect(addr);
    for r in requests {
        client.send_raw(r);
        let truth = client.read_response(None);
        assert_eq!(truth.status, 200);
    }
}

/// The agent's count of finished requests of the tiny model on the generation routes.
fn counted(agent: &Agent, outcome: &str) -> f64 {
    let text = agent.metrics();
    ["/v1/completions", "/v1/chat/completions"]
        .iter()
        .map(|route| {
            let series = format!(
                "inferwatch_http_requests_total{{model=\"tiny\",route=\"{route}\",status=\"200\",outcome=\"{outcome}\"}}"
            );
            series_value(&text, &series).unwrap_or(0.0)
        })
        .sum()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Instances the agent reports whose root process is `pid`.
fn instance_of(agent: &Agent, pid: u32) -> Option<Value> {
    let list = agent.json("/api/v1/instances");
    list.as_array()?.iter().find(|i| i["root_pid"].as_u64() == Some(pid as u64)).cloned()
}

fn watched(agent: &Agent) -> f64 {
    series_value(&agent.metrics(), "inferwatch_watched_processes").unwrap_or(0.0)
}

/// `vllm:*` samples keyed by name and labels (without the agent's `vllm_instance`, keeping only
/// `instance`'s when given), without creation times.
fn vllm_samples(text: &str, instance: Option<&str>) -> BTreeMap<String, f64> {
    let tag = instance.map(|i| format!("vllm_instance=\"{i}\""));
    text.lines()
        .filter(|l| l.starts_with("vllm:") && !l.contains("_created"))
        .filter(|l| tag.as_ref().is_none_or(|t| l.contains(t.as_str())))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let mut labels: Vec<&str> = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|kv| !kv.is_empty() && !kv.starts_with("vllm_instance="))
                .collect();
            labels.sort();
            Some((format!("{name}{{{}}}", labels.join(",")), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn discovers_times_reexports_and_follows_a_restart() {
    require_root();
    let agent = Agent::start_discovering(&["--scrape-interval", "1s"]);
    let mut vllm = Vllm::start("single", &[]);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();

    // Found with no flags, from /proc alone, before it even listens.
    let found = wait_until("discovery of the new vLLM", Duration::from_secs(5), || {
        instance_of(&agent, vllm.pid()).is_some()
    });
    println!("e2e: vLLM found {found:?} after it started");
    let startup = vllm.wait_ready(READY);
    println!("e2e: vLLM ready in {startup:?}");
    wait_until("instance description", Duration::from_secs(10), || {
        instance_of(&agent, vllm.pid()).is_some_and(|i| i["version"] == "0.32.0" && i["models"][0] == "tiny")
    });
    let instance = instance_of(&agent, vllm.pid()).unwrap();
    assert_eq!(instance["listen"][0], addr.to_string());
    let roles: Vec<&str> =
        instance["processes"].as_array().unwrap().iter().filter_map(|p| p["role"].as_str()).collect();
    assert!(roles.contains(&"api_server") && roles.contains(&"engine_core"), "{roles:?}");
    assert!(watched(&agent) >= 1.0);

    // Requests are counted exactly, streamed or not, completions and chat.
    let mut requests = Vec::new();
    for i in 0..5 {
        requests.push(completion(true, i));
        requests.push(completion(false, i));
    }
    for i in 0..3 {
        requests.push(chat(true, i));
        requests.push(chat(false, i));
    }
    send(addr, &requests);
    wait_until("the agent counting 16 requests", Duration::from_secs(10), || {
        counted(&agent, "complete") == 16.0
    });
    thread::sleep(Duration::from_millis(300));
    assert_eq!(counted(&agent, "complete"), 16.0);
    assert_eq!(counted(&agent, "aborted"), 0.0);
    let records = agent.json("/api/v1/requests?limit=100");
    let streamed: Vec<&Value> =
        records.as_array().unwrap().iter().filter(|r| r["stream"] == true && r["model"] == "tiny").collect();
    assert_eq!(streamed.len(), 8);
    for r in &streamed {
        assert!(r["events"].as_u64().unwrap() >= 2, "{r}");
        assert!(r["response_headers_seconds"].as_f64().unwrap() <= r["duration_seconds"].as_f64().unwrap());
    }

    // vLLM's own metrics, re-exported: equal to a direct scrape once both have settled.
    thread::sleep(Duration::from_millis(2500));
    let (_, direct) = http_get(addr, "/metrics").unwrap();
    let direct = vllm_samples(&direct, None);
    let exported = vllm_samples(&agent.metrics(), Some(&format!("localhost:{}", addr.port())));
    assert!(direct.len() > 50, "vLLM exposes its metrics");
    let mut differing = Vec::new();
    for (series, value) in &direct {
        match exported.get(series) {
            Some(v) if v == value || (v.is_nan() && value.is_nan()) => {}
            other => differing.push(format!("{series}: vLLM {value}, agent {other:?}")),
        }
    }
    assert!(differing.is_empty(), "re-exported samples differ:\n{}", differing.join("\n"));
    let success = direct
        .iter()
        .filter(|(k, _)| k.starts_with("vllm:request_success_total{"))
        .map(|(_, v)| v)
        .sum::<f64>();
    assert_eq!(success, 16.0, "vLLM agrees on the number of requests");
    let up = format!("inferwatch_vllm_up{{vllm_instance=\"localhost:{}\"}}", addr.port());
    assert_eq!(series_value(&agent.metrics(), &up), Some(1.0));

    // A crash: the agent lets go of the dead processes (other vLLMs on the machine stay watched).
    let old_pid = vllm.pid();
    let before = watched(&agent);
    vllm.kill();
    wait_until("unwatching the dead vLLM", Duration::from_secs(5), || {
        watched(&agent) == before - 1.0 && instance_of(&agent, old_pid).is_none()
    });

    // A restart: watched again within 5 s, and its requests are counted.
    let mut vllm = Vllm::start("restarted", &[]);
    let spawned = Instant::now();
    wait_until("watching the restarted vLLM", Duration::from_secs(5), || {
        instance_of(&agent, vllm.pid()).is_some() && watched(&agent) == before
    });
    println!("e2e: restarted vLLM watched {:?} after it started", spawned.elapsed());
    vllm.wait_ready(READY);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    send(addr, &[completion(true, 100), completion(false, 101), chat(true, 102)]);
    wait_until("counting after the restart", Duration::from_secs(10), || counted(&agent, "complete") == 19.0);
    assert!(agent.stop().success());
}

#[test]
fn two_api_servers_make_one_instance_with_both_watched() {
    require_root();
    let agent = Agent::start_discovering(&["--scrape-interval", "1s"]);
    let mut vllm = Vllm::serve("api-server-count-2", &["--api-server-count", "2"]);
    vllm.wait_ready(READY);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    let api_servers = |i: &Value| {
        i["processes"].as_array().map_or(0, |p| p.iter().filter(|p| p["role"] == "api_server").count())
    };
    wait_until("both API servers in one instance", Duration::from_secs(10), || {
        instance_of(&agent, vllm.pid()).is_some_and(|i| api_servers(&i) >= 3)
    });
    let instance = instance_of(&agent, vllm.pid()).unwrap();
    println!(
        "e2e: --api-server-count 2: {} API server processes (launcher included)",
        api_servers(&instance)
    );
    // One instance holds them all: no other instance has any of its processes.
    let pids: Vec<u64> =
        instance["processes"].as_array().unwrap().iter().filter_map(|p| p["pid"].as_u64()).collect();
    let others = agent.json("/api/v1/instances");
    for other in others.as_array().unwrap().iter().filter(|i| i["root_pid"] != instance["root_pid"]) {
        let theirs = other["processes"].as_array().unwrap();
        assert!(theirs.iter().all(|p| !pids.contains(&p["pid"].as_u64().unwrap())), "{other}");
    }
    let api_pids: Vec<u32> = instance["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "api_server")
        .map(|p| p["pid"].as_u64().unwrap() as u32)
        .collect();
    let text = agent.metrics();
    for pid in &api_pids {
        // Watched: the kernel programs report its sockets (every API server talks to the engine).
        let own = text
            .lines()
            .filter(|l| {
                l.starts_with("inferwatch_process_socket_ops_total{") && l.contains(&format!("pid=\"{pid}\""))
            })
            .count();
        assert!(own > 0 || *pid == vllm.pid(), "API server {pid} is not watched:\n{text}");
    }
    // Separate connections spread over both servers; every request is counted once.
    thread::scope(|s| {
        for i in 0..8 {
            s.spawn(move || send(addr, &[completion(i % 2 == 0, 200 + i)]));
        }
    });
    wait_until("counting 8 requests across two API servers", Duration::from_secs(10), || {
        counted(&agent, "complete") == 8.0
    });
    assert!(agent.stop().success());
}

/// Sum and count of a histogram's series in a metrics page.
fn histogram_sum_count(text: &str, name: &str, labels: &str) -> (f64, f64) {
    let get = |suffix: &str| series_value(text, &format!("{name}_{suffix}{{{labels}}}")).unwrap_or(0.0);
    (get("sum"), get("count"))
}

/// Mean over a window of a histogram: (sum, count) after minus before.
fn window_mean(before: (f64, f64), after: (f64, f64)) -> f64 {
    (after.0 - before.0) / (after.1 - before.1).max(1.0)
}

#[test]
fn breaks_requests_down_and_sees_scheduling_and_resets() {
    require_root();
    let agent = Agent::start_discovering(&["--scrape-interval", "1s"]);
    let mut vllm = Vllm::start("breakdown", &[]);
    vllm.wait_ready(READY);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    wait_until("watching vLLM", Duration::from_secs(10), || {
        instance_of(&agent, vllm.pid()).is_some_and(|i| i["version"] == "0.32.0")
    });
    let vllm_ttft = || {
        let (_, text) = http_get(addr, "/metrics").unwrap();
        histogram_sum_count(&text, "vllm:time_to_first_token_seconds", "engine=\"0\",model_name=\"tiny\"")
    };

    // Phases of every request, which add up to its TTFT and duration.
    let before = vllm_ttft();
    let mut requests: Vec<Vec<u8>> = (0..10).map(|i| completion(true, 300 + i)).collect();
    requests.extend((0..4).map(|i| completion(false, 400 + i)));
    send(addr, &requests);
    let after = vllm_ttft();
    wait_until("14 requests", Duration::from_secs(10), || counted(&agent, "complete") == 14.0);
    let records = agent.json("/api/v1/requests?limit=100");
    let generation: Vec<&Value> =
        records.as_array().unwrap().iter().filter(|r| r["route"] == "/v1/completions").collect();
    assert_eq!(generation.len(), 14);
    let f = |r: &Value, k: &str| r[k].as_f64();
    let mut agent_ttft = Vec::new();
    for r in &generation {
        assert_eq!(r["phases_unmatched"], Value::Null, "{r}");
        let (fin, fout, duration) = (
            f(r, "frontend_in_seconds").unwrap(),
            f(r, "frontend_out_seconds").unwrap(),
            f(r, "duration_seconds").unwrap(),
        );
        if r["stream"] == true {
            let Some(ttft) = f(r, "time_to_first_token_seconds") else { continue };
            let to_first = fin + f(r, "engine_first_seconds").unwrap() + fout;
            assert!((to_first - ttft).abs() < 1e-3, "phases {to_first} vs TTFT {ttft}: {r}");
            assert!((to_first + f(r, "decode_seconds").unwrap() - duration).abs() < 1e-3, "{r}");
            agent_ttft.push(ttft);
        } else {
            assert!((fin + f(r, "engine_seconds").unwrap() + fout - duration).abs() < 1e-3, "{r}");
        }
    }
    let agent_mean = agent_ttft.iter().sum::<f64>() / agent_ttft.len() as f64;
    let vllm_mean = window_mean(before, after);
    println!(
        "e2e: one request's breakdown: {}",
        generation.iter().find(|r| r["stream"] == true).map(|r| r.to_string()).unwrap_or_default()
    );
    println!("e2e: TTFT mean, kernel {:.3} ms vs vLLM {:.3} ms", agent_mean * 1e3, vllm_mean * 1e3);
    assert!(agent_mean >= vllm_mean, "the client cannot see a first token before vLLM makes it");
    let overhead =
        format!("inferwatch_api_server_overhead_seconds{{vllm_instance=\"localhost:{}\"}}", addr.port());
    wait_until("the API-server overhead gauge", Duration::from_secs(10), || {
        series_value(&agent.metrics(), &overhead).is_some()
    });

    // Run-queue delay of the API server, without and with CPU hogs on its cores.
    let runqueue = || {
        histogram_sum_count(
            &agent.metrics(),
            "inferwatch_sched_runqueue_delay_seconds",
            "role=\"api_server\"",
        )
    };
    let load = || send(addr, &(0..8).map(|i| completion(true, 500 + i)).collect::<Vec<_>>());
    thread::sleep(Duration::from_millis(1500));
    let a0 = runqueue();
    load();
    thread::sleep(Duration::from_millis(1500));
    let a1 = runqueue();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..6)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    load();
    thread::sleep(Duration::from_millis(1500));
    let b1 = runqueue();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let (quiet, busy) = (window_mean(a0, a1), window_mean(a1, b1));
    println!(
        "e2e: API server run-queue delay, mean per wait: quiet {:.1} µs, with CPU hogs {:.1} µs",
        quiet * 1e6,
        busy * 1e6
    );
    assert!(a1.1 > a0.1 && b1.1 > a1.1, "run-queue waits were measured");
    assert!(busy > quiet * 2.0, "CPU hogs raise the API server's run-queue delay: {quiet} → {busy}");

    // A client that resets its connection mid-stream.
    let resets = format!(
        "inferwatch_tcp_resets_total{{vllm_instance=\"localhost:{}\",direction=\"received\"}}",
        addr.port()
    );
    let mut client = Client::connect(addr);
    client.send_raw(&long_completion(600));
    let _ = client.read_response(Some(1));
    client.reset();
    wait_until("the reset counted", Duration::from_secs(5), || {
        series_value(&agent.metrics(), &resets).unwrap_or(0.0) >= 1.0
    });
    wait_until("the abort counted", Duration::from_secs(5), || counted(&agent, "aborted") >= 1.0);
    assert!(agent.stop().success());
}
