//! A real vLLM (CPU build, tiny random model) for the end-to-end tests, provisioned by
//! `cargo xtask e2e`, which sets `INFERWATCH_VLLM_PYTHON` and `INFERWATCH_TINY_MODEL`.
//! Each server runs in its own process group, so stopping it stops its engine and workers;
//! its log is kept under `target/e2e-logs/` and quoted when a test fails.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{free_port, http_get};

fn required_env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the end-to-end tests with `cargo xtask e2e`"))
}

pub struct Vllm {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Vllm {
    /// Starts `python -m vllm.entrypoints.openai.api_server` serving the tiny model as `tiny`.
    pub fn start(name: &str, extra: &[&str]) -> Vllm {
        Self::start_with_env(name, extra, &[])
    }

    /// [`Vllm::start`] with `env` added to vLLM's environment.
    pub fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Vllm {
        let model = required_env("INFERWATCH_TINY_MODEL");
        Self::spawn(name, &["-m", "vllm.entrypoints.openai.api_server", "--model", &model], extra, env)
    }

    /// Starts `vllm serve` (through tests/e2e/vllm_serve.py, see there why) with the tiny model.
    pub fn serve(name: &str, extra: &[&str]) -> Vllm {
        let model = required_env("INFERWATCH_TINY_MODEL");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2e/vllm_serve.py");
        Self::spawn(name, &[script.to_str().unwrap(), &model], extra, &[])
    }

    fn spawn(name: &str, launch: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Vllm {
        use std::os::unix::process::CommandExt;
        let python = required_env("INFERWATCH_VLLM_PYTHON");
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("vllm-{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(python)
            .args(launch)
            .args(["--served-model-name", "tiny", "--dtype", "float32", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--max-model-len", "1024", "--max-num-seqs", "16"])
            .args(extra)
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("DO_NOT_TRACK", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start vLLM");
        Vllm { child: Some(child), port, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until `/health` answers 200; panics with the log's tail otherwise.
    pub fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        loop {
            if let Ok((200, _)) = http_get(addr, "/health") {
                return start.elapsed();
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "vLLM exited ({status}) before it was ready; log {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "vLLM was not ready in {timeout:?}; log {}:\n{}",
                self.log.display(),
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Kills the whole process group at once (a crash, not a shutdown) and reaps the leader.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the process group this test created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for Vllm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A completion request for the tiny model.
pub fn completion(stream: bool, i: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"tiny","prompt":"request number {i} says hello","max_tokens":8,"stream":{stream}}}"#
    );
    post("/v1/completions", &body)
}

/// A stream long enough to still be running when the client gives up.
pub fn long_completion(i: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"tiny","prompt":"long request {i}","max_tokens":500,"min_tokens":500,"stream":true}}"#
    );
    post("/v1/completions", &body)
}

/// A chat request for the tiny model.
pub fn chat(stream: bool, i: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"tiny","messages":[{{"role":"user","content":"chat number {i}"}}],"max_tokens":8,"stream":{stream}}}"#
    );
    post("/v1/chat/completions", &body)
}

/// A raw HTTP/1.1 POST with a JSON body.
pub fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
