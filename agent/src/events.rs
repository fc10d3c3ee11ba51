//! What flows from the probes to the aggregator, and the decoding of raw ring-buffer records.
//!
//! Decoding is pure: a record is checked for size and kind before anything trusts it, so a
//! mismatched kernel object or a corrupt record is counted, never misread.

use bytes::Bytes;
use inferwatch_common::{MAX_CAPTURE, SOCK_EVENT_SIZE, SockEvent, SockEventKind};

use crate::syscalls;

/// Direction of a socket operation, from the watched process's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

/// One socket operation of a watched process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockOp<'a> {
    pub ts_ns: u64,
    /// The connection, unique for the socket's life (see `TrackedSock::conn_id`).
    pub conn_id: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Bytes moved, or a negative errno.
    pub ret: i32,
    pub syscall: &'static str,
    pub direction: Direction,
    /// The first bytes of the transfer (at most the capture limit). Never exported. Borrowed
    /// from the batch it arrived in: no allocation or reference count per event.
    pub payload: &'a [u8],
}

/// A TCP state change of a socket a watched process used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tgid: u32,
    pub old: i32,
    pub new: i32,
}

/// A TCP event on a connection of a watched process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetWhat {
    Retransmit,
    ResetSent,
    ResetReceived,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetEvent {
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tgid: u32,
    pub what: NetWhat,
}

/// TCP states (include/net/tcp_states.h) that end a connection for HTTP purposes: the peer
/// closed or reset it, or it is gone.
pub const TCP_CLOSE: i32 = 7;
pub const TCP_CLOSE_WAIT: i32 = 8;

impl StateChange {
    pub fn ends_connection(&self) -> bool {
        self.new == TCP_CLOSE || self.new == TCP_CLOSE_WAIT
    }
}

/// What the kernel programs report: one decoded ring-buffer record, borrowing from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent<'a> {
    Sock(SockOp<'a>),
    State(StateChange),
    Net(NetEvent),
}

/// The raw records of one ring-buffer drain, in order, in one buffer: one message and no
/// allocation per record. The records are decoded where they are used (the aggregator), so
/// nothing is copied twice; the drain takes the buffer back once they are dropped.
#[derive(Debug, Default)]
pub struct RecordBatch {
    buf: Bytes,
    /// Where each record ends in `buf`.
    ends: Vec<u32>,
}

impl RecordBatch {
    pub fn new(buf: Bytes, ends: Vec<u32>) -> Self {
        Self { buf, ends }
    }

    /// A batch of the given records (copied), as a drain would build it.
    pub fn from_records<'r>(records: impl IntoIterator<Item = &'r [u8]>) -> Self {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for record in records {
            buf.extend_from_slice(record);
            ends.push(buf.len() as u32);
        }
        Self { buf: buf.into(), ends }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            // Ends come from the drain in increasing order within `buf`; clamp anyway so a
            // bad batch yields short records (rejected by `decode`), never a panic.
            let end = (end as usize).clamp(start, self.buf.len());
            let record = &self.buf[start..end];
            start = end;
            record
        })
    }
}

/// Messages to the aggregator. Everything the agent learns arrives as one of these.
#[derive(Debug)]
pub enum AgentEvent {
    /// Kernel records of one ring-buffer drain, in order (one message, not one per record).
    Batch(RecordBatch),
    /// A process is now watched by the kernel programs.
    Watched { tgid: u32, comm: String },
    /// Cumulative count of events the kernel dropped, per reason (read from a per-CPU map).
    KernelLost { reason: &'static str, total: u64 },
    /// A process is no longer watched (it exited or is no longer a vLLM API server).
    Unwatched { tgid: u32 },
    /// The vLLM instances found by the latest discovery scan.
    Instances(Vec<crate::watcher::InstanceView>),
    /// The outcome of scraping one instance's `/metrics`.
    Scrape(crate::scraper::ScrapeResult),
    /// Cumulative scheduler statistics per role (the kernel's `SCHED_STATS`, summed over CPUs).
    Sched(Vec<u64>),
    /// Cumulative (program, run time ns, runs) of each kernel program.
    ProgramStats(Vec<(&'static str, u64, u64)>),
    /// The GPU collector's latest round (see gpu/).
    Gpu(crate::gpu::GpuSnapshot),
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Size(usize),
    Kind(u8),
    Captured { captured: usize, present: usize },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Size(n) => {
                write!(f, "record of {n} bytes, shorter than the {SOCK_EVENT_SIZE}-byte header")
            }
            DecodeError::Kind(k) => write!(f, "unknown event kind {k}"),
            DecodeError::Captured { captured, present } => {
                write!(f, "header announces {captured} payload bytes, record has {present}")
            }
        }
    }
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
    if captured > payload.len() || captured > MAX_CAPTURE {
        return Err(DecodeError::Captured { captured, present: payload.len() });
    }
    let direction = match SockEventKind::from_u8(raw.kind) {
        Some(SockEventKind::Send) => Direction::Sent,
        Some(SockEventKind::Recv) => Direction::Received,
        Some(SockEventKind::Net) => {
            return Ok(KernelEvent::Net(NetEvent {
                ts_ns: raw.ts_ns,
                conn_id: raw.conn_id,
                tgid: raw.tgid,
                what: match raw.ret {
                    inferwatch_common::NET_RETRANSMIT => NetWhat::Retransmit,
                    inferwatch_common::NET_RESET_SENT => NetWhat::ResetSent,
                    inferwatch_common::NET_RESET_RECEIVED => NetWhat::ResetReceived,
                    _ => return Err(DecodeError::Kind(raw.kind)),
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
        payload: &payload[..captured],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            tgid: 42,
            tid: 43,
            ret: 512,
            syscall_nr: nr,
            captured,
            kind,
            _pad: [0; 5],
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
                payload: b"HTTP/",
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
        ev.ret = TCP_CLOSE;
        let KernelEvent::State(st) = decode(&record(&ev, b"")).unwrap() else { panic!() };
        assert_eq!((st.conn_id, st.old, st.new), (77, 1, TCP_CLOSE));
        assert!(st.ends_connection());
    }

    #[test]
    fn decodes_tcp_events() {
        let mut ev = sample(SockEventKind::Net as u8, -1, 0);
        ev.ret = inferwatch_common::NET_RESET_RECEIVED;
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
        let bad = RecordBatch::new(Bytes::from(send.clone()), vec![60, 10, 9_999]);
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
