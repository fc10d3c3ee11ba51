//! The table of connections being followed, bounded: the least recently used connection is
//! evicted (and counted) when it is full.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt as _};

use super::http::{Connection, Outcome, Progress};
use crate::model::sock::{Direction, SockOp, StateChange};

pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 16 * 1024;
/// Bytes all connections may hold for partial heads and events together. Heads are kept up to
/// 16 KiB each: clients sending slow, large heads on every connection would otherwise make
/// the table's worst case 16 KiB × its size. Beyond this budget, the connection that grew is
/// dropped (counted as evicted).
const MAX_BUFFERED: usize = 32 << 20;
/// Connections remembered as closed, so that their late records are ignored (see `closed`).
const REMEMBER_CLOSED: usize = 8192;

const EAGAIN: i32 = -11;
const EPIPE: i32 = -32;
const ECONNRESET: i32 = -104;

struct Entry {
    conn: Connection,
    tgid: u32,
    /// When it was last used, in operations fed to the table.
    last_used: u64,
    /// Its [`Connection::buffered`] after its latest operation.
    buffered: usize,
}

pub struct ConnectionTable {
    entries: HashMap<u64, Entry>,
    /// `(last_used, id)` of every use, oldest first. Only appended to on the hot path: a pair
    /// is stale once its connection is used again or gone, and stale pairs are skipped when
    /// evicting and dropped when compacting. (A B-tree kept in recency order, updated on every
    /// operation, cost more than the HTTP parsing under `wrk`.)
    uses: VecDeque<(u64, u64)>,
    next_seq: u64,
    max: usize,
    /// Sum of the entries' `buffered`.
    buffered: usize,
    /// Ids of connections that closed lately, oldest first. A send's record is written after
    /// the call returns, so it can reach the ring after the close that a peer's RST or FIN
    /// caused meanwhile on another CPU; it must not bring the connection back (no close would
    /// ever remove it). Ids are unique per socket life, so a closed one never comes back.
    closed: VecDeque<u64>,
    closed_set: foldhash::HashSet<u64>,
    /// Connections dropped to stay within `max`, and requests that were open in them.
    pub evicted_connections: u64,
    pub evicted_requests: u64,
}

impl ConnectionTable {
    pub fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            uses: VecDeque::new(),
            next_seq: 0,
            max: max.max(1),
            buffered: 0,
            closed: VecDeque::new(),
            closed_set: foldhash::HashSet::default(),
            evicted_connections: 0,
            evicted_requests: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Feeds one socket operation; adds what it revealed to `up` and returns the process it
    /// belongs to, and whether the connection is the server side of HTTP.
    pub fn on_sock(&mut self, op: &SockOp<'_>, up: &mut Progress) -> (u32, bool) {
        if op.conn_id == 0 {
            return (op.tgid, false);
        }
        // Only an operation that moved bytes starts following a connection: the failed calls
        // and end-of-stream reads that trail a connection's close (or its eviction) would
        // otherwise leave an entry that no close ever removes.
        if (op.ret <= 0 && !self.entries.contains_key(&op.conn_id)) || self.closed_set.contains(&op.conn_id) {
            return (op.tgid, false);
        }
        let entry = self.touch(op.conn_id, op.tgid, op.ts_ns, up);
        let mark = Mark::of(up);
        let conn = &mut entry.conn;
        let mut broken = false;
        match (op.direction, op.ret) {
            (_, EAGAIN) => {}
            // End of stream from the peer (the server may still answer a half-closed one).
            (Direction::Received, 0) => conn.close_into(op.ts_ns, up),
            // The connection broke under us: nothing more will move on it.
            (_, EPIPE | ECONNRESET) => {
                conn.close_into(op.ts_ns, up);
                broken = true;
            }
            (_, r) if r < 0 => {}
            (Direction::Received, r) => conn.receive_transfer(op.ts_ns, op.transfer(r as usize), up),
            (Direction::Sent, r) => conn.send_transfer(op.ts_ns, op.transfer(r as usize), up),
        }
        mark.stamp(up, op.conn_id);
        let answer = (entry.tgid, conn.is_http_server());
        let (before, now) = (entry.buffered, conn.buffered());
        entry.buffered = now;
        self.buffered = self.buffered - before + now;
        if broken {
            self.remove(op.conn_id);
            self.remember_closed(op.conn_id);
        } else if self.buffered > MAX_BUFFERED {
            self.evict(op.conn_id, op.ts_ns, up);
        }
        answer
    }

