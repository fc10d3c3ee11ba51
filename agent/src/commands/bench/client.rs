//! One benchmark request on a fresh connection, and the client side of its SSE stream.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    cli::BenchArgs,
    requests::http::chunked::{Dechunker, Piece},
};

/// What the client saw of one request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcome {
    pub ok: bool,
    pub error: String,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Seconds from sending to the first content event.
    pub ttft: Option<f64>,
    /// Gaps between content events, seconds.
    pub itl: Vec<f64>,
    pub e2el: f64,
    /// When it was sent, seconds since the run started.
    pub started: f64,
}

/// A prompt of about `tokens` tokens (one common word each, for most tokenizers).
pub(crate) fn prompt(tokens: usize, seed: usize) -> String {
    const WORDS: [&str; 16] = [
        "the", "model", "serves", "tokens", "quickly", "while", "every", "request", "waits", "for", "its",
        "turn", "on", "a", "busy", "node",
    ];
    (0..tokens).map(|i| WORDS[(i * 7 + seed * 13) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

pub(crate) fn request_body(args: &BenchArgs, model: &str, i: usize) -> String {
    let text = prompt(args.prompt_tokens, i);
    let mut body = if args.endpoint == "chat" {
        json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": args.max_tokens})
    } else {
        json!({"model": model, "prompt": text, "max_tokens": args.max_tokens})
    };
    // Exactly max_tokens, as `vllm bench serve` asks (ignore_eos), so runs are comparable.
    body["ignore_eos"] = json!(true);
    if args.stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

/// One request on a fresh connection, timed from the write of its first byte.
pub(crate) async fn one(addr: SocketAddr, host: &str, path: &str, body: String, started: f64) -> Outcome {
    let t0 = Instant::now();
    let mut out = Outcome { started, ..Default::default() };
    match exchange(addr, host, path, &body, t0, &mut out).await {
        Ok(()) => out.ok = true,
        Err(e) => out.error = format!("{e:#}"),
    }
    out.e2el = t0.elapsed().as_secs_f64();
    out
}

async fn exchange(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: &str,
    t0: Instant,
    out: &mut Outcome,
) -> Result<()> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    s.set_nodelay(true)?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let (status, chunked, rest) = loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = resp.parse(&head)? {
            let chunked = resp.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("transfer-encoding")
                    && String::from_utf8_lossy(h.value).to_ascii_lowercase().contains("chunked")
            });
            break (resp.code.unwrap_or(0), chunked, head[len..].to_vec());
        }
    };
    let mut body_text = Vec::new();
    let mut events = SseReader::default();
    let mut last_content: Option<f64> = None;
    let mut dechunk = Dechunker::default();
    let mut feed = |bytes: &[u8], out: &mut Outcome, events: &mut SseReader| {
        let now = t0.elapsed().as_secs_f64();
        for event in events.push(bytes) {
            if let Some(u) = event.get("usage").filter(|u| u.is_object()) {
                out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(out.prompt_tokens);
                out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(out.output_tokens);
            }
            if has_content(&event) {
                match last_content {
                    None => out.ttft = Some(now),
                    Some(last) => out.itl.push(now - last),
                }
                last_content = Some(now);
            }
        }
    };
    let mut pending = rest;
    loop {
        if chunked {
            let mut data = Vec::new();
            dechunk.feed(&pending, &mut |p| {
                if let Piece::Data(b) = p {
                    data.extend_from_slice(b)
                }
            });
            feed(&data, out, &mut events);
            body_text.extend_from_slice(&data);
            if dechunk.is_done() {
                break;
            }
        } else {
            feed(&pending, out, &mut events);
            body_text.extend_from_slice(&pending);
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            if chunked {
                bail!("connection closed mid-response");
            }
            break;
        }
        pending = buf[..n].to_vec();
    }
    if status != 200 {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body_text[..body_text.len().min(300)]));
    }
    if out.ttft.is_none() && !events.seen_any {
        // Not streamed: the whole response is the first (and only) content.
        out.ttft = Some(t0.elapsed().as_secs_f64());
        if let Ok(v) = serde_json::from_slice::<Value>(&body_text) {
            out.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            out.output_tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        }
    }
    if out.output_tokens == 0 {
        out.output_tokens = out.itl.len() as u64 + u64::from(out.ttft.is_some());
    }
    Ok(())
}

fn has_content(event: &Value) -> bool {
    let Some(choice) = event["choices"].as_array().and_then(|c| c.first()) else { return false };
    let non_empty = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    non_empty(&choice["text"])
        || non_empty(&choice["delta"]["content"])
        || non_empty(&choice["delta"]["reasoning_content"])
        || choice["delta"]["tool_calls"].as_array().is_some_and(|t| !t.is_empty())
}

/// Client-side SSE: complete events' JSON data.
#[derive(Default)]
struct SseReader {
    text: String,
    seen_any: bool,
}

impl SseReader {
    fn push(&mut self, bytes: &[u8]) -> Vec<Value> {
        self.text.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(end) = self.text.find("\n\n") {
            let event: String = self.text.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data:").map(str::trim) {
                    self.seen_any = true;
                    if let Ok(v) = serde_json::from_str::<Value>(data) {
                        out.push(v);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_events_and_usage() {
        let mut r = SseReader::default();
        let events = r.push(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(events.iter().filter(|e| has_content(e)).count(), 1);
        assert_eq!(events[2]["usage"]["completion_tokens"], 7);
    }
}
