//! `inferwatch diagnose` and `inferwatch baseline`: clients of a running agent's HTTP API.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    bench::{percentile, url_addr},
    cli::{BaselineCommand, DiagnoseArgs},
    httpclient::{self, Target},
};

async fn get(agent: &str, path: &str) -> Result<Vec<u8>> {
    let (addr, _) = url_addr(agent).with_context(|| format!("--agent {agent}"))?;
    httpclient::get(&Target { addr, netns_of: None }, path, Duration::from_secs(10), 64 << 20)
        .await
        .map_err(|e| anyhow::anyhow!("the agent at {agent}{path}: {e}"))
}

async fn get_json(agent: &str, path: &str) -> Result<Value> {
    Ok(serde_json::from_slice(&get(agent, path).await?)?)
}

pub async fn diagnose(args: DiagnoseArgs) -> Result<()> {
    let d = get_json(&args.agent, &format!("/api/v1/diagnosis?window={}", args.window.as_secs_f64())).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let instances = d["instances"].as_array().map(|a| a.len()).unwrap_or(0);
    println!(
        "diagnosis over the last {:.0} s, {instances} vLLM instance(s)",
        d["window_seconds"].as_f64().unwrap_or(0.0)
    );
    let findings = d["findings"].as_array().cloned().unwrap_or_default();
    if findings.is_empty() {
        println!("no problem found");
    }
    for f in &findings {
        println!(
            "\n[{}] {}: {}",
            f["severity"].as_str().unwrap_or("").to_uppercase(),
            f["rule"].as_str().unwrap_or(""),
            f["summary"].as_str().unwrap_or("")
        );
        for e in f["evidence"].as_array().into_iter().flatten() {
            println!("  evidence: {}", e.as_str().unwrap_or(""));
        }
        println!("  change:   {}", f["action"].as_str().unwrap_or(""));
    }
    for n in d["not_evaluated"].as_array().into_iter().flatten() {
        println!("not evaluated: {} ({})", n[0].as_str().unwrap_or(""), n[1].as_str().unwrap_or(""));
    }
    Ok(())
}

/// Sum of every sample named `name` in a metrics page (optionally only those with `needle`).
fn sum_samples(text: &str, name: &str, needle: &str) -> f64 {
    let Ok(families) = crate::promtext::parse(text) else { return 0.0 };
    families
        .iter()
        .flat_map(|f| &f.samples)
        .filter(|s| {
            s.name == name
                && (needle.is_empty() || s.labels.iter().any(|(k, v)| format!("{k}=\"{v}\"") == needle))
        })
        .map(|s| s.value)
        .sum()
}

pub async fn baseline(cmd: BaselineCommand) -> Result<()> {
    match cmd {
        BaselineCommand::Record { agent, duration, out } => {
            let doc = record(&agent, duration).await?;
            std::fs::write(&out, serde_json::to_string_pretty(&doc)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("baseline written to {}: {} requests", out.display(), doc["requests"]);
            Ok(())
        }
        BaselineCommand::Compare { a, b, threshold } => {
            let regressions = compare(&read(&a)?, &read(&b)?, threshold);
            if regressions > 0 {
                bail!("{regressions} regression(s) beyond {threshold}%");
            }
            Ok(())
        }
    }
}

fn read(path: &Path) -> Result<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a baseline", path.display()))
}

async fn record(agent: &str, duration: Duration) -> Result<Value> {
    let before = String::from_utf8_lossy(&get(agent, "/metrics").await?).into_owned();
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    tokio::time::sleep(duration).await;
    let after = String::from_utf8_lossy(&get(agent, "/metrics").await?).into_owned();
    let records = get_json(agent, "/api/v1/requests?limit=2048").await?;
    let instances = get_json(agent, "/api/v1/instances").await?;
    let generation: Vec<&Value> = records.as_array().map(|a| a.iter().collect()).unwrap_or_default();
    let generation: Vec<&Value> = generation
        .into_iter()
        .filter(|r| r["received_unix_seconds"].as_f64().unwrap_or(0.0) >= start)
        .filter(|r| matches!(r["route"].as_str(), Some("/v1/completions" | "/v1/chat/completions")))
        .collect();
    let pcts = |key: &str| {
        let mut v: Vec<f64> = generation.iter().filter_map(|r| r[key].as_f64()).map(|x| x * 1e3).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return json!(null);
        }
        json!({"p50": percentile(&v, 50.0), "p90": percentile(&v, 90.0), "p99": percentile(&v, 99.0), "mean": v.iter().sum::<f64>() / v.len() as f64})
    };
    let delta = |name: &str| sum_samples(&after, name, "") - sum_samples(&before, name, "");
    let secs = duration.as_secs_f64();
    let first = &instances[0];
    let mean_phase = |key: &str| {
        let v: Vec<f64> = generation.iter().filter_map(|r| r[key].as_f64()).collect();
        if v.is_empty() { json!(null) } else { json!(v.iter().sum::<f64>() / v.len() as f64 * 1e3) }
    };
    let gpu_util = sum_samples(&after, "inferwatch_gpu_utilization_ratio", "");
    Ok(json!({
        "recorded_unix_seconds": start,
        "duration_seconds": secs,
        "requests": generation.len(),
        "requests_per_second": generation.len() as f64 / secs,
        "output_tokens_per_second": delta("vllm:generation_tokens_total") / secs,
        "ttft_ms": pcts("time_to_first_token_seconds"),
        "duration_ms": pcts("duration_seconds"),
        "phases_ms": {
            "frontend_in": mean_phase("frontend_in_seconds"),
            "engine_first": mean_phase("engine_first_seconds"),
            "frontend_out": mean_phase("frontend_out_seconds"),
            "decode": mean_phase("decode_seconds"),
        },
        "gpu": if gpu_util > 0.0 { json!({"utilization": gpu_util}) } else { json!(null) },
        "vllm_version": first["version"],
        "model": first["models"],
        "flags": first["flags"],
    }))
}

