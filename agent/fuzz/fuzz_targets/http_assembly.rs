//! HTTP/SSE assembly fed arbitrary transfer sequences: any mix of received and sent bytes,
//! transfers longer than their captured prefix (gaps, with or without their last bytes), closes. Besides not crashing, every
//! finished request must have times in order and no more content events than events; the
//! captured bytes also go through the engine-IPC id scanner and the kernel-record decoder.
#![no_main]

use inferwatch::requests::http::{Connection, Progress, Transfer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = inferwatch::kernel::decode::decode(data);
    let _ = inferwatch::requests::handoff::request_ids(data);
    let mut conn = Connection::default();
    // One update reused for every transfer, as the agent does.
    let mut update = Progress::default();
    let mut ts = 1_000u64;
    let mut rest = data;
    while let [control, len, tail @ ..] = rest {
        let take = (*len as usize).min(tail.len());
        let (known, next) = tail.split_at(take);
        rest = next;
        ts += (*control as u64 + 1) * 1_000;
        // Bits 0-1: the kind of transfer; bits 2-7: bytes beyond the captured prefix.
        let gap = ((*control >> 2) as usize) * 97;
        match control & 3 {
            0 => conn.receive_into(ts, known, known.len(), &mut update),
            1 => conn.send_into(ts, known, known.len(), &mut update),
            2 => conn.receive_into(ts, known, known.len() + gap, &mut update),
            // Beyond the captured prefix, the transfer's last bytes (the kernel's tail): the
            // second half of what was taken.
            _ if gap.is_multiple_of(4) => {
                let (head, tail) = known.split_at(known.len() / 2);
                // Arrival and establishment times anywhere, after the read too (the kernel's
                // are untrusted): the reassembly must keep its times ordered whatever they are.
                let arrival_ns =
                    ts.wrapping_sub((gap as u64) << 20).wrapping_add(*control as u64 % 3 * 5_000);
                let established_ns = if gap.is_multiple_of(16) { arrival_ns.wrapping_sub(1_000) } else { 0 };
                let t = Transfer { head, tail, total: known.len() + gap, arrival_ns, established_ns };
                if gap.is_multiple_of(8) {
                    conn.send_transfer(ts, t, &mut update)
                } else {
                    conn.receive_transfer(ts, t, &mut update)
                }
            }
            _ if gap.is_multiple_of(2) => conn.send_into(ts, known, known.len() + gap, &mut update),
            _ => conn.close_into(ts, &mut update),
        }
        update.started.clear();
        update.not_http = None;
        for req in update.finished.drain(..) {
            assert!(req.received_ns <= req.first_read_ns && req.first_read_ns <= req.end_ns, "{req:?}");
            for t in [req.headers_ns, req.first_token_ns].into_iter().flatten() {
                assert!(req.received_ns <= t && t <= req.end_ns, "{req:?}");
            }
            assert!(req.content_events <= req.events, "{req:?}");
        }
    }
    conn.close_into(ts + 1, &mut update);
});
