//! `inferwatch bench`: a load generator for any OpenAI-compatible server, reporting like
//! `vllm bench serve` with its definitions (TTFT to the first content event, TPOT =
//! (E2E − TTFT)/(tokens − 1), ITL between content events, E2E), and `--json` with the field
//! names of `vllm bench serve --save-result`. With `--agent`, it also prints the agent's
//! server-side view of the same requests.

use std::{
    io::IsTerminal,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    cli::BenchArgs,
    http::chunked::{Dechunker, Piece},
};

/// What the client saw of one request.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
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

pub fn url_addr(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs are supported")?;
    let authority = rest.split('/').next().unwrap_or_default();
    use std::net::ToSocketAddrs;
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{authority} has no address"))?;
    Ok((addr, authority.to_string()))
}

/// A prompt of about `tokens` tokens (one common word each, for most tokenizers).
pub fn prompt(tokens: usize, seed: usize) -> String {
    const WORDS: [&str; 16] = [
        "the", "model", "serves", "tokens", "quickly", "while", "every", "request", "waits", "for", "its",
        "turn", "on", "a", "busy", "node",
    ];
    (0..tokens).map(|i| WORDS[(i * 7 + seed * 13) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

pub fn request_body(args: &BenchArgs, model: &str, i: usize) -> String {
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
pub async fn one(addr: SocketAddr, host: &str, path: &str, body: String, started: f64) -> Outcome {
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

/// Summary statistics the way `vllm bench serve` reports them (milliseconds).
#[derive(Debug, Default, Serialize, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p90: f64,
    pub p99: f64,
}

pub fn stats_ms(values: &[f64]) -> Stats {
    if values.is_empty() {
        return Stats::default();
    }
    let mut v: Vec<f64> = values.iter().map(|x| x * 1e3).collect();
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    Stats {
        mean,
        median: percentile(&v, 50.0),
        std: var.sqrt(),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
    }
}

/// Linear interpolation between closest ranks, as numpy's default (what vLLM uses).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.len() == 1 {
        return sorted[0];
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// The result document, with `vllm bench serve --save-result` field names.
pub fn result_json(args: &BenchArgs, model: &str, outcomes: &[Outcome], duration: f64) -> Value {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let ttfts: Vec<f64> = ok.iter().filter_map(|o| o.ttft).collect();
    let tpots: Vec<f64> = ok
        .iter()
        .filter(|o| o.output_tokens > 1)
        .filter_map(|o| Some((o.e2el - o.ttft?) / (o.output_tokens - 1) as f64))
        .collect();
    let itls: Vec<f64> = ok.iter().flat_map(|o| o.itl.iter().copied()).collect();
    let e2els: Vec<f64> = ok.iter().map(|o| o.e2el).collect();
    let input: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
    let output: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let mut doc = json!({
        "date": chrono_like_now(),
        "backend": "openai",
        "endpoint_type": args.endpoint,
        "model_id": model,
        "num_prompts": outcomes.len(),
        "request_rate": args.rate.map_or(json!("inf"), |r| json!(r)),
        "max_concurrency": args.concurrency,
        "duration": duration,
        "completed": ok.len(),
        "failed": outcomes.len() - ok.len(),
        "total_input_tokens": input,
        "total_output_tokens": output,
        "request_throughput": ok.len() as f64 / duration,
        "output_throughput": output as f64 / duration,
        "total_token_throughput": (input + output) as f64 / duration,
        "input_lens": ok.iter().map(|o| o.prompt_tokens).collect::<Vec<_>>(),
        "output_lens": ok.iter().map(|o| o.output_tokens).collect::<Vec<_>>(),
        "ttfts": ttfts,
        "itls": ok.iter().map(|o| o.itl.clone()).collect::<Vec<_>>(),
        "errors": outcomes.iter().map(|o| o.error.clone()).collect::<Vec<_>>(),
    });
    for (name, values) in [("ttft", &ttfts), ("tpot", &tpots), ("itl", &itls), ("e2el", &e2els)] {
        let s = stats_ms(values);
        for (stat, v) in
            [("mean", s.mean), ("median", s.median), ("std", s.std), ("p90", s.p90), ("p99", s.p99)]
        {
            doc[format!("{stat}_{name}_ms")] = json!(v);
        }
    }
    doc
}

fn chrono_like_now() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs}")
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let (addr, host) = url_addr(&args.url).with_context(|| format!("--url {}", args.url))?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(addr).await.context("--model not given and /v1/models did not answer")?,
    };
    let path = if args.endpoint == "chat" { "/v1/chat/completions" } else { "/v1/completions" };
    let total = args.requests;
    let done = Arc::new(AtomicUsize::new(0));
    let progress =
        tokio::spawn(show_progress(done.clone(), total, args.rate.is_some().then_some(args.duration)));
    let start = Instant::now();
    let args = Arc::new(args);
    let mut outcomes: Vec<Outcome> = Vec::new();
    if let Some(rate) = args.rate {
        // Open loop: Poisson arrivals at `rate`/s for `duration`.
        let mut handles = Vec::new();
        let mut t = 0.0f64;
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut i = 0;
        while t < args.duration.as_secs_f64() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
            t += -(1.0 - u).ln() / rate;
            let at = start + Duration::from_secs_f64(t);
            let (args, host, model, done) = (args.clone(), host.clone(), model.clone(), done.clone());
            handles.push(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let o = one(addr, &host, path, request_body(&args, &model, i), t).await;
                done.fetch_add(1, Ordering::Relaxed);
                o
            }));
            i += 1;
        }
        for h in handles {
            outcomes.push(h.await?);
        }
    } else {
        // Closed loop: `concurrency` clients, `requests` in all.
        let next = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..args.concurrency.max(1))
            .map(|_| {
                let (args, host, model, done, next) =
                    (args.clone(), host.clone(), model.clone(), done.clone(), next.clone());
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= args.requests {
                            return mine;
                        }
                        let started = start.elapsed().as_secs_f64();
                        mine.push(one(addr, &host, path, request_body(&args, &model, i), started).await);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            outcomes.extend(w.await?);
        }
    }
    let duration = start.elapsed().as_secs_f64();
    progress.abort();
    eprintln!();
    outcomes.sort_by(|a, b| a.started.total_cmp(&b.started));
    let doc = result_json(&args, &model, &outcomes, duration);
    print_report(&doc);
    if let Some(agent) = &args.agent {
        server_side(agent, &outcomes, start_unix(start)).await?;
    }
    if let Some(file) = &args.json {
        std::fs::write(file, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", file.display()))?;
        eprintln!("wrote {}", file.display());
    }
    if doc["completed"] == 0 {
        bail!("no request succeeded: {}", outcomes.first().map(|o| o.error.as_str()).unwrap_or(""));
    }
    Ok(())
}

