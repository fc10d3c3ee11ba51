//! What `inferwatch top` draws: a pure function of a [`Snapshot`] and the view state, so the
//! frame is tested as text (ratatui's TestBackend) on recorded snapshots (`agent/tests/top_view.rs`,
//! with its golden frame). Public for that test only.

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Paragraph, Row, Table},
};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceRow {
    pub id: String,
    pub model: String,
    pub version: String,
    pub requests_per_second: f64,
    pub running: f64,
    pub waiting: f64,
    pub kernel_ttft_ms: Option<(f64, f64)>,
    pub vllm_ttft_ms: Option<(f64, f64)>,
    pub duration_ms: Option<(f64, f64)>,
    pub tokens_per_second: f64,
    pub kv_cache: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuRow {
    pub index: String,
    pub name: String,
    pub utilization: f64,
    pub memory_used_gib: f64,
    pub memory_total_gib: f64,
    pub power_w: f64,
    pub temperature_c: f64,
    pub throttled: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestRow {
    pub age_s: f64,
    pub model: String,
    pub route: String,
    pub status: u64,
    pub outcome: String,
    pub content_events: u64,
    pub headers_ms: Option<f64>,
    /// Arrival → the server's first read (waiting in the socket).
    pub queued_ms: Option<f64>,
    pub frontend_in_ms: Option<f64>,
    pub engine_first_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    /// Its trace (the client's, or the one the agent exported it in).
    pub trace_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub agent: String,
    /// Set while the agent does not answer.
    pub error: Option<String>,
    pub instances: Vec<InstanceRow>,
    /// None: the agent has no GPU collector data.
    pub gpus: Option<Vec<GpuRow>>,
    pub requests: Vec<RequestRow>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sort {
    #[default]
    Recent,
    SlowestTtft,
    SlowestDuration,
}

impl Sort {
    pub fn next(self) -> Self {
        match self {
            Sort::Recent => Sort::SlowestTtft,
            Sort::SlowestTtft => Sort::SlowestDuration,
            Sort::SlowestDuration => Sort::Recent,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Sort::Recent => "recent",
            Sort::SlowestTtft => "slowest TTFT",
            Sort::SlowestDuration => "slowest",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ViewState {
    pub sort: Sort,
    /// Only requests of this model.
    pub model: Option<String>,
    pub paused: bool,
    pub selected: usize,
    pub color: bool,
}

/// The requests as listed: filtered by model, sorted.
pub fn listed<'a>(s: &'a Snapshot, v: &ViewState) -> Vec<&'a RequestRow> {
    let mut rows: Vec<&RequestRow> =
        s.requests.iter().filter(|r| v.model.as_ref().is_none_or(|m| &r.model == m)).collect();
    match v.sort {
        Sort::Recent => rows.sort_by(|a, b| a.age_s.total_cmp(&b.age_s)),
        Sort::SlowestTtft => {
            rows.sort_by(|a, b| b.ttft_ms.unwrap_or(-1.0).total_cmp(&a.ttft_ms.unwrap_or(-1.0)))
        }
        Sort::SlowestDuration => rows.sort_by(|a, b| b.duration_ms.total_cmp(&a.duration_ms)),
    }
    rows
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") })
}

fn pair(v: Option<(f64, f64)>) -> String {
    v.map_or("-".into(), |(a, b)| format!("{}/{}", ms(Some(a)), ms(Some(b))))
}

pub fn render(frame: &mut Frame, s: &Snapshot, v: &ViewState) {
    let style = |c: Color| if v.color { Style::default().fg(c) } else { Style::default() };
    let bold = if v.color { Style::default().add_modifier(Modifier::BOLD) } else { Style::default() };
    let area = frame.area();
    let gpu_rows = s.gpus.as_ref().map_or(1, |g| g.len().max(1)) as u16;
    let [header, instances, gpus, requests, waterfall] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(s.instances.len().max(1) as u16 + 3),
        Constraint::Length(gpu_rows + 2),
        Constraint::Min(4),
        Constraint::Length(9),
    ])
    .areas(area);

    let model = v.model.as_deref().unwrap_or("all");
    let mut title =
        format!("inferwatch top  {}  [s]ort:{} [m]odel:{} [p]ause [q]uit", s.agent, v.sort.label(), model);
    if v.paused {
        title.push_str("  PAUSED");
    }
    frame.render_widget(Paragraph::new(Line::from(Span::styled(title, bold))), header);

    let block = |t: &str| Block::default().borders(Borders::ALL).title(t.to_string());
    if let Some(e) = &s.error {
        frame.render_widget(
            Paragraph::new(format!("agent unreachable: {e}\nretrying every second…"))
                .style(style(Color::Red))
                .block(block("vLLM")),
            instances,
        );
    } else if s.instances.is_empty() {
        frame.render_widget(
            Paragraph::new("no vLLM found on this node (the agent sees no vLLM process)")
                .block(block("vLLM")),
            instances,
        );
    } else {
        let rows = s.instances.iter().map(|i| {
            Row::new(vec![
                i.id.clone(),
                i.model.clone(),
                format!("{:.1}", i.requests_per_second),
                format!("{:.0}/{:.0}", i.running, i.waiting),
                pair(i.kernel_ttft_ms),
                pair(i.vllm_ttft_ms),
                pair(i.duration_ms),
                format!("{:.0}", i.tokens_per_second),
                format!("{:.0}%", i.kv_cache * 100.0),
            ])
        });
        let widths = [15, 7, 5, 6, 9, 9, 9, 5, 4].map(Constraint::Length);
        let head = Row::new([
            "instance",
            "model",
            "req/s",
            "run/wt",
            "TTFT",
            "vLLM TTFT",
            "duration",
            "tok/s",
            "KV",
        ])
        .style(bold);
        let title = "vLLM: p50/p99 ms, TTFT as the kernel saw it and vLLM's own";
        frame.render_widget(Table::new(rows, widths).header(head).block(block(title)), instances);
    }

    match &s.gpus {
        None => frame
            .render_widget(Paragraph::new("no GPU data (no NVML on this node)").block(block("GPUs")), gpus),
        Some(list) => {
            let rows = list.iter().map(|g| {
                Row::new(vec![
                    g.index.clone(),
                    g.name.clone(),
                    format!("{:.0}%", g.utilization * 100.0),
                    format!("{:.1}/{:.1} GiB", g.memory_used_gib, g.memory_total_gib),
                    format!("{:.0} W", g.power_w),
                    format!("{:.0} °C", g.temperature_c),
                    if g.throttled { "THROTTLED".into() } else { String::new() },
                ])
                .style(if g.throttled { style(Color::Yellow) } else { Style::default() })
            });
            let widths = [4, 18, 5, 16, 7, 6, 10].map(Constraint::Length);
            frame.render_widget(Table::new(rows, widths).block(block("GPUs")), gpus);
        }
    }

    let list = listed(s, v);
    let selected = v.selected.min(list.len().saturating_sub(1));
    let rows = list.iter().enumerate().map(|(n, r)| {
        let row = Row::new(vec![
            format!("{:.0}s", r.age_s),
            r.route.trim_start_matches("/v1/").to_string(),
            r.model.clone(),
            format!("{}", r.status),
            if r.outcome == "complete" { String::new() } else { r.outcome.clone() },
            ms(r.ttft_ms),
            ms(Some(r.duration_ms)),
        ]);
        if n == selected { row.style(Style::default().add_modifier(Modifier::REVERSED)) } else { row }
    });
    let widths = [5, 17, 12, 4, 8, 9, 9].map(Constraint::Length);
    let head = Row::new(["ago", "route", "model", "st", "", "TTFT ms", "total ms"]).style(bold);
    let title = format!("requests ({}, {} shown)", v.sort.label(), list.len());
    frame.render_widget(Table::new(rows, widths).header(head).block(block(&title)), requests);

    let wf = list.get(selected).map_or_else(
        || vec![Line::from("no request yet")],
        |r| waterfall_lines(r, waterfall.width.saturating_sub(2)),
    );
    let title = match list.get(selected).and_then(|r| r.trace_id.as_deref()) {
        Some(trace) => format!("waterfall of the selected request, trace {trace}"),
        None => "waterfall of the selected request".to_string(),
    };
    frame.render_widget(Paragraph::new(wf).block(block(&title)), waterfall);
}

/// The selected request drawn to scale: one line per milestone, bars from its arrival.
pub fn waterfall_lines(r: &RequestRow, width: u16) -> Vec<Line<'static>> {
    let read = r.queued_ms.unwrap_or(0.0);
    let handed = r.frontend_in_ms.map(|v| read + v);
    let first_output = handed.zip(r.engine_first_ms).map(|(a, b)| a + b);
    let marks: [(&str, Option<f64>, String); 7] = [
        (if r.queued_ms.is_some() { "arrived" } else { "received" }, Some(0.0), String::new()),
        (
            "read",
            r.queued_ms,
            r.queued_ms
                .map_or("arrival not seen: from here".to_string(), |v| format!("queued {}", ms(Some(v)))),
        ),
        ("headers", r.headers_ms, String::new()),
        (
            "to engine",
            handed,
            r.frontend_in_ms.map_or(String::new(), |v| format!("frontend_in {}", ms(Some(v)))),
        ),
        (
            "engine out",
            first_output,
            r.engine_first_ms.map_or(String::new(), |v| format!("engine_first {}", ms(Some(v)))),
        ),
        (
            "first token",
            r.ttft_ms,
            first_output
                .zip(r.ttft_ms)
                .map_or(String::new(), |(o, t)| format!("frontend_out {}", ms(Some(t - o)))),
        ),
        ("end", Some(r.duration_ms), format!("{} content events, {}", r.content_events, r.outcome)),
    ];
    let label_w = 12usize;
    // Label, time, the two bar ends and room for the note; the bar takes the rest.
    let bar_w = (width as usize).saturating_sub(label_w + 9 + 2 + 28).max(10);
    marks
        .iter()
        .map(|(name, at, note)| match at {
            Some(t) => {
                let filled = if r.duration_ms > 0.0 {
                    ((t / r.duration_ms) * bar_w as f64).round() as usize
                } else {
                    0
                };
                let bar: String = "█".repeat(filled.min(bar_w)) + &" ".repeat(bar_w - filled.min(bar_w));
                Line::from(format!("{name:<label_w$}{:>8} |{bar}| {note}", ms(Some(*t))))
            }
            None => {
                let note = if note.is_empty() { "not seen" } else { note.as_str() };
                Line::from(format!("{name:<label_w$}{:>8} |{}| {note}", "-", " ".repeat(bar_w)))
            }
        })
        .collect()
}
