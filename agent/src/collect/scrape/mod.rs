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
        scrape::{MAX_VLLM_SAMPLES, ScrapeResult, ScrapeTarget},
    },
};

/// Largest `/metrics` page accepted (vLLM's, with one model, is ~100 KiB).
const MAX_PAGE: usize = 8 << 20;
/// Samples parsed per page at most (one more than the aggregator keeps, so it can tell a page
/// that reached its cap); the rest of a page is not even read.
const MAX_SAMPLES: usize = MAX_VLLM_SAMPLES + 1;

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
    let mut dropped = 0;
    let outcome = match fetch::get(&target.target, "/metrics", timeout, MAX_PAGE).await {
        Err(e) => Err((e.reason(), e.to_string())),
        // Parsing runs on the blocking pool, within what is left of the scrape's time: a page
        // built to be slow to parse holds up no async worker and no other scrape.
        Ok(body) => {
            let parsing = tokio::task::spawn_blocking(move || parse_page(&body));
            match tokio::time::timeout(timeout.saturating_sub(start.elapsed()), parsing).await {
                Err(_) => {
                    Err(("timeout", "parsing the page took longer than the scrape timeout".to_string()))
                }
                Ok(Err(e)) => Err(("parse", format!("the parser failed: {e}"))),
                Ok(Ok(Err(e))) => Err(("parse", e)),
                Ok(Ok(Ok((families, left_out)))) => {
                    dropped = left_out;
                    Ok(families)
                }
            }
        }
    };
    ScrapeResult { target, outcome, duration: start.elapsed(), dropped }
}

/// The `vllm:*` families of a page (current names added), and how many samples were left out.
fn parse_page(body: &[u8]) -> Result<(Vec<Family>, u64), String> {
    let text = std::str::from_utf8(body).map_err(|_| "the page is not UTF-8".to_string())?;
    let (families, dropped) = parse::parse_capped(text, MAX_SAMPLES).map_err(|e| e.to_string())?;
    let mut vllm: Vec<Family> = families.into_iter().filter(|f| f.name.starts_with("vllm:")).collect();
    parse::add_current_names(&mut vllm);
    Ok((vllm, dropped))
}