/// Wall-clock time (Unix seconds) of an Instant in the past.
fn start_unix(start: Instant) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    now - start.elapsed().as_secs_f64()
}

async fn first_model(addr: SocketAddr) -> Result<String> {
    let body = crate::httpclient::get(
        &crate::httpclient::Target { addr, netns_of: None },
        "/v1/models",
        Duration::from_secs(5),
        1 << 20,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let v: Value = serde_json::from_slice(&body)?;
    v["data"][0]["id"].as_str().map(str::to_string).context("/v1/models lists no model")
}

async fn show_progress(done: Arc<AtomicUsize>, total: usize, duration: Option<Duration>) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(if tty { 200 } else { 5000 })).await;
        let n = done.load(Ordering::Relaxed);
        let fraction = match duration {
            Some(d) => (start.elapsed().as_secs_f64() / d.as_secs_f64()).min(1.0),
            None => n as f64 / total.max(1) as f64,
        };
        let bar: String = (0..30).map(|i| if (i as f64) < fraction * 30.0 { '#' } else { '.' }).collect();
        if tty {
            eprint!("\r[{bar}] {n} requests done, {:.0} s", start.elapsed().as_secs_f64());
        } else {
            eprintln!("[{bar}] {n} requests done, {:.0} s", start.elapsed().as_secs_f64());
        }
    }
}

fn print_report(doc: &Value) {
    let line = |label: &str, v: &Value| println!("{label:<40}{}", fmt(v));
    println!("============ Serving Benchmark Result ============");
    line("Successful requests:", &doc["completed"]);
    line("Failed requests:", &doc["failed"]);
    line("Benchmark duration (s):", &doc["duration"]);
    line("Total input tokens:", &doc["total_input_tokens"]);
    line("Total generated tokens:", &doc["total_output_tokens"]);
    line("Request throughput (req/s):", &doc["request_throughput"]);
    line("Output token throughput (tok/s):", &doc["output_throughput"]);
    line("Total token throughput (tok/s):", &doc["total_token_throughput"]);
    for (title, name) in [
        ("Time to First Token", "ttft"),
        ("Time per Output Token (excl. 1st token)", "tpot"),
        ("Inter-token Latency", "itl"),
        ("End-to-end Latency", "e2el"),
    ] {
        println!("{:-^50}", title);
        for stat in ["mean", "median", "p90", "p99"] {
            line(
                &format!("{} {} (ms):", capitalize(stat), name.to_uppercase()),
                &doc[format!("{stat}_{name}_ms")],
            );
        }
    }
    println!("==================================================");
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if v.is_f64() => format!("{f:.2}"),
        _ => v.to_string(),
    }
}

