//! Assembly on recorded byte streams: the vLLM 0.32 captures (tests/fixtures, copied from
//! shared/fixtures) split at every byte boundary, and the awkward cases of HTTP/1.1.

use super::{Connection, FinishedRequest, Outcome, Started};

/// What the started requests say, without their connection.
fn pairs(started: &[Started]) -> Vec<(&'static str, Option<String>)> {
    started.iter().map(|s| (s.route, s.model.clone())).collect()
}

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../../../../tests/fixtures/vllm-0.32.0-cpu/", $name)).as_slice()
    };
}

const COMPLETIONS_STREAM: &[u8] = fixture!("completions-stream.raw");
const CHAT_STREAM: &[u8] = fixture!("chat-stream.raw");
const COMPLETIONS_NONSTREAM: &[u8] = fixture!("completions-nonstream.raw");
const BAD_MODEL: &[u8] = fixture!("completions-bad-model.raw");
const MODELS: &[u8] = fixture!("models.raw");

fn request(route: &str, body: &str) -> Vec<u8> {
    format!("POST {route} HTTP/1.1\r\nhost: 127.0.0.1:8011\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

const STREAM_BODY: &str = r#"{"model":"tiny","prompt":"hi","max_tokens":4,"stream":true}"#;

/// Feeds one request at t=1000 and the response as `writes` (each with its time), capturing
/// at most `capture` bytes of each transfer; returns everything that finished.
fn exchange(req: &[u8], writes: &[(u64, &[u8])], capture: usize) -> Vec<FinishedRequest> {
    let mut c = Connection::default();
    let mut done = Vec::new();
    done.extend(c.received(1000, &req[..req.len().min(capture)], req.len()).finished);
    for (ts, w) in writes {
        done.extend(c.sent(*ts, &w[..w.len().min(capture)], w.len()).finished);
    }
    done
}

fn position_after(haystack: &[u8], needle: &[u8], then: &[u8]) -> usize {
    let start = haystack.windows(needle.len()).position(|w| w == needle).unwrap();
    start + haystack[start..].windows(then.len()).position(|w| w == then).unwrap() + then.len()
}

fn expected_id(response: &[u8]) -> &'static str {
    if response == CHAT_STREAM { "chatcmpl-8e16167c5c6a3a7e" } else { "cmpl-be618ddab538b76a" }
}

/// The response split in two at every byte: same request, same counts, and the first token
/// timed by the write in which the first content event completes.
fn check_every_split(route: &str, response: &[u8], first_content: &[u8], events: u32, content: u32) {
    let req = request(route, STREAM_BODY);
    let first_content_end = position_after(response, first_content, b"\n\n");
    for cut in 1..response.len() {
        let done = exchange(&req, &[(2000, &response[..cut]), (3000, &response[cut..])], usize::MAX);
        assert_eq!(done.len(), 1, "cut {cut}");
        let r = &done[0];
        assert_eq!((r.status, r.outcome, r.stream), (200, Outcome::Complete, true), "cut {cut}");
        assert_eq!((r.events, r.content_events), (events, content), "cut {cut}");
        assert_eq!(r.model.as_deref(), Some("tiny"));
        assert_eq!(r.route, route);
        assert_eq!(r.response_bytes, response.len() as u64);
        assert_eq!(r.request_bytes, req.len() as u64);
        let expect_first = if cut >= first_content_end { 2000 } else { 3000 };
        assert_eq!(r.first_token_ns, Some(expect_first), "cut {cut}");
        assert_eq!(r.end_ns, 3000, "cut {cut}: the terminator is in the second write");
        assert_eq!(r.received_ns, 1000);
        assert_eq!(r.response_id.as_deref(), Some(expected_id(response)), "cut {cut}");
    }
    // And byte by byte.
    let writes: Vec<(u64, &[u8])> =
        (0..response.len()).map(|i| (10_000 + i as u64, &response[i..i + 1])).collect();
    let done = exchange(&req, &writes, usize::MAX);
    assert_eq!((done[0].events, done[0].content_events), (events, content));
    assert_eq!(done[0].first_token_ns, Some(10_000 + first_content_end as u64 - 1));
    assert_eq!(done[0].end_ns, 10_000 + response.len() as u64 - 1);
}

#[test]
fn completions_stream_split_at_every_byte() {
    check_every_split("/v1/completions", COMPLETIONS_STREAM, b"\"text\":\" at\"", 6, 2);
}

#[test]
fn chat_stream_split_at_every_byte_skips_the_role_chunk() {
    // The role chunk and an empty delta carry no content: the first token is the third event.
    check_every_split("/v1/chat/completions", CHAT_STREAM, "\"content\":\"Ķ\"".as_bytes(), 6, 3);
}

/// Splits a raw response the way vLLM writes it: the head, then one write per chunk.
fn vllm_writes(response: &[u8]) -> Vec<&[u8]> {
    let head_end = position_after(response, b"HTTP/1.1", b"\r\n\r\n");
    let mut writes = vec![&response[..head_end]];
    let mut pos = head_end;
    while pos < response.len() {
        let line_end = response[pos..].windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        let size =
            usize::from_str_radix(std::str::from_utf8(&response[pos..pos + line_end - 2]).unwrap(), 16)
                .unwrap();
        let end = pos + line_end + size + 2;
        writes.push(&response[pos..end]);
        pos = end;
    }
    writes
}

#[test]
fn vllm_write_pattern_gives_headers_first_token_and_end_times() {
    let writes = vllm_writes(COMPLETIONS_STREAM);
    assert_eq!(writes.len(), 8, "head, 6 events, terminator");
    let timed: Vec<(u64, &[u8])> =
        writes.iter().enumerate().map(|(i, w)| (2000 + 1000 * i as u64, *w)).collect();
    for capture in [usize::MAX, 1024, 512] {
        let r = &exchange(&request("/v1/completions", STREAM_BODY), &timed, capture)[0];
        assert_eq!(r.headers_ns, Some(2000), "capture {capture}");
        assert_eq!(r.first_token_ns, Some(3000), "capture {capture}");
        assert_eq!(r.end_ns, 9000, "capture {capture}");
        assert_eq!((r.events, r.content_events), (6, 2), "capture {capture}");
        assert_eq!(r.max_chunk_gap_ns, Some(3000), "capture {capture}: content at 3000 and 6000");
        assert_eq!(r.response_bytes, COMPLETIONS_STREAM.len() as u64);
    }
}

#[test]
fn a_small_capture_keeps_framing_and_errs_towards_content() {
    let writes = vllm_writes(COMPLETIONS_STREAM);
    let req = request("/v1/completions", STREAM_BODY);
    let mut c = Connection::default();
    c.received(1000, &req, req.len());
    assert!(c.sent(2000, writes[0], writes[0].len()).finished.is_empty());
    // 64 bytes of each event: chunk sizes are seen, the events' text fields are not.
    let mut done = Vec::new();
    for (i, w) in writes[1..].iter().enumerate() {
        done.extend(c.sent(3000 + 1000 * i as u64, &w[..w.len().min(64)], w.len()).finished);
    }
    let r = &done[0];
    assert_eq!((r.status, r.outcome), (200, Outcome::Complete));
    assert_eq!(r.end_ns, 9000);
    assert_eq!(r.events, 6);
    assert_eq!(r.content_events, 5, "undecidable events count as content; [DONE] does not");
    assert_eq!(r.first_token_ns, Some(3000));
    assert_eq!(r.response_bytes, COMPLETIONS_STREAM.len() as u64);
}

#[test]
fn sized_responses_at_every_split() {
    for (response, status) in [(COMPLETIONS_NONSTREAM, 200), (BAD_MODEL, 404), (MODELS, 200)] {
        let req = request("/v1/completions", r#"{"model":"tiny","prompt":"x"}"#);
        for cut in 1..response.len() {
            let done = exchange(&req, &[(2000, &response[..cut]), (3000, &response[cut..])], usize::MAX);
            assert_eq!(done.len(), 1, "cut {cut}");
            let r = &done[0];
            assert_eq!((r.status, r.outcome, r.stream, r.events), (status, Outcome::Complete, false, 0));
            assert_eq!(r.end_ns, 3000);
            assert_eq!(r.first_token_ns, None, "no stream, no first token");
            // The first "id" of the JSON body, whatever it names (the model, for /v1/models).
            let id = match response {
                r if r == COMPLETIONS_NONSTREAM => Some("cmpl-8126f3a726390833"),
                r if r == MODELS => Some("tiny"),
                _ => None,
            };
            assert_eq!(r.response_id.as_deref(), id, "cut {cut}");
        }
        // Body beyond the capture is skipped exactly.
        let r = &exchange(&req, &[(2000, response)], 200)[0];
        assert_eq!((r.status, r.end_ns), (status, 2000));
    }
}

#[test]
fn request_split_at_every_byte() {
    let req = request(
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"model":"tiny","stream":true}"#,
    );
    for cut in 1..req.len() {
        let mut c = Connection::default();
        let mut started = c.received(100, &req[..cut], cut).started;
        started.extend(c.received(200, &req[cut..], req.len() - cut).started);
        assert_eq!(pairs(&started), vec![("/v1/chat/completions", Some("tiny".to_string()))], "cut {cut}");
        let done = c.sent(300, CHAT_STREAM, CHAT_STREAM.len()).finished;
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].received_ns, 100, "received at the first byte");
        assert_eq!(done[0].request_bytes, req.len() as u64);
    }
}

