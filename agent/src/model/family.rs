//! A metric family as the Prometheus text format describes it: what a scrape of vLLM returns,
//! and what the agent builds for its snapshot families (scheduler, GPU).

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's own name (`…_total`, `…_bucket`, `…_sum`, …).
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: String,
    pub help: String,
    /// `counter`, `gauge`, `histogram`, `summary`, `untyped`, …
    pub kind: String,
    pub samples: Vec<Sample>,
}

/// A sample with borrowed labels, for families built in code.
pub fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
    Sample {
        name: name.to_string(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        value,
    }
}

pub fn family(name: &str, help: &str, kind: &str, samples: Vec<Sample>) -> Family {
    Family { name: name.to_string(), help: help.to_string(), kind: kind.to_string(), samples }
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The sum of every sample named `sample` whose labels include all of `with`, combined by
/// `combine` (a sum, a max, …) from 0.
pub fn total(families: &[Family], sample: &str, with: &[(&str, &str)], combine: fn(f64, f64) -> f64) -> f64 {
    families
        .iter()
        .flat_map(|f| &f.samples)
        .filter(|s| s.name == sample && with.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .fold(0.0, combine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_of_samples_by_name_and_labels() {
        let families = vec![family(
            "vllm:generation_tokens",
            "",
            "counter",
            vec![
                sample("vllm:generation_tokens_total", &[("vllm_instance", "a")], 10.0),
                sample("vllm:generation_tokens_total", &[("vllm_instance", "b")], 5.0),
                sample("vllm:generation_tokens_created", &[("vllm_instance", "b")], 99.0),
            ],
        )];
        let sum =
            |with: &[(&str, &str)]| total(&families, "vllm:generation_tokens_total", with, |a, b| a + b);
        assert_eq!(sum(&[]), 15.0);
        assert_eq!(sum(&[("vllm_instance", "b")]), 5.0);
        assert_eq!(sum(&[("vllm_instance", "c")]), 0.0);
        assert_eq!(total(&families, "vllm:generation_tokens_total", &[], f64::max), 10.0);
    }
}
