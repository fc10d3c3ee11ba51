//! Running commands loudly: each one is printed before it runs, and a failure names it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub type Result<T = ()> = std::result::Result<T, String>;

/// The repository root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repo").to_path_buf()
}

/// A command that does not inherit rustup's choice of toolchain from `cargo xtask` itself:
/// every cargo we start names its toolchain explicitly.
pub fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("RUSTUP_TOOLCHAIN").env_remove("RUSTC").env_remove("RUSTDOC");
    c.env_remove("CARGO").env_remove("RUSTC_WRAPPER").env_remove("CARGO_TARGET_DIR");
    c.current_dir(root());
    c
}

pub fn cargo(toolchain: &str) -> Command {
    let mut c = command("cargo");
    c.arg(format!("+{toolchain}"));
    c
}

pub fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio; fails with the command line if it fails.
pub fn run(c: &mut Command) -> Result {
    let line = describe(c);
    eprintln!("xtask: $ {line}");
    let status = c.status().map_err(|e| format!("cannot start `{line}`: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`{line}` failed ({status})")) }
}

/// Runs a command quietly and returns its stdout if it succeeded.
pub fn output(c: &mut Command) -> Option<String> {
    let out = c.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// Prefix for commands that need root: nothing when we are root, `sudo -E` otherwise.
pub fn as_root(program: &Path) -> Command {
    if is_root() {
        let mut c = command(&program.to_string_lossy());
        c.current_dir(root());
        c
    } else {
        let mut c = command("sudo");
        c.arg("-E").arg(program);
        c
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A plain HTTP/1.1 GET on loopback: status and body, or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_string()))
}
