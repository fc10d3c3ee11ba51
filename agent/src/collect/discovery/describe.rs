//! The describe stage: what an instance says about itself (`/version`, `/v1/models`), asked
//! once per instance and again until it answers.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{
    collect::fetch,
    model::{
        instance::{Instance, Role},
        scrape::Target,
    },
};

/// `/version` and `/v1/models` of an instance.
pub(crate) type Description = (Option<String>, Vec<String>);

/// An instance's root process and listening addresses: a restart changes it.
type InstanceKey = (u32, Vec<std::net::SocketAddr>);

/// Longest any one round of describing may take, however many instances (or impersonators
/// that accept and never answer) there are.
const ROUND_DEADLINE: Duration = Duration::from_secs(3);
/// Each request's own limit.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// Waits before asking an instance that did not answer again: doubling from the first, up to
/// the last.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(300));
/// Bounds on what an instance says of itself, before it becomes a label value.
const MAX_VERSION: usize = 64;
const MAX_MODEL_NAME: usize = 256;
const MAX_MODELS: usize = 32;

struct Entry {
    description: Description,
    failures: u32,
    next_try: Instant,
}

/// Descriptions of the instances of the last scan.
#[derive(Default)]
pub(crate) struct Descriptions(HashMap<InstanceKey, Entry>);

impl Descriptions {
    /// The description of each of `instances`: those that have not answered yet (and whose
    /// back-off has run out) are asked concurrently, within one deadline.
    pub(crate) async fn of(&mut self, instances: &[Instance]) -> Vec<Description> {
        let key = |i: &Instance| (i.root_pid, i.listen.clone());
        self.0.retain(|k, _| instances.iter().any(|i| key(i) == *k));
        let now = Instant::now();
        let mut asking = tokio::task::JoinSet::new();
        let mut asked = Vec::new();
        for i in instances {
            let entry = self.0.entry(key(i)).or_insert(Entry {
                description: (None, Vec::new()),
                failures: 0,
                next_try: now,
            });
            if entry.description.0.is_none() && entry.next_try <= now {
                asked.push(key(i));
                let i = i.clone();
                asking.spawn(async move { (key(&i), describe(&i).await) });
            }
        }
        let mut answered = HashMap::new();
        let deadline = tokio::time::sleep(ROUND_DEADLINE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = asking.join_next() => match next {
                    Some(Ok((k, d))) => {
                        answered.insert(k, d);
                    }
                    Some(Err(_)) => {}
                    None => break,
                },
                () = &mut deadline => {
                    asking.abort_all();
                    break;
                }
            }
        }
        for k in asked {
            let Some(entry) = self.0.get_mut(&k) else { continue };
            let d = answered.remove(&k).unwrap_or_default();
            if d.0.is_some() {
                entry.failures = 0;
            } else {
                back_off(entry, now);
            }
            // Models without a version still count (the command line's are the fallback).
            if d.0.is_some() || !d.1.is_empty() {
                entry.description = d;
            }
        }
        instances
            .iter()
            .map(|i| self.0.get(&key(i)).map(|e| e.description.clone()).unwrap_or_default())
            .collect()
    }
}

fn back_off(e: &mut Entry, now: Instant) {
    let wait = BACKOFF.0.saturating_mul(1 << e.failures.min(16)).min(BACKOFF.1);
    e.failures += 1;
    e.next_try = now + wait;
}

/// Printable ASCII of at most `max` characters, or None.
fn bounded(text: String, max: usize) -> Option<String> {
    (!text.is_empty() && text.len() <= max && text.chars().all(|c| c.is_ascii_graphic() || c == ' '))
        .then_some(text)
}

/// `/version` and `/v1/models` of an instance (empty when it does not answer yet).
pub(crate) async fn describe(i: &Instance) -> Description {
    let (Some(addr), Some(api)) = (i.listen.first().copied(), i.pids(Role::ApiServer).next()) else {
        return (None, Vec::new());
    };
    let target = Target { addr, netns_of: Some(api) };
    let timeout = REQUEST_TIMEOUT;
    let version = fetch::get(&target, "/version", timeout, 1 << 16)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<Version>(&b).ok())
        .and_then(|v| bounded(v.version, MAX_VERSION));
    let models = fetch::get(&target, "/v1/models", timeout, 1 << 20)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<Models>(&b).ok())
        .map(|m| m.data.into_iter().filter_map(|m| bounded(m.id, MAX_MODEL_NAME)).take(MAX_MODELS).collect())
        .unwrap_or_default();
    (version, models)
}

/// vLLM's `/version`.
#[derive(serde::Deserialize)]
struct Version {
    version: String,
}

/// The OpenAI `/v1/models` list, as far as it matters here.
#[derive(serde::Deserialize)]
struct Models {
    data: Vec<Model>,
}

#[derive(serde::Deserialize)]
struct Model {
    id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_instance_says_is_bounded() {
        assert_eq!(bounded("0.32.0".into(), MAX_VERSION).as_deref(), Some("0.32.0"));
        assert_eq!(bounded("x".repeat(65), MAX_VERSION), None);
        assert_eq!(bounded("a\nb".into(), MAX_VERSION), None);
        assert_eq!(bounded(String::new(), MAX_VERSION), None);
    }

    #[test]
    fn silence_is_asked_again_later_and_later() {
        let now = Instant::now();
        let mut e = Entry { description: (None, Vec::new()), failures: 0, next_try: now };
        let waits: Vec<u64> = (0..10)
            .map(|_| {
                back_off(&mut e, now);
                (e.next_try - now).as_secs()
            })
            .collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }
}
