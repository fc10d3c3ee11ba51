//! Reassembling HTTP/1.1 exchanges, and the SSE streams inside them, from what the kernel saw
//! of a connection: timestamped transfers, each with its byte count and the first bytes of it.
//!
//! Everything here is pure (no I/O, no clocks): fed the same transfers it gives the same
//! requests however the byte stream was split into system calls. Bytes beyond a transfer's
//! captured prefix are a *gap* of known length: sized bodies and chunk payloads are skipped
//! through gaps exactly; framing lost in a gap is recovered at the next transfer when possible
//! and otherwise the request is reported with what is known, never invented.

pub(crate) mod chunked;
mod connection;
mod exchange;
mod head;
mod routes;
mod sse;

pub use connection::Connection;

pub use crate::model::sock::Transfer;

/// Whether a transfer ends with a chunked body's last chunk. Where its bytes are known
/// whole, a transfer of just `0\r\n\r\n` counts (servers write it alone); after unseen
/// bytes, only the whole `\r\n0\r\n\r\n`.
fn ends_chunked_body(t: &Transfer<'_>) -> bool {
    if t.head.len() + t.tail.len() < t.total {
        return t.tail.ends_with(b"\r\n0\r\n\r\n");
    }
    const END: &[u8] = b"0\r\n\r\n";
    let mut last = [0u8; END.len()];
    let joined = t.head.iter().chain(t.tail).rev().take(END.len()).count();
    for (slot, b) in last.iter_mut().rev().zip(t.head.iter().chain(t.tail).rev()) {
        *slot = *b;
    }
    joined == END.len() && last == *END
}
pub use exchange::{FinishedRequest, Gap, Outcome, Progress, Started};

#[cfg(test)]
mod tests;

/// A fixed byte string the parsers search payloads for, with its SIMD searcher built once:
/// this runs over every captured payload, and building a searcher per call (what
/// `memmem::find` does) cost more than the search itself on heads and SSE events.
pub(crate) struct Needle(pub(crate) std::sync::LazyLock<memchr::memmem::Finder<'static>>);

impl Needle {
    pub(crate) fn len(&self) -> usize {
        self.0.needle().len()
    }
}

/// `needle!(b"...")`: a [`Needle`] for a `static`.
macro_rules! needle {
    ($bytes:literal) => {
        $crate::requests::http::Needle(std::sync::LazyLock::new(|| memchr::memmem::Finder::new($bytes)))
    };
}
pub(crate) use needle;

/// Where `needle` first occurs in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &Needle) -> Option<usize> {
    needle.0.find(haystack)
}
