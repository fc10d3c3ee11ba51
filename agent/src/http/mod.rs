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
mod routes;
mod sse;

#[cfg(test)]
pub use connection::Outcome;
pub use connection::{Connection, FinishedRequest, Update};

#[cfg(test)]
mod tests;

/// Where `needle` first occurs in `haystack` (SIMD search: this runs over every captured
/// payload, engine outputs of up to 4 KiB included).
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}
