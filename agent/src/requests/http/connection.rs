//! One TCP connection of a server: requests in, responses out, in order (keep-alive and
//! pipelining), with the timestamps a client would see.

use std::collections::VecDeque;

use super::{
    Transfer,
    chunked::{Dechunker, Piece},
    exchange::{Gap, ID_SCAN, Outcome, Pending, Progress, Started, finished, new_pending, response_id},
    head::{
        MAX_HEAD, decimal, may_be_request, method_label, names, read_head, request_line_start, take_sized,
    },
    routes::{model_from_body, route_of},
    sse::{EventClass, SseParser},
};
use crate::model::trace::TraceContext;
/// Request body bytes kept to find the `"model"`.
const KEEP_BODY: usize = 1024;
/// Requests queued on one connection (pipelined, their responses not begun) at most; beyond,
/// the connection is no longer followed until it starts a request afresh.
const MAX_PENDING: usize = 64;

/// When a request's first byte reached the server, as far as the kernel tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Arrival {
    /// When its first byte reached the socket; the first read where the kernel cannot tell.
    pub(super) at: u64,
    /// The read that returned it.
    pub(super) read: u64,
    /// Whether `at` comes from the kernel (else it is the read).
    pub(super) known: bool,
    /// For a connection's first request: when the connection was established.
    pub(super) established: Option<u64>,
}

impl Arrival {
    /// The arrival of the bytes of `t`, read at `ts`: the kernel's stamp when it has one (times
    /// after the read are ignored), else the read itself. The establishment is reported beside
    /// it, never used as the start: a client may open a connection long before it sends.
    fn of(ts: u64, t: &Transfer<'_>) -> Self {
        let valid = |v: u64| Some(v).filter(|&v| v != 0 && v <= ts);
        let at = valid(t.arrival_ns);
        Self { at: at.unwrap_or(ts), read: ts, known: at.is_some(), established: valid(t.established_ns) }
    }
}

#[derive(Debug)]
enum Inbound {
    /// Reading a request head; `started` is the arrival of its first byte.
    Head {
        buf: Vec<u8>,
        started: Option<Arrival>,
    },
    /// Request body of known remaining length.
    Sized {
        remaining: u64,
    },
    Chunked(Dechunker),
    /// Framing lost (a head cut by the capture, a body we could not delimit): wait for a
    /// transfer that starts with a request line.
    Lost,
    /// The connection's first bytes were not an HTTP request: nothing more is followed.
    NotHttp,
}

#[derive(Debug)]
enum Outbound {
    Head {
        buf: Vec<u8>,
    },
    Sized {
        remaining: u64,
    },
    Chunked(Dechunker),
    /// Body delimited by the server closing the connection.
    UntilClose,
    /// Framing lost: wait for a transfer that starts with a status line.
    Lost,
}

#[derive(Debug)]
pub struct Connection {
    inbound: Inbound,
    outbound: Outbound,
    /// Requests in order; the front one is being answered.
    pending: VecDeque<Pending>,
    sse: Option<SseParser>,
    /// Whether a request head was ever parsed here (tells HTTP from anything else).
    seen_request: bool,
    closed: bool,
    /// Time of the last transfer out, to end a response whose framing was lost.
    last_sent_ns: u64,
}

impl Default for Connection {
    fn default() -> Self {
        Self {
            inbound: Inbound::Head { buf: Vec::new(), started: None },
            outbound: Outbound::Head { buf: Vec::new() },
            pending: VecDeque::new(),
            sse: None,
            seen_request: false,
            closed: false,
            last_sent_ns: 0,
        }
    }
}

impl Connection {
    /// Whether this is the server side of HTTP: a request was read on it.
    pub fn is_http_server(&self) -> bool {
        self.seen_request
    }

    /// Requests in flight (head received, response not over).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Heap bytes held for partial heads and events (what a slow client can make grow).
    pub fn buffered(&self) -> usize {
        let head = |buf: &Vec<u8>| buf.capacity();
        let inbound = match &self.inbound {
            Inbound::Head { buf, .. } => head(buf),
            _ => 0,
        };
        let outbound = match &self.outbound {
            Outbound::Head { buf } => head(buf),
            _ => 0,
        };
        inbound + outbound + self.sse.as_ref().map_or(0, SseParser::buffered)
    }

