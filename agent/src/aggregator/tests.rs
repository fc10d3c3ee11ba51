//! The aggregator as a whole: inputs in, metrics and records out.

use std::sync::Arc;

use inferwatch_common::sock::AF_INET;

use super::{Aggregator, Input, Store, requests::MAX_MODELS, scrapes::cap_samples};
use crate::{
    collect::discovery::DiscoveryReport,
    kernel::{KernelReport, LOST_RING_BUFFER_FULL},
    model::sock::{Direction, KernelEvent, RecordBatch, SockOp},
};

/// An instance whose API server is `api` and which serves `models`.
fn instance(api: u32, models: &[&str]) -> crate::model::instance::InstanceView {
    use crate::model::instance::{Instance, InstanceView, Process, Role};
    let instance = Instance {
        root_pid: api,
        processes: vec![Process { pid: api, ppid: 1, role: Role::ApiServer, comm: "python".into() }],
        listen: vec![format!("127.0.0.1:{}", 8000 + api).parse().unwrap()],
        cmdline_models: vec![],
        flags: vec![],
        container_id: None,
        pod_uid: None,
        verified: false,
    };
    InstanceView {
        id: format!("localhost:{}", 8000 + api),
        instance,
        version: None,
        models: models.iter().map(|m| m.to_string()).collect(),
        listen_overflows: None,
    }
}

fn watched(tgid: u32) -> Input {
    Input::Discovery(DiscoveryReport::Watched { tgid, comm: "vllm".into() })
}

fn op(tgid: u32, syscall: &'static str, direction: Direction, ret: i32) -> KernelEvent<'static> {
    KernelEvent::Sock(SockOp {
        ts_ns: 1,
        conn_id: 0,
        tgid,
        tid: tgid,
        ret,
        syscall,
        direction,
        family: AF_INET,
        payload: b"",
        tail: b"",
        arrival_ns: 0,
        established_ns: 0,
    })
}

fn io(conn_id: u64, ts_ns: u64, direction: Direction, bytes: &[u8]) -> KernelEvent<'_> {
    KernelEvent::Sock(SockOp {
        ts_ns,
        conn_id,
        tgid: 10,
        tid: 10,
        ret: bytes.len() as i32,
        syscall: "read",
        direction,
        family: AF_INET,
        payload: bytes,
        tail: b"",
        arrival_ns: 0,
        established_ns: 0,
    })
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn series_of_an_unwatched_process_go_and_their_room_is_freed() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store.clone(), 16, 4);
    agg.apply(watched(10));
    agg.kernel_event(op(10, "write", Direction::Sent, 100));
    agg.kernel_event(op(10, "read", Direction::Received, 7));
    agg.apply(Input::Discovery(DiscoveryReport::Unwatched { tgid: 10 }));
    let text = store.metrics.encode().unwrap();
    assert!(!text.contains("pid=\"10\""), "{text}");
    assert_eq!(value(&text, "inferwatch_watched_processes"), Some(0.0));
    // The freed room serves the next process (pid reuse or a restart).
    agg.apply(watched(11));
    agg.kernel_event(op(11, "write", Direction::Sent, 1));
    let text = store.metrics.encode().unwrap();
    let write = "inferwatch_process_socket_ops_total{pid=\"11\",comm=\"vllm\",syscall=\"write\"}";
    assert_eq!(value(&text, write), Some(1.0));
    assert_eq!(
        value(&text, "inferwatch_series_refused_total{family=\"inferwatch_process_socket_ops\"}"),
        None
    );
}