#[test]
fn keep_alive_and_pipelining() {
    let a = request("/v1/completions", STREAM_BODY);
    let b = request("/v1/completions", r#"{"model":"other-model","prompt":"x"}"#);
    let mut c = Connection::default();
    // Both requests in one read (pipelined), responses one after the other.
    let both = [a.as_slice(), b.as_slice()].concat();
    let started = c.received(1000, &both, both.len()).started;
    assert_eq!(started.len(), 2);
    let mut done = c.sent(2000, COMPLETIONS_STREAM, COMPLETIONS_STREAM.len()).finished;
    done.extend(c.sent(3000, COMPLETIONS_NONSTREAM, COMPLETIONS_NONSTREAM.len()).finished);
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].model.as_deref(), Some("tiny"));
    assert!(done[0].stream);
    assert_eq!(done[1].model.as_deref(), Some("other-model"));
    assert!(!done[1].stream);
    assert_eq!(done[1].end_ns, 3000);
    // Both responses in one write.
    let mut c = Connection::default();
    c.received(1000, &both, both.len());
    let responses = [COMPLETIONS_NONSTREAM, COMPLETIONS_STREAM].concat();
    let done = c.sent(5000, &responses, responses.len()).finished;
    assert_eq!(done.len(), 2);
    assert_eq!((done[0].stream, done[1].stream), (false, true));
    // Then a third request on the same connection, later.
    let done = exchange_on(&mut c, &a, 6000, 7000);
    assert_eq!(done[0].received_ns, 6000);
}

