//! The table of connections being followed, bounded: when it is full, the least recently used
//! sixteenth of it is evicted (and counted) in one sweep.

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
    /// When it was last used, in operations fed to the table.
    last_used: u64,
}

/// Evictions happen a sixteenth of the table at a time: finding the oldest entries costs one
/// pass over the table, paid once per `max / 16` new connections. Keeping an exact recency
/// order instead (a B-tree updated on every operation) cost more than the HTTP parsing.
const EVICT_FRACTION: usize = 16;

pub struct ConnectionTable {
    entries: HashMap<u64, Entry>,
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

    /// Feeds one socket operation; adds what it revealed to `up` and returns the process it
    /// belongs to, and whether the connection is the server side of HTTP.
    pub fn on_sock(&mut self, op: &SockOp<'_>, up: &mut Update) -> (u32, bool) {
        if op.conn_id == 0 {
            return (op.tgid, false);
        }
        let entry = self.touch(op.conn_id, op.tgid);
        let conn = &mut entry.conn;
        match (op.direction, op.ret) {
            (_, EAGAIN) => {}
            // End of stream from the peer, or the connection broke under us.
            (Direction::Received, 0) | (_, EPIPE | ECONNRESET) => conn.close_into(op.ts_ns, up),
            (_, r) if r < 0 => {}
            (Direction::Received, r) => conn.receive_into(op.ts_ns, op.payload, r as usize, up),
            (Direction::Sent, r) => conn.send_into(op.ts_ns, op.payload, r as usize, up),
        }
        (entry.tgid, conn.is_http_server())
    }

    /// Feeds a TCP state change: a closed or half-closed connection ends what is open on it
    /// (added to `up`). Returns the process it belongs to.
    pub fn on_state(&mut self, st: &StateChange, up: &mut Update) -> u32 {
        let Some(entry) = self.entries.get_mut(&st.conn_id) else {
            return st.tgid;
        };
        let tgid = entry.tgid;
        if st.ends_connection() {
            entry.conn.close_into(st.ts_ns, up);
        }
        if st.new == crate::events::TCP_CLOSE {
            self.entries.remove(&st.conn_id);
        }
        tgid
    }

    fn touch(&mut self, conn_id: u64, tgid: u32) -> &mut Entry {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() >= self.max && !self.entries.contains_key(&conn_id) {
            self.evict_oldest();
        }
        let entry = self.entries.entry(conn_id).or_insert_with(|| Entry {
            conn: Connection::default(),
            tgid,
            last_used: seq,
        });
        entry.last_used = seq;
        entry
    }

    /// Drops the least recently used sixteenth of the table (at least one entry).
    fn evict_oldest(&mut self) {
        let count = (self.entries.len() / EVICT_FRACTION).max(1);
        let mut by_age: Vec<(u64, u64)> = self.entries.iter().map(|(&id, e)| (e.last_used, id)).collect();
        by_age.select_nth_unstable(count - 1);
        for &(_, id) in &by_age[..count] {
            if let Some(e) = self.entries.remove(&id) {
                self.evicted_connections += 1;
                self.evicted_requests += e.conn.in_flight() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(conn_id: u64, direction: Direction, ts: u64, payload: &[u8]) -> SockOp<'_> {
        SockOp {
            ts_ns: ts,
            conn_id,
            tgid: 9,
            tid: 9,
            ret: payload.len() as i32,
            syscall: "read",
            direction,
            payload,
        }
    }

    #[test]
    fn least_recently_used_connection_is_evicted_and_counted() {
        let mut t = ConnectionTable::new(2);
        let up = &mut Update::default();
        t.on_sock(&op(1, Direction::Received, 1, b"GET / HTTP/1.1\r\n\r\n"), up);
        t.on_sock(&op(2, Direction::Received, 2, b"GET / HTTP/1.1\r\n\r\n"), up);
        t.on_sock(&op(1, Direction::Received, 3, b""), up); // touch 1 (an EOF: closes its request)
        t.on_sock(&op(3, Direction::Received, 4, b"GET / HTTP/1.1\r\n\r\n"), up);
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted_connections, 1);
        assert_eq!(t.evicted_requests, 1, "connection 2 had a request open");
    }

    #[test]
    fn a_full_table_evicts_its_oldest_sixteenth_at_once() {
        let mut t = ConnectionTable::new(64);
        let up = &mut Update::default();
        for id in 1..=64 {
            t.on_sock(&op(id, Direction::Received, id, b"GET / HTTP/1.1\r\n\r\n"), up);
        }
        // Connections 1..=4 are the oldest, but 2 is used again: 1, 3, 4, 5 must go.
        t.on_sock(&op(2, Direction::Sent, 100, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"), up);
        t.on_sock(&op(65, Direction::Received, 101, b"GET / HTTP/1.1\r\n\r\n"), up);
        assert_eq!((t.len(), t.evicted_connections, t.evicted_requests), (61, 4, 4));
        for (id, kept) in [(1, false), (2, true), (3, false), (4, false), (5, false), (6, true), (65, true)] {
            assert_eq!(t.entries.contains_key(&id), kept, "connection {id}");
        }
    }

    #[test]
    fn close_removes_and_a_new_id_starts_fresh() {
        let mut t = ConnectionTable::new(8);
        t.on_sock(&op(1, Direction::Received, 1, b"GET /health HTTP/1.1\r\n\r\n"), &mut Update::default());
        let st = StateChange { ts_ns: 5, conn_id: 1, tgid: 9, old: 1, new: crate::events::TCP_CLOSE };
        let mut up = Update::default();
        assert_eq!(t.on_state(&st, &mut up), 9);
        assert_eq!(up.finished.len(), 1);
        assert_eq!(up.finished[0].outcome, crate::http::Outcome::Aborted);
        assert_eq!(t.len(), 0);
    }
}
