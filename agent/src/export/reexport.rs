//! vLLM's own families, re-exported on the agent's page: each instance's scraped families with
//! its labels added, one block per family name however many instances have it, in OpenMetrics.
//! (The agent's own families go through the registry; these are vLLM's text, passed on.)

use std::fmt::Write as _;

use crate::{
    collect::scrape::parse::valid_name,
    model::family::{Family, Sample},
};

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
pub(crate) type Source<'a> = (&'a [Family], &'a [(&'a str, &'a str)]);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::scrape::parse::parse;

    const METRICS: &str = include_str!("../../../tests/fixtures/vllm-0.32.0-cpu/metrics.txt");

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
