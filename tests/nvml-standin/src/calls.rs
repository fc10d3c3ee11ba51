//! Calls per NVML function, written to the scenario's `calls_file` (or
//! `INFERWATCH_NVML_CALLS`) as JSON whenever they changed, at most every 100 ms, so a test can
//! compare them with what the collector reports it called.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

struct Counts {
    calls: BTreeMap<&'static str, u64>,
    dirty: bool,
    written: Option<Instant>,
}

static COUNTS: Mutex<Counts> = Mutex::new(Counts { calls: BTreeMap::new(), dirty: false, written: None });

pub fn count(function: &'static str) {
    let mut c = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    *c.calls.entry(function).or_default() += 1;
    c.dirty = true;
}

/// Writes the counts (atomically: a new file renamed over the old) if they changed and the last
/// write is 100 ms old; `file` is the scenario's, else `INFERWATCH_NVML_CALLS`.
pub fn flush_to(file: Option<&Path>) {
    let from_env = std::env::var_os("INFERWATCH_NVML_CALLS");
    let Some(file) = file.or(from_env.as_deref().map(Path::new)) else { return };
    let text = {
        let mut c = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
        if !c.dirty || c.written.is_some_and(|w| w.elapsed() < Duration::from_millis(100)) {
            return;
        }
        c.dirty = false;
        c.written = Some(Instant::now());
        serde_json::to_string(&c.calls).unwrap_or_default()
    };
    let staging = file.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&staging, text).is_ok() {
        let _ = std::fs::rename(&staging, file);
    }
}
