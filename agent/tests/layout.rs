//! The shape of agent/src, checked: imports between its rooms run one way (the README's
//! "Layout"), `model` imports nothing of the agent, nothing imports `run` or `commands`, and no
//! source file is over 600 lines before its tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Each room and the rooms it may import. Data flows kernel, collect → aggregator → export;
/// `requests` is the aggregator's pure helper; `api` and `commands` are the clients' side.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("kernel", &["model"]),
    ("requests", &["model"]),
    ("collect", &["model", "requests"]),
    ("aggregator", &["model", "kernel", "requests", "collect"]),
    ("export", &["model", "aggregator", "collect"]),
    ("api", &["model", "collect"]),
    ("cli", &["model", "requests", "aggregator", "export"]),
    ("commands", &["api", "cli", "collect", "requests"]),
    ("run", &["model", "kernel", "requests", "collect", "aggregator", "export", "cli"]),
];

const MAX_LINES: usize = 600;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room a file belongs to: its first component under src/ (`lib` and `main` for the roots).
fn room(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// The file without its unit tests (everything from the first `#[cfg(test)]` item on, which is
/// where this project keeps them) and without comments.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end].lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The rooms a piece of code names through `crate::`: plain paths and `use crate::{…}` groups.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first segment of each path at the group's top level.
            let (mut depth, mut want, mut word) = (1, true, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        want = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if want && depth == 1 {
                    if c.is_alphanumeric() || c == '_' {
                        word.push(c);
                        continue;
                    }
                    if c.is_whitespace() && word.is_empty() {
                        continue;
                    }
                    want = false;
                }
                if !word.is_empty() {
                    found.insert(std::mem::take(&mut word));
                }
            }
        } else {
            let word: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            found.insert(word);
        }
    }
    found
}

#[test]
fn rooms_import_one_way_and_files_stay_small() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap();
        let code = code(&text);
        let lines = text.find("#[cfg(test)]").map_or(text.lines().count(), |i| text[..i].lines().count());
        if lines > MAX_LINES {
            problems
                .push(format!("{}: {lines} lines before its tests (at most {MAX_LINES})", file.display()));
        }
        let from = room(file);
        if from == "lib" || from == "main" {
            continue;
        }
        let Some(may) = allowed.get(from.as_str()) else {
            problems.push(format!("{}: room {from} is not in the layout", file.display()));
            continue;
        };
        for to in imports(&code) {
            if to == from || to == "self" || to == "super" {
                continue;
            }
            graph.entry(from.clone()).or_default().insert(to.clone());
            if !may.contains(&to.as_str()) {
                problems.push(format!("{}: {from} imports {to}", file.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // And so no cycle: the allowed table is itself acyclic.
    fn reaches(graph: &[(&str, &[&str])], from: &str, to: &str, seen: &mut BTreeSet<String>) -> bool {
        let next = graph.iter().find(|(r, _)| *r == from).map_or(&[][..], |(_, n)| *n);
        next.iter().any(|n| *n == to || (seen.insert(n.to_string()) && reaches(graph, n, to, seen)))
    }
    for (room, _) in ALLOWED {
        assert!(!reaches(ALLOWED, room, room, &mut BTreeSet::new()), "{room} can reach itself");
    }
    println!("import graph of agent/src: {graph:#?}");
}

#[test]
fn the_import_scanner_sees_groups_and_paths() {
    let code = "use crate::{\n    collect::procfs,\n    kernel::{A, b::C},\n    model::x as y,\n};\nlet v = crate::api::Client::new();";
    let found: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(found, ["api", "collect", "kernel", "model"]);
}
