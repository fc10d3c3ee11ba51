//! Request spans over OTLP/HTTP to a real receiver that decodes them with the official proto
//! definitions: parented to the client's span when the request carries `traceparent`, phases
//! as children, no payload, and a collector that is slow, refusing or dead costs counted drops
//! only. Needs root and `cargo xtask setup`'s Python (uvicorn).

use std::{collections::HashMap, ffi::OsStr, thread, time::Duration};

use inferwatch_tests::{
    Agent,
    client::{Client, Completion},
    otlp::{Receiver, attribute},
    require_root, series_value,
    servers::Server,
    sum_matching,
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A prompt that must never leave the agent.
const SECRET: &str = "do-not-export-this-prompt";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A streamed completion whose prompt carries [`SECRET`], with `traceparent` when given.
fn request(i: usize, traceparent: Option<&str>) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"otlp-model","prompt":"{SECRET} {}","max_tokens":4,"delay_ms":2,"stream":true}}"#,
        "p".repeat(i)
    );
    let trace =
        traceparent.map_or(String::new(), |t| format!("traceparent: {t}\r\ntracestate: vendor=x1\r\n"));
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n{trace}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn each_request_is_a_span_in_its_clients_trace() {
    require_root();
    let receiver = Receiver::start(1); // the first export is refused (503): retried
    let server = Server::uvicorn();
    let endpoint = receiver.endpoint();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", OsStr::new(&endpoint)),
        ("OTEL_SERVICE_NAME", OsStr::new("inferwatch-test")),
    ];
    let agent = Agent::start_with_env(&[server.pid()], &[], &env);
    // 10 traced requests (their client's span ids differ), 5 without trace context, on fresh
    // and kept-alive connections.
    let mut traced = HashMap::new();
    let mut client = Client::connect(server.addr);
    for i in 0..15 {
        let parent = (i < 10)
            .then(|| (format!("{:032x}", 0xabc0_0000_u128 + i as u128), format!("{:016x}", 0x5150 + i)));
        // The client did not sample request 9's trace: the parent-based sampler leaves it out.
        let flags = if i == 9 { "00" } else { "01" };
        let tp = parent.as_ref().map(|(t, s)| format!("00-{t}-{s}-{flags}"));
        let bytes = request(i, tp.as_deref());
        if i % 2 == 0 {
            client.send_raw(&bytes);
            assert_eq!(client.read_response(None).status, 200);
        } else {
            let mut fresh = Client::connect(server.addr);
            fresh.send_raw(&bytes);
            assert_eq!(fresh.read_response(None).status, 200);
        }
        if let Some(p) = parent.filter(|_| i != 9) {
            traced.insert(p.0, (p.1, bytes.len()));
        }
    }
    let servers = |spans: &[inferwatch_tests::otlp::Received]| {
        spans.iter().filter(|s| s.span.kind == SpanKind::Server as i32).count()
    };
    let spans = receiver.wait_for(Duration::from_secs(20), |s| servers(s) >= 14);
    assert_eq!(servers(&spans), 14, "one server span per sampled request:\n{}", agent.log());
    assert!(spans.iter().all(|s| s.service == "inferwatch-test"));
    let by_id: HashMap<Vec<u8>, &_> = spans.iter().map(|s| (s.span.span_id.clone(), &s.span)).collect();
    let mut roots = 0;
    for s in spans.iter().map(|s| &s.span).filter(|s| s.kind == SpanKind::Server as i32) {
        assert_eq!(attribute(s, "http.route").as_deref(), Some("/v1/completions"));
        assert_eq!(attribute(s, "http.response.status_code").as_deref(), Some("200"));
        assert_eq!(attribute(s, "gen_ai.system").as_deref(), Some("vllm"));
        assert!(attribute(s, "gen_ai.server.time_to_first_token").is_some());
        assert!(s.end_time_unix_nano > s.start_time_unix_nano);
        match traced.get(&hex(&s.trace_id)) {
            Some((parent, _)) => {
                assert_eq!(hex(&s.parent_span_id), *parent, "parented to the client's span");
                assert_eq!(s.trace_state, "vendor=x1");
            }
            None => {
                assert!(s.parent_span_id.is_empty(), "a request without traceparent starts a trace");
                roots += 1;
            }
        }
        // Its phases: children inside it; here (not vLLM) the wait before the read.
        let children: Vec<_> =
            spans.iter().map(|c| &c.span).filter(|c| c.parent_span_id == s.span_id).collect();
        let queued = children.iter().find(|c| c.name == "queued").expect("a queued phase");
        assert_eq!(queued.start_time_unix_nano, s.start_time_unix_nano, "from the arrival");
        for c in &children {
            assert_eq!(c.trace_id, s.trace_id);
            assert!(
                c.start_time_unix_nano >= s.start_time_unix_nano
                    && c.end_time_unix_nano <= s.end_time_unix_nano
            );
            assert!(by_id.contains_key(&c.span_id));
        }
    }
    assert_eq!(roots, 5);
    // /api/v1/requests (and so `top`) names each request's trace: the exported one.
    let records = agent.json("/api/v1/requests?limit=100");
    let recorded: std::collections::BTreeSet<String> = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["route"] == "/v1/completions")
        .map(|r| r["trace_id"].as_str().expect("a trace id").to_string())
        .collect();
    let exported: std::collections::BTreeSet<String> = spans
        .iter()
        .filter(|s| s.span.kind == SpanKind::Server as i32)
        .map(|s| hex(&s.span.trace_id))
        .collect();
    assert_eq!(recorded.len(), 15, "every request names its trace");
    assert!(exported.is_subset(&recorded) && !exported.contains(&format!("{:032x}", 0xabc0_0009_u128)));
    // Exemplars: the latency buckets name a recent exported trace (OpenMetrics).
    let text = agent.metrics();
    let exemplars: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("inferwatch_http_time_to_first_token_seconds_bucket{")
                && l.contains(" # {trace_id=\"")
        })
        .collect();
    assert!(!exemplars.is_empty(), "TTFT buckets carry exemplars:\n{text}");
    for line in exemplars {
        let id = line.split("trace_id=\"").nth(1).unwrap().split('"').next().unwrap();
        assert!(exported.contains(id), "an exemplar names an exported trace: {line}");
    }
    let raw = String::from_utf8_lossy(&receiver.raw()).into_owned();
    assert!(!raw.contains(SECRET), "no prompt text in any span");
    assert!(!raw.contains("localhost"), "no header values but the trace context");
    let text = agent.metrics();
    assert_eq!(series_value(&text, "inferwatch_otlp_requests_exported_total"), Some(14.0), "{text}");
    assert_eq!(series_value(&text, "inferwatch_otlp_requests_not_sampled_total"), Some(1.0));
    assert_eq!(
        sum_matching(&text, "inferwatch_otlp_requests_dropped_total{", ""),
        0.0,
        "the 503 was retried"
    );
    assert!(agent.stop().success());
}

