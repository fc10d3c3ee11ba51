//! Which container and pod a process runs in, from `/proc/PID/cgroup`.

/// Container id and Kubernetes pod uid from `/proc/PID/cgroup`, where the path shows them
/// (cgroupfs and systemd drivers; docker, containerd, CRI-O).
pub fn container_from_cgroup(cgroup: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for part in path.split('/') {
            let part = part.trim_end_matches(".scope").trim_end_matches(".slice");
            if let Some(uid) = part.rsplit_once("-pod").map(|(_, u)| u).or_else(|| part.strip_prefix("pod")) {
                let uid = uid.replace('_', "-");
                if uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                    pod = Some(uid);
                }
            }
            let id = part.rsplit(['-', ':']).next().unwrap_or(part);
            if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                container = Some(id.to_string());
            }
        }
    }
    (container, pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_server_runs_in_a_pod() {
        let root = crate::collect::procfs::fixture("vllm-node");
        let text = std::fs::read_to_string(root.join("4100/cgroup")).unwrap();
        let (container, pod) = container_from_cgroup(&text);
        assert_eq!(container.as_deref().map(|c| &c[..12]), Some("9f1c2d3e4f5a"));
        assert_eq!(pod.as_deref(), Some("2f0c6bd1-5b1e-4c4e-9a4f-1b0a6e0f7c11"));
        let host = std::fs::read_to_string(root.join("5000/cgroup")).unwrap();
        assert_eq!(container_from_cgroup(&host), (None, None));
    }

    #[test]
    fn containers_and_pods_from_cgroups() {
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2f0c6bd1_5b1e_4c4e_9a4f_1b0a6e0f7c11.slice/cri-containerd-9f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c.scope\n";
        assert_eq!(
            container_from_cgroup(systemd),
            (
                Some("9f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c".into()),
                Some("2f0c6bd1-5b1e-4c4e-9a4f-1b0a6e0f7c11".into())
            )
        );
        let cgroupfs = "12:memory:/kubepods/besteffort/pod0a1b2c3d-0000-1111-2222-333344445555/4c4b3a29180d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f\n";
        let (c, p) = container_from_cgroup(cgroupfs);
        assert_eq!(p.as_deref(), Some("0a1b2c3d-0000-1111-2222-333344445555"));
        assert_eq!(c.as_deref(), Some("4c4b3a29180d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"));
        let docker = "0::/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n";
        assert_eq!(
            container_from_cgroup(docker).0.as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert_eq!(
            container_from_cgroup("4:memory:/process_api/af73461c10a3d7fd569d48561f63d2d3\n0::/\n"),
            (None, None)
        );
    }
}
