//! A load client that records its own truth: when it sent each request and when it received
//! the first content event and the end of the response, on CLOCK_MONOTONIC like the kernel.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

/// CLOCK_MONOTONIC in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to an initialised timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One completion request as the test servers understand it. `pad` extra prompt bytes make
/// its size unique, which is how a test finds the agent's record of it.
#[derive(Clone, Debug)]
pub struct Completion {
    pub model: String,
    pub pad: usize,
    pub max_tokens: u32,
    pub delay_ms: f64,
    pub stream: bool,
}

impl Completion {
    pub fn bytes(&self) -> Vec<u8> {
        let body = format!(
            r#"{{"model":"{}","prompt":"{}","max_tokens":{},"delay_ms":{},"stream":{}}}"#,
            self.model,
            "p".repeat(self.pad),
            self.max_tokens,
            self.delay_ms,
            self.stream
        );
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// What the client saw of one request.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    pub request_bytes: u64,
    pub status: u16,
    /// Just before the request's `write`.
    pub sent_ns: u64,
    /// Just after it returned: on loopback the request is in the server's socket by then, so
    /// the true arrival lies in `sent_ns..=written_ns` even if the client was preempted.
    pub written_ns: u64,
    pub first_content_ns: Option<u64>,
    pub end_ns: u64,
    pub content_events: u32,
}

impl Truth {
    pub fn ttft_seconds(&self) -> Option<f64> {
        self.first_content_ns.map(|t| (t - self.sent_ns) as f64 / 1e9)
    }
    pub fn duration_seconds(&self) -> f64 {
        (self.end_ns - self.sent_ns) as f64 / 1e9
    }
    /// How far (ms) an agent's span from the request's arrival to `end_ns` lies outside what
    /// the client's clocks allow: the arrival is somewhere in `sent_ns..=written_ns`, so a
    /// client preempted inside its `write` widens the interval instead of counting as the
    /// agent's error.
    pub fn off_ms(&self, agent_seconds: f64, end_ns: u64) -> f64 {
        let lo = end_ns.saturating_sub(self.written_ns) as f64 / 1e9;
        let hi = end_ns.saturating_sub(self.sent_ns) as f64 / 1e9;
        (lo - agent_seconds).max(agent_seconds - hi).max(0.0) * 1e3
    }
}

/// Puts the calling thread in the real-time class: a client's clock is the truth the agent is
/// checked against, and on a busy two-core machine a normal thread can wait a whole scheduler
/// slice (several ms) to be woken by the first token, which is then the client's error, not the
/// agent's. Needs root, as every test that uses it does.
pub fn client_thread_realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter struct.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    assert_eq!(rc, 0, "SCHED_FIFO for a client thread: {}", std::io::Error::last_os_error());
}

pub struct Client {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let writer = TcpStream::connect(addr).expect("connect to the test server");
        writer.set_nodelay(true).unwrap();
        writer.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        Client { writer, reader }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Sends one request and reads its whole response.
    pub fn request(&mut self, c: &Completion) -> Truth {
        let bytes = c.bytes();
        let sent_ns = monotonic_ns();
        self.send_raw(&bytes);
        let written_ns = monotonic_ns();
        let mut truth = self.read_response(None);
        truth.request_bytes = bytes.len() as u64;
        truth.sent_ns = sent_ns;
        truth.written_ns = written_ns;
        truth
    }

