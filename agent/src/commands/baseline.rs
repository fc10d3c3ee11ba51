//! `inferwatch baseline`: what a running agent saw over a while, written to a file, and two
//! such files compared.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    api::{self, RequestRecord, total},
    cli::BaselineCommand,
    commands::stats::percentile,
};

/// A baseline file. Every figure is optional, so older or partial files still compare.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Baseline {
    pub recorded_unix_seconds: f64,
    pub duration_seconds: f64,
    pub requests: usize,
    pub requests_per_second: Option<f64>,
    pub output_tokens_per_second: Option<f64>,
    pub ttft_ms: Option<Percentiles>,
    pub duration_ms: Option<Percentiles>,
    pub phases_ms: PhaseMeans,
    pub gpu: Option<Gpu>,
    pub vllm_version: Option<String>,
    pub model: Option<Vec<String>>,
    pub flags: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Percentiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub mean: Option<f64>,
}

/// Mean phase durations of the generation requests, milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct PhaseMeans {
    pub queued: Option<f64>,
    pub frontend_in: Option<f64>,
    pub engine_first: Option<f64>,
    pub frontend_out: Option<f64>,
    pub decode: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Gpu {
    pub utilization: f64,
}

pub(crate) async fn run(cmd: BaselineCommand) -> Result<()> {
    match cmd {
        BaselineCommand::Record { agent, duration, out } => {
            let doc = record(&agent, duration).await?;
            std::fs::write(&out, serde_json::to_string_pretty(&doc)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("baseline written to {}: {} requests", out.display(), doc.requests);
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

fn read(path: &Path) -> Result<Baseline> {
    serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a baseline", path.display()))
}

async fn record(agent: &str, duration: Duration) -> Result<Baseline> {
    let client = api::Client::new(agent, Duration::from_secs(10))?;
    let before = client.metrics().await?;
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    tokio::time::sleep(duration).await;
    let after = client.metrics().await?;
    let records = client.requests(2048).await?;
    let instances = client.instances().await?;
    let generation: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.received_unix_seconds >= start)
        .filter(|r| matches!(&*r.route, "/v1/completions" | "/v1/chat/completions"))
        .collect();
    let pcts = |f: fn(&RequestRecord) -> Option<f64>| {
        let mut v: Vec<f64> = generation.iter().filter_map(|r| f(r)).map(|x| x * 1e3).collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| Percentiles {
            p50: Some(percentile(&v, 50.0)),
            p90: Some(percentile(&v, 90.0)),
            p99: Some(percentile(&v, 99.0)),
            mean: Some(v.iter().sum::<f64>() / v.len() as f64),
        })
    };
    let mean_phase = |f: fn(&RequestRecord) -> Option<f64>| {
        let v: Vec<f64> = generation.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64 * 1e3)
    };
    let sum = |families: &[api::Family], name: &str| total(families, name, &[], |a, b| a + b);
    let tokens = sum(&after, "vllm:generation_tokens_total") - sum(&before, "vllm:generation_tokens_total");
    let secs = duration.as_secs_f64();
    let first = instances.first();
    let gpu_util = sum(&after, "inferwatch_gpu_utilization_ratio");
    Ok(Baseline {
        recorded_unix_seconds: start,
        duration_seconds: secs,
        requests: generation.len(),
        requests_per_second: Some(generation.len() as f64 / secs),
        output_tokens_per_second: Some(tokens / secs),
        ttft_ms: pcts(|r| r.time_to_first_token_seconds),
        duration_ms: pcts(|r| Some(r.duration_seconds)),
        phases_ms: PhaseMeans {
            queued: mean_phase(|r| r.queued_seconds),
            frontend_in: mean_phase(|r| r.frontend_in_seconds),
            engine_first: mean_phase(|r| r.engine_first_seconds),
            frontend_out: mean_phase(|r| r.frontend_out_seconds),
            decode: mean_phase(|r| r.decode_seconds),
        },
        gpu: (gpu_util > 0.0).then_some(Gpu { utilization: gpu_util }),
        vllm_version: first.and_then(|i| i.version.clone()),
        model: first.map(|i| i.models.clone()),
        flags: first.map(|i| i.instance.flags.clone()),
    })
}

/// One figure of a baseline, where it has it.
type Figure = fn(&Baseline) -> Option<f64>;

/// Prints the deltas; returns how many metrics regressed beyond `threshold` percent.
pub(crate) fn compare(a: &Baseline, b: &Baseline, threshold: f64) -> usize {
    // (name, the figure, higher is better)
    let metrics: [(&str, Figure, bool); 9] = [
        ("requests/s", |b| b.requests_per_second, true),
        ("output tokens/s", |b| b.output_tokens_per_second, true),
        ("TTFT p50 (ms)", |b| b.ttft_ms.as_ref()?.p50, false),
        ("TTFT p99 (ms)", |b| b.ttft_ms.as_ref()?.p99, false),
        ("duration p50 (ms)", |b| b.duration_ms.as_ref()?.p50, false),
        ("duration p99 (ms)", |b| b.duration_ms.as_ref()?.p99, false),
        ("queued mean (ms)", |b| b.phases_ms.queued, false),
        ("frontend_in mean (ms)", |b| b.phases_ms.frontend_in, false),
        ("engine_first mean (ms)", |b| b.phases_ms.engine_first, false),
    ];
    println!("{:<26}{:>14}{:>14}{:>10}  verdict", "metric", "A", "B", "Δ %");
    let mut regressions = 0;
    let mut rows = BTreeMap::new();
    for (name, figure, higher_better) in metrics {
        let (Some(x), Some(y)) = (figure(a), figure(b)) else {
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
    if a.vllm_version != b.vllm_version {
        println!("vLLM version differ: A {} / B {}", json(&a.vllm_version), json(&b.vllm_version));
    }
    if a.flags != b.flags {
        println!("flags differ: A {} / B {}", json(&a.flags), json(&b.flags));
    }
    regressions
}

/// A field as the JSON it is in the file.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline(rps: f64, ttft_p99: f64) -> Baseline {
        Baseline {
            requests_per_second: Some(rps),
            output_tokens_per_second: Some(rps * 16.0),
            ttft_ms: Some(Percentiles {
                p50: Some(ttft_p99 / 2.0),
                p99: Some(ttft_p99),
                ..Default::default()
            }),
            duration_ms: Some(Percentiles { p50: Some(50.0), p99: Some(90.0), ..Default::default() }),
            phases_ms: PhaseMeans { frontend_in: Some(2.0), engine_first: Some(5.0), ..Default::default() },
            vllm_version: Some("0.32.0".into()),
            flags: Some(vec![]),
            ..Default::default()
        }
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
    fn a_baseline_file_round_trips_and_partial_files_still_read() {
        let b = baseline(10.0, 100.0);
        let text = serde_json::to_string_pretty(&b).unwrap();
        assert_eq!(serde_json::from_str::<Baseline>(&text).unwrap(), b);
        let partial: Baseline =
            serde_json::from_str(r#"{"requests_per_second": 3.5, "ttft_ms": null}"#).unwrap();
        assert_eq!((partial.requests_per_second, partial.ttft_ms), (Some(3.5), None));
    }
}
