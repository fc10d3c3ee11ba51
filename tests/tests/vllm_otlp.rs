//! The agent's spans and vLLM's own in one trace: real vLLM started with its OpenTelemetry
//! tracing (`--otlp-traces-endpoint`, OTLP/HTTP protobuf) and the agent exporting to the same
//! real receiver; clients send `traceparent`. Needs root, the vLLM venv and the tiny model.

use std::{collections::HashMap, ffi::OsStr, net::SocketAddr, time::Duration};

use inferwatch_tests::{
    Agent,
    client::Client,
    otlp::{Receiver, attribute},
    require_root,
    vllm::Vllm,
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const READY: Duration = Duration::from_secs(240);
const SECRET: &str = "never-in-a-span";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_agents_spans_and_vllms_share_the_clients_trace() {
    require_root();
    let receiver = Receiver::start(0);
    let endpoint = format!("{}/v1/traces", receiver.endpoint());
    let env = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", OsStr::new(&endpoint))];
    let agent = Agent::start_with_env(&[], &[], &env);
    let vllm_env = [
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ("OTEL_SERVICE_NAME", "vllm"),
        ("OTEL_BSP_SCHEDULE_DELAY", "500"),
    ];
    let mut vllm = Vllm::start_with_env("otlp", &["--otlp-traces-endpoint", &endpoint], &vllm_env);
    vllm.wait_ready(READY);
    let addr: SocketAddr = format!("127.0.0.1:{}", vllm.port).parse().unwrap();
    agent.wait_listening(vllm.port);

    let mut parents = HashMap::new();
    let mut client = Client::connect(addr);
    for i in 0..6u32 {
        let trace = format!("{:032x}", 0x7ace_0000_u128 + i as u128);
        let span = format!("{:016x}", 0x900d + i as u64);
        let body = format!(
            r#"{{"model":"tiny","prompt":"{SECRET} {i}","max_tokens":8,"stream":true,"stream_options":{{"include_usage":true}}}}"#
        );
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ntraceparent: 00-{trace}-{span}-01\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        client.send_raw(req.as_bytes());
        assert_eq!(client.read_response(None).status, 200);
        parents.insert(trace, span);
    }
    let ours = |s: &[inferwatch_tests::otlp::Received]| {
        s.iter()
            .filter(|r| r.service == "inferwatch" && r.span.kind == SpanKind::Server as i32)
            .filter(|r| parents.contains_key(&hex(&r.span.trace_id)))
            .count()
    };
    let theirs = |s: &[inferwatch_tests::otlp::Received]| {
        s.iter().filter(|r| r.service != "inferwatch" && parents.contains_key(&hex(&r.span.trace_id))).count()
    };
    let spans = receiver.wait_for(Duration::from_secs(40), |s| ours(s) >= 6 && theirs(s) >= 6);
    assert_eq!(ours(&spans), 6, "the agent's spans:\n{}", agent.log());
    assert!(
        theirs(&spans) >= 6,
        "vLLM's own spans in the clients' traces ({}):\n{}",
        theirs(&spans),
        vllm.log_tail()
    );
    for (trace, parent) in &parents {
        let in_trace: Vec<_> = spans.iter().filter(|r| &hex(&r.span.trace_id) == trace).collect();
        let server = in_trace
            .iter()
            .find(|r| r.service == "inferwatch" && r.span.kind == SpanKind::Server as i32)
            .map(|r| &r.span)
            .unwrap();
        assert_eq!(&hex(&server.parent_span_id), parent, "parented to the client's span");
        let vllm_span = in_trace.iter().find(|r| r.service != "inferwatch").unwrap();
        println!(
            "e2e otlp: trace {trace}: agent span {:?}, vLLM span {:?} ({})",
            server.name, vllm_span.span.name, vllm_span.service
        );
        assert_eq!(attribute(server, "gen_ai.request.model").as_deref(), Some("tiny"));
        // Token counts from the stream's usage chunk (the request asked for it).
        let output: u32 =
            attribute(server, "gen_ai.usage.output_tokens").expect("output tokens").parse().unwrap();
        let input: u32 =
            attribute(server, "gen_ai.usage.input_tokens").expect("input tokens").parse().unwrap();
        assert!((1..=8).contains(&output) && input > 0, "{input} in, {output} out");
        let id = attribute(server, "gen_ai.response.id").expect("vLLM's request id");
        assert!(id.starts_with("cmpl-"), "{id}");
        // The phases cover the request end to end: arrival to end within 1 ms.
        let children: Vec<_> =
            in_trace.iter().map(|r| &r.span).filter(|c| c.parent_span_id == server.span_id).collect();
        let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["queued", "frontend_in", "engine_first", "frontend_out", "decode"], "{trace}");
        let sum: u64 = children.iter().map(|c| c.end_time_unix_nano - c.start_time_unix_nano).sum();
        let whole = server.end_time_unix_nano - server.start_time_unix_nano;
        assert!(sum.abs_diff(whole) < 1_000_000, "{trace}: phases {sum} ns, request {whole} ns");
    }
    let agents_raw_has_secret =
        spans.iter().filter(|r| r.service == "inferwatch").any(|r| format!("{:?}", r.span).contains(SECRET));
    assert!(!agents_raw_has_secret, "no prompt text in the agent's spans");
    assert!(agent.stop().success());
}