    /// [`Self::receive_into`], into a fresh [`Progress`].
    #[cfg(test)]
    pub fn received(&mut self, ts: u64, known: &[u8], total: usize) -> Progress {
        let mut up = Progress::default();
        self.receive_into(ts, known, total, &mut up);
        up
    }

    /// Bytes the server received: `total` of them, the first `known.len()` seen.
    pub fn receive_into(&mut self, ts: u64, known: &[u8], total: usize, up: &mut Progress) {
        self.receive_transfer(ts, Transfer { head: known, total, ..Transfer::default() }, up);
    }

    /// Bytes the server received, with the transfer's last bytes when it was longer than the
    /// capture.
    pub fn receive_transfer(&mut self, ts: u64, t: Transfer<'_>, up: &mut Progress) {
        if self.closed {
            return;
        }
        if matches!(self.inbound, Inbound::Lost) && request_line_start(t.head) {
            self.inbound = Inbound::Head { buf: Vec::new(), started: None };
        }
        let arrival = Arrival::of(ts, &t);
        self.receive_part(arrival, t.head, t.gap(), t.total, up);
        if !t.tail.is_empty() {
            self.receive_part(arrival, t.tail, 0, t.total, up);
        }
    }

    /// `data` then `gap` unseen bytes of a transfer of `total`.
    fn receive_part(
        &mut self,
        arrival: Arrival,
        mut data: &[u8],
        mut gap: usize,
        total: usize,
        up: &mut Progress,
    ) {
        while !data.is_empty() || gap > 0 {
            match &mut self.inbound {
                Inbound::Lost | Inbound::NotHttp => break,
                Inbound::Head { buf, started } => {
                    if data.is_empty() {
                        // The rest of this head is beyond the capture.
                        let (buf, started) = (std::mem::take(buf), started.unwrap_or(arrival));
                        self.head_cut(&buf, started, total as u64, up);
                        break;
                    }
                    started.get_or_insert(arrival);
                    match read_head(buf, data) {
                        Some((head, used)) => {
                            data = &data[used..];
                            let started = started.unwrap_or(arrival);
                            if let Err(reason) = self.request_head(&head, started, up) {
                                self.not_http(reason, up);
                                break;
                            }
                        }
                        None if !self.seen_request && !may_be_request(buf) => {
                            self.not_http("not_http", up);
                            break;
                        }
                        None if buf.len() >= MAX_HEAD => {
                            let (buf, started) = (std::mem::take(buf), started.unwrap_or(arrival));
                            self.head_cut(&buf, started, total as u64, up);
                            break;
                        }
                        None => data = &[],
                    }
                }
                Inbound::Sized { remaining } => {
                    let (body, skipped, done) = take_sized(remaining, &mut data, &mut gap);
                    self.request_body(body, skipped, done, up);
                    if done {
                        self.inbound = Inbound::Head { buf: Vec::new(), started: None };
                    }
                }
                Inbound::Chunked(d) => {
                    let mut body = Vec::new();
                    let mut skipped = 0;
                    if !data.is_empty() {
                        let n = d.feed(data, &mut |p| {
                            if let Piece::Data(b) = p {
                                body.extend_from_slice(b)
                            }
                        });
                        data = &data[n..];
                    } else {
                        skipped = d.gap(gap, &mut |_| {});
                        gap -= skipped;
                    }
                    let (done, lost) = (d.is_done(), d.is_lost());
                    self.request_body(&body, skipped, done || lost, up);
                    if done {
                        self.inbound = Inbound::Head { buf: Vec::new(), started: None };
                    } else if lost {
                        self.inbound = Inbound::Lost;
                    }
                }
            }
        }
    }

    fn not_http(&mut self, reason: &'static str, up: &mut Progress) {
        up.not_http = Some(reason);
        if self.seen_request {
            self.inbound = Inbound::Lost;
        } else {
            self.inbound = Inbound::NotHttp;
            self.outbound = Outbound::Lost;
        }
    }

