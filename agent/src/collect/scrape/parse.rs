//! The Prometheus text exposition format (0.0.4), as vLLM serves it, parsed into families.
//! Unlike the `prometheus-parse` crate this keeps metric names with `:` (all of vLLM's), and it
//! refuses a malformed page as a whole: nothing half-parsed is ever re-exported.

pub use crate::model::family::{Family, Sample};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

pub(crate) fn valid_name(name: &str) -> bool {
    name.chars().next().is_some_and(is_name_start) && name.chars().all(is_name_char)
}

/// Families by name (names are unique: a family is only added under a name none has).
type Index = foldhash::HashMap<String, usize>;

/// The family a sample belongs to: among the declared families whose name it equals or extends
/// with a known suffix, the one declared last. A few hash lookups, however many families.
fn family_of(sample: &str, index: &Index) -> Option<usize> {
    const SUFFIXES: [&str; 7] = ["", "_total", "_created", "_bucket", "_sum", "_count", "_info"];
    SUFFIXES.iter().filter_map(|s| index.get(sample.strip_suffix(s)?).copied()).max()
}

/// The family named `name`, added (untyped, no help) if there is none.
fn family_named(families: &mut Vec<Family>, index: &mut Index, name: &str) -> usize {
    if let Some(&i) = index.get(name) {
        return i;
    }
    families.push(Family { name: name.into(), help: String::new(), kind: "untyped".into(), samples: vec![] });
    index.insert(name.to_string(), families.len() - 1);
    families.len() - 1
}

/// A page, parsed whole.
pub fn parse(text: &str) -> Result<Vec<Family>, ParseError> {
    parse_capped(text, usize::MAX).map(|(families, _)| families)
}

/// A page, parsed up to `max_samples` samples: the rest of the page is not read (a huge page
/// costs no more than its cap), and the samples left out are counted (one per remaining line
/// that is not a comment). Returns the families and that count.
pub fn parse_capped(text: &str, max_samples: usize) -> Result<(Vec<Family>, u64), ParseError> {
    let mut families: Vec<Family> = Vec::new();
    let mut index = Index::default();
    let mut samples = 0usize;
    let mut lines = text.lines().enumerate();
    for (i, raw) in lines.by_ref() {
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
                    let at = family_named(&mut families, &mut index, name);
                    families[at].help = unescape_help(help.unwrap_or(""));
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
                    let at = family_named(&mut families, &mut index, name);
                    if !families[at].samples.is_empty() {
                        return Err(err("TYPE after samples"));
                    }
                    families[at].kind = kind.into();
                }
                _ => {} // other comments
            }
            continue;
        }
        if samples >= max_samples {
            let rest = lines.filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')).count();
            return Ok((families, rest as u64 + 1));
        }
        let sample = parse_sample(line).map_err(err)?;
        let at = match family_of(&sample.name, &index) {
            Some(i) => i,
            None => family_named(&mut families, &mut index, &sample.name.clone()),
        };
        families[at].samples.push(sample);
        samples += 1;
    }
    Ok((families, 0))
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

    #[test]
    fn a_page_beyond_the_cap_is_cut_and_counted_and_families_are_found_by_hash() {
        let mut page = String::from("# TYPE vllm:a counter\n");
        for i in 0..1000 {
            page.push_str(&format!("vllm:a_total{{i=\"{i}\"}} 1\n# a comment\n"));
        }
        let (families, dropped) = parse_capped(&page, 300).unwrap();
        assert_eq!(families[0].samples.len(), 300);
        assert_eq!(dropped, 700);
        assert_eq!(parse_capped(&page, 5000).unwrap().1, 0);
        // Many families, each found again by name (TYPE then HELP then samples).
        let wide: String =
            (0..2_000).map(|i| format!("# TYPE f{i} counter\n# HELP f{i} h{i}\nf{i}_total {i}\n")).collect();
        let families = parse(&wide).unwrap();
        assert_eq!(families.len(), 2_000);
        assert!(families.iter().enumerate().all(|(i, f)| f.help == format!("h{i}") && f.samples.len() == 1));
    }

    const METRICS: &str = include_str!("../../../../tests/fixtures/vllm-0.32.0-cpu/metrics.txt");
    const METRICS_2: &str =
        include_str!("../../../../tests/fixtures/vllm-0.32.0-cpu/metrics-api-server-count-2.txt");

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
    fn escapes_special_values_and_timestamps() {
        let fams = parse("m{a=\"x\\\"y\\\\z\\n\"} NaN 1700000000000\nn +Inf\n").unwrap();
        assert_eq!(fams[0].samples[0].labels[0].1, "x\"y\\z\n");
        assert!(fams[0].samples[0].value.is_nan());
        assert_eq!(fams[1].samples[0].value, f64::INFINITY);
    }
}
