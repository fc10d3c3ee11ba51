//! What `inferwatch bench` reports: statistics with `vllm bench serve`'s definitions, its
//! result document (`--save-result` field names), the printed table, and the agent's view of
//! the same requests.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::{Value, json};

use super::client::Outcome;
use crate::{
    api::{self, RequestRecord},
    cli::BenchArgs,
    commands::stats::percentile,
};

/// Summary statistics the way `vllm bench serve` reports them (milliseconds).
#[derive(Debug, Default, Serialize, Clone, Copy, PartialEq)]
pub(crate) struct Stats {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p90: f64,
    pub p99: f64,
}

pub(crate) fn stats_ms(values: &[f64]) -> Stats {
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

/// The result document, with `vllm bench serve --save-result` field names.
pub(crate) fn result_json(args: &BenchArgs, model: &str, outcomes: &[Outcome], duration: f64) -> Value {
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

pub(super) fn print_report(doc: &Value) {
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

/// One figure of a request record, where it has it.
type Field = fn(&RequestRecord) -> Option<f64>;

/// The agent's view of the same requests (matched by time), next to the client's.
pub(super) async fn server_side(agent: &str, outcomes: &[Outcome], start_unix: f64) -> Result<()> {
    let records = api::Client::new(agent, Duration::from_secs(5))
        .with_context(|| format!("--agent {agent}"))?
        .requests(2048)
        .await?;
    let last = outcomes.iter().map(|o| o.started + o.e2el).fold(0.0, f64::max);
    let ours: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| {
            let t = r.received_unix_seconds - start_unix;
            (-0.5..=last + 0.5).contains(&t)
                && matches!(&*r.route, "/v1/completions" | "/v1/chat/completions")
        })
        .collect();
    let mean = |f: fn(&RequestRecord) -> Option<f64>| {
        let v: Vec<f64> = ours.iter().filter_map(|r| f(r)).collect();
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
    show("Mean TTFT (ms):", client(|o| o.ttft), mean(|r| r.time_to_first_token_seconds));
    show("Mean E2E (ms):", client(|o| Some(o.e2el)), mean(|r| Some(r.duration_seconds)));
    let phases: [(&str, Field); 6] = [
        ("  queued, before the first read (ms):", |r| r.queued_seconds),
        ("  frontend_in (ms):", |r| r.frontend_in_seconds),
        ("  engine_first (ms):", |r| r.engine_first_seconds),
        ("  engine (whole responses) (ms):", |r| r.engine_seconds),
        ("  frontend_out (ms):", |r| r.frontend_out_seconds),
        ("  decode (ms):", |r| r.decode_seconds),
    ];
    for (label, phase) in phases {
        if let Some(v) = mean(phase) {
            println!("{label:<40}{v:.2}");
        }
    }
    let unmatched = ours.iter().filter(|r| r.phases_unmatched.is_some()).count();
    if unmatched > 0 {
        println!("{:<40}{unmatched}", "  requests without phases:");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
