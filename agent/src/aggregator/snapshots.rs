//! Families the aggregator rebuilds from snapshots (scheduler, GPU, the OTLP exporter's
//! counters), encoded at each scrape by a prometheus-client collector.

use std::sync::Arc;

#[cfg(test)]
use prometheus_client::registry::Registry;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::store::Locked;
use crate::model::family::Family as Snapshot;

#[cfg(test)]
pub(crate) fn encode_snapshots(families: Vec<Snapshot>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshots(Arc::new(Locked::new(families)))));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding to a String");
    out
}

/// Families the aggregator rebuilds from a snapshot, encoded at each scrape.
#[derive(Debug)]
pub(crate) struct Snapshots(pub Arc<Locked<Vec<Snapshot>>>);

impl Collector for Snapshots {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in self.0.read().iter() {
            encode_family(&mut encoder, family)?;
        }
        Ok(())
    }
}

/// One snapshot family: gauges and counters sample by sample, histograms from their
/// cumulative `_bucket`, `_sum` and `_count` samples, grouped by their other labels.
fn encode_family(encoder: &mut DescriptorEncoder, f: &Snapshot) -> Result<(), std::fmt::Error> {
    let labels = |s: &'_ crate::model::family::Sample| -> Vec<(String, String)> {
        s.labels.iter().filter(|(k, _)| k != "le").cloned().collect()
    };
    match f.kind.as_str() {
        "counter" => {
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, MetricType::Counter)?;
            for s in &f.samples {
                metric.encode_family(&labels(s))?.encode_counter::<NoLabelSet, f64, f64>(&s.value, None)?;
            }
        }
        "histogram" => {
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, MetricType::Histogram)?;
            // In first-seen order of their labels.
            let mut series: Vec<HistogramSeries> = Vec::new();
            for s in &f.samples {
                let key = labels(s);
                let at = match series.iter().position(|h| h.labels == key) {
                    Some(i) => i,
                    None => {
                        series.push(HistogramSeries { labels: key, ..Default::default() });
                        series.len() - 1
                    }
                };
                let entry = &mut series[at];
                match s.name.strip_prefix(f.name.as_str()) {
                    Some("_bucket") => {
                        let le = s.label("le").unwrap_or("+Inf");
                        let le =
                            if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                        entry.cumulative.push((le, s.value));
                    }
                    Some("_sum") => entry.sum = s.value,
                    Some("_count") => entry.count = s.value,
                    _ => {}
                }
            }
            for HistogramSeries { labels: key, cumulative, sum, count } in series {
                // The encoder takes each bucket's own count and accumulates them itself.
                let mut previous = 0.0;
                let buckets: Vec<(f64, u64)> = cumulative
                    .into_iter()
                    .map(|(le, c)| {
                        let own = (c - previous).max(0.0) as u64;
                        previous = c;
                        (le, own)
                    })
                    .collect();
                metric.encode_family(&key)?.encode_histogram::<NoLabelSet>(
                    sum,
                    count as u64,
                    &buckets,
                    None,
                )?;
            }
        }
        kind => {
            let kind = if kind == "gauge" { MetricType::Gauge } else { MetricType::Unknown };
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, kind)?;
            for s in &f.samples {
                metric.encode_family(&labels(s))?.encode_gauge(&s.value)?;
            }
        }
    }
    Ok(())
}

/// One labelled histogram of a snapshot family.
#[derive(Default)]
struct HistogramSeries {
    labels: Vec<(String, String)>,
    /// (upper bound, cumulative count), in the family's order.
    cumulative: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}
