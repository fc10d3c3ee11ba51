//! A real OTLP/HTTP receiver for the tests: accepts `POST /v1/traces` (protobuf), decodes each
//! export with the official proto definitions (`opentelemetry-proto`), and keeps the spans and
//! the raw bytes. It can answer the first exports with 503 to exercise the exporter's retries.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value, trace::v1::Span,
};
use prost::Message;

/// A span with the `service.name` of the resource it came under.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

#[derive(Default)]
struct State {
    spans: Vec<Received>,
    raw: Vec<u8>,
    exports: usize,
    refuse_first: usize,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    /// Listens on a free loopback port; the first `refuse_first` exports get 503.
    pub fn start(refuse_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State { refuse_first, ..State::default() }));
        let shared = state.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = shared.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        Receiver { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.state.lock().unwrap().spans.clone()
    }

    /// Every byte every export carried (to search for what must never be there).
    pub fn raw(&self) -> Vec<u8> {
        self.state.lock().unwrap().raw.clone()
    }

    pub fn exports(&self) -> usize {
        self.state.lock().unwrap().exports
    }

    /// Waits until `done` holds for the spans received (at most `timeout`).
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() > deadline {
                return spans;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn serve(stream: std::net::TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let post = line.starts_with("POST /v1/traces ");
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let status = {
            let mut s = state.lock().unwrap();
            if !post {
                "404 Not Found"
            } else if s.refuse_first > 0 {
                s.refuse_first -= 1;
                "503 Service Unavailable"
            } else {
                let export = ExportTraceServiceRequest::decode(body.as_slice()).expect("a valid OTLP export");
                s.exports += 1;
                s.raw.extend_from_slice(&body);
                for resource in export.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            s.spans.push(Received { service: service.clone(), span });
                        }
                    }
                }
                "200 OK"
            }
        };
        writer.write_all(
            format!("HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                .as_bytes(),
        )?;
    }
}

/// A span's string or integer attribute, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    })
}