#[test]
fn a_family_stops_growing_at_its_cap_and_counts_what_it_refused() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store.clone(), 64, 3);
    // Five status codes from a misbehaving server: three series, two refused requests.
    for (conn, status) in [200u16, 201, 299, 298, 297].into_iter().enumerate() {
        let conn = conn as u64 + 1;
        agg.kernel_event(io(conn, 1, Direction::Received, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"));
        let head = format!("HTTP/1.1 {status} OK\r\ncontent-length: 0\r\n\r\n");
        agg.kernel_event(io(conn, 2, Direction::Sent, head.as_bytes()));
    }
    let text = store.metrics.encode().unwrap();
    let series = text.lines().filter(|l| l.starts_with("inferwatch_http_requests_total{")).count();
    assert_eq!(series, 3, "{text}");
    let refused = "inferwatch_series_refused_total{family=\"inferwatch_http_requests\"}";
    assert_eq!(value(&text, refused), Some(2.0));
    // Timing families have bounded labels (model, route) and still saw all five.
    assert!(
        text.contains(
            "inferwatch_http_request_duration_seconds_count{model=\"unknown\",route=\"/health\"} 5"
        ),
        "{text}"
    );
}

#[test]
fn a_huge_scraped_page_is_cut_at_the_cap() {
    use crate::model::family::{family, sample};
    let mut families: Vec<_> = (0..10)
        .map(|i| {
            family(
                &format!("vllm:f{i}"),
                "",
                "gauge",
                (0..10).map(|j| sample(&format!("vllm:f{i}"), &[("j", &j.to_string())], 1.0)).collect(),
            )
        })
        .collect();
    assert_eq!(cap_samples(&mut families, 35), 70);
    assert_eq!(families.len(), 3, "whole families are kept or dropped");
}

#[test]
fn counts_ops_and_bytes_per_process_and_call() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store.clone(), 16, 2000);
    agg.apply(watched(10));
    for _ in 0..3 {
        agg.kernel_event(op(10, "write", Direction::Sent, 100));
    }
    agg.kernel_event(op(10, "sendto", Direction::Sent, -11));
    agg.kernel_event(op(10, "read", Direction::Received, 7));
    let text = store.metrics.encode().unwrap();
    let ops = |s: &str| {
        value(
            &text,
            &format!("inferwatch_process_socket_ops_total{{pid=\"10\",comm=\"vllm\",syscall=\"{s}\"}}"),
        )
    };
    assert_eq!(ops("write"), Some(3.0));
    assert_eq!(ops("sendto"), Some(1.0), "failed calls are operations too");
    assert_eq!(ops("read"), Some(1.0));
    let bytes = |d: &str| {
        value(
            &text,
            &format!("inferwatch_process_socket_bytes_total{{pid=\"10\",comm=\"vllm\",direction=\"{d}\"}}"),
        )
    };
    assert_eq!(bytes("sent"), Some(300.0), "errors move no bytes");
    assert_eq!(bytes("received"), Some(7.0));
    assert_eq!(value(&text, "inferwatch_agent_events_total"), Some(5.0));
    assert_eq!(value(&text, "inferwatch_watched_processes"), Some(1.0));
}

#[test]
fn kernel_loss_totals_become_increments() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store.clone(), 16, 2000);
    let series = "inferwatch_agent_events_lost_total{reason=\"ring_buffer_full\"}";
    for (total, expect) in [(5, 5.0), (5, 5.0), (12, 12.0), (3, 15.0)] {
        agg.apply(Input::Kernel(KernelReport::Lost { reason: LOST_RING_BUFFER_FULL, total }));
        assert_eq!(value(&store.metrics.encode().unwrap(), series), Some(expect), "after total {total}");
    }
    // A record too short for its header is counted as malformed.
    agg.apply(Input::Kernel(KernelReport::Batch(RecordBatch::from_records([&[1u8, 2, 3][..]]))));
    let text = store.metrics.encode().unwrap();
    assert_eq!(value(&text, "inferwatch_agent_events_lost_total{reason=\"malformed\"}"), Some(1.0));
}

#[test]
fn a_streamed_request_becomes_metrics_and_a_record() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store.clone(), 16, 2000);
    // Process 10 is the API server of an instance serving "tiny".
    agg.apply(Input::Discovery(DiscoveryReport::Instances(vec![instance(10, &["tiny"])])));
    let body = br#"{"model":"tiny","prompt":"hi","stream":true}"#;
    let head = format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
    let request = [head.as_bytes(), body].concat();
    agg.kernel_event(io(5, 1_000_000, Direction::Received, &request));
    let text = store.metrics.encode().unwrap();
    let in_flight = "inferwatch_http_requests_in_flight{model=\"tiny\",route=\"/v1/completions\"}";
    assert_eq!(value(&text, in_flight), Some(1.0));
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    agg.kernel_event(io(5, 3_000_000, Direction::Sent, head));
    let event = |t: &str| {
        let e = format!("data: {{\"choices\":[{{\"text\":\"{t}\"}}]}}\n\n");
        format!("{:x}\r\n{e}\r\n", e.len())
    };
    agg.kernel_event(io(5, 11_000_000, Direction::Sent, event("").as_bytes()));
    agg.kernel_event(io(5, 21_000_000, Direction::Sent, event("a").as_bytes()));
    agg.kernel_event(io(5, 41_000_000, Direction::Sent, event("b").as_bytes()));
    agg.kernel_event(io(5, 42_000_000, Direction::Sent, b"e\r\ndata: [DONE]\n\n\r\n"));
    agg.kernel_event(io(5, 43_000_000, Direction::Sent, b"0\r\n\r\n"));
    let text = store.metrics.encode().unwrap();
    assert_eq!(value(&text, in_flight), Some(0.0));
    let total = "inferwatch_http_requests_total{model=\"tiny\",route=\"/v1/completions\",status=\"200\",outcome=\"complete\"}";
    assert_eq!(value(&text, total), Some(1.0), "{text}");
    let recent = store.recent.read();
    let r = &recent[0];
    assert_eq!((r.model.as_str(), r.status, &*r.outcome, r.stream), ("tiny", 200, "complete", true));
    assert_eq!((r.events, r.content_events), (4, 2));
    assert_eq!(r.response_headers_seconds, Some(0.002));
    assert_eq!(r.time_to_first_token_seconds, Some(0.020));
    assert_eq!(r.duration_seconds, 0.042);
    assert_eq!(r.max_chunk_gap_seconds, Some(0.020));
    assert_eq!(r.request_bytes, request.len() as u64);
    let json = serde_json::to_string(r).unwrap();
    assert!(!json.contains("hi"), "no payload in the record: {json}");
}

