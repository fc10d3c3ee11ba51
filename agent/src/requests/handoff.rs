//! The API server ↔ engine hand-off, from the kernel's view of vLLM's ZMQ IPC: the API server
//! `sendto`s each request to `VLLM::EngineCore` and `recvfrom`s its outputs, and the request id
//! (`cmpl-…`, `chatcmpl-…`) is in both, as in the SSE stream the client receives. Outputs arrive
//! batched and may be longer than the capture: an id is only ever taken from bytes actually
//! seen, and a request whose id never shows up is counted as unmatched, not guessed.

use std::collections::{HashMap, VecDeque};

/// Ids followed at once; the oldest are forgotten beyond this.
const MAX_IDS: usize = 4096;
/// Output receipts kept per request: the first ones (where the first token comes from), then
/// only the latest in one more slot (where the end comes from).
const MAX_RECEIPTS: usize = 64;

/// What the IPC showed of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandoffTimes {
    /// First message to the engine that named the request.
    pub handed_ns: Option<u64>,
    /// Messages from the engine that named it, in order: the first [`MAX_RECEIPTS`], then
    /// the latest.
    pub receipts: Vec<u64>,
}

#[derive(Default)]
pub struct HandoffTracker {
    ids: HashMap<String, HandoffTimes>,
    order: VecDeque<String>,
}