    /// Reads one response; with `stop_after` content events, returns early (to abort).
    pub fn read_response(&mut self, stop_after: Option<u32>) -> Truth {
        let mut truth = Truth::default();
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        truth.status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        if !chunked {
            let mut body = vec![0u8; length.unwrap_or(0)];
            self.reader.read_exact(&mut body).expect("body");
            truth.end_ns = monotonic_ns();
            return truth;
        }
        let mut events = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim(), 16).expect("hex chunk size");
            if size == 0 {
                line.clear();
                self.reader.read_line(&mut line).expect("last CRLF");
                truth.end_ns = monotonic_ns();
                return truth;
            }
            let mut data = vec![0u8; size + 2];
            self.reader.read_exact(&mut data).expect("chunk");
            let now = monotonic_ns();
            events.push_str(&String::from_utf8_lossy(&data[..size]));
            while let Some(end) = events.find("\n\n") {
                let event: String = events.drain(..end + 2).collect();
                let has_content = event
                    .find("\"text\":")
                    .map(|i| event[i + 7..].trim_start())
                    .is_some_and(|v| v.starts_with('"') && !v[1..].starts_with('"'));
                if has_content {
                    truth.content_events += 1;
                    truth.first_content_ns.get_or_insert(now);
                    if stop_after == Some(truth.content_events) {
                        return truth;
                    }
                }
            }
        }
    }

    /// Closes the connection now (both directions), as a client that gives up does.
    pub fn abort(self) {
        let _ = self.writer.shutdown(Shutdown::Both);
    }

    /// Resets the connection (RST instead of FIN), as a client that crashes or times out hard.
    pub fn reset(self) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid socket and option value for the duration of the call.
        unsafe {
            libc::setsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(self.reader);
        drop(self.writer);
    }
}

/// Percentile (0..=100) of a sample, nearest rank.
/// The timing bar for a run's agent-minus-client offsets (ms): the median within 1 ms (a
/// systematic error, such as timing the wrong write, shows there), at most one offset in 50 (at
/// least one) beyond 3 ms and none beyond 30 ms. The single allowance is for a write whose
/// delivery the node's scheduler held up (a deferred softirq, a server preempted inside its
/// `write`): nearest-rank p99 of 20 or 80 values is their maximum, so one such write on a busy
/// two-core machine would otherwise fail a correct agent.
pub fn timing_bar(what: &str, offsets_ms: &[f64]) -> Result<(), String> {
    let median = percentile(offsets_ms, 50.0);
    let late: Vec<f64> = offsets_ms.iter().copied().filter(|&o| o > 3.0).collect();
    let allowed = (offsets_ms.len() / 50).max(1);
    let worst = offsets_ms.iter().copied().fold(0.0, f64::max);
    if median > 1.0 || late.len() > allowed || worst > 30.0 {
        return Err(format!(
            "{what}: median {median:.3} ms (bar 1), {} of {} beyond 3 ms (bar {allowed}): {late:.3?}, worst {worst:.3} ms (bar 30)",
            late.len(),
            offsets_ms.len()
        ));
    }
    Ok(())
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timing_bar_allows_one_held_write_but_not_a_systematic_error() {
        let good = vec![0.05; 20];
        assert!(timing_bar("good", &good).is_ok());
        let mut one_held = good.clone();
        one_held[7] = 4.7;
        assert!(timing_bar("one held", &one_held).is_ok());
        let mut two_held = one_held.clone();
        two_held[3] = 3.5;
        assert!(timing_bar("two held of 20", &two_held).is_err());
        let mut far = good.clone();
        far[0] = 31.0;
        assert!(timing_bar("far", &far).is_err());
        // Every request timed one 2 ms event early: the median shows it.
        assert!(timing_bar("systematic", &[2.0; 80]).is_err());
        let mut of_100 = vec![0.05; 100];
        of_100[1] = 4.0;
        of_100[2] = 4.0;
        assert!(timing_bar("two of 100", &of_100).is_ok());
    }

    #[test]
    fn the_client_interval_absorbs_a_slow_write() {
        let t = Truth { sent_ns: 1_000_000, written_ns: 5_000_000, end_ns: 20_000_000, ..Truth::default() };
        // The request arrived anywhere in 1–5 ms: spans of 15–19 ms are exact.
        assert_eq!(t.off_ms(0.017, t.end_ns), 0.0);
        assert!((t.off_ms(0.020, t.end_ns) - 1.0).abs() < 1e-9);
        assert!((t.off_ms(0.014, t.end_ns) - 1.0).abs() < 1e-9);
    }
}
