//! Scrape targets and results: what discovery hands the scraper, and what the scraper hands
//! the aggregator.

use std::{net::SocketAddr, time::Duration};

use super::family::Family;

/// Where to reach a server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    /// Connect from inside this process's network namespace, when it is not ours.
    pub netns_of: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeTarget {
    /// The `vllm_instance` label.
    pub id: String,
    pub target: Target,
    /// Labels added to every re-exported sample (`vllm_instance`, `container_id`, `pod_uid`).
    pub labels: Vec<(String, String)>,
}

/// Samples re-exported per vLLM instance at most (vLLM 0.32 with one model: ~1,100).
pub const MAX_VLLM_SAMPLES: usize = 50_000;

#[derive(Debug)]
pub struct ScrapeResult {
    pub target: ScrapeTarget,
    /// The `vllm:*` families, current names added; or the reason and detail of the failure.
    pub outcome: Result<Vec<Family>, (&'static str, String)>,
    pub duration: Duration,
    /// Samples of the page left out: beyond the scraper's cap, not parsed at all.
    pub dropped: u64,
}
