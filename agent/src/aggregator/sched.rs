//! The kernel's per-role scheduler sums as metric families: on-CPU and off-CPU time, context
//! switches, and the run-queue delay histogram (see ebpf/inferwatch-ebpf/src/sched.rs).

use inferwatch_common::sched::{RUNQUEUE_BUCKETS, Slot, index};

use crate::model::{
    family::{Family, family, sample},
    instance::Role,
};

const OFFCPU_REASONS: [(&str, Slot); 3] =
    [("futex", Slot::OffCpuFutexNs), ("sleep", Slot::OffCpuSleepNs), ("other", Slot::OffCpuOtherNs)];

/// The values of the four families, each in its samples' order (roles in `Role::ALL` order).
fn values(slots: &[u64]) -> [Vec<f64>; 4] {
    let at = |role: Role, slot: Slot, offset: u32| {
        slots.get(index(role.sched_index(), slot, offset)).copied().unwrap_or(0)
    };
    let seconds = |ns: u64| ns as f64 / 1e9;
    let (mut oncpu, mut offcpu, mut switches, mut runqueue) = (vec![], vec![], vec![], vec![]);
    for role in Role::ALL {
        oncpu.push(seconds(at(role, Slot::OnCpuNs, 0)));
        for (_, slot) in OFFCPU_REASONS {
            offcpu.push(seconds(at(role, slot, 0)));
        }
        switches.push(at(role, Slot::Switches, 0) as f64);
        let mut cumulative = 0u64;
        for b in 0..RUNQUEUE_BUCKETS {
            cumulative += at(role, Slot::RunqueueBuckets, b);
            runqueue.push(cumulative as f64);
        }
        runqueue.push(seconds(at(role, Slot::RunqueueNs, 0)));
        runqueue.push(at(role, Slot::RunqueueCount, 0) as f64);
    }
    [oncpu, offcpu, switches, runqueue]
}

/// Families from `slots` (`SCHED_SLOTS` per role, in role order).
pub(crate) fn families(slots: &[u64]) -> Vec<Family> {
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
pub(crate) fn update(families: &mut Vec<Family>, slots: &[u64]) {
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
    use crate::aggregator::snapshots::encode_snapshots;
    use inferwatch_common::sched::{ROLE_COUNT, SLOTS};

    #[test]
    fn slots_become_counters_and_a_cumulative_histogram() {
        let mut slots = vec![0u64; (ROLE_COUNT * SLOTS) as usize];
        let api = Role::ApiServer.sched_index();
        slots[index(api, Slot::OnCpuNs, 0)] = 2_500_000_000;
        slots[index(api, Slot::OffCpuFutexNs, 0)] = 1_000_000;
        slots[index(api, Slot::RunqueueNs, 0)] = 300_000;
        slots[index(api, Slot::RunqueueCount, 0)] = 3;
        slots[index(api, Slot::RunqueueBuckets, 2)] = 1; // <= 4 µs
        slots[index(api, Slot::RunqueueBuckets, 10)] = 2; // <= 1024 µs
        let fams = families(&slots);
        let out = encode_snapshots(fams.clone());
        assert!(out.contains("inferwatch_oncpu_seconds_total{role=\"api_server\"} 2.5\n"), "{out}");
        assert!(
            out.contains("inferwatch_offcpu_seconds_total{role=\"api_server\",reason=\"futex\"} 0.001\n")
        );
        assert!(
            out.contains(
                "inferwatch_sched_runqueue_delay_seconds_bucket{le=\"0.000004\",role=\"api_server\"} 1\n"
            ),
            "{out}"
        );
        assert!(out.contains(
            "inferwatch_sched_runqueue_delay_seconds_bucket{le=\"0.001024\",role=\"api_server\"} 3\n"
        ));
        assert!(
            out.contains(
                "inferwatch_sched_runqueue_delay_seconds_bucket{le=\"+Inf\",role=\"api_server\"} 3\n"
            )
        );
        assert!(out.contains("inferwatch_sched_runqueue_delay_seconds_count{role=\"api_server\"} 3\n"));
        assert!(out.contains("# TYPE inferwatch_oncpu_seconds counter\n"));
        // And it parses back as one histogram family.
        let parsed = crate::collect::scrape::parse::parse(&out).unwrap();
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