/// `n` short streamed completions of `model` on one fresh kept-alive connection, each answered
/// 200.
fn streams(server: &Server, model: &str, n: usize) {
    let mut client = Client::connect(server.addr);
    for i in 0..n {
        let stream =
            Completion { model: model.into(), pad: 100 + i, max_tokens: 2, delay_ms: 1.0, stream: true };
        assert_eq!(client.request(&stream).status, 200);
    }
}

/// A child process killed when dropped, also when the test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_dead_collector_costs_counted_drops_only() {
    require_root();
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = Server::uvicorn();
    let endpoint = format!("http://{dead}/v1/traces");
    let env = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", OsStr::new(&endpoint))];
    let agent = Agent::start_with_env(&[server.pid()], &[], &env);
    streams(&server, "dead-model", 20);
    // Retries take 0.5 + 1 + 2 s per batch; then the batch is dropped, counted.
    let text = agent.wait_for_metrics(Duration::from_secs(20), |t| {
        sum_matching(t, "inferwatch_otlp_requests_dropped_total{", "export_failed") >= 20.0
    });
    assert_eq!(
        sum_matching(&text, "inferwatch_otlp_requests_dropped_total{", "export_failed"),
        20.0,
        "{text}"
    );
    assert_eq!(sum_matching(&text, "inferwatch_http_requests_total{", r#"model="dead-model""#), 20.0);
    assert_eq!(series_value(&text, "inferwatch_otlp_requests_exported_total"), Some(0.0));
    let (status, _) = agent.try_get("/healthz").unwrap();
    assert_eq!(status, 200);
    thread::sleep(Duration::from_millis(100));
    assert!(agent.stop().success());
}

#[test]
fn a_bad_otlp_setting_is_a_startup_error() {
    require_root();
    let out = std::process::Command::new(inferwatch_tests::agent_binary())
        .args(["--listen", "127.0.0.1:0", "--no-discovery"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_TRACES_SAMPLER", "sometimes")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OTLP: sampler \"sometimes\""), "{stderr}");
}

/// A CA and a certificate for 127.0.0.1 it signed (webpki refuses a self-signed CA as a server's
/// own certificate), in a fresh folder.
fn ca_and_leaf(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("inferwatch-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
        [&["req"][..], &ec, &["-subj", "/CN=collector", "-keyout", "leaf.key", "-out", "leaf.csr"]].concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            "leaf.pem",
        ],
    ];
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    for args in steps {
        let out =
            std::process::Command::new("openssl").args(&args).current_dir(&dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    dir
}

#[test]
fn spans_reach_a_collector_over_tls() {
    require_root();
    let receiver = Receiver::start(0);
    let dir = ca_and_leaf("otlp-tls");
    let port = inferwatch_tests::free_port();
    let mut front = KillOnDrop(
        std::process::Command::new(inferwatch_tests::servers::python())
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("servers/tls_forward.py"))
            .arg(port.to_string())
            .arg(dir.join("leaf.pem"))
            .arg(dir.join("leaf.key"))
            .arg(receiver.endpoint())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(front.0.stdout.take().unwrap()), &mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening");
    let server = Server::uvicorn();
    let endpoint = format!("https://127.0.0.1:{port}/v1/traces");
    let ca = dir.join("ca.pem");
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", OsStr::new(&endpoint)),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_os_str()),
    ];
    let agent = Agent::start_with_env(&[server.pid()], &[], &env);
    streams(&server, "tls-model", 3);
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter().filter(|r| r.span.kind == SpanKind::Server as i32).count() >= 3
    });
    assert_eq!(spans.iter().filter(|r| r.span.kind == SpanKind::Server as i32).count(), 3, "{}", agent.log());
    assert!(agent.stop().success());

    // The same collector with a CA that did not sign its certificate: refused, counted.
    let other = ca_and_leaf("otlp-tls-other");
    let wrong = other.join("ca.pem");
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", OsStr::new(&endpoint)),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", wrong.as_os_str()),
    ];
    let agent = Agent::start_with_env(&[server.pid()], &[], &env);
    // A fresh connection: the first one may have idled past the server's keep-alive meanwhile.
    streams(&server, "tls-model", 1);
    let text = agent.wait_for_metrics(Duration::from_secs(20), |t| {
        sum_matching(t, "inferwatch_otlp_requests_dropped_total{", "export_failed") >= 1.0
    });
    assert_eq!(sum_matching(&text, "inferwatch_otlp_requests_dropped_total{", "export_failed"), 1.0);
    assert!(agent.log().contains("TLS with 127.0.0.1"), "{}", agent.log());
    assert!(agent.stop().success());
    drop(front);
}
