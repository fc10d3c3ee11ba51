//! Helpers for the integration tests: start the real agent, read its metrics over HTTP,
//! and drive helper processes whose socket I/O is known exactly.
//!
//! The agent binary is `$INFERWATCH_BIN` (set by `cargo xtask test`), else `target/debug/inferwatch`.

pub mod client;
pub mod fake_vllm;
pub mod netns;
pub mod otlp;
pub mod prometheus;
pub mod servers;
pub mod vllm;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixListener,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// The NVML stand-in library (`cargo xtask nvml-standin`), as `$INFERWATCH_NVML_STANDIN` names
/// it: the GPU path's tests need it on machines without a GPU, and fail without it.
pub fn nvml_standin() -> PathBuf {
    let path = std::env::var_os("INFERWATCH_NVML_STANDIN").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/nvml-standin/libnvidia-ml.so.1")
    });
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask nvml-standin` (cargo xtask test does)",
        path.display()
    );
    path
}

pub fn agent_binary() -> PathBuf {
    std::env::var_os("INFERWATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/inferwatch"))
}

/// Fails loudly when not root: these tests load BPF programs and are meant to run, not skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the kernel integration tests need root: run them with `cargo xtask test`");
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running agent, stopped with SIGTERM (or killed) when dropped.
pub struct Agent {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent watching `pids` only (no discovery) and waits until `/healthz` answers.
    pub fn start(pids: &[u32]) -> Agent {
        Self::start_with(pids, &["--no-discovery"])
    }

    /// Starts the agent with discovery on, as a user would: no pids.
    pub fn start_discovering(extra: &[&str]) -> Agent {
        Self::start_with(&[], extra)
    }

    /// Waits until discovery has seen vLLM listen on `port`: from then on its connections are
    /// tracked from their handshake, so even a connection's first request is timed from its
    /// arrival (before, it is timed from its first read: README, "The clock starts when the
    /// request arrives").
    pub fn wait_listening(&self, port: u16) {
        let suffix = format!(":{port}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let all = self.json("/api/v1/instances");
            let listening = all.as_array().into_iter().flatten().any(|i| {
                i["listen"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a.as_str().is_some_and(|a| a.ends_with(&suffix)))
            });
            if listening {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not see vLLM listen on {port}:\n{all}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// GETs a JSON document from the agent's API.
    pub fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.try_get(path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn start_with(pids: &[u32], extra: &[&str]) -> Agent {
        Self::start_with_env(pids, extra, &[])
    }

    /// [`Agent::start_with`], with `env` added to the agent's environment.
    pub fn start_with_env(pids: &[u32], extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Agent {
        let mut agent = Self::spawn_with_env(pids, extra, env);
        // Ready: the first discovery scan has set up the watch maps, so nothing is missed from
        // here on; and healthy.
        agent.wait_until_ready(|agent| {
            matches!(agent.try_get("/readyz"), Ok((200, _)))
                && match agent.try_get("/healthz") {
                    Ok((200, body)) => {
                        assert_eq!(body, "ok\n");
                        true
                    }
                    _ => false,
                }
        });
        agent
    }

    /// Starts the agent without waiting for it: see [`Agent::wait_until_ready`].
    pub fn spawn(pids: &[u32], extra: &[&str]) -> Agent {
        Self::spawn_with_env(pids, extra, &[])
    }

    fn spawn_with_env(pids: &[u32], extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Agent {
        Self::spawn_wrapped(&[], pids, extra, env)
    }

    /// [`Agent::start_with`] run through `wrapper` (e.g. `setpriv --bounding-set=-sys_admin --`),
    /// which must exec the agent.
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Agent {
        let mut agent = Self::spawn_wrapped(wrapper, &[], extra, &[]);
        agent.wait_until_ready(|agent| matches!(agent.try_get("/readyz"), Ok((200, _))));
        agent
    }

    fn spawn_wrapped(
        wrapper: &[&str],
        pids: &[u32],
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Agent {
        // A test may choose the address (`--listen 0.0.0.0:PORT`); it is then reached on loopback.
        let chosen = extra.iter().position(|a| *a == "--listen").and_then(|i| extra.get(i + 1));
        let addr: SocketAddr = match chosen {
            Some(listen) => {
                let port = listen.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap();
                format!("127.0.0.1:{port}").parse().unwrap()
            }
            None => format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        };
        let log =
            std::env::temp_dir().join(format!("inferwatch-test-{}-{}.log", std::process::id(), addr.port()));
        let mut cmd = match wrapper.split_first() {
            None => Command::new(agent_binary()),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_binary());
                c
            }
        };
        if chosen.is_none() {
            cmd.arg("--listen").arg(addr.to_string());
        }
        cmd.args(extra);
        for pid in pids {
            cmd.arg("--pid").arg(pid.to_string());
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .env("INFERWATCH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", agent_binary().display()));
        Agent { child: Some(child), addr, log }
    }

    /// Polls `ready` for up to 20 s (`$INFERWATCH_READY_SECONDS` where everything is slower,
    /// as in an emulated VM); panics with the agent's log if it exits or never gets there.
    pub fn wait_until_ready(&mut self, ready: impl Fn(&Agent) -> bool) {
        let seconds =
            std::env::var("INFERWATCH_READY_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            if ready(self) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the agent exited early ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the agent was not ready in {seconds} s:\n{}", self.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.addr, path)
    }

    pub fn metrics(&self) -> String {
        let (status, body) = self.try_get("/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls /metrics until `done` holds for the text, or panics after `timeout`.
    pub fn wait_for_metrics(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics();
            if done(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "metrics never reached the expected state:\n{text}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the agent to exit on its own, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit within {timeout:?}:\n{}", self.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill with a pid we own and a valid signal.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the agent ignored SIGTERM for 10 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET (Connection: close), returning status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status"))?;
    Ok((status, body.to_string()))
}

/// The value of the series whose name and labels are exactly `series` (e.g. `m{a="1"}`).
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Every series line of a metric family whose labels contain `needle`.
pub fn series_matching<'a>(text: &'a str, family: &str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(family) && l.contains(needle)).collect()
}

/// A web config in a fresh directory named after `tag`: TLS with a self-signed certificate for
/// 127.0.0.1 (`agent.crt`, also the CA a client trusts) and basic auth for `prom:s3cret`.
/// Returns the directory and the config file's path.
pub fn tls_web_config(tag: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("inferwatch-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-days", "2", "-subj", "/CN=inferwatch", "-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-keyout", "agent.key", "-out", "agent.crt"])
        .current_dir(&dir)
        .output()
        .expect("openssl");
    assert!(openssl.status.success(), "{}", String::from_utf8_lossy(&openssl.stderr));
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let config = dir.join("web.yml");
    std::fs::write(
        &config,
        format!("tls_server_config:\n  cert_file: agent.crt\n  key_file: agent.key\nbasic_auth_users:\n  prom: '{hash}'\n"),
    )
    .unwrap();
    (dir, config)
}

/// The sum of the series of a metric family whose lines contain `needle` (`""`: all of them).
pub fn sum_matching(text: &str, family: &str, needle: &str) -> f64 {
    series_matching(text, family, needle)
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A `sockload` helper process: connects to `target`, waits for "go", then makes exactly
/// `writes` `write()`s and `sendtos` `sendto()`s of `size` bytes each on that socket.
pub struct SockLoad {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Its command name as the agent labels it: the binary's file name, cut to 15 bytes.
    comm: String,
}

impl SockLoad {
    /// `binary` is `env!("CARGO_BIN_EXE_sockload")`, which only integration tests can name.
    pub fn spawn(binary: &str, target: SocketAddr, writes: u32, sendtos: u32, size: usize) -> SockLoad {
        SockLoad::spawn_at(binary, &target.to_string(), writes, sendtos, size)
    }

    /// As [`SockLoad::spawn`], to `target` as sockload takes it: `HOST:PORT` or `unix:PATH`.
    pub fn spawn_at(binary: &str, target: &str, writes: u32, sendtos: u32, size: usize) -> SockLoad {
        let mut child = Command::new(binary)
            .args([target, &writes.to_string(), &sendtos.to_string(), &size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sockload");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "connected\n");
        let comm =
            std::path::Path::new(binary).file_name().unwrap().to_string_lossy().chars().take(15).collect();
        SockLoad { child, stdin, stdout, comm }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its `inferwatch_process_socket_ops_total` series for `syscall`.
    pub fn ops_series(&self, syscall: &str) -> String {
        format!(
            "inferwatch_process_socket_ops_total{{pid=\"{}\",comm=\"{}\",syscall=\"{syscall}\"}}",
            self.pid(),
            self.comm
        )
    }

    /// Makes the calls and waits until they are all done.
    pub fn go(&mut self) {
        self.start();
        self.finish();
    }

    /// Starts the calls (several loads at once: `start` each, then `finish` each).
    pub fn start(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
    }

    /// Waits until the calls `start` began are all done.
    pub fn finish(&mut self) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "done\n");
    }
}

impl Drop for SockLoad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accepts connections on `listener` and reads everything sent to them, in a thread.
pub fn drain_connections(listener: TcpListener, count: usize) -> thread::JoinHandle<u64> {
    drain_accepted(move || listener.accept().map(|(s, _)| s), count)
}

/// [`drain_connections`] for a Unix stream socket's listener.
pub fn drain_unix_connections(listener: UnixListener, count: usize) -> thread::JoinHandle<u64> {
    drain_accepted(move || listener.accept().map(|(s, _)| s), count)
}

fn drain_accepted<S: Read + Send + 'static>(
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    count: usize,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut readers = Vec::new();
        for _ in 0..count {
            let mut s = accept().unwrap();
            readers.push(thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            }));
        }
        readers.into_iter().map(|r| r.join().unwrap()).sum()
    })
}