/// Prints the deltas; returns how many metrics regressed beyond `threshold` percent.
pub fn compare(a: &Value, b: &Value, threshold: f64) -> usize {
    // (name, value path, higher is better)
    let metrics: [(&str, &[&str], bool); 8] = [
        ("requests/s", &["requests_per_second"], true),
        ("output tokens/s", &["output_tokens_per_second"], true),
        ("TTFT p50 (ms)", &["ttft_ms", "p50"], false),
        ("TTFT p99 (ms)", &["ttft_ms", "p99"], false),
        ("duration p50 (ms)", &["duration_ms", "p50"], false),
        ("duration p99 (ms)", &["duration_ms", "p99"], false),
        ("frontend_in mean (ms)", &["phases_ms", "frontend_in"], false),
        ("engine_first mean (ms)", &["phases_ms", "engine_first"], false),
    ];
    let at = |v: &Value, path: &[&str]| path.iter().fold(v.clone(), |v, k| v[*k].clone()).as_f64();
    println!("{:<26}{:>14}{:>14}{:>10}  verdict", "metric", "A", "B", "Δ %");
    let mut regressions = 0;
    let mut rows = BTreeMap::new();
    for (name, path, higher_better) in metrics {
        let (Some(x), Some(y)) = (at(a, path), at(b, path)) else {
            println!("{name:<26}{:>14}{:>14}{:>10}  not in both", "-", "-", "-");
            continue;
        };
        let change = if x != 0.0 { (y - x) / x * 100.0 } else { 0.0 };
        let worse = if higher_better { -change } else { change };
        let verdict = if worse > threshold {
            regressions += 1;
            "REGRESSION"
        } else if worse < -threshold {
            "better"
        } else {
            "same"
        };
        rows.insert(name, change);
        println!("{name:<26}{x:>14.2}{y:>14.2}{change:>+10.1}  {verdict}");
    }
    for (label, key) in [("vLLM version", "vllm_version"), ("flags", "flags")] {
        if a[key] != b[key] {
            println!("{label} differ: A {} / B {}", a[key], b[key]);
        }
    }
    regressions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline(rps: f64, ttft_p99: f64) -> Value {
        json!({"requests_per_second": rps, "output_tokens_per_second": rps * 16.0,
               "ttft_ms": {"p50": ttft_p99 / 2.0, "p99": ttft_p99}, "duration_ms": {"p50": 50.0, "p99": 90.0},
               "phases_ms": {"frontend_in": 2.0, "engine_first": 5.0}, "vllm_version": "0.32.0", "flags": []})
    }

    #[test]
    fn compare_flags_regressions_beyond_the_threshold() {
        assert_eq!(compare(&baseline(10.0, 100.0), &baseline(10.0, 100.0), 10.0), 0);
        assert_eq!(
            compare(&baseline(10.0, 100.0), &baseline(9.1, 100.0), 10.0),
            0,
            "-9% throughput is within 10%"
        );
        assert_eq!(
            compare(&baseline(10.0, 100.0), &baseline(8.0, 100.0), 10.0),
            2,
            "requests and tokens per second"
        );
        assert_eq!(compare(&baseline(10.0, 100.0), &baseline(10.0, 150.0), 10.0), 2, "TTFT p50 and p99");
        assert_eq!(
            compare(&baseline(10.0, 100.0), &baseline(20.0, 50.0), 10.0),
            0,
            "better is not a regression"
        );
    }

    #[test]
    fn sums_samples_of_an_agent_page() {
        let page = "# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total{vllm_instance=\"a\"} 10\nvllm:generation_tokens_total{vllm_instance=\"b\"} 5\n# EOF\n";
        assert_eq!(sum_samples(page, "vllm:generation_tokens_total", ""), 15.0);
        assert_eq!(sum_samples(page, "vllm:generation_tokens_total", "vllm_instance=\"b\""), 5.0);
    }
}