#[test]
fn model_labels_are_bounded() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store, 16, 2000);
    // Where discovery knows what the instance serves: those names, else `other`.
    agg.apply(Input::Discovery(DiscoveryReport::Instances(vec![instance(10, &["tiny", "big"])])));
    assert_eq!(agg.model_label(Some("tiny"), 10), "tiny");
    assert_eq!(agg.model_label(Some("big"), 10), "big");
    assert_eq!(agg.model_label(Some("junk1"), 10), "other");
    assert_eq!(agg.model_label(None, 10), "unknown", "two served: which one is unknown");
    // Elsewhere (process 1, no instance): only models served successfully before, at most
    // MAX_MODELS, never from a refused request.
    assert_eq!(agg.model_label(Some("m0"), 1), "other", "not seen served yet");
    agg.admit_model(Some("m0"), 1, 404);
    assert_eq!(agg.model_label(Some("m0"), 1), "other", "a refused request admits nothing");
    for i in 0..MAX_MODELS + 5 {
        agg.admit_model(Some(&format!("m{i}")), 1, 200);
    }
    assert_eq!(agg.model_label(Some("m0"), 1), "m0");
    assert_eq!(agg.model_label(Some(&format!("m{}", MAX_MODELS - 1)), 1), format!("m{}", MAX_MODELS - 1));
    assert_eq!(agg.model_label(Some(&format!("m{MAX_MODELS}")), 1), "other", "beyond the cap");
    // The instance's own requests never used those slots.
    assert_eq!(agg.model_label(Some("m0"), 10), "other");
}

#[test]
fn without_discovery_a_model_is_a_label_once_the_server_accepted_it() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store.clone(), 16, 2000);
    let request = |model: &str| {
        let body = format!(r#"{{"model":"{model}","prompt":"x"}}"#);
        format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}", body.len())
    };
    let answer = |status: &str| format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
    // Two requests for `m` in flight at once: both start as `other`; rejected names never label.
    agg.kernel_event(io(1, 1, Direction::Received, request("m").as_bytes()));
    agg.kernel_event(io(2, 1, Direction::Received, request("m").as_bytes()));
    agg.kernel_event(io(3, 1, Direction::Received, request("junk").as_bytes()));
    let text = store.metrics.encode().unwrap();
    let in_flight = |text: &str, model: &str| {
        value(
            text,
            &format!("inferwatch_http_requests_in_flight{{model=\"{model}\",route=\"/v1/completions\"}}"),
        )
    };
    assert_eq!(in_flight(&text, "other"), Some(3.0));
    agg.kernel_event(io(3, 2, Direction::Sent, answer("404 Not Found").as_bytes()));
    agg.kernel_event(io(1, 2, Direction::Sent, answer("200 OK").as_bytes()));
    agg.kernel_event(io(2, 3, Direction::Sent, answer("200 OK").as_bytes()));
    let text = store.metrics.encode().unwrap();
    let total = |model: &str, status: &str| {
        value(
            &text,
            &format!(
                "inferwatch_http_requests_total{{model=\"{model}\",route=\"/v1/completions\",status=\"{status}\",outcome=\"complete\"}}"
            ),
        )
    };
    // Accepted: counted under its name, both; in flight taken back where it was put.
    assert_eq!(total("m", "200"), Some(2.0));
    assert_eq!(total("other", "404"), Some(1.0));
    assert!(!text.contains("junk"), "{text}");
    assert_eq!(in_flight(&text, "other"), Some(0.0));
    assert_eq!(in_flight(&text, "m").unwrap_or(0.0), 0.0);
}

#[test]
fn junk_models_named_by_clients_take_no_label_and_in_flight_returns_to_zero() {
    let store = Arc::new(Store::new());
    let mut agg = Aggregator::new(store.clone(), 16, 2000);
    agg.apply(Input::Discovery(DiscoveryReport::Instances(vec![instance(10, &["tiny"])])));
    for (conn, model) in (1..=40u64).map(|i| (i, format!("junk{i}"))) {
        let body = format!(r#"{{"model":"{model}","prompt":"x"}}"#);
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        agg.kernel_event(io(conn, 1, Direction::Received, head.as_bytes()));
        agg.kernel_event(io(
            conn,
            2,
            Direction::Sent,
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        ));
    }
    let text = store.metrics.encode().unwrap();
    assert!(!text.contains("junk"), "{text}");
    let other = "inferwatch_http_requests_total{model=\"other\",route=\"/v1/completions\",status=\"404\",outcome=\"complete\"}";
    assert_eq!(value(&text, other), Some(40.0));
    assert_eq!(
        value(&text, "inferwatch_http_requests_in_flight{model=\"other\",route=\"/v1/completions\"}"),
        Some(0.0)
    );
}
