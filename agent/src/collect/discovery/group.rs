//! The group stage: vLLM processes into instances, each under its topmost vLLM ancestor.

use std::collections::{BTreeMap, HashMap};

use crate::model::instance::{Process, Role};

/// Groups vLLM processes into instances: each belongs to its topmost vLLM ancestor.
pub(crate) fn group(processes: &[Process], all_ppids: &HashMap<u32, u32>) -> Vec<(u32, Vec<Process>)> {
    let vllm: BTreeMap<u32, &Process> = processes.iter().map(|p| (p.pid, p)).collect();
    let mut instances: BTreeMap<u32, Vec<Process>> = BTreeMap::new();
    for p in processes {
        let mut root = p.pid;
        let mut cursor = p.pid;
        let mut hops = 0;
        while let Some(&parent) = all_ppids.get(&cursor) {
            if parent <= 1 || hops > 64 {
                break;
            }
            if vllm.contains_key(&parent) {
                root = parent;
            }
            cursor = parent;
            hops += 1;
        }
        instances.entry(root).or_default().push(p.clone());
    }
    instances.into_iter().filter(|(_, ps)| ps.iter().any(|p| p.role == Role::ApiServer)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_process_tree() {
        let p = |pid, ppid, role| Process { pid, ppid, role, comm: String::new() };
        // One instance with two API servers under a launcher; a second, separate instance.
        let procs = vec![
            p(100, 50, Role::ApiServer),
            p(101, 100, Role::ApiServer),
            p(102, 100, Role::ApiServer),
            p(103, 100, Role::EngineCore),
            p(104, 103, Role::Worker),
            p(200, 1, Role::ApiServer),
            p(201, 200, Role::EngineCore),
            p(300, 1, Role::EngineCore), // an orphaned engine: no API server, not an instance
        ];
        let ppids: HashMap<u32, u32> = procs.iter().map(|p| (p.pid, p.ppid)).chain([(50, 1)]).collect();
        let groups = group(&procs, &ppids);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, 100);
        assert_eq!(groups[0].1.len(), 5);
        assert_eq!(groups[1].0, 200);
    }
}
