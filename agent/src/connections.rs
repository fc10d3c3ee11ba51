//! The table of connections being followed, bounded: the least recently used connection is
//! evicted (and counted) when it is full.

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt as _};

use crate::{
    events::{Direction, SockOp, StateChange},
    http::{Connection, Update},
};

pub const DEFAULT_MAX_CONNECTIONS: usize = 16 * 1024;

const EAGAIN: i32 = -11;
const EPIPE: i32 = -32;
const ECONNRESET: i32 = -104;

struct Entry {
    conn: Connection,
    tgid: u32,
    /// Position in the recency order.
    seq: u64,
}

pub struct ConnectionTable {
    entries: HashMap<u64, Entry>,
    by_recency: BTreeMap<u64, u64>,
    next_seq: u64,
    max: usize,
    /// Connections dropped to stay within `max`, and requests that were open in them.
    pub evicted_connections: u64,
    pub evicted_requests: u64,
}

impl ConnectionTable {
    pub fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            by_recency: BTreeMap::new(),
            next_seq: 0,
            max: max.max(1),
            evicted_connections: 0,
            evicted_requests: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Feeds one socket operation; returns what it revealed, with the process it belongs to,
    /// and whether the connection is the server side of HTTP.
    pub fn on_sock(&mut self, op: &SockOp) -> (u32, Update, bool) {
        if op.conn_id == 0 {
            return (op.tgid, Update::default(), false);
        }
        let entry = self.touch(op.conn_id, op.tgid);
        let conn = &mut entry.conn;
        let update = match (op.direction, op.ret) {
            (_, EAGAIN) => Update::default(),
            // End of stream from the peer, or the connection broke under us.
            (Direction::Received, 0) | (_, EPIPE | ECONNRESET) => conn.closed(op.ts_ns),
            (_, r) if r < 0 => Update::default(),
            (Direction::Received, r) => conn.received(op.ts_ns, &op.payload, r as usize),
            (Direction::Sent, r) => conn.sent(op.ts_ns, &op.payload, r as usize),
        };
        (entry.tgid, update, conn.is_http_server())
    }

    /// Feeds a TCP state change: a closed or half-closed connection ends what is open on it.
    pub fn on_state(&mut self, st: &StateChange) -> (u32, Update) {
        let Some(entry) = self.entries.get_mut(&st.conn_id) else {
            return (st.tgid, Update::default());
        };
        let tgid = entry.tgid;
        let update = if st.ends_connection() { entry.conn.closed(st.ts_ns) } else { Update::default() };
        if st.new == crate::events::TCP_CLOSE
            && let Some(entry) = self.entries.remove(&st.conn_id)
        {
            self.by_recency.remove(&entry.seq);
        }
        (tgid, update)
    }

    fn touch(&mut self, conn_id: u64, tgid: u32) -> &mut Entry {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(old) = self.entries.get(&conn_id).map(|e| e.seq) {
            self.by_recency.remove(&old);
        } else if self.entries.len() >= self.max
            && let Some((_, victim)) = self.by_recency.pop_first()
            && let Some(e) = self.entries.remove(&victim)
        {
            self.evicted_connections += 1;
            self.evicted_requests += e.conn.in_flight() as u64;
        }
        self.by_recency.insert(seq, conn_id);
        let entry =
            self.entries.entry(conn_id).or_insert_with(|| Entry { conn: Connection::default(), tgid, seq });
        entry.seq = seq;
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(conn_id: u64, direction: Direction, ts: u64, payload: &[u8]) -> SockOp {
        SockOp {
            ts_ns: ts,
            conn_id,
            tgid: 9,
            tid: 9,
            ret: payload.len() as i32,
            syscall: "read",
            direction,
            payload: bytes::Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn least_recently_used_connection_is_evicted_and_counted() {
        let mut t = ConnectionTable::new(2);
        t.on_sock(&op(1, Direction::Received, 1, b"GET / HTTP/1.1\r\n\r\n"));
        t.on_sock(&op(2, Direction::Received, 2, b"GET / HTTP/1.1\r\n\r\n"));
        t.on_sock(&op(1, Direction::Received, 3, b"")); // touch 1 (an EOF: closes its request)
        t.on_sock(&op(3, Direction::Received, 4, b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted_connections, 1);
        assert_eq!(t.evicted_requests, 1, "connection 2 had a request open");
    }

    #[test]
    fn close_removes_and_a_new_id_starts_fresh() {
        let mut t = ConnectionTable::new(8);
        t.on_sock(&op(1, Direction::Received, 1, b"GET /health HTTP/1.1\r\n\r\n"));
        let st = StateChange { ts_ns: 5, conn_id: 1, tgid: 9, old: 1, new: crate::events::TCP_CLOSE };
        let (_, up) = t.on_state(&st);
        assert_eq!(up.finished.len(), 1);
        assert_eq!(up.finished[0].outcome, crate::http::Outcome::Aborted);
        assert_eq!(t.len(), 0);
    }
}