/// The agent's view of the same requests (matched by time), next to the client's.
async fn server_side(agent: &str, outcomes: &[Outcome], start_unix: f64) -> Result<()> {
    let (addr, _) = url_addr(agent).with_context(|| format!("--agent {agent}"))?;
    let body = crate::httpclient::get(
        &crate::httpclient::Target { addr, netns_of: None },
        "/api/v1/requests?limit=2048",
        Duration::from_secs(5),
        64 << 20,
    )
    .await
    .map_err(|e| anyhow::anyhow!("the agent at {agent}: {e}"))?;
    let records: Vec<Value> = serde_json::from_slice(&body)?;
    let last = outcomes.iter().map(|o| o.started + o.e2el).fold(0.0, f64::max);
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| {
            let t = r["received_unix_seconds"].as_f64().unwrap_or(0.0) - start_unix;
            (-0.5..=last + 0.5).contains(&t)
                && matches!(r["route"].as_str(), Some("/v1/completions" | "/v1/chat/completions"))
        })
        .collect();
    let mean = |k: &str| {
        let v: Vec<f64> = ours.iter().filter_map(|r| r[k].as_f64()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64 * 1e3)
    };
    let client = |f: fn(&Outcome) -> Option<f64>| {
        let v: Vec<f64> = outcomes.iter().filter(|o| o.ok).filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64 * 1e3)
    };
    println!("{:-^50}", "Server side (inferwatch agent)");
    println!("{:<40}{}", "Requests the agent saw:", ours.len());
    let show = |label: &str, c: Option<f64>, s: Option<f64>| match (c, s) {
        (Some(c), Some(s)) => {
            println!("{label:<40}client {c:.2}, server {s:.2}, client − server {:.2}", c - s)
        }
        _ => println!("{label:<40}n/a"),
    };
    show("Mean TTFT (ms):", client(|o| o.ttft), mean("time_to_first_token_seconds"));
    show("Mean E2E (ms):", client(|o| Some(o.e2el)), mean("duration_seconds"));
    for (label, key) in [
        ("  frontend_in (ms):", "frontend_in_seconds"),
        ("  engine_first (ms):", "engine_first_seconds"),
        ("  engine (whole responses) (ms):", "engine_seconds"),
        ("  frontend_out (ms):", "frontend_out_seconds"),
        ("  decode (ms):", "decode_seconds"),
    ] {
        if let Some(v) = mean(key) {
            println!("{label:<40}{v:.2}");
        }
    }
    let unmatched = ours.iter().filter(|r| !r["phases_unmatched"].is_null()).count();
    if unmatched > 0 {
        println!("{:<40}{unmatched}", "  requests without phases:");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
    }

    #[test]
    fn definitions_match_vllm_bench_serve() {
        let a = Outcome {
            ok: true,
            prompt_tokens: 10,
            output_tokens: 5,
            ttft: Some(0.1),
            itl: vec![0.05; 4],
            e2el: 0.3,
            ..Default::default()
        };
        let b = Outcome { ok: false, error: "HTTP 500".into(), ..Default::default() };
        let args = BenchArgs::for_tests();
        let doc = result_json(&args, "m", &[a, b], 2.0);
        assert_eq!((doc["completed"].as_u64(), doc["failed"].as_u64()), (Some(1), Some(1)));
        assert_eq!(doc["mean_ttft_ms"].as_f64(), Some(100.0));
        // TPOT = (E2E − TTFT) / (tokens − 1) = 0.2 / 4.
        assert!((doc["mean_tpot_ms"].as_f64().unwrap() - 50.0).abs() < 1e-9);
        assert!((doc["p99_itl_ms"].as_f64().unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(doc["output_throughput"].as_f64(), Some(2.5));
        assert_eq!(doc["total_input_tokens"].as_u64(), Some(10));
    }

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
