//! A stage's sign of life: the time it last made progress, read by `/healthz`.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// When this process started keeping time (the first heartbeat or read).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[derive(Debug)]
pub struct Heartbeat(AtomicU64);

impl Default for Heartbeat {
    /// A fresh heartbeat counts as a beat now: a stage gets its whole grace period to start.
    fn default() -> Self {
        let beat = Self(AtomicU64::new(0));
        beat.beat();
        beat
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        let now = epoch().elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_is_the_time_since_the_last_beat() {
        let h = Heartbeat::default();
        assert!(h.age() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.age() >= Duration::from_millis(20));
        h.beat();
        assert!(h.age() < Duration::from_millis(20));
    }
}
