//! The maps both sides name, and their sizes.

/// The watched thread-group ids as a bitmap: an array of `u64` words, bit `tgid % 64` of word
/// `tgid / 64` (see [`watched_bit`]). Every socket operation on the node asks it, so it is an
/// array the verifier turns into one load (a hash lookup is a helper call and a hash).
pub const WATCHED_TGIDS: &str = "WATCHED_TGIDS";
/// Thread-group ids are below Linux's `PID_MAX_LIMIT` (2^22 on 64-bit systems): 512 KiB of words.
pub const TGID_LIMIT: u32 = 1 << 22;
/// Words of [`WATCHED_TGIDS`].
pub const WATCHED_WORDS: u32 = TGID_LIMIT / 64;
/// Most processes watched at once; the capacity of [`SCHED_ROLES`].
pub const MAX_WATCHED_TGIDS: u32 = 4096;

/// Where `tgid` is in [`WATCHED_TGIDS`]: its word's index and its bit in that word.
#[inline(always)]
pub const fn watched_bit(tgid: u32) -> (u32, u64) {
    (tgid / 64, 1 << (tgid % 64))
}

/// Ring buffer carrying [`crate::sock::SockEvent`] records to userspace.
pub const EVENTS: &str = "EVENTS";
/// Ring buffer size in bytes (a power of two, a multiple of the page size). 4 MiB: the reader
/// drains every few milliseconds and is woken at 1/16 full, so this absorbs bursts; the ring's
/// pages count in the agent's RSS twice (the kernel maps its data area twice, for
/// wrap-around), so it is no larger than that needs.
pub const EVENTS_RING_BYTES: u32 = 1 << 22;
/// Pending ring-buffer bytes at which a data record wakes the reader (1/16 of the ring); below
/// it the reader drains on its own timer (the agent's `--drain-interval`).
pub const WAKEUP_PENDING_BYTES: u64 = EVENTS_RING_BYTES as u64 / 16;

/// Per-CPU array of events dropped in the kernel: one `u64` per [`crate::sock::LostReason`].
pub const LOST: &str = "LOST";

/// LRU map from `struct sock` address to [`crate::sock::TrackedSock`].
pub const TRACKED_SOCKS: &str = "TRACKED_SOCKS";
pub const MAX_TRACKED_SOCKS: u32 = 65536;

/// Hash map from a TCP port that a watched process listens on (`u16`, host order) to that
/// process's tgid: its accepted connections are tracked from their establishment, so the time a
/// request waits before the server accepts and reads it is seen.
pub const LISTEN_PORTS: &str = "LISTEN_PORTS";
pub const MAX_LISTEN_PORTS: u32 = 4096;

/// Hash map from tgid to [`crate::sched::Role`] of the processes whose scheduling is measured.
pub const SCHED_ROLES: &str = "SCHED_ROLES";
/// Per-CPU array holding one [`crate::sched::SchedStats`], so the agent reads all of them with
/// one system call.
pub const SCHED_STATS: &str = "SCHED_STATS";

/// Array of one record-assembly slot per possible CPU; the agent sets its size at load.
pub const SCRATCH: &str = "SCRATCH";

/// The global (a `u32` in .rodata) holding the runtime payload capture limit.
pub const CAPTURE_BYTES_GLOBAL: &str = "CAPTURE_BYTES";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tgid_has_its_own_bit_inside_the_bitmap() {
        for tgid in [0, 1, 63, 64, 65, 4095, 4096, 32_768, 4_194_303] {
            let (word, bit) = watched_bit(tgid);
            assert!(word < WATCHED_WORDS, "{tgid}");
            assert_eq!(bit.count_ones(), 1, "{tgid}");
        }
        // Neighbours (pids are handed out in sequence) never share a bit.
        for a in 0..1024u32 {
            for b in a + 1..a + 130 {
                assert_ne!(watched_bit(a), watched_bit(b), "{a} and {b}");
            }
        }
    }
}