    /// Bytes held for partial heads and events, all connections together.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.buffered
    }

    fn remember_closed(&mut self, conn_id: u64) {
        if self.closed_set.insert(conn_id) {
            self.closed.push_back(conn_id);
            if self.closed.len() > REMEMBER_CLOSED
                && let Some(old) = self.closed.pop_front()
            {
                self.closed_set.remove(&old);
            }
        }
    }

    fn remove(&mut self, conn_id: u64) -> Option<Entry> {
        let e = self.entries.remove(&conn_id)?;
        self.buffered -= e.buffered;
        Some(e)
    }

    /// Drops a connection; what was open on it ends as `evicted` (so its requests leave the
    /// in-flight count and its state is freed).
    fn evict(&mut self, conn_id: u64, ts: u64, up: &mut Progress) -> bool {
        let Some(mut e) = self.remove(conn_id) else { return false };
        self.evicted_connections += 1;
        self.evicted_requests += e.conn.in_flight() as u64;
        let mark = Mark::of(up);
        e.conn.end_into(ts, Outcome::Evicted, up);
        mark.stamp(up, conn_id);
        true
    }

    /// Feeds a TCP state change: a closed or half-closed connection ends what is open on it
    /// (added to `up`). Returns the process it belongs to.
    pub fn on_state(&mut self, st: &StateChange, up: &mut Progress) -> u32 {
        if st.is_close() {
            // Also for a connection not in the table (evicted earlier): its late records too.
            self.remember_closed(st.conn_id);
        }
        let Some(entry) = self.entries.get_mut(&st.conn_id) else {
            return st.tgid;
        };
        let tgid = entry.tgid;
        if st.ends_connection() {
            let mark = Mark::of(up);
            entry.conn.close_into(st.ts_ns, up);
            mark.stamp(up, st.conn_id);
        }
        if st.is_close() {
            self.remove(st.conn_id);
        }
        tgid
    }

    fn touch(&mut self, conn_id: u64, tgid: u32, ts: u64, up: &mut Progress) -> &mut Entry {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() >= self.max && !self.entries.contains_key(&conn_id) {
            self.evict_least_recently_used(ts, up);
        }
        // Amortised: a pass over the queue once per `entries.len() + 64` uses.
        if self.uses.len() > 2 * self.entries.len() + 64 {
            self.compact();
        }
        self.uses.push_back((seq, conn_id));
        let entry = self.entries.entry(conn_id).or_insert_with(|| Entry {
            conn: Connection::default(),
            tgid,
            last_used: seq,
            buffered: 0,
        });
        entry.last_used = seq;
        entry
    }

    fn is_current(&self, (seq, id): (u64, u64)) -> bool {
        self.entries.get(&id).is_some_and(|e| e.last_used == seq)
    }

    /// Drops the least recently used connection.
    fn evict_least_recently_used(&mut self, ts: u64, up: &mut Progress) {
        // Every entry's latest use is in the queue, so this finds one while any is left.
        while let Some(used) = self.uses.pop_front() {
            if self.is_current(used) && self.evict(used.1, ts, up) {
                return;
            }
        }
    }

    /// Keeps only each connection's latest use.
    fn compact(&mut self) {
        let mut uses = std::mem::take(&mut self.uses);
        uses.retain(|&used| self.is_current(used));
        self.uses = uses;
    }
}

/// Where a connection's additions to a [`Progress`] begin, to give them its id.
struct Mark {
    started: usize,
    gaps: usize,
    finished: usize,
}

impl Mark {
    fn of(up: &Progress) -> Self {
        Self { started: up.started.len(), gaps: up.gaps.len(), finished: up.finished.len() }
    }

