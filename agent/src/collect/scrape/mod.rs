//! Scraping each vLLM instance's own `/metrics`, on its own schedule; results go to the
//! aggregator as immutable snapshots. A hung or broken endpoint costs a timeout and a counted
//! error, never a half-parsed export.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

pub mod parse;

use crate::{
    collect::fetch,
    model::{
        family::Family,
        scrape::{ScrapeResult, ScrapeTarget},
    },
};

/// Largest `/metrics` page accepted.
const MAX_PAGE: usize = 32 << 20;

pub(crate) async fn run<M: From<ScrapeResult> + Send + 'static>(
    mut targets: watch::Receiver<Vec<ScrapeTarget>>,
    tx: mpsc::Sender<M>,
    interval: Duration,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // New instances are scraped at once, not a whole interval later.
            changed = targets.changed() => if changed.is_err() { return },
        }
        let current = targets.borrow_and_update().clone();
        let scrapes = current.into_iter().map(|t| tokio::spawn(scrape(t, timeout)));
        for handle in scrapes.collect::<Vec<_>>() {
            if let Ok(result) = handle.await
                && tx.send(result.into()).await.is_err()
            {
                return;
            }
        }
    }
}

pub(crate) async fn scrape(target: ScrapeTarget, timeout: Duration) -> ScrapeResult {
    let start = Instant::now();
    let outcome = match fetch::get(&target.target, "/metrics", timeout, MAX_PAGE).await {
        Err(e) => Err((e.reason(), e.to_string())),
        Ok(body) => match std::str::from_utf8(&body) {
            Err(_) => Err(("parse", "the page is not UTF-8".to_string())),
            Ok(text) => match parse::parse(text) {
                Err(e) => Err(("parse", e.to_string())),
                Ok(families) => {
                    let mut vllm: Vec<Family> =
                        families.into_iter().filter(|f| f.name.starts_with("vllm:")).collect();
                    parse::add_current_names(&mut vllm);
                    Ok(vllm)
                }
            },
        },
    };
    ScrapeResult { target, outcome, duration: start.elapsed() }
}
