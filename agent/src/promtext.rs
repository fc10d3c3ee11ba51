//! The Prometheus text exposition format (0.0.4), as vLLM serves it: parsed into families and
//! written back with extra labels. Unlike the `prometheus-parse` crate this keeps metric names
//! with `:` (all of vLLM's), and it refuses a malformed page as a whole: nothing half-parsed is
//! ever re-exported.

use std::fmt::Write as _;

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

#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn valid_name(name: &str) -> bool {
    name.chars().next().is_some_and(is_name_start) && name.chars().all(is_name_char)
}

/// The family a sample belongs to: the longest declared family name it extends with a known
/// suffix (or equals).
fn family_of(sample: &str, families: &[Family]) -> Option<usize> {
    const SUFFIXES: [&str; 7] = ["", "_total", "_created", "_bucket", "_sum", "_count", "_info"];
    families
        .iter()
        .enumerate()
        .rev()
        .find(|(_, f)| SUFFIXES.iter().any(|s| sample.strip_prefix(f.name.as_str()) == Some(*s)))
        .map(|(i, _)| i)
}

pub fn parse(text: &str) -> Result<Vec<Family>, ParseError> {
    let mut families: Vec<Family> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |reason| ParseError { line: line_no, reason };
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), help) => {
                    if !valid_name(name) {
                        return Err(err("bad metric name in HELP"));
                    }
                    let help = unescape_help(help.unwrap_or(""));
                    match families.iter_mut().rev().find(|f| f.name == name) {
                        Some(f) => f.help = help,
                        None => families.push(Family {
                            name: name.into(),
                            help,
                            kind: "untyped".into(),
                            samples: vec![],
                        }),
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name) {
                        return Err(err("bad metric name in TYPE"));
                    }
                    let kind = kind.trim();
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "untyped",
                        "info",
                        "stateset",
                        "gaugehistogram",
                        "unknown",
                    ]
                    .contains(&kind)
                    {
                        return Err(err("unknown metric type"));
                    }
                    match families.iter_mut().rev().find(|f| f.name == name) {
                        Some(f) if f.samples.is_empty() => f.kind = kind.into(),
                        Some(_) => return Err(err("TYPE after samples")),
                        None => families.push(Family {
                            name: name.into(),
                            help: String::new(),
                            kind: kind.into(),
                            samples: vec![],
                        }),
                    }
                }
                _ => {} // other comments
            }
            continue;
        }
        let sample = parse_sample(line).map_err(err)?;
        let index = match family_of(&sample.name, &families) {
            Some(i) => i,
            None => {
                families.push(Family {
                    name: sample.name.clone(),
                    help: String::new(),
                    kind: "untyped".into(),
                    samples: vec![],
                });
                families.len() - 1
            }
        };
        families[index].samples.push(sample);
    }
    Ok(families)
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_len = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
    let name = &line[..name_len];
    if !valid_name(name) {
        return Err("bad metric name");
    }
    let mut rest = &line[name_len..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let key_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            let key = &rest[..key_len];
            if key.is_empty() {
                return Err("bad label name");
            }
            rest = rest[key_len..].trim_start().strip_prefix('=').ok_or("expected = after label name")?;
            rest = rest.trim_start().strip_prefix('"').ok_or("expected a quoted label value")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value"),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        _ => return Err("bad escape in label value"),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            rest = &rest[end + 1..];
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("missing value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| "bad value")?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| "bad timestamp")?;
    }
    if fields.next().is_some() {
        return Err("trailing text after the sample");
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

fn unescape_help(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\\\", "\\")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v:?}")
    }
}

/// One source's families and the labels added to each of its samples.
pub type Source<'a> = (&'a [Family], &'a [(&'a str, &'a str)]);

/// Whether a family only carries the creation times of another (Python's 0.0.4 encoding writes
/// them as separate `…_created` gauges).
fn is_created_shadow(f: &Family, families: &[Family]) -> bool {
    let Some(base) = f.name.strip_suffix("_created") else { return false };
    families.iter().any(|o| {
        o.name.strip_suffix("_total").unwrap_or(&o.name) == base
            && matches!(o.kind.as_str(), "counter" | "histogram" | "summary")
    })
}

