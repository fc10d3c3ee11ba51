//! What flows from the probes to the aggregator, and the decoding of raw ring-buffer records.
//!
//! Decoding is pure: a record is checked for size and kind before anything trusts it, so a
//! mismatched kernel object or a corrupt record is counted, never misread.

use inferwatch_common::{SOCK_EVENT_SIZE, SockEvent, SockEventKind};

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
    pub sock: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Bytes moved, or a negative errno.
    pub ret: i32,
    pub syscall: &'static str,
    pub direction: Direction,
}

/// Messages to the aggregator. Everything the agent learns arrives as one of these.
#[derive(Debug)]
pub enum AgentEvent {
    Sock(SockOp),
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
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Size(usize),
    Kind(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Size(n) => write!(f, "record of {n} bytes, expected {SOCK_EVENT_SIZE}"),
            DecodeError::Kind(k) => write!(f, "unknown event kind {k}"),
        }
    }
}

/// Decodes one ring-buffer record.
pub fn decode(record: &[u8]) -> Result<SockOp, DecodeError> {
    if record.len() != SOCK_EVENT_SIZE {
        return Err(DecodeError::Size(record.len()));
    }
    // SAFETY: the length matches and SockEvent is plain #[repr(C)] data valid for any bytes;
    // the ring buffer gives no alignment guarantee to a slice, hence read_unaligned.
    let raw: SockEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let direction = match SockEventKind::from_u8(raw.kind) {
        Some(SockEventKind::Send) => Direction::Sent,
        Some(SockEventKind::Recv) => Direction::Received,
        None => return Err(DecodeError::Kind(raw.kind)),
    };
    Ok(SockOp {
        ts_ns: raw.ts_ns,
        sock: raw.sock,
        tgid: raw.tgid,
        tid: raw.tid,
        ret: raw.ret,
        syscall: syscalls::name(raw.syscall_nr),
        direction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(ev: &SockEvent) -> Vec<u8> {
        // SAFETY: SockEvent is #[repr(C)] with explicit padding, so all its bytes are initialised.
        unsafe { std::slice::from_raw_parts((ev as *const SockEvent).cast::<u8>(), SOCK_EVENT_SIZE) }.to_vec()
    }

    fn sample(kind: u8, nr: i32) -> SockEvent {
        SockEvent {
            ts_ns: 123_456_789,
            sock: 0xffff_8880_1234_5678,
            tgid: 42,
            tid: 43,
            ret: 512,
            syscall_nr: nr,
            kind,
            _pad: [0; 7],
        }
    }

    #[test]
    fn decodes_a_send() {
        let op = decode(&bytes_of(&sample(SockEventKind::Send as u8, 1))).unwrap();
        assert_eq!(
            op,
            SockOp {
                ts_ns: 123_456_789,
                sock: 0xffff_8880_1234_5678,
                tgid: 42,
                tid: 43,
                ret: 512,
                syscall: "write",
                direction: Direction::Sent,
            }
        );
    }

    #[test]
    fn decodes_a_recv_from_an_unaligned_buffer() {
        let mut buf = vec![0u8];
        buf.extend(bytes_of(&sample(SockEventKind::Recv as u8, 45)));
        let op = decode(&buf[1..]).unwrap();
        assert_eq!(op.direction, Direction::Received);
        assert_eq!(op.syscall, "recvfrom");
    }

    #[test]
    fn rejects_wrong_sizes_and_kinds() {
        let good = bytes_of(&sample(1, 1));
        assert_eq!(decode(&good[..39]), Err(DecodeError::Size(39)));
        assert_eq!(decode(&[good.clone(), vec![0]].concat()), Err(DecodeError::Size(41)));
        assert_eq!(decode(&bytes_of(&sample(9, 1))), Err(DecodeError::Kind(9)));
    }
}