    fn stamp(&self, up: &mut Progress, conn_id: u64) {
        up.started[self.started..].iter_mut().for_each(|s| s.conn_id = conn_id);
        up.gaps[self.gaps..].iter_mut().for_each(|g| g.conn_id = conn_id);
        up.finished[self.finished..].iter_mut().for_each(|f| f.conn_id = conn_id);
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
            family: inferwatch_common::sock::AF_INET,
            payload,
            tail: b"",
            arrival_ns: 0,
            established_ns: 0,
        }
    }

    /// The kernel's record of connection `conn_id` closing at `ts_ns`.
    fn closed(conn_id: u64, ts_ns: u64) -> StateChange {
        StateChange { ts_ns, conn_id, tgid: 9, old: 1, new: inferwatch_common::tcp::TcpState::Close as i32 }
    }

    #[test]
    fn least_recently_used_connection_is_evicted_and_counted() {
        let mut t = ConnectionTable::new(2);
        let up = &mut Progress::default();
        t.on_sock(&op(1, Direction::Received, 1, b"GET / HTTP/1.1\r\n\r\n"), up);
        t.on_sock(&op(2, Direction::Received, 2, b"GET / HTTP/1.1\r\n\r\n"), up);
        t.on_sock(&op(1, Direction::Received, 3, b""), up); // touch 1 (an EOF: closes its request)
        t.on_sock(&op(3, Direction::Received, 4, b"GET / HTTP/1.1\r\n\r\n"), up);
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted_connections, 1);
        assert_eq!(t.evicted_requests, 1, "connection 2 had a request open");
        // It ends as evicted (so it leaves the in-flight count), under its own connection.
        let evicted: Vec<_> = up.finished.iter().filter(|f| f.outcome == Outcome::Evicted).collect();
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].conn_id, 2);
        assert!(up.started.iter().all(|s| s.conn_id != 0), "every start carries its connection");
    }

    #[test]
    fn eviction_follows_recency_through_many_uses_and_closes() {
        let mut t = ConnectionTable::new(64);
        let up = &mut Progress::default();
        for id in 1..=64 {
            t.on_sock(&op(id, Direction::Received, id, b"GET / HTTP/1.1\r\n\r\n"), up);
        }
        // Many uses of a few connections (the queue is compacted along the way), and a close.
        for round in 0..1000 {
            t.on_sock(&op(2 + round % 3, Direction::Sent, 100 + round, b"x"), up);
        }
        t.on_state(&closed(1, 2000), up);
        assert!(t.uses.len() <= 2 * t.len() + 65, "the queue stays bounded: {}", t.uses.len());
        // 63 left: one new connection fits, the next evicts the least recently used: 5, then 6.
        for id in [65, 66, 67] {
            t.on_sock(&op(id, Direction::Received, 3000 + id, b"GET / HTTP/1.1\r\n\r\n"), up);
        }
        assert_eq!((t.len(), t.evicted_connections, t.evicted_requests), (64, 2, 2));
        for (id, kept) in [(2, true), (3, true), (4, true), (5, false), (6, false), (7, true), (67, true)] {
            assert_eq!(t.entries.contains_key(&id), kept, "connection {id}");
        }
    }

    #[test]
    fn close_removes_and_a_new_id_starts_fresh() {
        let mut t = ConnectionTable::new(8);
        t.on_sock(&op(1, Direction::Received, 1, b"GET /health HTTP/1.1\r\n\r\n"), &mut Progress::default());
        let st = closed(1, 5);
        let mut up = Progress::default();
        assert_eq!(t.on_state(&st, &mut up), 9);
        assert_eq!(up.finished.len(), 1);
        assert_eq!(up.finished[0].outcome, crate::requests::http::Outcome::Aborted);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn calls_that_trail_a_close_or_an_eviction_leave_nothing_behind() {
        let mut t = ConnectionTable::new(8);
        let up = &mut Progress::default();
        let failed = |id, ret| SockOp { ret, ..op(id, Direction::Sent, 9, b"") };
        // Unknown connections (closed, or evicted earlier): a failed write, an EOF.
        t.on_sock(&failed(1, EPIPE), up);
        t.on_sock(&op(2, Direction::Received, 9, b""), up);
        assert_eq!(t.len(), 0);
        // A connection that breaks under the server is done with at once.
        t.on_sock(&op(3, Direction::Received, 1, b"GET / HTTP/1.1\r\n\r\n"), up);
        t.on_sock(&failed(3, ECONNRESET), up);
        assert_eq!(t.len(), 0);
        assert_eq!(up.finished.len(), 1);
    }

    #[test]
    fn slow_heads_on_every_connection_stay_within_the_byte_budget() {
        let mut t = ConnectionTable::new(DEFAULT_MAX_CONNECTIONS);
        let up = &mut Progress::default();
        // Each connection sends 15 KiB of a head that never ends.
        let part = [b"POST /v1/completions HTTP/1.1\r\n".as_slice(), &[b'x'; 15 * 1024]].concat();
        for id in 1..=DEFAULT_MAX_CONNECTIONS as u64 {
            t.on_sock(&op(id, Direction::Received, id, &part), up);
            assert!(t.buffered() <= MAX_BUFFERED);
        }
        assert!(t.evicted_connections > 0);
        let kept: usize = t.entries.values().map(|e| e.conn.buffered()).sum();
        assert_eq!(kept, t.buffered(), "the running sum matches");
        // Closing everything gives every byte back.
        for id in 1..=DEFAULT_MAX_CONNECTIONS as u64 {
            t.on_state(&closed(id, 1 << 40), up);
        }
        assert_eq!((t.len(), t.buffered()), (0, 0));
    }

    #[test]
    fn a_send_recorded_after_its_close_does_not_bring_the_connection_back() {
        let mut t = ConnectionTable::new(8);
        let up = &mut Progress::default();
        t.on_sock(&op(1, Direction::Received, 1, b"GET / HTTP/1.1\r\n\r\n"), up);
        t.on_state(&closed(1, 5), up);
        t.on_sock(&op(1, Direction::Sent, 4, b"HTTP/1.1 200 OK\r\n"), up);
        assert_eq!(t.len(), 0);
        // Remembered within bounds.
        for id in 100..100 + 2 * REMEMBER_CLOSED as u64 {
            t.on_state(&closed(id, 5), up);
        }
        assert_eq!((t.closed.len(), t.closed_set.len()), (REMEMBER_CLOSED, REMEMBER_CLOSED));
    }
}