/// Writes the families of several sources (vLLM instances) as OpenMetrics text, one block per
/// family name however many sources have it, each source's samples with its `extra` labels
/// (an existing label of the same name is replaced). Counter families are named without their
/// `_total`; kinds OpenMetrics lacks are written as `unknown`; creation times (`_created`
/// samples and families) are dropped: they describe the source's process, not the metric.
pub fn write_sources(out: &mut String, sources: &[Source<'_>]) {
    // Families are keyed by the name they are written under: a counter `x_total` and another
    // family `x` would otherwise make two blocks of one name, which no parser accepts. The
    // first one of a name wins, in each source.
    let mut order: Vec<&str> = Vec::new();
    for (families, _) in sources {
        for f in families.iter() {
            if !is_created_shadow(f, families) && !order.contains(&written_name(f)) {
                order.push(written_name(f));
            }
        }
    }
    for name in order {
        let mut header_written = false;
        for (families, extra) in sources {
            let Some(f) =
                families.iter().find(|f| written_name(f) == name && !is_created_shadow(f, families))
            else {
                continue;
            };
            if !header_written {
                let _ = writeln!(out, "# HELP {name} {}", f.help.replace('\\', "\\\\").replace('\n', "\\n"));
                let _ = writeln!(out, "# TYPE {name} {}", written_kind(f));
                header_written = true;
            }
            for s in &f.samples {
                if s.name.ends_with("_created") && s.name != f.name {
                    continue;
                }
                write_sample(out, s, extra);
            }
        }
    }
}

/// The kind as OpenMetrics names it.
fn written_kind(f: &Family) -> &str {
    match f.kind.as_str() {
        "untyped" => "unknown",
        k => k,
    }
}

/// The family's name in OpenMetrics: counters without their `_total`.
fn written_name(f: &Family) -> &str {
    let stripped = f.name.strip_suffix("_total").filter(|n| valid_name(n));
    if written_kind(f) == "counter" { stripped.unwrap_or(&f.name) } else { &f.name }
}

fn write_sample(out: &mut String, s: &Sample, extra: &[(&str, &str)]) {
    out.push_str(&s.name);
    let own = s.labels.iter().filter(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    let mut labels = own.map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied()).peekable();
    if labels.peek().is_some() {
        out.push('{');
        for (i, (k, v)) in labels.enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(s.value));
}

/// Old vLLM names next to which the current ones are also exported (the current family wins
/// when the source has both).
const RENAMED: [(&str, &str); 2] = [
    ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds"),
];

/// Adds the current name of each old-named family the source lacks under its current name.
pub fn add_current_names(families: &mut Vec<Family>) {
    for (old, new) in RENAMED {
        if families.iter().any(|f| f.name == new) {
            continue;
        }
        let Some(f) = families.iter().find(|f| f.name == old) else { continue };
        let mut copy = f.clone();
        copy.name = new.to_string();
        for s in &mut copy.samples {
            s.name = format!("{new}{}", &s.name[old.len()..]);
        }
        families.push(copy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo xtask fuzz` (promtext): a counter family named `_total` was written
    /// under the empty name.
    #[test]
    fn a_counter_named_total_keeps_its_name() {
        let families = parse("# TYPE _total counter\n_total 3\n").unwrap();
        let mut out = String::new();
        write_sources(&mut out, &[(&families, &[])]);
        assert!(parse(&out).is_ok(), "{out}");
        assert!(out.contains("# TYPE _total counter"), "{out}");
    }

    /// Found by `cargo xtask fuzz` (promtext): a counter `x_total` and a family `x` were both
    /// written as family `x`, and the output did not parse.
    #[test]
    fn two_families_written_under_one_name_become_one_block() {
        let page = "# TYPE vllm:x_total counter\nvllm:x_total 1\n# HELP vllm:x other\nvllm:x 2\n";
        let families = parse(page).unwrap();
        let mut out = String::new();
        write_sources(&mut out, &[(&families, &[("vllm_instance", "a")])]);
        let again = parse(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert_eq!(again.len(), 1, "{out}");
        assert_eq!(out.matches("# TYPE vllm:x ").count(), 1, "{out}");
    }

    const METRICS: &str = include_str!("../../tests/fixtures/vllm-0.32.0-cpu/metrics.txt");
    const METRICS_2: &str =
        include_str!("../../tests/fixtures/vllm-0.32.0-cpu/metrics-api-server-count-2.txt");

    fn family<'a>(fams: &'a [Family], name: &str) -> &'a Family {
        fams.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no family {name}"))
    }

    #[test]
    fn keeps_every_vllm_family_of_both_fixtures() {
        for text in [METRICS, METRICS_2] {
            let fams = parse(text).unwrap();
            let declared = text.lines().filter(|l| l.starts_with("# TYPE vllm:")).count();
            let parsed = fams.iter().filter(|f| f.name.starts_with("vllm:")).count();
            assert_eq!(parsed, declared);
            let samples: usize = fams.iter().map(|f| f.samples.len()).sum();
            let lines = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();
            assert_eq!(samples, lines, "every sample line lands in a family");
        }
    }

    #[test]
    fn reads_counters_gauges_and_histograms() {
        let fams = parse(METRICS).unwrap();
        // Python's client names counter families with their `_total` in the 0.0.4 format.
        let prompt = family(&fams, "vllm:prompt_tokens_total");
        assert_eq!(prompt.kind, "counter");
        let total = prompt.samples.iter().find(|s| s.name == "vllm:prompt_tokens_total").unwrap();
        assert_eq!(total.value, 43.0);
        assert_eq!(total.labels, vec![("engine".into(), "0".into()), ("model_name".into(), "tiny".into())]);
        assert_eq!(family(&fams, "vllm:num_requests_running").kind, "gauge");
        let e2e = family(&fams, "vllm:e2e_request_latency_seconds");
        assert_eq!(e2e.kind, "histogram");
        assert!(
            e2e.samples.iter().any(
                |s| s.name.ends_with("_bucket") && s.labels.iter().any(|(k, v)| k == "le" && v == "+Inf")
            )
        );
        assert!(e2e.samples.iter().any(|s| s.name.ends_with("_count")));
    }

    #[test]
    fn malformed_pages_are_refused_whole() {
        for (bad, reason) in [
            ("vllm:x{a=\"1\"} abc\n", "bad value"),
            ("vllm:x{a=\"1} 1\n", "unterminated label value"),
            ("vllm:x{=\"1\"} 1\n", "bad label name"),
            ("9bad 1\n", "bad metric name"),
            ("vllm:x 1 2.5\n", "bad timestamp"),
            ("vllm:x 1 2 3\n", "trailing text after the sample"),
            ("# TYPE vllm:x sometype\n", "unknown metric type"),
            ("vllm:x\n", "missing value"),
        ] {
            let text = format!("# TYPE vllm:ok gauge\nvllm:ok 1\n{bad}");
            assert_eq!(parse(&text).unwrap_err(), ParseError { line: 3, reason }, "{bad:?}");
        }
    }

    #[test]
    fn old_names_gain_their_current_twins() {
        let mut fams = parse(
            "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n\
# TYPE vllm:time_per_output_token_seconds histogram\nvllm:time_per_output_token_seconds_bucket{le=\"+Inf\"} 3\n\
vllm:time_per_output_token_seconds_sum 0.3\nvllm:time_per_output_token_seconds_count 3\n",
        )
        .unwrap();
        add_current_names(&mut fams);
        let kv = family(&fams, "vllm:kv_cache_usage_perc");
        assert_eq!(kv.samples[0].value, 0.5);
        let itl = family(&fams, "vllm:inter_token_latency_seconds");
        assert_eq!(itl.samples[2].name, "vllm:inter_token_latency_seconds_count");
        // A current vLLM already has both: nothing is duplicated.
        let mut current = parse(METRICS).unwrap();
        let before = current.len();
        add_current_names(&mut current);
        assert_eq!(current.len(), before);
    }

    #[test]
    fn several_sources_share_one_family_block() {
        let fams =
            parse("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"a\"} 1\n")
                .unwrap();
        let mut out = String::new();
        write_sources(
            &mut out,
            &[(&fams, &[("vllm_instance", "x:1")]), (&fams, &[("vllm_instance", "y:2")])],
        );
        assert_eq!(out.matches("# TYPE vllm:num_requests_running gauge").count(), 1);
        assert!(out.contains("vllm:num_requests_running{model_name=\"a\",vllm_instance=\"x:1\"} 1.0\n"));
        assert!(out.contains("vllm:num_requests_running{model_name=\"a\",vllm_instance=\"y:2\"} 1.0\n"));
    }

    #[test]
    fn escapes_special_values_and_timestamps() {
        let fams = parse("m{a=\"x\\\"y\\\\z\\n\"} NaN 1700000000000\nn +Inf\n").unwrap();
        assert_eq!(fams[0].samples[0].labels[0].1, "x\"y\\z\n");
        assert!(fams[0].samples[0].value.is_nan());
        assert_eq!(fams[1].samples[0].value, f64::INFINITY);
    }

    #[test]
    fn writes_back_with_extra_labels_and_round_trips() {
        let fams = parse(METRICS).unwrap();
        let vllm: Vec<Family> = fams.into_iter().filter(|f| f.name.starts_with("vllm:")).collect();
        let mut out = String::new();
        write_sources(&mut out, &[(&vllm, &[("vllm_instance", "127.0.0.1:8011")])]);
        let again = parse(&out).unwrap();
        let kept: Vec<&Family> = vllm.iter().filter(|f| !is_created_shadow(f, &vllm)).collect();
        assert_eq!(again.len(), kept.len());
        assert!(kept.len() < vllm.len(), "the _created shadows are gone");
        assert!(
            out.contains("# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total{"),
            "OpenMetrics counter naming"
        );
        for (a, b) in kept.iter().zip(&again) {
            let expect =
                if a.kind == "counter" { a.name.strip_suffix("_total").unwrap_or(&a.name) } else { &a.name };
            assert_eq!(expect, b.name);
            let kept: Vec<&Sample> =
                a.samples.iter().filter(|s| !s.name.ends_with("_created") || s.name == a.name).collect();
            assert_eq!(kept.len(), b.samples.len(), "{}", a.name);
            for (x, y) in kept.iter().zip(&b.samples) {
                assert_eq!(x.name, y.name);
                assert!(x.value == y.value || (x.value.is_nan() && y.value.is_nan()));
                assert_eq!(
                    y.labels.last().unwrap(),
                    &("vllm_instance".to_string(), "127.0.0.1:8011".to_string())
                );
            }
        }
    }
}
