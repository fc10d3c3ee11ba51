//! A real vLLM (CPU, tiny random model) on a node shared with hostile neighbours: unprivileged
//! impersonators of its API server that outnumber the agent's caps, and clients that squat
//! model labels with names vLLM rejects. Run by `cargo xtask e2e` (part of `cargo xtask test`).

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::{
    Agent,
    client::Client,
    fake_vllm::FakeVllm,
    require_root, series_value, sum_matching,
    vllm::{Vllm, completion, post},
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(360);
const NOBODY: u32 = 65534;

fn instance_of(agent: &Agent, pid: u32) -> Option<Value> {
    let all = agent.json("/api/v1/instances");
    all.as_array()?
        .iter()
        .find(|i| i["processes"].as_array().unwrap().iter().any(|p| p["pid"] == pid))
        .cloned()
}

#[test]
fn a_real_vllm_among_impersonators_and_rejected_models() {
    require_root();
    // 70 impostors, all older than vLLM: more than the 64 instances the agent follows.
    let fakes = FakeVllm::impostors(70, NOBODY);
    let agent = Agent::start_discovering(&["--discovery-interval", "1s", "--scrape-interval", "1s"]);
    let mut vllm = Vllm::start("hostile", &[]);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    let startup = vllm.wait_ready(READY);
    println!("hostile e2e: vLLM ready in {startup:?} among 70 impostors");

    // The real one is verified by its mapped code, so it is followed and watched over older
    // impostors; the cap leaves 7 out, counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if instance_of(&agent, vllm.pid()).is_some_and(|i| i["verified"] == true && i["models"][0] == "tiny")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the real vLLM followed, verified and scraped:\n{}", agent.log());
        thread::sleep(Duration::from_millis(200));
    }
    let text = agent.metrics();
    assert_eq!(series_value(&text, r#"inferwatch_discovery_left_out{what="instances"}"#), Some(7.0));

    // 40 requests for models vLLM does not serve: rejected (404), and labelled `other`.
    let mut client = Client::connect(addr);
    for i in 0..40 {
        let body = format!(r#"{{"model":"junk{i}","prompt":"hi","max_tokens":2}}"#);
        client.send_raw(&post("/v1/completions", &body));
        assert_eq!(client.read_response(None).status, 404);
    }
    for i in 0..3 {
        client.send_raw(&completion(true, i));
        assert_eq!(client.read_response(None).status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = agent.metrics();
        // The agent's own scrapes (/metrics, /version, /v1/models) are counted under `tiny` too.
        let tiny =
            sum_matching(&text, "inferwatch_http_requests_total{", r#"model="tiny",route="/v1/completions""#);
        let rejected = sum_matching(&text, "inferwatch_http_requests_total{", r#"status="404""#);
        if tiny == 3.0 && rejected == 40.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "43 requests counted:\n{text}");
        thread::sleep(Duration::from_millis(200));
    };
    assert!(!text.contains("junk"), "a rejected model name became a label");
    assert_eq!(
        sum_matching(
            &text,
            "inferwatch_http_requests_total{",
            r#"model="other",route="/v1/completions",status="404""#
        ),
        40.0
    );
    drop(fakes);
    assert!(agent.stop().success());
}
