//! A process that looks like vLLM's API server from /proc and answers its /metrics, /version and
//! /v1/models (tests/servers/fake_vllm): for what discovery and scraping see where a real vLLM
//! would be too slow or cannot go (inside a test's network namespace, as a hostile impersonator).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct FakeVllm {
    child: Child,
}

impl FakeVllm {
    /// Started by `command` (e.g. `Netns::command("python3")` or `Command::new("python3")`),
    /// listening on `host:port`, with extra arguments (`--mode silent`, `--served-model-name`).
    pub fn start(mut command: Command, host: &str, port: u16, extra: &[&str]) -> FakeVllm {
        let child = command
            .args(["-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", &port.to_string()])
            .args(extra)
            .env("PYTHONPATH", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("servers/fake_vllm"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        FakeVllm { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `count` silent impostors run as `uid` (titled like vLLM's API server, listening on
    /// 127.0.0.1, never answering), each on a port of its own, all listening on return. A port
    /// taken meanwhile by someone else costs a retry on another.
    pub fn impostors(count: usize, uid: u32) -> Vec<FakeVllm> {
        use std::os::unix::process::CommandExt;
        let mut used = std::collections::HashSet::new();
        let mut start = || loop {
            let port = crate::free_port();
            if used.insert(port) {
                let mut command = Command::new("python3");
                command.uid(uid).gid(uid);
                return FakeVllm::start(command, "127.0.0.1", port, &["--mode", "silent"]);
            }
        };
        let mut all: Vec<FakeVllm> = (0..count).map(|_| start()).collect();
        for fake in &mut all {
            for _ in 0..5 {
                if fake.listening_within(Duration::from_secs(20)) {
                    break;
                }
                *fake = start();
            }
        }
        all
    }

    /// Whether it listens (a listening socket in its /proc/PID/net/tcp) within `timeout`;
    /// false at once if it exited.
    fn listening_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let pid = self.pid();
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
            // A listener owned by this process: state 0A and an inode among its fds.
            if tcp.lines().any(|l| l.split_whitespace().nth(3) == Some("0A") && owns(pid, l)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits until `ready` says it answers (e.g. a connect from where it should be reachable).
    pub fn wait(&mut self, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(self.child.try_wait().unwrap().is_none(), "the fake vLLM exited");
            assert!(Instant::now() < deadline, "the fake vLLM did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeVllm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the socket of a /proc/net/tcp line belongs to process `pid`.
fn owns(pid: u32, line: &str) -> bool {
    let Some(inode) = line.split_whitespace().nth(9) else { return false };
    let target = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target))
        })
        .unwrap_or(false)
}
