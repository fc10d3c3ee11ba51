//! Test server with the same protocol as `tests/servers/sse_app.py`, on Rust std sockets: it
//! receives with `recv` (recvfrom) and sends the head with `send` (sendto) and each SSE chunk
//! with one `writev` of two iovecs (size line, then data), as Node.js does.
//!
//! `sseserver PORT`: a thread per connection, keep-alive and pipelining supported.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).expect("usage: sseserver PORT");
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    println!("listening");
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = serve(stream);
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

fn serve(stream: TcpStream) -> std::io::Result<()> {
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
            send_chunk(&out, event("").as_bytes())?;
            for i in 0..tokens {
                thread::sleep(delay);
                send_chunk(&out, event(&format!(" t{i}")).as_bytes())?;
            }
            send_chunk(&out, b"data: [DONE]\n\n")?;
            out.write_all(b"0\r\n\r\n")?;
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

/// One chunk in one `writev`: the size line and the data in separate iovecs.
fn send_chunk(out: &TcpStream, data: &[u8]) -> std::io::Result<()> {
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
