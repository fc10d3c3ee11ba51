//! Reading request and response heads out of captured bytes, and the small parsers they need.

use std::borrow::Cow;

use super::{Needle, find, needle};

/// Longest request or response head we buffer (two per connection at most: memory per
/// connection stays small with 16k of them). Longer heads are cut: the request line is kept.
pub(super) const MAX_HEAD: usize = 16 * 1024;

/// A header value that is a decimal number (`Content-Length`), surrounding spaces allowed.
pub(super) fn decimal(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Whether a header value names `token` (case-insensitively), e.g. `chunked` in
/// `Transfer-Encoding: gzip, chunked`, without allocating.
pub(super) fn names(value: &[u8], token: &[u8]) -> bool {
    value.windows(token.len()).any(|w| w.eq_ignore_ascii_case(token))
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"];

pub(super) fn method_label(m: &str) -> &'static str {
    METHODS.iter().find(|k| **k == m).copied().unwrap_or("OTHER")
}

pub(super) fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    static HEAD_END: Needle = needle!(b"\r\n\r\n");
    find(buf.get(start..)?, &HEAD_END).map(|i| start + i + 4)
}

/// Adds `data` to a head being read (at most [`MAX_HEAD`] bytes). Once the head is complete,
/// takes it out of `buf` and returns it with the number of bytes of `data` it used.
pub(super) fn read_head<'a>(buf: &mut Vec<u8>, data: &'a [u8]) -> Option<(Cow<'a, [u8]>, usize)> {
    if buf.is_empty() {
        // The common case, a whole head in one transfer: parsed where it lies, not copied.
        // Else the start of one, kept (searched once: it holds no head end).
        let window = &data[..data.len().min(MAX_HEAD)];
        let Some(end) = find_head_end(window, 0) else {
            buf.extend_from_slice(window);
            return None;
        };
        return Some((Cow::Borrowed(&data[..end]), end));
    }
    let from = buf.len();
    let take = data.len().min(MAX_HEAD - buf.len());
    buf.extend_from_slice(&data[..take]);
    let end = find_head_end(buf, from)?;
    let mut head = std::mem::take(buf);
    head.truncate(end);
    Some((Cow::Owned(head), end - from))
}

/// `METHOD SP target`: the start of a request line (used to pick a stream back up).
pub(super) fn request_line_start(data: &[u8]) -> bool {
    let token = data.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=7).contains(&token)
        && data.get(token) == Some(&b' ')
        && matches!(data.get(token + 1), Some(b'/' | b'*' | b'h'))
}

/// Could `buf` (the first bytes a server received) still become an HTTP request?
pub(super) fn may_be_request(buf: &[u8]) -> bool {
    let token = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if token == buf.len() {
        return token <= 7;
    }
    (3..=7).contains(&token) && buf[token] == b' '
}

/// Takes the part of a sized body (`remaining` bytes) that this transfer holds: known bytes
/// first, then unseen ones from the gap. Returns the known body bytes, the skipped count, and
/// whether the body is complete.
pub(super) fn take_sized<'a>(
    remaining: &mut u64,
    data: &mut &'a [u8],
    gap: &mut usize,
) -> (&'a [u8], usize, bool) {
    let take = (*remaining).min(data.len() as u64) as usize;
    let body = &data[..take];
    *data = &data[take..];
    let mut skipped = 0;
    if data.is_empty() {
        skipped = (*remaining - take as u64).min(*gap as u64) as usize;
        *gap -= skipped;
    }
    *remaining -= (take + skipped) as u64;
    (body, skipped, *remaining == 0)
}
