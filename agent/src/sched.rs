//! The kernel's per-role scheduler sums as metric families: on-CPU and off-CPU time, context
//! switches, and the run-queue delay histogram (see ebpf/inferwatch-ebpf/src/sched.rs).

use inferwatch_common::{
    RUNQUEUE_BUCKETS, SCHED_SLOTS, SLOT_OFFCPU_FUTEX_NS, SLOT_OFFCPU_OTHER_NS, SLOT_OFFCPU_SLEEP_NS,
    SLOT_ONCPU_NS, SLOT_RUNQUEUE_BUCKETS, SLOT_RUNQUEUE_COUNT, SLOT_RUNQUEUE_NS, SLOT_SWITCHES,
};

use crate::{
    discovery::Role,
    promtext::{Family, family, sample},
};

const OFFCPU_REASONS: [(&str, u32); 3] =
    [("futex", SLOT_OFFCPU_FUTEX_NS), ("sleep", SLOT_OFFCPU_SLEEP_NS), ("other", SLOT_OFFCPU_OTHER_NS)];

/// The values of the four families, each in its samples' order (roles in `Role::ALL` order).
fn values(slots: &[u64]) -> [Vec<f64>; 4] {
    let at = |role: Role, slot: u32| {
        slots.get((role.sched_index() as u32 * SCHED_SLOTS + slot) as usize).copied().unwrap_or(0)
    };
    let seconds = |ns: u64| ns as f64 / 1e9;
    let (mut oncpu, mut offcpu, mut switches, mut runqueue) = (vec![], vec![], vec![], vec![]);
    for role in Role::ALL {
        oncpu.push(seconds(at(role, SLOT_ONCPU_NS)));
        for (_, slot) in OFFCPU_REASONS {
            offcpu.push(seconds(at(role, slot)));
        }
        switches.push(at(role, SLOT_SWITCHES) as f64);
        let mut cumulative = 0u64;
        for b in 0..RUNQUEUE_BUCKETS {
            cumulative += at(role, SLOT_RUNQUEUE_BUCKETS + b);
            runqueue.push(cumulative as f64);
        }
        runqueue.push(seconds(at(role, SLOT_RUNQUEUE_NS)));
        runqueue.push(at(role, SLOT_RUNQUEUE_COUNT) as f64);
    }
    [oncpu, offcpu, switches, runqueue]
}

/// Families from `slots` (`SCHED_SLOTS` per role, in role order).
pub fn families(slots: &[u64]) -> Vec<Family> {
    let (mut oncpu, mut offcpu, mut switches, mut runqueue) = (vec![], vec![], vec![], vec![]);
    for role in Role::ALL {
        let r = role.as_str();
        oncpu.push(sample("inferwatch_oncpu_seconds_total", &[("role", r)], 0.0));
        for (reason, _) in OFFCPU_REASONS {
            offcpu.push(sample("inferwatch_offcpu_seconds_total", &[("role", r), ("reason", reason)], 0.0));
        }
        switches.push(sample("inferwatch_context_switches_total", &[("role", r)], 0.0));
        for b in 0..RUNQUEUE_BUCKETS {
            let le = if b == RUNQUEUE_BUCKETS - 1 {
                "+Inf".to_string()
            } else {
                format!("{:?}", (1u64 << b) as f64 * 1e-6)
            };
            runqueue.push(sample(
                "inferwatch_sched_runqueue_delay_seconds_bucket",
                &[("role", r), ("le", &le)],
                0.0,
            ));
        }
        runqueue.push(sample("inferwatch_sched_runqueue_delay_seconds_sum", &[("role", r)], 0.0));
        runqueue.push(sample("inferwatch_sched_runqueue_delay_seconds_count", &[("role", r)], 0.0));
    }
    let mut families = vec![
        family("inferwatch_oncpu_seconds", "CPU time of vLLM's processes, by role", "counter", oncpu),
        family(
            "inferwatch_offcpu_seconds",
            "Time vLLM's threads spent blocked, by role and what they blocked in (futex: locks and the GIL)",
            "counter",
            offcpu,
        ),
        family(
            "inferwatch_context_switches",
            "Context switches of vLLM's threads, by role",
            "counter",
            switches,
        ),
        family(
            "inferwatch_sched_runqueue_delay_seconds",
            "Time vLLM's threads waited for a CPU after being woken or preempted, by role",
            "histogram",
            runqueue,
        ),
    ];
    update(&mut families, slots);
    families
}

/// Rewrites the values of `families` (as [`families`] built them) from `slots`. The families'
/// shape never changes, so the report every second only writes numbers: building ~100 labelled
/// samples per second was a fifth of an idle agent's CPU.
pub fn update(families: &mut Vec<Family>, slots: &[u64]) {
    if families.len() != 4 {
        *families = self::families(slots);
        return;
    }
    for (family, values) in families.iter_mut().zip(values(slots)) {
        for (sample, value) in family.samples.iter_mut().zip(values) {
            sample.value = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferwatch_common::{ROLE_API_SERVER, SCHED_ROLE_COUNT};

    #[test]
    fn slots_become_counters_and_a_cumulative_histogram() {
        let mut slots = vec![0u64; (SCHED_ROLE_COUNT * SCHED_SLOTS) as usize];
        let base = (ROLE_API_SERVER as u32 * SCHED_SLOTS) as usize;
        slots[base + SLOT_ONCPU_NS as usize] = 2_500_000_000;
        slots[base + SLOT_OFFCPU_FUTEX_NS as usize] = 1_000_000;
        slots[base + SLOT_RUNQUEUE_NS as usize] = 300_000;
        slots[base + SLOT_RUNQUEUE_COUNT as usize] = 3;
        slots[base + (SLOT_RUNQUEUE_BUCKETS + 2) as usize] = 1; // <= 4 µs
        slots[base + (SLOT_RUNQUEUE_BUCKETS + 10) as usize] = 2; // <= 1024 µs
        let mut out = String::new();
        let fams = families(&slots);
        crate::promtext::write_sources(&mut out, &[(&fams, &[])]);
        assert!(out.contains("inferwatch_oncpu_seconds_total{role=\"api_server\"} 2.5\n"), "{out}");
        assert!(
            out.contains("inferwatch_offcpu_seconds_total{role=\"api_server\",reason=\"futex\"} 0.001\n")
        );
        assert!(
            out.contains(
                "inferwatch_sched_runqueue_delay_seconds_bucket{role=\"api_server\",le=\"4e-6\"} 1.0\n"
            ),
            "{out}"
        );
        assert!(out.contains(
            "inferwatch_sched_runqueue_delay_seconds_bucket{role=\"api_server\",le=\"0.001024\"} 3.0\n"
        ));
        assert!(out.contains(
            "inferwatch_sched_runqueue_delay_seconds_bucket{role=\"api_server\",le=\"+Inf\"} 3.0\n"
        ));
        assert!(out.contains("inferwatch_sched_runqueue_delay_seconds_count{role=\"api_server\"} 3.0\n"));
        assert!(out.contains("# TYPE inferwatch_oncpu_seconds counter\n"));
        // And it parses back as one histogram family.
        let parsed = crate::promtext::parse(&out).unwrap();
        assert_eq!(parsed.iter().filter(|f| f.kind == "histogram").count(), 1);

        // Updating in place gives what building afresh gives, values in the right samples.
        let mut kept = families(&vec![0u64; slots.len()]);
        update(&mut kept, &slots);
        assert_eq!(kept, fams);
        let mut empty = Vec::new();
        update(&mut empty, &slots);
        assert_eq!(empty, fams);
    }
}