/// The client-visible request ids named in a message: `cmpl-<hex>` / `chatcmpl-<hex>`, the
/// engine's own suffixes (`-0-9a84c292`) removed. Found anywhere in binary data (msgpack).
pub fn request_ids(payload: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut from = 0;
    static CMPL: super::http::Needle = super::http::needle!(b"cmpl-");
    while let Some(at) = super::http::find(&payload[from..], &CMPL) {
        let start = from + at;
        from = start + 5;
        let chat = start >= 4 && &payload[start - 4..start] == b"chat";
        let hex = payload[start + 5..].iter().take_while(|b| b.is_ascii_hexdigit()).count();
        // Ids of vLLM are 16 hex digits or more; shorter runs are text, not ids.
        if hex < 16 {
            continue;
        }
        let prefix = if chat { "chatcmpl-" } else { "cmpl-" };
        let mut id = String::with_capacity(prefix.len() + hex);
        id.push_str(prefix);
        // Hex digits: ASCII, one char each.
        id.extend(payload[start + 5..start + 5 + hex].iter().map(|&b| b as char));
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

impl HandoffTracker {
    /// A message the API server sent to (`to_engine`) or received from its engine.
    pub fn observe(&mut self, ts: u64, to_engine: bool, payload: &[u8]) {
        if to_engine {
            let Some(id) = request_ids(payload).into_iter().next() else { return };
            if !self.ids.contains_key(&id) {
                if self.order.len() >= MAX_IDS
                    && let Some(old) = self.order.pop_front()
                {
                    self.ids.remove(&old);
                }
                self.order.push_back(id.clone());
            }
            self.ids.entry(id).or_default().handed_ns.get_or_insert(ts);
            return;
        }
        for id in request_ids(payload) {
            let Some(times) = self.ids.get_mut(&id) else { continue };
            if times.receipts.len() <= MAX_RECEIPTS {
                times.receipts.push(ts);
            } else if let Some(latest) = times.receipts.last_mut() {
                *latest = ts;
            }
        }
    }

    /// Takes (and forgets) what was seen of `id`.
    pub fn take(&mut self, id: &str) -> Option<HandoffTimes> {
        let times = self.ids.remove(id)?;
        self.order.retain(|i| i != id);
        Some(times)
    }
}

/// Where a request's time went, in seconds. By construction `frontend_in + engine_first +
/// frontend_out` is the time to first token and, with `decode`, the duration (streams); for a
/// response sent whole, `frontend_in + engine + frontend_out` is the duration.
#[derive(Clone, Debug, PartialEq)]
pub struct Phases {
    pub frontend_in: f64,
    pub engine_first: Option<f64>,
    pub engine: Option<f64>,
    pub frontend_out: f64,
    pub decode: Option<f64>,
}

/// Why a request's phases could not be derived.
pub type Unmatched = &'static str;

/// Derives the phases of a request received at `received`, with its first token written at
/// `first_token` (streams) and its response ended at `end`.
pub fn phases(
    received: u64,
    first_token: Option<u64>,
    end: u64,
    ipc: Option<&HandoffTimes>,
) -> Result<Phases, Unmatched> {
    let ipc = ipc.ok_or("no_ipc")?;
    let handed = ipc.handed_ns.filter(|h| *h >= received).ok_or("no_handoff")?;
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
    // The engine output a write came from: the latest one received before it.
    let output_before = |t: u64| ipc.receipts.iter().copied().filter(|r| *r >= handed && *r <= t).max();
    match first_token {
        Some(first) => {
            let out = output_before(first).ok_or("no_engine_output")?;
            Ok(Phases {
                frontend_in: secs(received, handed),
                engine_first: Some(secs(handed, out)),
                engine: None,
                frontend_out: secs(out, first),
                decode: Some(secs(first, end)),
            })
        }
        None => {
            let out = output_before(end).ok_or("no_engine_output")?;
            Ok(Phases {
                frontend_in: secs(received, handed),
                engine_first: None,
                engine: Some(secs(handed, out)),
                frontend_out: secs(out, end),
                decode: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_vllm_ipc_messages() {
        // Bytes as strace showed them: msgpack around the engine's id.
        let handoff = b"\x01\x01\x00\x02\x00\x00\x00\x00\x00\x00\x01v\xdc\x00\x16\xd9 cmpl-9cc68e414298da50-0-9a84c292\x91\xcd\x01e";
        assert_eq!(request_ids(handoff), ["cmpl-9cc68e414298da50"]);
        let batch =
            b"\x02\x00\xd9 chatcmpl-8e16167c5c6a3a7e-0-aaaa1111\x91\xd9 cmpl-be618ddab538b76a-0-bbbb2222\x91";
        assert_eq!(request_ids(batch), ["chatcmpl-8e16167c5c6a3a7e", "cmpl-be618ddab538b76a"]);
        assert!(request_ids(b"the cmpl-abc text and num_running_reqs").is_empty());
        // Cut by the capture in the middle of an id: too short to be one, so not guessed.
        assert!(request_ids(b"\xd9 cmpl-9cc68e41").is_empty());
    }

    #[test]
    fn tracker_keeps_first_handoff_and_receipts_of_known_ids() {
        let mut t = HandoffTracker::default();
        t.observe(10, true, b"cmpl-0123456789abcdef-0-x");
        t.observe(15, true, b"cmpl-0123456789abcdef-0-x"); // an abort message, later
        t.observe(20, false, b"cmpl-0123456789abcdef-0-x");
        t.observe(30, false, b"cmpl-0123456789abcdef-0-x and cmpl-fedcba9876543210-0-y");
        assert_eq!(
            t.take("cmpl-0123456789abcdef"),
            Some(HandoffTimes { handed_ns: Some(10), receipts: vec![20, 30] })
        );
        assert_eq!(t.take("cmpl-0123456789abcdef"), None, "taken once");
        assert_eq!(t.take("cmpl-fedcba9876543210"), None, "an output never creates an id");
    }

    #[test]
    fn ids_a_client_wrote_into_a_request_are_not_followed() {
        let mut t = HandoffTracker::default();
        // A stop string carrying forged ids travels in the request's own message.
        t.observe(
            10,
            true,
            b"\xd9 cmpl-0123456789abcdef-0-x ... stop: cmpl-aaaaaaaaaaaaaaaa cmpl-bbbbbbbbbbbbbbbb",
        );
        assert_eq!(t.ids.len(), 1);
        assert!(t.take("cmpl-0123456789abcdef").is_some());
    }

    #[test]
    fn receipts_per_id_are_bounded_and_keep_the_latest() {
        let mut t = HandoffTracker::default();
        t.observe(1, true, b"cmpl-0123456789abcdef");
        for ts in 2..100_000 {
            t.observe(ts, false, b"cmpl-0123456789abcdef");
        }
        let times = t.take("cmpl-0123456789abcdef").unwrap();
        assert_eq!(times.receipts.len(), MAX_RECEIPTS + 1);
        assert_eq!(times.receipts[..3], [2, 3, 4]);
        assert_eq!(times.receipts.last(), Some(&99_999));
    }

    #[test]
    fn tracker_is_bounded() {
        let mut t = HandoffTracker::default();
        for i in 0..MAX_IDS + 10 {
            t.observe(i as u64, true, format!("cmpl-{i:016x}").as_bytes());
        }
        assert_eq!(t.ids.len(), MAX_IDS);
        assert!(t.take(&format!("cmpl-{:016x}", 0)).is_none(), "the oldest went first");
    }

    #[test]
    fn phases_add_up_by_construction() {
        let ipc = HandoffTimes { handed_ns: Some(1_300), receipts: vec![5_000, 9_000, 12_000] };
        // Stream: first token written at 9_500 came from the output received at 9_000.
        let p = phases(1_000, Some(9_500), 20_000, Some(&ipc)).unwrap();
        let sum = p.frontend_in + p.engine_first.unwrap() + p.frontend_out;
        assert!((sum - 8_500e-9).abs() < 1e-15, "adds up to TTFT");
        assert!((sum + p.decode.unwrap() - 19_000e-9).abs() < 1e-15, "and with decode to the duration");
        assert_eq!(p.frontend_in, 300e-9);
        assert_eq!(p.engine_first, Some(7_700e-9));
        // Whole response: the last output before the end.
        let p = phases(1_000, None, 12_500, Some(&ipc)).unwrap();
        assert_eq!((p.engine, p.frontend_out), (Some(10_700e-9), 500e-9));
    }

    #[test]
    fn what_is_not_seen_is_not_guessed() {
        assert_eq!(phases(1, Some(5), 9, None), Err("no_ipc"));
        let no_handoff = HandoffTimes { handed_ns: None, receipts: vec![3] };
        assert_eq!(phases(1, Some(5), 9, Some(&no_handoff)), Err("no_handoff"));
        let early = HandoffTimes { handed_ns: Some(2), receipts: vec![7] };
        assert_eq!(phases(1, Some(5), 9, Some(&early)), Err("no_engine_output"), "output after the token");
        let stale = HandoffTimes { handed_ns: Some(0), receipts: vec![3] };
        assert_eq!(phases(1, Some(5), 9, Some(&stale)), Err("no_handoff"), "a hand-off before receipt");
    }
}
