//! Test server with the same protocol as `tests/servers/sse_app.py`, on Rust std sockets: it
//! receives with `recv` (recvfrom) and sends the head with `send` (sendto) and each SSE chunk
//! with one `writev` of two iovecs (size line, then data), as Node.js does.
//!
//! `sseserver PORT [IOVECS [LAST_PAD]]`: a thread per connection, keep-alive and pipelining
//! supported. With IOVECS (default 2) each chunk is written as that many iovecs (1: a plain
//! `write`), and the stream's end — the `[DONE]` chunk and the terminator — as one call of that
//! many, as Node.js does (a `writev` of 5 there); LAST_PAD bytes of padding in an event before `[DONE]`, in the same `writev`, put
//! the terminator beyond the agent's capture.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: sseserver PORT [IOVECS [LAST_PAD]]");
    let iovecs: usize = std::env::args().nth(2).and_then(|p| p.parse().ok()).unwrap_or(2);
    let last_pad: usize = std::env::args().nth(3).and_then(|p| p.parse().ok()).unwrap_or(0);
    let shape = Shape { iovecs: iovecs.clamp(1, 1024), last_pad };
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    println!("listening");
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = serve(stream, shape);
        });
    }
}

fn json_field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    let at = body.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = body[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return s.split('"').next();
    }
    Some(rest.split([',', '}']).next()?.trim())
}

/// How the stream's writes are cut.
#[derive(Clone, Copy)]
struct Shape {
    iovecs: usize,
    last_pad: usize,
}

fn serve(stream: TcpStream, shape: Shape) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body);
        if path != "/v1/completions" {
            out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found")?;
            continue;
        }
        let model = json_field(&body, "model").unwrap_or("test-model").to_string();
        let tokens: u32 = json_field(&body, "max_tokens").and_then(|v| v.parse().ok()).unwrap_or(8);
        let delay_ms: f64 = json_field(&body, "delay_ms").and_then(|v| v.parse().ok()).unwrap_or(2.0);
        let delay = Duration::from_secs_f64(delay_ms / 1000.0);
        let event = |text: &str| {
            format!(
                "data: {{\"id\":\"cmpl-test\",\"object\":\"text_completion\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"{text}\",\"finish_reason\":null}}]}}\n\n"
            )
        };
        if json_field(&body, "stream") == Some("true") {
            out.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            )?;
            send_chunk(&out, event("").as_bytes(), shape)?;
            for i in 0..tokens {
                thread::sleep(delay);
                send_chunk(&out, event(&format!(" t{i}")).as_bytes(), shape)?;
            }
            if shape.iovecs == 2 && shape.last_pad == 0 {
                send_chunk(&out, b"data: [DONE]\n\n", shape)?;
                out.write_all(b"0\r\n\r\n")?;
            } else {
                // The end in one call: [padding event,] [DONE], terminator.
                let mut end = Vec::new();
                if shape.last_pad > 0 {
                    // A usage chunk (no choices), as vLLM sends with `include_usage`, padded.
                    let pad = format!(
                        "data: {{\"id\":\"cmpl-test\",\"choices\":[],\"usage\":{{\"pad\":\"{}\"}}}}\n\n",
                        "u".repeat(shape.last_pad)
                    );
                    end.extend_from_slice(&chunk(pad.as_bytes()));
                }
                end.extend_from_slice(&chunk(b"data: [DONE]\n\n"));
                end.extend_from_slice(b"0\r\n\r\n");
                write_vectored(&out, &end, shape.iovecs)?;
            }
        } else {
            thread::sleep(delay * tokens);
            let text = " t".repeat(tokens as usize);
            let json = format!(
                "{{\"id\":\"cmpl-test\",\"object\":\"text_completion\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"{text}\"}}]}}"
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                json.len()
            );
            out.write_all(resp.as_bytes())?;
        }
    }
}

fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

/// One chunk in one `writev`: by default the size line and the data in separate iovecs, else
/// cut into `shape.iovecs` pieces.
fn send_chunk(out: &TcpStream, data: &[u8], shape: Shape) -> std::io::Result<()> {
    if shape.iovecs != 2 {
        return write_vectored(out, &chunk(data), shape.iovecs);
    }
    let size = format!("{:x}\r\n", data.len());
    let tail = [data, b"\r\n"].concat();
    let iov = [
        libc::iovec { iov_base: size.as_ptr() as *mut _, iov_len: size.len() },
        libc::iovec { iov_base: tail.as_ptr() as *mut _, iov_len: tail.len() },
    ];
    // SAFETY: both iovecs point to live buffers for the duration of the call.
    let n = unsafe { libc::writev(out.as_raw_fd(), iov.as_ptr(), 2) };
    if n as usize != size.len() + tail.len() {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `bytes` in one `writev` of exactly `count` iovecs (as equal as they come; empty ones when
/// `bytes` is shorter).
fn write_vectored(out: &TcpStream, bytes: &[u8], count: usize) -> std::io::Result<()> {
    if count == 1 {
        // One buffer: a plain `write`.
        return (&*out).write_all(bytes);
    }
    let (each, extra) = (bytes.len() / count, bytes.len() % count);
    let mut at = 0;
    let iov: Vec<libc::iovec> = (0..count)
        .map(|i| {
            let len = each + usize::from(i < extra);
            let v = libc::iovec { iov_base: bytes[at..].as_ptr() as *mut _, iov_len: len };
            at += len;
            v
        })
        .collect();
    // SAFETY: every iovec points into `bytes`, alive for the call.
    let n = unsafe { libc::writev(out.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
    if n as usize != bytes.len() {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
