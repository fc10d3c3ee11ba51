//! Request timing on the real kernel against real servers: the agent's view of each request
//! compared with what the client itself measured. Needs root and `cargo xtask setup`'s Python.

use std::{collections::HashMap, net::TcpStream, thread, time::Duration};

use inferwatch_tests::{
    Agent,
    client::{Client, Completion, Truth, client_thread_realtime, percentile, timing_bar},
    require_root,
    servers::Server,
    sum_matching,
};
use serde_json::Value;

const SSESERVER: &str = env!("CARGO_BIN_EXE_sseserver");
const AXUMSERVER: &str = env!("CARGO_BIN_EXE_axumserver");

fn servers() -> Vec<Server> {
    vec![Server::uvicorn(), Server::rust(SSESERVER)]
}

/// The agent's records, keyed by request size (each test request has a unique size).
fn records(agent: &Agent) -> HashMap<u64, Value> {
    let (status, body) = agent.try_get("/api/v1/requests?limit=2048").expect("GET /api/v1/requests");
    assert_eq!(status, 200);
    let list: Vec<Value> = serde_json::from_str(&body).expect("JSON array");
    list.into_iter().map(|r| (r["request_bytes"].as_u64().unwrap(), r)).collect()
}

fn wait_for_records(agent: &Agent, expected: usize) -> HashMap<u64, Value> {
    for _ in 0..100 {
        let r = records(agent);
        if r.len() >= expected {
            return r;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let r = records(agent);
    panic!("the agent reported {} of {expected} requests:\n{}", r.len(), agent.log());
}

/// Runs `per_connection` requests on each of `connections` keep-alive connections at once;
/// `realtime`: by real-time client threads, whose clocks are the truth the agent's timing is
/// checked against (see [`client_thread_realtime`]), for a few connections only.
fn load(
    server: &Server,
    connections: usize,
    per_connection: usize,
    realtime: bool,
    make: impl Fn(usize) -> Completion + Sync,
) -> Vec<Truth> {
    assert!(!realtime || connections <= 8, "real-time clients are for timing a few connections");
    thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                let make = &make;
                s.spawn(move || {
                    if realtime {
                        client_thread_realtime();
                    }
                    let mut client = Client::connect(server.addr);
                    (0..per_connection)
                        .map(|i| client.request(&make(c * per_connection + i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

fn stream(i: usize) -> Completion {
    Completion { model: "fidelity-model".into(), pad: 100 + i, max_tokens: 12, delay_ms: 3.0, stream: true }
}

/// The agent's clock runs from the request's arrival in the server's socket (the kernel's
/// `sk_data_ready`), the client's from its send to its reads, all on CLOCK_MONOTONIC:
/// - the start: the arrival (`received_monotonic_ns`) can never precede the client's send, and
///   on loopback follows it within microseconds;
/// - the ends: the agent's first-token and end times (arrival + its TTFT / duration) against
///   the client's receipt of the first content event and of the end: what the agent gets wrong
///   there (a role chunk taken for a token, a response ended early or late) shows here.
#[test]
fn streamed_requests_are_timed_as_the_client_sees_them() {
    require_root();
    for server in servers() {
        let agent = Agent::start(&[server.pid()]);
        // 200 requests: enough that the p99 is not simply the slowest one.
        let truths = load(&server, 4, 50, true, stream);
        let records = wait_for_records(&agent, truths.len());
        let (mut ttft, mut duration, mut after_send) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ttft_end, mut duration_end) = (Vec::new(), Vec::new());
        for t in &truths {
            let r = records
                .get(&t.request_bytes)
                .unwrap_or_else(|| panic!("no record of a {}-byte request", t.request_bytes));
            assert_eq!(r["status"], 200);
            assert_eq!(r["outcome"], "complete");
            assert_eq!(r["stream"], true);
            assert_eq!(r["model"], "fidelity-model");
            assert_eq!(r["route"], "/v1/completions");
            assert_eq!(r["content_events"].as_u64(), Some(t.content_events as u64));
            assert_eq!(
                r["events"].as_u64(),
                Some(t.content_events as u64 + 2),
                "empty first event and [DONE]"
            );
            let agent_ttft = r["time_to_first_token_seconds"].as_f64().expect("a first token");
            let agent_duration = r["duration_seconds"].as_f64().unwrap();
            assert!(r["response_headers_seconds"].as_f64().unwrap() <= agent_ttft);
            ttft.push((agent_ttft - t.ttft_seconds().unwrap()).abs() * 1e3);
            duration.push((agent_duration - t.duration_seconds()).abs() * 1e3);
            let ms = |ns: f64| ns / 1e6;
            let read = r["received_monotonic_ns"].as_u64().unwrap() as f64;
            after_send.push(ms(read - t.sent_ns as f64));
            let first = t.first_content_ns.unwrap() as f64;
            ttft_end.push(ms(first - (read + agent_ttft * 1e9)).abs());
            duration_end.push(ms(t.end_ns as f64 - (read + agent_duration * 1e9)).abs());
        }
        let summary = |v: &[f64]| (percentile(v, 50.0), percentile(v, 99.0));
        let ((t50, t99), (d50, d99)) = (summary(&ttft), summary(&duration));
        let ((q50, q99), (te50, te99), (de50, de99)) =
            (summary(&after_send), summary(&ttft_end), summary(&duration_end));
        let earliest_read = after_send.iter().copied().fold(f64::MAX, f64::min);
        println!(
            "fidelity {}: {} requests, |agent - client| TTFT median {t50:.3} ms p99 {t99:.3} ms; duration median {d50:.3} ms p99 {d99:.3} ms; arrival after the send median {q50:.3} ms p99 {q99:.3} ms; at the ends, first token median {te50:.3} ms p99 {te99:.3} ms, end median {de50:.3} ms p99 {de99:.3} ms",
            server.name,
            truths.len()
        );
        // Clock sanity: the agent's start lies after the client's send (a few µs of slack for
        // where each side reads the clock around its system call).
        assert!(
            earliest_read >= -0.05,
            "{}: the server read {earliest_read} ms before the send",
            server.name
        );
        assert!(t50 <= 1.0 && d50 <= 1.0, "{}: |delta| median TTFT {t50} ms, duration {d50} ms", server.name);
        assert!(
            te50 <= 1.0 && te99 <= 5.0,
            "{}: first token |delta| median {te50} ms, p99 {te99} ms",
            server.name
        );
        assert!(de50 <= 1.0 && de99 <= 5.0, "{}: end |delta| median {de50} ms, p99 {de99} ms", server.name);
        assert!(agent.stop().success());
    }
}

/// Servers that cut their writes into several iovecs (Node.js ends a stream with one `writev`
/// of 5; here up to 1024, `UIO_MAXIOV`, a few bytes each) and ends that lie beyond the capture (a
/// large last event in the same call as the terminator): every stream is still seen to its end,
/// its events counted, at the right time.
#[test]
fn several_iovecs_and_an_end_beyond_the_capture() {
    require_root();
    for (iovecs, last_pad) in [(5, 0), (8, 0), (16, 0), (64, 0), (1024, 0), (16, 6000), (1, 6000), (1, 20000)]
    {
        let server = Server::rust_vectored(SSESERVER, iovecs, last_pad);
        let agent = Agent::start(&[server.pid()]);
        let truths = load(&server, 2, 10, true, stream);
        let records = wait_for_records(&agent, truths.len());
        let mut end = Vec::new();
        for t in &truths {
            let r = &records[&t.request_bytes];
            let what = format!("{iovecs} iovecs, {last_pad} bytes before the end: {r}");
            assert_eq!(r["outcome"], "complete", "{what}");
            assert_eq!(r["content_events"].as_u64(), Some(t.content_events as u64), "{what}");
            let read = r["received_monotonic_ns"].as_u64().unwrap() as f64;
            let agent_end = read + r["duration_seconds"].as_f64().unwrap() * 1e9;
            end.push((t.end_ns as f64 - agent_end).abs() / 1e6);
        }
        let (e50, e99) = (percentile(&end, 50.0), percentile(&end, 99.0));
        println!(
            "fidelity writev {iovecs} iovecs, last pad {last_pad}: end |delta| median {e50:.3} ms p99 {e99:.3} ms"
        );
        if let Err(e) = timing_bar(&format!("{iovecs} iovecs, last pad {last_pad}: end |delta|"), &end) {
            panic!("{e}");
        }
        let text = agent.metrics();
        assert_eq!(sum_matching(&text, "inferwatch_http_requests_total{", "outcome=\"aborted\""), 0.0);
        assert!(agent.stop().success());
    }
}

#[test]
fn every_request_is_counted_at_concurrency_64() {
    require_root();
    for server in servers() {
        let agent = Agent::start(&[server.pid()]);
        let truths = load(&server, 64, 3, false, |i| Completion {
            model: "count-model".into(),
            pad: 1000 + 2 * i, // "false" is a byte longer than "true": keep sizes unique
            max_tokens: 4,
            delay_ms: 1.0,
            stream: i % 2 == 0,
        });
        assert_eq!(truths.len(), 192);
        assert!(truths.iter().all(|t| t.status == 200));
        let records = wait_for_records(&agent, truths.len());
        for t in &truths {
            let r = &records[&t.request_bytes];
            assert_eq!((r["outcome"].as_str(), r["status"].as_u64()), (Some("complete"), Some(200)));
        }
        let text = agent.metrics();
        let total = sum_matching(&text, "inferwatch_http_requests_total{", "model=\"count-model\"");
        assert_eq!(total, 192.0, "{}:\n{text}", server.name);
        let in_flight = sum_matching(&text, "inferwatch_http_requests_in_flight{", "model=\"count-model\"");
        assert_eq!(in_flight, 0.0);
        for reason in ["ring_buffer_full", "agent_queue_full", "malformed"] {
            assert_eq!(sum_matching(&text, "inferwatch_agent_events_lost_total{", reason), 0.0);
        }
        println!("{}: 192 of 192 requests at concurrency 64", server.name);
        assert!(agent.stop().success());
    }
}

#[test]
fn a_client_abort_mid_stream_is_aborted() {
    require_root();
    for server in servers() {
        let agent = Agent::start(&[server.pid()]);
        let c =
            Completion { model: "abort-model".into(), pad: 7, max_tokens: 200, delay_ms: 10.0, stream: true };
        let mut client = Client::connect(server.addr);
        client.send_raw(&c.bytes());
        let seen = client.read_response(Some(3));
        assert_eq!(seen.content_events, 3);
        client.abort();
        let records = wait_for_records(&agent, 1);
        let r = &records[&(c.bytes().len() as u64)];
        assert_eq!(r["outcome"], "aborted", "{}: {r}", server.name);
        assert_eq!(r["status"], 200);
        let content = r["content_events"].as_u64().unwrap();
        assert!((3..200).contains(&content), "{}: {content} content events before the abort", server.name);
        let text = agent.metrics();
        assert_eq!(sum_matching(&text, "inferwatch_http_requests_total{", "outcome=\"aborted\""), 1.0);
        assert_eq!(sum_matching(&text, "inferwatch_http_requests_total{", "outcome=\"complete\""), 0.0);
        assert!(agent.stop().success());
    }
}

#[test]
fn pipelined_requests_large_bodies_and_garbage() {
    require_root();
    for server in servers() {
        let agent = Agent::start(&[server.pid()]);
        // Garbage on the port first: counted as not HTTP, nothing reported, nothing breaks.
        let mut junk = TcpStream::connect(server.addr).unwrap();
        std::io::Write::write_all(&mut junk, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n")
            .unwrap();
        thread::sleep(Duration::from_millis(200));
        drop(junk);

        // Two requests in one write.
        let a =
            Completion { model: "pipe-model".into(), pad: 11, max_tokens: 3, delay_ms: 1.0, stream: true };
        let b =
            Completion { model: "pipe-model".into(), pad: 12, max_tokens: 3, delay_ms: 1.0, stream: false };
        let mut client = Client::connect(server.addr);
        client.send_raw(&[a.bytes(), b.bytes()].concat());
        let (ra, rb) = (client.read_response(None), client.read_response(None));
        assert_eq!((ra.status, rb.status, ra.content_events), (200, 200, 3));

        // A 1 MiB request body, far beyond the capture, on the same connection.
        let big = Completion {
            model: "pipe-model".into(),
            pad: 1 << 20,
            max_tokens: 2,
            delay_ms: 1.0,
            stream: true,
        };
        let rbig = client.request(&big);
        assert_eq!(rbig.status, 200);

        let records = wait_for_records(&agent, 3);
        let ra = &records[&(a.bytes().len() as u64)];
        let rb = &records[&(b.bytes().len() as u64)];
        let rbig = &records[&(big.bytes().len() as u64)];
        for r in [ra, rb, rbig] {
            assert_eq!(
                (r["outcome"].as_str(), r["status"].as_u64()),
                (Some("complete"), Some(200)),
                "{}: {r}",
                server.name
            );
            assert_eq!(r["model"], "pipe-model");
        }
        assert_eq!((ra["stream"].as_bool(), rb["stream"].as_bool()), (Some(true), Some(false)));
        assert_eq!(rbig["content_events"], 2);
        let text = agent.metrics();
        assert_eq!(
            sum_matching(&text, "inferwatch_connections_not_http_total{", "reason=\"not_http\""),
            1.0,
            "{}",
            server.name
        );
        assert_eq!(
            sum_matching(&text, "inferwatch_http_requests_total{", ""),
            3.0,
            "{}:\n{text}",
            server.name
        );
        assert!(agent.stop().success());
    }
}

/// Runs `per_thread` requests from each of `threads` threads, each after a pause of 0–28 ms
/// (clients that arrive at any moment, not just when the server has answered): on one
/// keep-alive connection per thread, or on a fresh connection per request (`fresh`: the server
/// accepts every one).
fn load_paced(
    server: &Server,
    threads: usize,
    per_thread: usize,
    fresh: bool,
    make: impl Fn(usize) -> Completion + Sync,
) -> Vec<Truth> {
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|c| {
                let make = &make;
                s.spawn(move || {
                    client_thread_realtime();
                    let mut kept = (!fresh).then(|| Client::connect(server.addr));
                    (0..per_thread)
                        .map(|i| {
                            let n = c * per_thread + i;
                            thread::sleep(Duration::from_millis((n as u64 * 37) % 29));
                            match kept.as_mut() {
                                Some(client) => client.request(&make(n)),
                                None => Client::connect(server.addr).request(&make(n)),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

/// An event loop that blocks for 20–50 ms at random: requests wait in their sockets (and new
/// connections in the accept queue) before the server reads them. The agent times them from
/// their arrival, as the client does, and reports the wait as the `queued` phase.
#[test]
fn a_stalling_event_loop_is_timed_from_each_requests_arrival() {
    require_root();
    let server = Server::uvicorn_stalling();
    let agent = Agent::start(&[server.pid()]);
    // Fresh connections (the accept queue) and keep-alive ones (the socket), interleaved.
    let make = |i: usize| Completion {
        model: "stall-model".into(),
        pad: 100 + i,
        max_tokens: 6,
        delay_ms: 2.0,
        stream: true,
    };
    let (fresh, kept) = thread::scope(|s| {
        let fresh = s.spawn(|| load_paced(&server, 2, 40, true, make));
        let kept = s.spawn(|| load_paced(&server, 2, 40, false, |i| make(1000 + i)));
        (fresh.join().unwrap(), kept.join().unwrap())
    });
    let records = wait_for_records(&agent, fresh.len() + kept.len());
    for (kind, truths) in [("fresh connections", &fresh), ("keep-alive", &kept)] {
        let (mut ttft, mut duration, mut unexplained) = (Vec::new(), Vec::new(), Vec::new());
        let (mut waited, mut queued_seen) = (0, 0);
        for t in truths {
            let r = &records[&t.request_bytes];
            assert_eq!((r["outcome"].as_str(), r["status"].as_u64()), (Some("complete"), Some(200)), "{r}");
            let agent_ttft = r["time_to_first_token_seconds"].as_f64().expect("a first token");
            let queued = r["queued_seconds"].as_f64().expect("the kernel told the arrival");
            // The true arrival lies between the client's clock before and after its `write`:
            // the agent is off by its distance from that interval.
            let first = t.first_content_ns.unwrap();
            ttft.push(t.off_ms(agent_ttft, first));
            duration.push(t.off_ms(r["duration_seconds"].as_f64().unwrap(), t.end_ns));
            // What timing from the first read would have missed (at least: counted from the
            // `write`'s return), and how much of it `queued` covers.
            let missed = ((first - t.written_ns) as f64 / 1e9 - (agent_ttft - queued)) * 1e3;
            if missed > 5.0 {
                waited += 1;
                queued_seen += usize::from(queued * 1e3 >= missed - 3.0);
            }
            unexplained.push((missed - queued * 1e3).abs());
            let arrival = r["received_monotonic_ns"].as_u64().unwrap();
            assert!(arrival + 50_000 >= t.sent_ns, "{kind}: arrival before the send: {r}");
            assert!(r["first_read_monotonic_ns"].as_u64().unwrap() >= arrival);
        }
        let summary = |v: &[f64]| (percentile(v, 50.0), percentile(v, 99.0));
        let ((t50, t99), (d50, d99), (u50, u99)) =
            (summary(&ttft), summary(&duration), summary(&unexplained));
        println!(
            "fidelity stalling loop, {kind}: {} requests, {waited} waited > 5 ms before the first read; |agent - client| TTFT median {t50:.3} ms p99 {t99:.3} ms, duration median {d50:.3} ms p99 {d99:.3} ms; wait not covered by queued median {u50:.3} ms p99 {u99:.3} ms",
            truths.len()
        );
        assert!(waited >= 5, "{kind}: the stalls made only {waited} requests wait: the test proves nothing");
        assert_eq!(queued_seen, waited, "{kind}: every wait the client saw is in queued");
        for (what, offsets) in [("TTFT", &ttft), ("duration", &duration)] {
            if let Err(e) = timing_bar(&format!("{kind}: {what} off"), offsets) {
                panic!("{e}");
            }
        }
    }
    let text = agent.metrics();
    let queued = sum_matching(&text, "inferwatch_request_phase_seconds_count{", r#"phase="queued""#);
    assert_eq!(queued, (fresh.len() + kept.len()) as f64, "every request's queued phase observed");
    let connections = records.values().filter(|r| r["connection_established_monotonic_ns"].is_u64()).count();
    assert!(connections >= fresh.len(), "fresh connections' establishment reported: {connections}");
    assert!(agent.stop().success());
}

/// Servers nobody here wrote the write pattern of: uvicorn (vLLM's stack), a Rust std server,
/// axum on hyper (several buffers per `writev`), Node.js's `http` (a chunk per `write`, the end one `writev` of 5 iovecs) and Go's `net/http` (a
/// `write` per flush, the terminator with the last event). Each on keep-alive and on fresh
/// connections, clients arriving at any moment, and a few streams abandoned on purpose: exact
/// counts of `complete` and `aborted`, and the agent's TTFT and duration against the client's.
#[test]
fn a_matrix_of_servers_as_they_really_write() {
    require_root();
    let make = |i: usize| Completion {
        model: "matrix-model".into(),
        pad: 100 + i,
        max_tokens: 8,
        delay_ms: 2.0,
        stream: true,
    };
    for server in
        [Server::uvicorn(), Server::rust(SSESERVER), Server::axum(AXUMSERVER), Server::node(), Server::go()]
    {
        let agent = Agent::start(&[server.pid()]);
        let kept = load_paced(&server, 2, 20, false, make);
        let fresh = load_paced(&server, 2, 20, true, |i| make(500 + i));
        // Abandoned after 2 content events: the server's next writes meet a closed socket.
        for i in 0..3 {
            let mut client = Client::connect(server.addr);
            client.send_raw(&make(900 + i).bytes());
            assert_eq!(client.read_response(Some(2)).content_events, 2);
            client.abort();
        }
        let finished = kept.len() + fresh.len();
        let records = wait_for_records(&agent, finished + 3);
        let (mut ttft, mut duration) = (Vec::new(), Vec::new());
        // The longest a client's `write` took (ms): a wide interval says the client was held up.
        let mut worst = (0.0f64, 0u64);
        for t in kept.iter().chain(&fresh) {
            let r = &records[&t.request_bytes];
            let what = format!("{}: {r}", server.name);
            assert_eq!(
                (r["outcome"].as_str(), r["status"].as_u64()),
                (Some("complete"), Some(200)),
                "{what}"
            );
            assert_eq!(r["content_events"].as_u64(), Some(t.content_events as u64), "{what}");
            // Against the interval the client's clocks allow (see `Truth::off_ms`).
            let agent_ttft = r["time_to_first_token_seconds"].as_f64().unwrap();
            ttft.push(t.off_ms(agent_ttft, t.first_content_ns.unwrap()));
            duration.push(t.off_ms(r["duration_seconds"].as_f64().unwrap(), t.end_ns));
            let write_ms = (t.written_ns - t.sent_ns) as f64 / 1e6;
            if write_ms > worst.0 {
                worst = (write_ms, t.request_bytes);
            }
        }
        let text = agent.metrics();
        let count = |outcome: &str| {
            sum_matching(
                &text,
                "inferwatch_http_requests_total{",
                &format!(r#"model="matrix-model",route="/v1/completions",status="200",outcome="{outcome}""#),
            )
        };
        let (complete, aborted) = (count("complete"), count("aborted"));
        let summary = |v: &[f64]| (percentile(v, 50.0), percentile(v, 99.0));
        let ((t50, t99), (d50, d99)) = (summary(&ttft), summary(&duration));
        println!(
            "fidelity matrix {}: {complete} complete, {aborted} aborted; agent off the client's interval: TTFT median {t50:.3} ms p99 {t99:.3} ms, duration median {d50:.3} ms p99 {d99:.3} ms",
            server.name
        );
        assert_eq!((complete, aborted), (finished as f64, 3.0), "{}:\n{text}", server.name);
        let slowest_write = format!("slowest client write {:.3} ms ({}-byte request)", worst.0, worst.1);
        for (what, offsets) in [("TTFT", &ttft), ("duration", &duration)] {
            if let Err(e) = timing_bar(&format!("{}: {what} off", server.name), offsets) {
                panic!("{e}; {slowest_write}");
            }
        }
        assert!(agent.stop().success());
    }
}
