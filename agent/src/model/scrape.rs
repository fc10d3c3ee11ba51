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

#[derive(Debug)]
pub struct ScrapeResult {
    pub target: ScrapeTarget,
    /// The `vllm:*` families, current names added; or the reason and detail of the failure.
    pub outcome: Result<Vec<Family>, (&'static str, String)>,
    pub duration: Duration,
}
