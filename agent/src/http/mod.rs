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

/// Where `needle` first occurs in `haystack`. This runs over every captured payload: short
/// ones (request and response heads, SSE events) are searched for the needle's first byte
/// and compared, which costs a few nanoseconds; `memmem` (SIMD, but with a set-up cost per
/// call that dominated the agent's profile under `wrk`) takes long ones, engine outputs of up
/// to 4 KiB.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let Some((&first, rest)) = needle.split_first() else { return Some(0) };
    if haystack.len() >= SHORT_HAYSTACK {
        return memchr::memmem::find(haystack, needle);
    }
    let mut from = 0;
    while let Some(i) = memchr::memchr(first, &haystack[from..]) {
        let at = from + i;
        if haystack[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Below this length `find` compares at each occurrence of the needle's first byte.
const SHORT_HAYSTACK: usize = 256;
