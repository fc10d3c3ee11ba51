//! `inferwatch top`'s frame as text (ratatui's TestBackend) on recorded snapshots: the golden
//! frame beside this file, the honest states, the keys and the waterfall's scale.

use inferwatch::commands::top::view::{
    InstanceRow, RequestRow, Snapshot, Sort, ViewState, listed, render, waterfall_lines,
};
use ratatui::{Terminal, backend::TestBackend};

fn recorded() -> Snapshot {
    Snapshot {
        agent: "http://127.0.0.1:9420".into(),
        error: None,
        instances: vec![InstanceRow {
            id: "localhost:8000".into(),
            model: "tiny".into(),
            version: "0.32.0".into(),
            requests_per_second: 12.5,
            running: 3.0,
            waiting: 1.0,
            kernel_ttft_ms: Some((9.7, 31.2)),
            vllm_ttft_ms: Some((5.6, 20.0)),
            duration_ms: Some((52.0, 120.0)),
            tokens_per_second: 410.0,
            kv_cache: 0.12,
        }],
        gpus: None,
        requests: vec![
            RequestRow {
                age_s: 1.0,
                model: "tiny".into(),
                route: "/v1/completions".into(),
                status: 200,
                outcome: "complete".into(),
                content_events: 4,
                headers_ms: Some(2.2),
                queued_ms: Some(1.2),
                frontend_in_ms: Some(2.7),
                engine_first_ms: Some(5.6),
                ttft_ms: Some(9.7),
                duration_ms: 15.7,
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            },
            RequestRow {
                age_s: 3.0,
                model: "other".into(),
                route: "/v1/chat/completions".into(),
                status: 200,
                outcome: "aborted".into(),
                duration_ms: 40.0,
                ..Default::default()
            },
        ],
    }
}

fn frame_text(s: &Snapshot, v: &ViewState, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| render(f, s, v)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..h)
        .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn golden_frame_at_80x24() {
    let text = frame_text(&recorded(), &ViewState::default(), 80, 24);
    let golden = include_str!("top_view.golden.txt");
    assert_eq!(text, golden.trim_end_matches('\n'), "frame:\n{text}");
}

#[test]
fn honest_states_and_keys() {
    let text = frame_text(
        &Snapshot { agent: "a".into(), gpus: None, ..Default::default() },
        &ViewState::default(),
        80,
        24,
    );
    assert!(text.contains("no vLLM found"), "{text}");
    let down = Snapshot { agent: "a".into(), error: Some("connection refused".into()), ..Default::default() };
    assert!(
        frame_text(&down, &ViewState::default(), 80, 24).contains("agent unreachable: connection refused")
    );
    let s = recorded();
    let v = ViewState { model: Some("other".into()), ..Default::default() };
    assert_eq!(listed(&s, &v).len(), 1);
    let v = ViewState { sort: Sort::SlowestDuration, ..Default::default() };
    assert_eq!(listed(&s, &v)[0].duration_ms, 40.0);
    let text = frame_text(&s, &ViewState { paused: true, ..Default::default() }, 120, 40);
    assert!(text.contains("PAUSED") && text.contains("frontend_in 2.7"), "{text}");
}

#[test]
fn waterfall_is_to_scale() {
    let lines = waterfall_lines(&recorded().requests[0], 60);
    let bar = |i: usize| lines[i].to_string().chars().filter(|c| *c == '█').count();
    assert_eq!(bar(0), 0);
    assert!(bar(1) > 0 && lines[1].to_string().contains("queued 1.2"), "the wait before the read");
    assert!(bar(3) > bar(1), "handed to the engine after the read");
    assert!(bar(5) > bar(3), "first token after the hand-off");
    assert_eq!(bar(6), 10, "the end fills the bar (its minimum width at 60 columns)");
    let wide = waterfall_lines(&recorded().requests[0], 120);
    assert_eq!(wide[6].to_string().chars().filter(|c| *c == '█').count(), 120 - 12 - 9 - 2 - 28);
}