fn exchange_on(c: &mut Connection, req: &[u8], t_req: u64, t_resp: u64) -> Vec<FinishedRequest> {
    c.received(t_req, req, req.len());
    c.sent(t_resp, COMPLETIONS_STREAM, COMPLETIONS_STREAM.len()).finished
}

#[test]
fn client_abort_mid_stream_is_aborted_not_complete() {
    let writes = vllm_writes(COMPLETIONS_STREAM);
    let mut c = Connection::default();
    let req = request("/v1/completions", STREAM_BODY);
    c.received(1000, &req, req.len());
    for (i, w) in writes[..3].iter().enumerate() {
        assert!(c.sent(2000 + i as u64, w, w.len()).finished.is_empty());
    }
    let done = c.closed(9000).finished;
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].outcome, Outcome::Aborted);
    assert_eq!(done[0].first_token_ns, Some(2001));
    assert_eq!(done[0].end_ns, 9000);
    // Nothing more comes out of a closed connection.
    assert!(c.sent(9500, writes[3], writes[3].len()).finished.is_empty());
}

#[test]
fn abort_before_any_response_has_no_status() {
    let mut c = Connection::default();
    let req = request("/v1/completions", STREAM_BODY);
    c.received(1000, &req, req.len());
    let done = c.closed(5000).finished;
    assert_eq!((done[0].status, done[0].outcome, done[0].headers_ns), (0, Outcome::Aborted, None));
}