    /// A request head cut short by the capture: keep what its request line says, and pick the
    /// inbound stream up again at the next request line.
    fn head_cut(&mut self, buf: &[u8], started: Arrival, bytes: u64, up: &mut Progress) {
        self.inbound = Inbound::Lost;
        if buf.is_empty() {
            // Unseen bytes between requests: nothing to report, resume at the next request line.
            return;
        }
        let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return self.not_http("not_http", up);
        };
        if !request_line_start(buf) {
            return self.not_http("not_http", up);
        }
        self.seen_request = true;
        let mut req = new_pending(method_label(method), route_of(target), started, bytes);
        req.started = true;
        up.started.push(Started { conn_id: 0, route: req.route, model: None });
        self.pending.push_back(req);
    }

    fn request_head(&mut self, head: &[u8], started: Arrival, up: &mut Progress) -> Result<(), &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("bad_request_head"),
            Err(_) => return Err("not_http"),
        }
        let method = method_label(req.method.unwrap_or(""));
        let route = route_of(req.path.unwrap_or(""));
        let mut content_length = None;
        let mut chunked = false;
        let (mut traceparent, mut tracestate) = (None, Vec::new());
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = decimal(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = names(h.value, b"chunked");
            } else if h.name.eq_ignore_ascii_case("traceparent") {
                traceparent = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("tracestate") {
                // Several `tracestate` headers are one list (W3C), joined here up to the limit.
                if !tracestate.is_empty() {
                    tracestate.push(b',');
                }
                // One byte past the limit at most: enough for the check to refuse it.
                let room = (crate::model::trace::MAX_TRACESTATE + 1).saturating_sub(tracestate.len());
                tracestate.extend_from_slice(&h.value[..h.value.len().min(room)]);
            }
        }
        let tracestate = (!tracestate.is_empty()).then_some(tracestate.as_slice());
        let trace = traceparent.and_then(|t| TraceContext::parse(t, tracestate));
        self.seen_request = true;
        if self.pending.len() >= MAX_PENDING {
            return Err("too_many_pipelined");
        }
        let mut pending = new_pending(method, route, started, head.len() as u64);
        pending.trace = trace;
        self.pending.push_back(pending);
        if chunked {
            self.inbound = Inbound::Chunked(Dechunker::default());
        } else if let Some(n) = content_length.filter(|n| *n > 0) {
            self.inbound = Inbound::Sized { remaining: n };
        } else {
            self.inbound = Inbound::Head { buf: Vec::new(), started: None };
            self.request_body(&[], 0, true, up);
        }
        Ok(())
    }

    /// Body bytes of the newest request; `done` when its body is complete.
    fn request_body(&mut self, known: &[u8], skipped: usize, done: bool, up: &mut Progress) {
        let Some(req) = self.pending.back_mut() else { return };
        req.request_bytes += (known.len() + skipped) as u64;
        if !req.started {
            let room = KEEP_BODY.saturating_sub(req.body.len());
            req.body.extend_from_slice(&known[..known.len().min(room)]);
            if done || skipped > 0 || req.body.len() >= KEEP_BODY {
                req.model = model_from_body(&req.body);
                req.body = Vec::new();
                req.started = true;
                up.started.push(Started { conn_id: 0, route: req.route, model: req.model.clone() });
            }
        }
    }

    /// [`Self::send_into`], into a fresh [`Progress`].
    #[cfg(test)]
    pub fn sent(&mut self, ts: u64, known: &[u8], total: usize) -> Progress {
        let mut up = Progress::default();
        self.send_into(ts, known, total, &mut up);
        up
    }

    /// Bytes the server sent: `total` of them, the first `known.len()` seen. What they reveal
    /// is added to `up` (the caller reuses one, so a request allocates no update of its own).
    pub fn send_into(&mut self, ts: u64, known: &[u8], total: usize, up: &mut Progress) {
        self.send_transfer(ts, Transfer { head: known, total, ..Transfer::default() }, up);
    }

    /// Bytes the server sent, with the transfer's last bytes when it was longer than the
    /// capture: a chunked body stays in step across the unseen middle when that lies inside a
    /// chunk, and its end is seen in any case.
    pub fn send_transfer(&mut self, ts: u64, t: Transfer<'_>, up: &mut Progress) {
        let (known, total) = (t.head, t.total);
        if self.closed || matches!(self.inbound, Inbound::NotHttp) {
            return;
        }
        if known.starts_with(b"HTTP/1.") {
            match &self.outbound {
                // A new response while the previous one's end was lost: that one ended before.
                Outbound::Lost | Outbound::UntilClose => {
                    let end = self.last_sent_ns;
                    if self.pending.front().is_some_and(|r| r.headers_ns.is_some()) {
                        self.finish_front(end, Outcome::Complete, up);
                    }
                    self.outbound = Outbound::Head { buf: Vec::new() };
                }
                _ => {}
            }
        }
        if let Outbound::Chunked(d) = &mut self.outbound {
            d.resync(known);
        }
        self.last_sent_ns = ts;
        // Whole transfers count for the response in progress when they start (exact in sum;
        // pipelined responses sharing one write are attributed to the first).
        if let Some(front) = self.pending.front_mut() {
            front.response_bytes += total as u64;
        }
        self.send_part(ts, known, t.gap(), up);
        if !t.tail.is_empty() {
            self.send_part(ts, t.tail, 0, up);
        }
        if let Some(sse) = &mut self.sse {
            let mut classes = Vec::new();
            sse.transfer_end(&mut |c| classes.push(c));
            for c in classes {
                self.sse_event(c, ts, up);
            }
        }
        // A chunked stream whose framing was lost still ends visibly with the last chunk.
        if let Outbound::Chunked(d) = &self.outbound
            && d.is_lost()
            && super::ends_chunked_body(&t)
        {
            self.finish_front(ts, Outcome::Complete, up);
        }
    }

    /// `data` then `gap` unseen bytes of a transfer out.
    fn send_part(&mut self, ts: u64, mut data: &[u8], mut gap: usize, up: &mut Progress) {
        while !data.is_empty() || gap > 0 {
            match &mut self.outbound {
                Outbound::Lost => break,
                Outbound::UntilClose => {
                    self.body_bytes(data, gap, ts, up);
                    break;
                }
                Outbound::Head { buf } => {
                    if data.is_empty() {
                        // A head beyond the capture: its framing is unknown.
                        self.outbound = Outbound::Lost;
                        break;
                    }
                    match read_head(buf, data) {
                        Some((head, used)) => {
                            data = &data[used..];
                            self.response_head(&head, ts, up);
                        }
                        None if buf.len() >= MAX_HEAD => {
                            self.outbound = Outbound::Lost;
                            break;
                        }
                        None => data = &[],
                    }
                }
                Outbound::Sized { remaining } => {
                    let (body, skipped, done) = take_sized(remaining, &mut data, &mut gap);
                    self.body_bytes(body, skipped, ts, up);
                    if done {
                        self.finish_front(ts, Outcome::Complete, up);
                    }
                }
                Outbound::Chunked(d) => {
                    let mut pieces: Vec<Result<Vec<u8>, usize>> = Vec::new();
                    if !data.is_empty() {
                        let n = d.feed(data, &mut |p| match p {
                            Piece::Data(b) => pieces.push(Ok(b.to_vec())),
                            Piece::Gap(n) => pieces.push(Err(n)),
                        });
                        data = &data[n..];
                    } else {
                        let n = d.gap(gap, &mut |p| {
                            if let Piece::Gap(n) = p {
                                pieces.push(Err(n))
                            }
                        });
                        gap -= n;
                    }
                    let (done, lost) = (d.is_done(), d.is_lost());
                    for piece in pieces {
                        match piece {
                            Ok(b) => self.body_bytes(&b, 0, ts, up),
                            Err(n) => self.body_bytes(&[], n, ts, up),
                        }
                    }
                    if done {
                        self.finish_front(ts, Outcome::Complete, up);
                    } else if lost {
                        // Wait for a transfer that starts a chunk (see resync), or the terminator.
                        break;
                    }
                }
            }
        }
    }

    fn response_head(&mut self, head: &[u8], ts: u64, up: &mut Progress) {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if !matches!(resp.parse(head), Ok(httparse::Status::Complete(_))) {
            self.outbound = Outbound::Lost;
            return;
        }
        let status = resp.code.unwrap_or(0);
        let mut content_length = None;
        let mut chunked = false;
        let mut sse = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = decimal(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = names(h.value, b"chunked");
            } else if h.name.eq_ignore_ascii_case("content-type") {
                let v = h.value.trim_ascii();
                sse = v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream");
            }
        }
        if (100..200).contains(&status) && status != 101 {
            // Interim response (100 Continue, 103 Early Hints): the final one follows.
            self.outbound = Outbound::Head { buf: Vec::new() };
            return;
        }
        let Some(req) = self.pending.front_mut() else {
            // A response to a request we never saw (watching began mid-connection).
            self.outbound = Outbound::Lost;
            return;
        };
        req.status = status;
        req.headers_ns = Some(ts);
        req.stream = sse;
        let head_only = req.method == "HEAD" || status == 204 || status == 304;
        self.sse = sse.then(SseParser::default);
        if status == 101 {
            self.finish_front(ts, Outcome::Complete, up);
            self.inbound = Inbound::NotHttp;
            self.outbound = Outbound::Lost;
        } else if head_only || (content_length == Some(0) && !chunked) {
            self.finish_front(ts, Outcome::Complete, up);
        } else if chunked {
            self.outbound = Outbound::Chunked(Dechunker::default());
        } else if let Some(n) = content_length {
            self.outbound = Outbound::Sized { remaining: n };
        } else {
            self.outbound = Outbound::UntilClose;
        }
    }

    fn body_bytes(&mut self, known: &[u8], gap: usize, ts: u64, up: &mut Progress) {
        if let Some(req) = self.pending.front_mut()
            && req.response_id.is_none()
            && req.id_scan.len() < ID_SCAN
        {
            let room = ID_SCAN - req.id_scan.len();
            req.id_scan.extend_from_slice(&known[..known.len().min(room)]);
            req.response_id = response_id(&req.id_scan);
            if req.response_id.is_some() || gap > 0 {
                req.id_scan = Vec::new();
            }
        }
        let Some(sse) = &mut self.sse else { return };
        let mut classes = Vec::new();
        sse.feed(known, &mut |c| classes.push(c));
        if gap > 0 {
            sse.gap();
        }
        for c in classes {
            self.sse_event(c, ts, up);
        }
    }

    fn sse_event(&mut self, class: EventClass, ts: u64, up: &mut Progress) {
        let Some(req) = self.pending.front_mut() else { return };
        req.events += 1;
        if let EventClass::Usage { input, output } = class {
            req.usage = Some((input, output));
        }
        if class == EventClass::Content {
            req.content_events += 1;
            if req.first_token_ns.is_none() {
                req.first_token_ns = Some(ts);
            }
            if let Some(last) = req.last_content_ns {
                let gap = ts.saturating_sub(last);
                req.max_chunk_gap_ns = Some(req.max_chunk_gap_ns.map_or(gap, |m| m.max(gap)));
                up.gaps.push(Gap { conn_id: 0, ns: gap });
            }
            req.last_content_ns = Some(ts);
        }
    }

    fn finish_front(&mut self, ts: u64, outcome: Outcome, up: &mut Progress) {
        self.sse = None;
        self.outbound = Outbound::Head { buf: Vec::new() };
        if let Some(req) = self.pending.pop_front() {
            if !req.started {
                up.started.push(Started { conn_id: 0, route: req.route, model: req.model.clone() });
            }
            up.finished.push(finished(req, ts, outcome));
        }
    }

    /// [`Self::close_into`], into a fresh [`Progress`].
    #[cfg(test)]
    pub fn closed(&mut self, ts: u64) -> Progress {
        let mut up = Progress::default();
        self.close_into(ts, &mut up);
        up
    }

    /// The connection ended (peer EOF, reset, close). What is still open is aborted, except a
    /// body delimited by the close itself.
    pub fn close_into(&mut self, ts: u64, up: &mut Progress) {
        self.end_into(ts, Outcome::Aborted, up);
    }

    /// The connection is no longer followed (evicted from a full table): what is still open
    /// ends as `outcome`.
    pub fn end_into(&mut self, ts: u64, outcome: Outcome, up: &mut Progress) {
        if self.closed {
            return;
        }
        self.closed = true;
        if matches!(self.outbound, Outbound::UntilClose) {
            self.finish_front(ts, Outcome::Complete, up);
        }
        while let Some(req) = self.pending.pop_front() {
            if !req.started {
                up.started.push(Started { conn_id: 0, route: req.route, model: req.model.clone() });
            }
            up.finished.push(finished(req, ts, outcome));
        }
    }
}
