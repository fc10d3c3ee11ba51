//! What the kernel programs report, decoded: socket operations, TCP state changes and TCP
//! events of watched processes. Decoding lives in `kernel::decode`.

use bytes::Bytes;
use inferwatch_common::tcp::TcpState;

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
    /// The socket's address family (`inferwatch_common::sock::AF_*`).
    pub family: u8,
    /// The first bytes of the transfer (at most the capture limit). Never exported. Borrowed
    /// from the batch it arrived in: no allocation or reference count per event.
    pub payload: &'a [u8],
    /// The transfer's last bytes when it was longer than the capture (else empty).
    pub tail: &'a [u8],
    /// For a read: when its first bytes reached the socket (0: not known).
    pub arrival_ns: u64,
    /// For the first read of an accepted connection: when it was established (else 0).
    pub established_ns: u64,
}

impl<'a> SockOp<'a> {
    /// The transfer as the HTTP reassembly reads it: `moved` bytes, the copied head and tail.
    pub fn transfer(&self, moved: usize) -> Transfer<'a> {
        Transfer {
            head: self.payload,
            tail: self.tail,
            total: moved,
            arrival_ns: self.arrival_ns,
            established_ns: self.established_ns,
        }
    }
}

/// What the kernel saw of one transfer: `total` bytes moved, of which the first (`head`) and,
/// when the transfer was longer than the capture, the last (`tail`) were copied. For a read,
/// the kernel may also tell when its first bytes reached the socket, and when the connection
/// was established (its first read); 0 where it cannot.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transfer<'a> {
    pub head: &'a [u8],
    pub tail: &'a [u8],
    pub total: usize,
    pub arrival_ns: u64,
    pub established_ns: u64,
}

impl Transfer<'_> {
    /// Unseen bytes between the head and the tail.
    pub fn gap(&self) -> usize {
        self.total.saturating_sub(self.head.len() + self.tail.len())
    }
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

impl StateChange {
    /// The peer closed or reset the connection, or it is gone.
    pub fn ends_connection(&self) -> bool {
        TcpState::ends_connection(self.new)
    }

    /// The socket is gone: its state can be freed.
    pub fn is_close(&self) -> bool {
        self.new == TcpState::Close as i32
    }
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

/// One decoded ring-buffer record, borrowing from it.
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
            // bad batch yields short records (rejected by decoding), never a panic.
            let end = (end as usize).clamp(start, self.buf.len());
            let record = &self.buf[start..end];
            start = end;
            record
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_out_in_order_and_bad_ends_never_panic() {
        let batch = RecordBatch::from_records([&b"abc"[..], &b"de"[..]]);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.records().collect::<Vec<_>>(), [&b"abc"[..], &b"de"[..]]);
        // Ends out of order or past the buffer give short records, never a panic.
        let bad = RecordBatch::new(Bytes::from_static(b"abcdef"), vec![4, 2, 9_999]);
        assert_eq!(bad.records().map(<[u8]>::len).collect::<Vec<_>>(), [4, 0, 2]);
    }
}