#[test]
fn one_mebibyte_body_beyond_the_capture() {
    let body = format!(r#"{{"model":"tiny","prompt":"{}"}}"#, "x".repeat(1 << 20));
    let req = request("/v1/completions", &body);
    let mut c = Connection::default();
    let mut started = Vec::new();
    // Reads of 64 KiB with 1 KiB captured each.
    for (i, chunk) in req.chunks(65536).enumerate() {
        started.extend(c.received(1000 + i as u64, &chunk[..chunk.len().min(1024)], chunk.len()).started);
    }
    assert_eq!(pairs(&started), vec![("/v1/completions", Some("tiny".to_string()))]);
    let done = c.sent(9000, COMPLETIONS_NONSTREAM, COMPLETIONS_NONSTREAM.len()).finished;
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].request_bytes, req.len() as u64);
    assert_eq!(done[0].received_ns, 1000);
}

#[test]
fn a_head_cut_by_the_capture_keeps_its_request_line() {
    // An SDK-style head longer than the capture: the route survives, the body is skipped until
    // the next request line, and the response is still timed.
    let long_header = "x".repeat(3000);
    let req =
        format!("POST /v1/completions HTTP/1.1\r\nx-long: {long_header}\r\ncontent-length: 2\r\n\r\n{{}}");
    let mut c = Connection::default();
    let started = c.received(1000, &req.as_bytes()[..1024], req.len()).started;
    assert_eq!(pairs(&started), vec![("/v1/completions", None)]);
    let done = c.sent(2000, COMPLETIONS_NONSTREAM, COMPLETIONS_NONSTREAM.len()).finished;
    assert_eq!((done[0].route, done[0].status, done[0].end_ns), ("/v1/completions", 200, 2000));
    // The next request on the connection is read normally.
    let next = request("/v1/completions", STREAM_BODY);
    let started = c.received(3000, &next, next.len()).started;
    assert_eq!(pairs(&started), vec![("/v1/completions", Some("tiny".to_string()))]);
}

#[test]
fn garbage_is_not_http_and_produces_nothing() {
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"hello there\r\n\r\n",
        b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f",
    ] {
        let mut c = Connection::default();
        let up = c.received(1, garbage, garbage.len());
        assert_eq!(up.not_http, Some("not_http"), "{garbage:?}");
        assert!(up.started.is_empty());
        assert!(c.sent(2, COMPLETIONS_STREAM, COMPLETIONS_STREAM.len()).finished.is_empty());
        assert!(c.closed(3).finished.is_empty());
    }
}

#[test]
fn interim_head_and_bodiless_responses() {
    let req = b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut c = Connection::default();
    c.received(1, req, req.len());
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n";
    let done = c.sent(2, head, head.len()).finished;
    assert_eq!((done[0].route, done[0].status, done[0].end_ns), ("/health", 200, 2), "HEAD has no body");

    let req = b"POST /v1/completions HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n";
    c.received(3, req, req.len());
    let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
    assert!(c.sent(4, cont, cont.len()).finished.is_empty());
    c.received(5, b"{}", 2);
    let no_content = b"HTTP/1.1 204 No Content\r\n\r\n";
    let done = c.sent(6, no_content, no_content.len()).finished;
    assert_eq!((done[0].status, done[0].end_ns, done[0].received_ns), (204, 6, 3));
}

#[test]
fn chunked_request_body() {
    let req = b"POST /v1/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n10\r\n{\"model\":\"tiny\"}\r\n0\r\n\r\n";
    for cut in 1..req.len() {
        let mut c = Connection::default();
        let mut started = c.received(1, &req[..cut], cut).started;
        started.extend(c.received(2, &req[cut..], req.len() - cut).started);
        assert_eq!(pairs(&started), vec![("/v1/completions", Some("tiny".to_string()))], "cut {cut}");
        assert_eq!(c.sent(3, MODELS, MODELS.len()).finished.len(), 1);
    }
}

#[test]
fn close_delimited_body_ends_at_the_close() {
    let mut c = Connection::default();
    let req = b"GET /v1/models HTTP/1.1\r\n\r\n";
    c.received(1, req, req.len());
    let resp = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: a\n\ndata: b\n\n";
    assert!(c.sent(2, resp, resp.len()).finished.is_empty());
    let done = c.closed(3).finished;
    assert_eq!(
        (done[0].outcome, done[0].content_events, done[0].first_token_ns),
        (Outcome::Complete, 2, Some(2))
    );
}

