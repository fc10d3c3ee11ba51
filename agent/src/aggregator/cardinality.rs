//! A cap on the series of each metric family whose labels come from the outside world (status
//! codes, pids, scraped pages): beyond it new label sets are refused and counted in
//! `inferwatch_series_refused_total{family}`, so a misbehaving server cannot grow the agent's
//! memory or a Prometheus without bound.

use std::hash::{BuildHasher as _, Hash};

use foldhash::{HashMap, HashMapExt as _, HashSet};

/// Default for `--max-series-per-family`.
pub(crate) const DEFAULT_MAX_SERIES_PER_FAMILY: usize = 2000;

pub(crate) struct SeriesBudget {
    max: usize,
    admitted: HashMap<&'static str, HashSet<u64>>,
}

impl SeriesBudget {
    pub fn new(max: usize) -> Self {
        Self { max, admitted: HashMap::new() }
    }

    /// Whether a series with `labels` may exist in `family`: true for one that already does, or
    /// while the family has room.
    pub fn admit(&mut self, family: &'static str, labels: &impl Hash) -> bool {
        let key = hash(labels);
        let set = self.admitted.entry(family).or_default();
        if set.contains(&key) {
            return true;
        }
        if set.len() >= self.max {
            return false;
        }
        set.insert(key);
        true
    }

    /// A series was removed: its room is free again.
    pub fn release(&mut self, family: &'static str, labels: &impl Hash) {
        if let Some(set) = self.admitted.get_mut(family) {
            set.remove(&hash(labels));
        }
    }
}

fn hash(labels: &impl Hash) -> u64 {
    // Fixed seed: the same labels must hash alike for the agent's whole life.
    foldhash::fast::FixedState::with_seed(0).hash_one(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_new_series_beyond_the_cap_but_keeps_existing_ones() {
        let mut budget = SeriesBudget::new(2);
        assert!(budget.admit("f", &("a", 1)));
        assert!(budget.admit("f", &("b", 2)));
        assert!(!budget.admit("f", &("c", 3)), "third series refused");
        assert!(budget.admit("f", &("a", 1)), "existing series still updated");
        assert!(budget.admit("g", &("c", 3)), "each family has its own room");
        budget.release("f", &("a", 1));
        assert!(budget.admit("f", &("c", 3)), "released room is reused");
    }
}
