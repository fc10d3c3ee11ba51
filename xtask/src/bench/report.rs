//! BENCHMARKS.md sections written by the benchmarks themselves: each run replaces the text
//! between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` with its command, date, machine
//! and numbers. What is written by hand (analysis, before/after) lives outside the markers.

use std::process::Command;

use crate::cmd::{self, Result};

/// Prints a benchmark's result and stores it in BENCHMARKS.md under `section`.
pub fn record(name: &str, section_name: &str, args: &[String], body: &str) -> Result {
    let command = std::iter::once(format!("cargo xtask bench {name}"))
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let section =
        format!("_`{command}` · {} · {} · inferwatch {}_\n\n{}", now(), machine(), revision(), body.trim());
    println!("\n{section}\n");
    let path = cmd::root().join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|_| "# inferwatch benchmarks\n".into());
    std::fs::write(&path, replace_section(&doc, section_name, &section))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("bench: {section_name} written to {}", path.display());
    Ok(())
}

/// The opening and closing markers of section `name`.
fn markers(name: &str) -> (String, String) {
    (format!("<!-- bench:{name} -->"), format!("<!-- /bench:{name} -->"))
}

/// The text between the markers of section `name` of `doc`, if it has one.
pub fn section<'a>(doc: &'a str, name: &str) -> Option<&'a str> {
    let (open, close) = markers(name);
    let start = doc.find(&open)? + open.len();
    let end = start + doc[start..].find(&close)?;
    Some(&doc[start..end])
}

/// `doc` with the section `name` replaced by `content`, or with it appended when absent.
pub fn replace_section(doc: &str, name: &str, content: &str) -> String {
    let (open, close) = markers(name);
    let block = format!("{open}\n{}\n{close}", content.trim());
    match (doc.find(&open), doc.find(&close)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &doc[..a], &doc[b + close.len()..]),
        _ => format!("{}\n\n{block}\n", doc.trim_end()),
    }
}

fn now() -> String {
    cmd::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// CPUs, memory, CPU model and kernel, e.g. `2 × Intel Xeon …, 24 GiB, kernel 6.18.44`.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = cmd::output(Command::new("uname").arg("-r")).unwrap_or_default();
    format!("{cpus} × {model}, {:.0} GiB, kernel {}", mem_kib as f64 / (1024.0 * 1024.0), kernel.trim())
}

/// The commit measured, `-dirty` when the tree has changes (other than this file's own).
fn revision() -> String {
    let rev =
        cmd::output(Command::new("git").arg("-C").arg(cmd::root()).args(["rev-parse", "--short", "HEAD"]))
            .unwrap_or_else(|| "unknown".into());
    let dirty = cmd::output(Command::new("git").arg("-C").arg(cmd::root()).args([
        "status",
        "--porcelain",
        "--",
        ".",
        ":!BENCHMARKS.md",
    ]))
    .is_some_and(|s| !s.trim().is_empty());
    format!("{}{}", rev.trim(), if dirty { "-dirty" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_in_place_and_the_rest_kept() {
        let doc = "# B\n\nintro\n<!-- bench:wrk -->\nold\n<!-- /bench:wrk -->\nanalysis\n";
        let out = replace_section(doc, "wrk", "new numbers");
        assert_eq!(out, "# B\n\nintro\n<!-- bench:wrk -->\nnew numbers\n<!-- /bench:wrk -->\nanalysis\n");
    }

    #[test]
    fn a_section_is_read_back() {
        let doc = "x\n<!-- bench:vllm -->\nA\n<!-- /bench:vllm -->\n<!-- bench:vllm-control -->\nB\n<!-- /bench:vllm-control -->\n";
        assert_eq!(section(doc, "vllm"), Some("\nA\n"));
        assert_eq!(section(doc, "vllm-control"), Some("\nB\n"));
        assert_eq!(section(doc, "wrk"), None);
    }

    #[test]
    fn a_missing_section_is_appended() {
        let out = replace_section("# B\n", "vllm", "x");
        assert_eq!(out, "# B\n\n<!-- bench:vllm -->\nx\n<!-- /bench:vllm -->\n");
        assert_eq!(
            replace_section(&out, "vllm", "y"),
            "# B\n\n<!-- bench:vllm -->\ny\n<!-- /bench:vllm -->\n"
        );
    }
}