/// The stream's whole body after the head in one transfer, as the kernel reports it: the
/// first `capture` bytes and the last `tail` (the capture's tail, when the transfer is longer).
fn sent_with_tail(
    c: &mut Connection,
    ts: u64,
    w: &[u8],
    capture: usize,
    tail: usize,
) -> Vec<FinishedRequest> {
    let head = &w[..w.len().min(capture)];
    let tail = if w.len() > head.len() { &w[w.len() - tail.min(w.len() - head.len())..] } else { &[][..] };
    let mut up = super::Progress::default();
    c.send_transfer(ts, super::Transfer { head, tail, total: w.len(), ..Default::default() }, &mut up);
    up.finished
}

#[test]
fn the_end_of_a_chunked_body_beyond_the_capture_is_seen_in_the_tail() {
    let writes = vllm_writes(COMPLETIONS_STREAM);
    let body: Vec<u8> = writes[1..].concat();
    let req = request("/v1/completions", STREAM_BODY);
    // Every capture that cuts the body: with a 64-byte tail the end is seen (complete, at the
    // write's time); without one it is not (the stream stays open).
    for capture in [16, 100, 400, body.len() - 8] {
        let mut c = Connection::default();
        c.received(1000, &req, req.len());
        c.sent(2000, writes[0], writes[0].len());
        let done = sent_with_tail(&mut c, 3000, &body, capture, 64);
        assert_eq!(done.len(), 1, "capture {capture}");
        assert_eq!((done[0].outcome, done[0].end_ns), (Outcome::Complete, 3000), "capture {capture}");
        assert_eq!(done[0].response_bytes, COMPLETIONS_STREAM.len() as u64);

        let mut c = Connection::default();
        c.received(1000, &req, req.len());
        c.sent(2000, writes[0], writes[0].len());
        assert!(sent_with_tail(&mut c, 3000, &body, capture, 0).is_empty(), "capture {capture}, no tail");
    }
}

#[test]
fn a_tail_after_a_gap_inside_a_chunk_keeps_the_framing() {
    // One large chunk whose middle is beyond the capture, then the terminator: the gap lies
    // inside the chunk's data, so the tail is decoded in step (not just recognised).
    let event = format!("data: {{\"choices\":[{{\"text\":\"{}\"}}]}}\n\n", "x".repeat(9000));
    let body = [format!("{:x}\r\n", event.len()).as_bytes(), event.as_bytes(), b"\r\n0\r\n\r\n"].concat();
    let req = request("/v1/completions", STREAM_BODY);
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut c = Connection::default();
    c.received(1000, &req, req.len());
    c.sent(2000, head, head.len());
    let done = sent_with_tail(&mut c, 3000, &body, 4096, 64);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].outcome, done[0].end_ns, done[0].content_events), (Outcome::Complete, 3000, 1));
}

#[test]
fn chunks_each_with_an_unseen_middle_keep_their_count() {
    // A vectored call per chunk whose middle iovecs are beyond the kernel's first ones: each
    // transfer is its first bytes, a gap, and its last bytes.
    let req = request("/v1/completions", STREAM_BODY);
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut c = Connection::default();
    c.received(1000, &req, req.len());
    c.sent(2000, head, head.len());
    let mut done = Vec::new();
    for i in 0..12 {
        let event = format!(
            "data: {{\"id\":\"cmpl-1\",\"choices\":[{{\"text\":\" t{i}\",\"finish_reason\":null}}]}}\n\n"
        );
        let chunk = [format!("{:x}\r\n", event.len()).as_bytes(), event.as_bytes(), b"\r\n"].concat();
        done.extend(sent_with_tail(&mut c, 3000 + i, &chunk, 40, 30));
    }
    let end = [b"f\r\ndata: [DONE]\n\n\r\n".as_slice(), b"0\r\n\r\n"].concat();
    done.extend(sent_with_tail(&mut c, 4000, &end, 4096, 64));
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].outcome, done[0].content_events), (Outcome::Complete, 12));
}
