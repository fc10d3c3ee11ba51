//! Decoding raw ring-buffer records into [`KernelEvent`]s.
//!
//! Decoding is pure: a record is checked for size and kind before anything trusts it, so a
//! mismatched kernel object or a corrupt record is counted, never misread.

use inferwatch_common::sock::{
    MAX_CAPTURE, NetEventKind, SOCK_EVENT_SIZE, SockEvent, SockEventKind, TAIL_BYTES,
};

use super::syscalls;
use crate::model::sock::{Direction, KernelEvent, NetEvent, NetWhat, SockOp, StateChange};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes, shorter than the {SOCK_EVENT_SIZE}-byte header")]
    Size(usize),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("header announces {captured} payload bytes, record has {present}")]
    Captured { captured: usize, present: usize },
    #[error("header announces a tail of {tail} bytes in {captured} captured")]
    Tail { tail: usize, captured: usize },
}

/// Decodes one ring-buffer record: a [`SockEvent`] header and its captured payload, which
/// stays a slice of `record`.
pub fn decode(record: &[u8]) -> Result<KernelEvent<'_>, DecodeError> {
    if record.len() < SOCK_EVENT_SIZE {
        return Err(DecodeError::Size(record.len()));
    }
    // SAFETY: the length is checked and SockEvent is plain #[repr(C)] data valid for any
    // bytes; the ring buffer gives no alignment guarantee to a slice, hence read_unaligned.
    let raw: SockEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let payload = &record[SOCK_EVENT_SIZE..];
    let captured = raw.captured as usize;
    if captured > payload.len() || captured > MAX_CAPTURE + TAIL_BYTES {
        return Err(DecodeError::Captured { captured, present: payload.len() });
    }
    let tail = raw.tail as usize;
    if tail > TAIL_BYTES || tail > captured || captured - tail > MAX_CAPTURE {
        return Err(DecodeError::Tail { tail, captured });
    }
    let direction = match SockEventKind::from_u8(raw.kind) {
        Some(SockEventKind::Send) => Direction::Sent,
        Some(SockEventKind::Recv) => Direction::Received,
        Some(SockEventKind::Net) => {
            return Ok(KernelEvent::Net(NetEvent {
                ts_ns: raw.ts_ns,
                conn_id: raw.conn_id,
                tgid: raw.tgid,
                what: match NetEventKind::from_i32(raw.ret) {
                    Some(NetEventKind::Retransmit) => NetWhat::Retransmit,
                    Some(NetEventKind::ResetSent) => NetWhat::ResetSent,
                    Some(NetEventKind::ResetReceived) => NetWhat::ResetReceived,
                    None => return Err(DecodeError::Kind(raw.kind)),
                },
            }));
        }
        Some(SockEventKind::State) => {
            return Ok(KernelEvent::State(StateChange {
                ts_ns: raw.ts_ns,
                conn_id: raw.conn_id,
                tgid: raw.tgid,
                old: raw.syscall_nr,
                new: raw.ret,
            }));
        }
        None => return Err(DecodeError::Kind(raw.kind)),
    };
    Ok(KernelEvent::Sock(SockOp {
        ts_ns: raw.ts_ns,
        conn_id: raw.conn_id,
        tgid: raw.tgid,
        tid: raw.tid,
        ret: raw.ret,
        syscall: syscalls::name(raw.syscall_nr),
        direction,
        family: raw.family,
        payload: &payload[..captured - tail],
        tail: &payload[captured - tail..captured],
        arrival_ns: raw.arrival_ns,
        established_ns: raw.established_ns,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sock::RecordBatch;
    use bytes::Bytes;
    use inferwatch_common::sock::AF_INET;

    fn record(ev: &SockEvent, payload: &[u8]) -> Vec<u8> {
        // SAFETY: SockEvent is #[repr(C)] with explicit padding, so all its bytes are initialised.
        let mut v =
            unsafe { std::slice::from_raw_parts((ev as *const SockEvent).cast::<u8>(), SOCK_EVENT_SIZE) }
                .to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn sample(kind: u8, nr: i32, captured: u16) -> SockEvent {
        SockEvent {
            ts_ns: 123_456_789,
            conn_id: 77,
            sock: 0xffff_8880_1234_5678,
            arrival_ns: 0,
            established_ns: 0,
            tgid: 42,
            tid: 43,
            ret: 512,
            syscall_nr: nr,
            captured,
            kind,
            family: AF_INET,
            tail: 0,
            _pad: [0; 2],
        }
    }

    #[test]
    fn a_tail_is_split_from_the_head_and_checked() {
        let mut ev = sample(SockEventKind::Send as u8, 1, 9);
        ev.tail = 4;
        let raw = record(&ev, b"HTTP/0\r\n\r\n");
        let KernelEvent::Sock(op) = decode(&raw).unwrap() else { panic!("not a socket op") };
        assert_eq!((op.payload, op.tail), (&b"HTTP/"[..], &b"0\r\n\r"[..]));
        for (captured, tail) in [(3, 4), (9, TAIL_BYTES as u16 + 1)] {
            let mut ev = sample(SockEventKind::Send as u8, 1, captured);
            ev.tail = tail;
            assert!(
                matches!(decode(&record(&ev, &[0; 200])), Err(DecodeError::Tail { .. })),
                "{captured} {tail}"
            );
        }
    }

    #[test]
    fn decodes_a_send_with_its_payload() {
        let raw = record(&sample(SockEventKind::Send as u8, 1, 5), b"HTTP/");
        let KernelEvent::Sock(op) = decode(&raw).unwrap() else { panic!("not a socket op") };
        assert_eq!(
            op,
            SockOp {
                ts_ns: 123_456_789,
                conn_id: 77,
                tgid: 42,
                tid: 43,
                ret: 512,
                syscall: "write",
                direction: Direction::Sent,
                family: AF_INET,
                payload: b"HTTP/",
                tail: b"",
                arrival_ns: 0,
                established_ns: 0,
            }
        );
    }

    #[test]
    fn decodes_a_recv_from_an_unaligned_buffer() {
        let mut buf = vec![0u8];
        buf.extend(record(&sample(SockEventKind::Recv as u8, 45, 0), b""));
        let KernelEvent::Sock(op) = decode(&buf[1..]).unwrap() else { panic!() };
        assert_eq!(op.direction, Direction::Received);
        assert_eq!(op.syscall, "recvfrom");
        assert!(op.payload.is_empty());
    }

    #[test]
    fn decodes_a_state_change() {
        let mut ev = sample(SockEventKind::State as u8, 1, 0);
        ev.ret = inferwatch_common::tcp::TcpState::Close as i32;
        let KernelEvent::State(st) = decode(&record(&ev, b"")).unwrap() else { panic!() };
        assert_eq!((st.conn_id, st.old, st.new), (77, 1, inferwatch_common::tcp::TcpState::Close as i32));
        assert!(st.ends_connection());
    }

    #[test]
    fn decodes_tcp_events() {
        let mut ev = sample(SockEventKind::Net as u8, -1, 0);
        ev.ret = NetEventKind::ResetReceived as i32;
        let KernelEvent::Net(n) = decode(&record(&ev, b"")).unwrap() else { panic!() };
        assert_eq!((n.conn_id, n.tgid, n.what), (77, 42, NetWhat::ResetReceived));
        ev.ret = 99;
        assert!(decode(&record(&ev, b"")).is_err());
    }

    #[test]
    fn a_batch_yields_its_records_in_order_and_survives_bad_ends() {
        let send = record(&sample(SockEventKind::Send as u8, 1, 2), b"ok");
        let state = record(&sample(SockEventKind::State as u8, 1, 0), b"");
        let batch = RecordBatch::from_records([send.as_slice(), state.as_slice()]);
        assert_eq!(batch.len(), 2);
        let decoded: Vec<_> = batch.records().map(decode).collect();
        assert!(matches!(&decoded[0], Ok(KernelEvent::Sock(op)) if op.payload == b"ok"));
        assert!(matches!(&decoded[1], Ok(KernelEvent::State(_))));
        // Ends out of order or past the buffer give short records, which decode rejects.
        let bad = RecordBatch::new(Bytes::from(send.clone()), vec![100, 10, 9_999]);
        let sizes: Vec<_> = bad.records().map(<[u8]>::len).collect();
        assert_eq!(sizes, [send.len(), 0, 0]);
        assert!(bad.records().skip(1).all(|r| decode(r).is_err()));
    }

    #[test]
    fn rejects_short_records_unknown_kinds_and_lying_lengths() {
        let good = record(&sample(1, 1, 0), b"");
        assert_eq!(decode(&good[..47]).unwrap_err(), DecodeError::Size(47));
        assert_eq!(decode(&record(&sample(9, 1, 0), b"")).unwrap_err(), DecodeError::Kind(9));
        assert_eq!(
            decode(&record(&sample(1, 1, 10), b"abc")).unwrap_err(),
            DecodeError::Captured { captured: 10, present: 3 }
        );
    }
}
