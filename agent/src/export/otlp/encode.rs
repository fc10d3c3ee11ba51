//! Requests as OTLP spans: one SERVER span per request (in the client's trace when it sent a
//! `traceparent`), one INTERNAL child per phase, after the OpenTelemetry HTTP and GenAI
//! semantic conventions. Pure: ids come from the caller's generator.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};

use crate::model::trace::{Ids, RequestSpan};

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn text(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(v.into()))
}

fn int(key: &str, v: i64) -> KeyValue {
    kv(key, Value::IntValue(v))
}

/// The spans of one request, in its trace: the server span (parent: the client's span, if
/// any), then its phases.
pub fn request_spans(r: &RequestSpan, ids: &mut Ids) -> Vec<Span> {
    let trace_id = r.trace_id;
    let span_id = ids.span_id();
    let (parent, trace_state, flags) = match &r.trace {
        // Low byte: the W3C trace flags (sampled: only sampled spans are exported); 0x100: the
        // parent's remoteness is known, 0x200: it is remote.
        Some(t) => {
            (t.parent_span_id.to_vec(), t.tracestate.clone().unwrap_or_default(), 0x01 | 0x100 | 0x200)
        }
        None => (Vec::new(), String::new(), 0x01 | 0x100),
    };
    let mut attributes = vec![
        text("http.request.method", r.method),
        text("http.route", r.route),
        text("inferwatch.outcome", r.outcome),
        int("process.pid", r.pid as i64),
        int("http.request.body.size", r.request_bytes as i64),
        int("http.response.body.size", r.response_bytes as i64),
    ];
    if r.status != 0 {
        attributes.push(int("http.response.status_code", r.status as i64));
    }
    let generation = crate::model::request::GENERATION_ROUTES.contains(&r.route);
    if generation {
        attributes.push(text("gen_ai.system", "vllm"));
        attributes.push(text("gen_ai.provider.name", "vllm"));
        attributes.push(text("gen_ai.request.model", r.model.clone()));
        attributes.push(kv("gen_ai.request.stream", Value::BoolValue(r.stream)));
        attributes.push(int("inferwatch.content_events", r.content_events as i64));
    }
    if let Some(id) = &r.response_id {
        attributes.push(text("gen_ai.response.id", id.clone()));
    }
    if let Some((input, output)) = r.usage {
        attributes.push(int("gen_ai.usage.input_tokens", input as i64));
        attributes.push(int("gen_ai.usage.output_tokens", output as i64));
    }
    if let Some(t) = r.time_to_first_token_seconds {
        attributes.push(kv("gen_ai.server.time_to_first_token", Value::DoubleValue(t)));
    }
    // Errors as the HTTP conventions define them for servers: 5xx, or no response at all.
    let error = r.status >= 500 || r.outcome != "complete";
    let status = Status {
        code: if error { StatusCode::Error } else { StatusCode::Unset } as i32,
        message: if error { format!("{} {}", r.outcome, r.status) } else { String::new() },
    };
    let name = if generation && !r.model.is_empty() {
        format!("{} {}", r.route.trim_start_matches("/v1/").replace('/', "."), r.model)
    } else {
        format!("{} {}", r.method, r.route)
    };
    let mut spans = vec![Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        trace_state: trace_state.clone(),
        parent_span_id: parent,
        flags,
        name,
        kind: SpanKind::Server as i32,
        start_time_unix_nano: r.start_unix_ns,
        end_time_unix_nano: r.end_unix_ns.max(r.start_unix_ns),
        attributes,
        status: Some(status),
        ..Default::default()
    }];
    for &(phase, start, end) in &r.phases {
        spans.push(Span {
            trace_id: trace_id.to_vec(),
            span_id: ids.span_id().to_vec(),
            trace_state: trace_state.clone(),
            parent_span_id: span_id.to_vec(),
            flags: 0x01 | 0x100,
            name: phase.to_string(),
            kind: SpanKind::Internal as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end.max(start),
            attributes: vec![text("inferwatch.phase", phase)],
            ..Default::default()
        });
    }
    spans
}

/// One export request carrying `spans` under the agent's resource.
pub fn export_request(service_name: &str, host: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", service_name),
                    text("service.version", env!("CARGO_PKG_VERSION")),
                    text("host.name", host),
                    text("telemetry.sdk.name", "inferwatch"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "inferwatch".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::trace::TraceContext;

    fn request() -> RequestSpan {
        RequestSpan {
            trace: TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
            trace_id: [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
                0x36,
            ],
            pid: 42,
            method: "POST",
            route: "/v1/completions",
            model: "tiny".into(),
            status: 200,
            outcome: "complete",
            stream: true,
            response_id: Some("cmpl-1".into()),
            start_unix_ns: 1_000,
            end_unix_ns: 9_000,
            time_to_first_token_seconds: Some(4e-6),
            request_bytes: 120,
            response_bytes: 900,
            content_events: 3,
            usage: Some((5, 8)),
            phases: vec![("queued", 1_000, 1_500), ("frontend_in", 1_500, 3_000), ("decode", 5_000, 9_000)],
        }
    }

    #[test]
    fn a_request_is_a_server_span_in_the_clients_trace_with_its_phases() {
        let r = request();
        let trace = r.trace.as_ref().unwrap().trace_id;
        assert_eq!(r.trace_id, trace);
        let spans = request_spans(&r, &mut Ids::new());
        assert_eq!(spans.len(), 4);
        let server = &spans[0];
        assert_eq!(server.trace_id, trace.to_vec());
        assert_eq!(server.parent_span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(
            (server.kind, server.start_time_unix_nano, server.end_time_unix_nano),
            (SpanKind::Server as i32, 1_000, 9_000)
        );
        assert_eq!(server.name, "completions tiny");
        let attr = |k: &str| server.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone());
        assert_eq!(
            attr("gen_ai.response.id"),
            Some(AnyValue { value: Some(Value::StringValue("cmpl-1".into())) })
        );
        assert_eq!(attr("http.response.status_code"), Some(AnyValue { value: Some(Value::IntValue(200)) }));
        for child in &spans[1..] {
            assert_eq!(
                (child.parent_span_id.as_slice(), child.trace_id.as_slice()),
                (server.span_id.as_slice(), &trace[..])
            );
            assert_ne!(child.span_id, server.span_id);
        }
        assert_eq!(spans[1].name, "queued");
    }

    #[test]
    fn without_a_traceparent_a_new_root_and_aborts_are_errors() {
        let mut r = request();
        r.trace = None;
        r.outcome = "aborted";
        let mut ids = Ids::new();
        r.trace_id = ids.trace_id();
        let spans = request_spans(&r, &mut ids);
        assert!(spans[0].parent_span_id.is_empty());
        assert_eq!(spans[0].status.as_ref().unwrap().code, StatusCode::Error as i32);
        let a = ids.trace_id();
        assert_ne!(a, ids.trace_id(), "ids differ");
    }
}
