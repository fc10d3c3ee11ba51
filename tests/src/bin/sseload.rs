//! Load helper: `sseload ADDR CONNECTIONS SECONDS TOKENS [MODEL [DELAY_MS]]` streams
//! completions (of MODEL, default `load`; the server waits DELAY_MS, default 0, before each
//! token) over CONNECTIONS keep-alive connections for SECONDS, then prints `requests
//! content_events` it received. Used by `cargo xtask bench events` and `demo`.
use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use inferwatch_tests::client::{Client, Completion};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, connections, seconds, tokens, model, delay_ms) = match args.as_slice() {
        [a, c, s, t] => (a, c, s, t, "load".to_string(), 0.0),
        [a, c, s, t, m] => (a, c, s, t, m.clone(), 0.0),
        [a, c, s, t, m, d] => (a, c, s, t, m.clone(), d.parse().expect("DELAY_MS")),
        _ => {
            eprintln!("usage: sseload ADDR CONNECTIONS SECONDS TOKENS [MODEL [DELAY_MS]]");
            std::process::exit(2);
        }
    };
    let addr: SocketAddr = addr.parse().expect("ADDR");
    let connections: usize = connections.parse().expect("CONNECTIONS");
    let until = Instant::now() + Duration::from_secs_f64(seconds.parse().expect("SECONDS"));
    let tokens: u32 = tokens.parse().expect("TOKENS");
    let totals: Vec<(u64, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|_| {
                let model = model.clone();
                s.spawn(move || {
                    let mut client = Client::connect(addr);
                    let c = Completion {
                        model: model.clone(),
                        pad: 16,
                        max_tokens: tokens,
                        delay_ms,
                        stream: true,
                    };
                    let (mut requests, mut events) = (0u64, 0u64);
                    while Instant::now() < until {
                        events += client.request(&c).content_events as u64;
                        requests += 1;
                    }
                    (requests, events)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let requests: u64 = totals.iter().map(|t| t.0).sum();
    let events: u64 = totals.iter().map(|t| t.1).sum();
    println!("{requests} {events}");
}
