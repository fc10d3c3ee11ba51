//! The fidelity tests' completions server on axum (hyper), written as hyper servers write: the
//! body a stream, hyper queueing each chunk's size line, data and CRLF into one `writev` (and
//! the terminator with the last chunk when it can). Same protocol as tests/servers/sse_app.py:
//! POST /v1/completions {"model", "max_tokens", "stream", "delay_ms"}: an empty first event,
//! then `max_tokens` events `delay_ms` apart, then `data: [DONE]`. Usage: axumserver PORT
use std::{convert::Infallible, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{StatusCode, header},
    response::Response,
    routing::post,
};

fn event(model: &str, text: &str) -> Bytes {
    let event = serde_json::json!({
        "id": "cmpl-test", "object": "text_completion", "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": null}],
    });
    Bytes::from(format!("data: {event}\n\n"))
}

async fn complete(body: Bytes) -> Response {
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("test-model").to_string();
    let tokens = req["max_tokens"].as_u64().unwrap_or(8);
    let delay = Duration::from_secs_f64(req["delay_ms"].as_f64().unwrap_or(2.0).max(0.0) / 1000.0);
    if req["stream"] != true {
        tokio::time::sleep(delay * tokens as u32).await;
        let out = serde_json::json!({
            "id": "cmpl-test", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": " t".repeat(tokens as usize)}],
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(out.to_string()))
            .unwrap();
    }
    let events = futures_util::stream::unfold(0u64, move |i| {
        let model = model.clone();
        async move {
            let bytes = match i {
                0 => event(&model, ""),
                i if i <= tokens => {
                    tokio::time::sleep(delay).await;
                    event(&model, &format!(" t{}", i - 1))
                }
                i if i == tokens + 1 => Bytes::from_static(b"data: [DONE]\n\n"),
                _ => return None,
            };
            Some((Ok::<_, Infallible>(bytes), i + 1))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(events))
        .unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).expect("usage: axumserver PORT");
    let app = Router::new()
        .route("/v1/completions", post(complete))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    // TCP_NODELAY as production hyper servers set it: with Nagle's algorithm on, a small write
    // waits in the kernel for the client's delayed ACK (up to 40 ms), and the agent, which times
    // the write, would be that far ahead of the client (README: fidelity).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.expect("serve");
}
