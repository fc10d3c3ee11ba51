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

use self::{
    client::{Outcome, one, request_body},
    report::{print_report, result_json, server_side},
};
use crate::{cli::BenchArgs, collect::fetch};

mod client;
mod report;

pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let (addr, host) = fetch::http_url(&args.url).with_context(|| format!("--url {}", args.url))?;
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
    let body =
        fetch::get(&fetch::Target { addr, netns_of: None }, "/v1/models", Duration::from_secs(5), 1 << 20)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
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
