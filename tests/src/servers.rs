//! The HTTP servers the fidelity tests watch: uvicorn + uvloop (vLLM's stack, `read`/`write`),
//! a Rust std server (`recv`/`send`/`writev`), Node.js's `http` module (`writev` of several
//! iovecs) and Go's `net/http` (a `write` per flush), each speaking the same small protocol.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::free_port;

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub name: &'static str,
}

/// The Python with uvicorn, uvloop and httptools that `cargo xtask setup` prepares.
pub fn python() -> PathBuf {
    std::env::var_os("INFERWATCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python"))
}

/// tests/servers: the servers' own sources.
fn servers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("servers")
}

impl Server {
    pub fn uvicorn() -> Server {
        Self::uvicorn_with(&[], "uvicorn+uvloop")
    }

    /// [`Server::uvicorn`] whose event loop blocks for 20–50 ms at random (a busy API server).
    pub fn uvicorn_stalling() -> Server {
        Self::uvicorn_with(&[("SSE_STALL_MS", "20,50")], "uvicorn-stalling")
    }

    fn uvicorn_with(env: &[(&str, &str)], name: &'static str) -> Server {
        let port = free_port();
        let child = Command::new(python())
            .envs(env.iter().copied())
            .args(["-m", "uvicorn", "sse_app:app", "--loop", "uvloop", "--http", "httptools"])
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--log-level",
                "warning",
                "--no-access-log",
            ])
            .arg("--app-dir")
            .arg(servers_dir())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting uvicorn with {}: {e} (run `cargo xtask setup`)", python().display())
            });
        Self::ready(child, port, name)
    }

    /// `binary` is `env!("CARGO_BIN_EXE_sseserver")`, which only integration tests can name.
    pub fn rust(binary: &str) -> Server {
        let port = free_port();
        let child =
            Command::new(binary).arg(port.to_string()).stdout(Stdio::null()).spawn().expect("sseserver");
        Self::ready(child, port, "rust-std")
    }

    /// [`Server::rust`] cutting every chunk into `iovecs` iovecs and ending each stream with
    /// one `writev` (`last_pad` bytes of padding before `[DONE]` put its end beyond the capture).
    pub fn rust_vectored(binary: &str, iovecs: usize, last_pad: usize) -> Server {
        let port = free_port();
        let child = Command::new(binary)
            .args([port.to_string(), iovecs.to_string(), last_pad.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("sseserver");
        Self::ready(child, port, "rust-writev")
    }

    /// axum on hyper (`binary` is `env!("CARGO_BIN_EXE_axumserver")`).
    pub fn axum(binary: &str) -> Server {
        let port = free_port();
        let child =
            Command::new(binary).arg(port.to_string()).stdout(Stdio::null()).spawn().expect("axumserver");
        Self::ready(child, port, "axum-hyper")
    }

    /// Node.js's `http` module (tests/servers/sse_node.js; Debian's `nodejs`, which `cargo xtask
    /// setup` installs).
    pub fn node() -> Server {
        let port = free_port();
        let child = Command::new("node")
            .arg(servers_dir().join("sse_node.js"))
            .arg(port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting node: {e} (run `cargo xtask setup`)"));
        Self::ready(child, port, "node-http")
    }

    /// Go's `net/http` (tests/servers/sse_go.go, built once per test process with Debian's
    /// `golang-go`, which `cargo xtask setup` installs; standard library only).
    pub fn go() -> Server {
        static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let binary = BUILT.get_or_init(|| {
            let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-servers");
            std::fs::create_dir_all(&target).unwrap();
            let out = target.join("sse_go");
            let status = Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(servers_dir().join("sse_go.go"))
                .env("GOCACHE", target.join("go-cache"))
                .env("GOPATH", target.join("go-path"))
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "")
                .status()
                .unwrap_or_else(|e| panic!("go build: {e} (run `cargo xtask setup`)"));
            assert!(status.success(), "go build tests/servers/sse_go.go failed");
            out
        });
        let port = free_port();
        let child = Command::new(binary).arg(port.to_string()).stdout(Stdio::null()).spawn().expect("sse_go");
        Self::ready(child, port, "go-net/http")
    }

    fn ready(mut child: Child, port: u16, name: &'static str) -> Server {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{name} exited before listening: {status}");
            }
            assert!(Instant::now() < deadline, "{name} did not listen within 30 s");
            thread::sleep(Duration::from_millis(50));
        }
        Server { child, addr, name }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
