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
pub struct SockOp {
    pub ts_ns: u64,
    /// The connection, unique for the socket's life (see `TrackedSock::conn_id`).
    pub conn_id: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Bytes moved, or a negative errno.
    pub ret: i32,
    pub syscall: &'static str,
    pub direction: Direction,
    /// The first bytes of the transfer (at most the capture limit). Never exported. A slice of
    /// the batch it arrived in: no allocation per event.
    pub payload: Bytes,
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

/// Messages to the aggregator. Everything the agent learns arrives as one of these.
#[derive(Debug)]
pub enum AgentEvent {
    /// Kernel records of one ring-buffer drain, in order (one message, not one per record).
    Batch(Vec<AgentEvent>),
    Sock(SockOp),
    State(StateChange),
    Net(NetEvent),
    /// A process is now watched by the kernel programs.
    Watched {
        tgid: u32,
        comm: String,
    },
    /// Cumulative count of events the kernel dropped, per reason (read from a per-CPU map).
    KernelLost {
        reason: &'static str,
        total: u64,
    },
    /// A ring-buffer record that did not decode.
    Malformed,
    /// A process is no longer watched (it exited or is no longer a vLLM API server).
    Unwatched {
        tgid: u32,
    },
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

/// Decodes one ring-buffer record (copied).
pub fn decode(record: &[u8]) -> Result<AgentEvent, DecodeError> {
    decode_shared(&Bytes::copy_from_slice(record))
}

/// Decodes one ring-buffer record: a [`SockEvent`] header and its captured payload, which
/// stays a slice of `record`.
pub fn decode_shared(record: &Bytes) -> Result<AgentEvent, DecodeError> {
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
            return Ok(AgentEvent::Net(NetEvent {
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
            return Ok(AgentEvent::State(StateChange {
                ts_ns: raw.ts_ns,
                conn_id: raw.conn_id,
                tgid: raw.tgid,
                old: raw.syscall_nr,
                new: raw.ret,
            }));
        }
        None => return Err(DecodeError::Kind(raw.kind)),
    };
    Ok(AgentEvent::Sock(SockOp {
        ts_ns: raw.ts_ns,
        conn_id: raw.conn_id,
        tgid: raw.tgid,
        tid: raw.tid,
        ret: raw.ret,
        syscall: syscalls::name(raw.syscall_nr),
        direction,
        payload: record.slice(SOCK_EVENT_SIZE..SOCK_EVENT_SIZE + captured),
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
        let AgentEvent::Sock(op) =
            decode(&record(&sample(SockEventKind::Send as u8, 1, 5), b"HTTP/")).unwrap()
        else {
            panic!("not a socket op")
        };
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
                payload: Bytes::from_static(b"HTTP/"),
            }
        );
    }

    #[test]
    fn decodes_a_recv_from_an_unaligned_buffer() {
        let mut buf = vec![0u8];
        buf.extend(record(&sample(SockEventKind::Recv as u8, 45, 0), b""));
        let AgentEvent::Sock(op) = decode(&buf[1..]).unwrap() else { panic!() };
        assert_eq!(op.direction, Direction::Received);
        assert_eq!(op.syscall, "recvfrom");
        assert!(op.payload.is_empty());
    }

    #[test]
    fn decodes_a_state_change() {
        let mut ev = sample(SockEventKind::State as u8, 1, 0);
        ev.ret = TCP_CLOSE;
        let AgentEvent::State(st) = decode(&record(&ev, b"")).unwrap() else { panic!() };
        assert_eq!((st.conn_id, st.old, st.new), (77, 1, TCP_CLOSE));
        assert!(st.ends_connection());
    }

    #[test]
    fn decodes_tcp_events() {
        let mut ev = sample(SockEventKind::Net as u8, -1, 0);
        ev.ret = inferwatch_common::NET_RESET_RECEIVED;
        let AgentEvent::Net(n) = decode(&record(&ev, b"")).unwrap() else { panic!() };
        assert_eq!((n.conn_id, n.tgid, n.what), (77, 42, NetWhat::ResetReceived));
        ev.ret = 99;
        assert!(decode(&record(&ev, b"")).is_err());
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
