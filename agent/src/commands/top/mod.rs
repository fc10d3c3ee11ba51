//! `inferwatch top`: a live terminal view of a node's vLLM, fed only by the agent's HTTP API
//! (`/api/v1/instances`, `/metrics`, `/api/v1/requests`), so it works against a remote agent
//! and rides out agent restarts. [`state`] fetches what to show; [`view`] draws it, a pure
//! function of the snapshot.

mod state;
pub mod view;

use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};

use self::{state::Fetcher, view::ViewState};
use crate::cli::TopArgs;

pub(crate) async fn run(args: TopArgs) -> Result<()> {
    let color = std::env::var_os("NO_COLOR").is_none() && std::env::var("TERM").map_or(true, |t| t != "dumb");
    let mut fetcher = Fetcher::new(&args.agent);
    let mut view = ViewState { color, ..Default::default() };
    let mut terminal = ratatui::init();
    let mut snapshot = fetcher.fetch(&args.agent).await;
    let mut last = Instant::now();
    let result: Result<()> = loop {
        if !view.paused && last.elapsed() >= args.interval {
            snapshot = fetcher.fetch(&args.agent).await;
            last = Instant::now();
        }
        if let Err(e) = terminal.draw(|f| view::render(f, &snapshot, &view)) {
            break Err(e.into());
        }
        let key = tokio::task::block_in_place(|| -> std::io::Result<Option<KeyCode>> {
            if event::poll(Duration::from_millis(100))?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
            {
                return Ok(Some(k.code));
            }
            Ok(None)
        });
        match key {
            Err(e) => break Err(e.into()),
            Ok(Some(KeyCode::Char('q') | KeyCode::Esc)) => break Ok(()),
            Ok(Some(KeyCode::Char('p'))) => view.paused = !view.paused,
            Ok(Some(KeyCode::Char('s'))) => view.sort = view.sort.next(),
            Ok(Some(KeyCode::Char('m'))) => {
                let mut models: Vec<String> = snapshot.requests.iter().map(|r| r.model.clone()).collect();
                models.sort();
                models.dedup();
                view.model = match &view.model {
                    None => models.first().cloned(),
                    Some(m) => models.iter().position(|x| x == m).and_then(|i| models.get(i + 1)).cloned(),
                };
                view.selected = 0;
            }
            Ok(Some(KeyCode::Down | KeyCode::Char('j'))) => view.selected += 1,
            Ok(Some(KeyCode::Up | KeyCode::Char('k'))) => view.selected = view.selected.saturating_sub(1),
            _ => {}
        }
        view.selected = view.selected.min(view::listed(&snapshot, &view).len().saturating_sub(1));
    };
    ratatui::restore();
    result
}
