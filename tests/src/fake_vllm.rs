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
