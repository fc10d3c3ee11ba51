//! `cargo xtask setup`: make this machine able to build and test inferwatch.
//!
//! Idempotent: each requirement is checked first and installed only when missing. The pins
//! are read from the files that already state them, so there is one place for each:
//! the userspace toolchain is `rust-version` in the workspace `Cargo.toml`, the eBPF
//! toolchain is `ebpf/inferwatch-ebpf/rust-toolchain.toml`.

use std::{fs, path::PathBuf};

use crate::cmd::{self, Result, command, output, run};

pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_MAJOR: u32 = 22;
const USERSPACE_COMPONENTS: &[&str] = &["clippy", "rustfmt"];
/// The Python servers of the fidelity tests: vLLM's HTTP stack, pinned.
pub const PYTHON_PACKAGES: &[&str] =
    &["uvicorn==0.54.0", "uvloop==0.23.0", "httptools==0.9.0", "kubernetes-validate==1.37.0"];
const EBPF_COMPONENTS: &[&str] = &["rust-src", "clippy"];

/// The pinned userspace toolchain (`rust-version` of the workspace).
pub fn userspace_toolchain() -> String {
    let manifest = read(&cmd::root().join("Cargo.toml"));
    value_of(&manifest, "rust-version").expect("the workspace Cargo.toml pins rust-version")
}

/// The pinned eBPF toolchain (`channel` of the eBPF crate's rust-toolchain.toml).
pub fn ebpf_toolchain() -> String {
    let file = read(&cmd::root().join("ebpf/inferwatch-ebpf/rust-toolchain.toml"));
    value_of(&file, "channel").expect("ebpf/inferwatch-ebpf/rust-toolchain.toml pins a channel")
}

pub fn llvm_prefix() -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}"))
}

/// Where `cargo install` puts binaries; prepended to PATH for builds that need bpf-linker.
pub fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory first, so the bpf-linker we installed is the one used.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![cargo_bin_dir()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).expect("PATH entries are joinable")
}

fn read(path: &std::path::Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The string value of `key = "value"` in a small TOML file (first occurrence).
pub fn value_of(toml: &str, key: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        if k.trim() != key {
            return None;
        }
        let v = v.trim();
        let v = v.split('#').next()?.trim();
        Some(v.strip_prefix('"')?.strip_suffix('"')?.to_string())
    })
}

/// Checks everything; installs what is missing. Prints one line per requirement.
pub fn ensure() -> Result {
    ensure_build_tools()?;
    ensure_python_env()?;
    ensure_debian_tool("tmux", "tmux")?;
    // Prometheus and promtool: the deploy/ tests run the real thing.
    ensure_debian_tool("promtool", "prometheus")?;
    // The TLS test makes its certificate with openssl and checks the agent with curl.
    ensure_debian_tool("openssl", "openssl")?;
    ensure_debian_tool("curl", "curl")?;
    // The fidelity tests' servers written the way Node.js and Go servers write.
    ensure_debian_tool("node", "nodejs")?;
    ensure_debian_tool("go", "golang-go")?;
    // The kernel matrix: the arm64 agent cross-built, qemu, and Debian's kernels (cached).
    for (_, arch) in crate::cross::TARGETS {
        crate::cross::ensure_cross_tools(arch)?;
    }
    crate::vm::ensure_tools()?;
    crate::vm::ensure_kernels()
}

/// What building the agent needs (and nothing the tests need): the toolchains, LLVM and
/// bpf-linker. The container image's build stage installs only these.
pub fn ensure_build_tools() -> Result {
    if build_tools_present() {
        return Ok(());
    }
    if output(command("rustup").arg("--version")).is_none() {
        return Err(
            "rustup is not installed: install it from the Rust project's site (rustup.rs), then rerun".into(),
        );
    }
    ensure_toolchain(&userspace_toolchain(), USERSPACE_COMPONENTS)?;
    ensure_toolchain(&ebpf_toolchain(), EBPF_COMPONENTS)?;
    ensure_llvm()?;
    ensure_bpf_linker()
}

fn build_tools_present() -> bool {
    toolchain_missing(&userspace_toolchain(), USERSPACE_COMPONENTS).is_empty()
        && toolchain_missing(&ebpf_toolchain(), EBPF_COMPONENTS).is_empty()
        && llvm_present()
        && bpf_linker_present()
}

/// Quick check used by every other task: true when nothing needs installing.
pub fn is_complete() -> bool {
    build_tools_present()
        && python_env_present()
        && ["tmux", "promtool", "openssl", "curl", "node", "go"].iter().all(|t| tool_present(t))
        && crate::cross::cross_tools_present()
}

fn tool_present(binary: &str) -> bool {
    let flag = match binary {
        "tmux" => "-V",
        "openssl" | "go" => "version",
        _ => "--version",
    };
    output(command(binary).arg(flag)).is_some()
}

/// A command-line tool the tests drive (tmux for `inferwatch top`), from Debian's packages.
pub fn ensure_debian_tool(binary: &str, package: &str) -> Result {
    if tool_present(binary) {
        eprintln!("setup: {binary}: present");
        return Ok(());
    }
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    if !(is_debian_like(&os_release) && cmd::is_root()) {
        return Err(format!("{binary} is missing: install the {package} package, then rerun"));
    }
    eprintln!("setup: {package}: installing with apt-get");
    apt_install(package)
}

/// `apt-get update`, then install: a fresh machine's package lists may be empty or stale.
fn apt_install(package: &str) -> Result {
    run(command("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(command("apt-get")
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Runs `ensure` only if something is missing, so the common path stays quiet and fast.
pub fn ensure_quietly() -> Result {
    if is_complete() { Ok(()) } else { ensure() }
}

/// The components (or the toolchain itself, as "toolchain") missing from `toolchain`.
fn toolchain_missing(toolchain: &str, components: &[&str]) -> Vec<String> {
    let Some(installed) =
        output(command("rustup").args(["component", "list", "--installed", "--toolchain", toolchain]))
    else {
        return vec!["toolchain".into()];
    };
    components
        .iter()
        .filter(|c| !installed.lines().any(|l| l == **c || l.starts_with(&format!("{c}-"))))
        .map(|c| c.to_string())
        .collect()
}

fn ensure_toolchain(toolchain: &str, components: &[&str]) -> Result {
    let missing = toolchain_missing(toolchain, components);
    if missing.is_empty() {
        eprintln!("setup: Rust {toolchain} with {}: present", components.join(", "));
        return Ok(());
    }
    eprintln!("setup: Rust {toolchain}: installing ({} missing)", missing.join(", "));
    run(command("rustup")
        .args(["toolchain", "install", toolchain, "--profile", "minimal", "--component"])
        .arg(components.join(",")))
}

fn llvm_present() -> bool {
    llvm_prefix().join("lib/libLLVM.so").exists() && llvm_prefix().join("bin/llvm-config").exists()
}

fn ensure_llvm() -> Result {
    let package = format!("llvm-{LLVM_MAJOR}-dev");
    if llvm_present() {
        eprintln!("setup: {package} (LLVM {LLVM_MAJOR} for bpf-linker): present");
        return Ok(());
    }
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    if !is_debian_like(&os_release) {
        let name = value_of(&os_release, "PRETTY_NAME").unwrap_or_else(|| "this system".into());
        return Err(format!(
            "LLVM {LLVM_MAJOR} development libraries are missing ({} has no libLLVM.so) and {name} is not Debian-like, so setup cannot install them: install LLVM {LLVM_MAJOR} with its shared library and llvm-config under {}, then rerun",
            llvm_prefix().display(),
            llvm_prefix().display()
        ));
    }
    if !cmd::is_root() {
        return Err(format!(
            "{package} is missing and installing it needs root: run `sudo apt-get install -y {package}`, then rerun"
        ));
    }
    eprintln!("setup: {package}: installing with apt-get");
    apt_install(&package).map_err(|e| {
        format!("{e}: {package} comes from Debian 12's bookworm-security (or Debian 13); enable that suite or install LLVM {LLVM_MAJOR} by hand")
    })?;
    if !llvm_present() {
        return Err(format!("{package} installed, but {} still has no libLLVM.so", llvm_prefix().display()));
    }
    Ok(())
}

pub fn is_debian_like(os_release: &str) -> bool {
    let id = value_of(os_release, "ID").or_else(|| bare_value_of(os_release, "ID")).unwrap_or_default();
    let like =
        value_of(os_release, "ID_LIKE").or_else(|| bare_value_of(os_release, "ID_LIKE")).unwrap_or_default();
    ["debian", "ubuntu"].contains(&id.as_str()) || like.split_whitespace().any(|l| l == "debian")
}

/// `KEY=value` without quotes, as /etc/os-release often has.
fn bare_value_of(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(|v| v.trim_matches('"').to_string()))
}

fn bpf_linker_version() -> Option<String> {
    let binary = cargo_bin_dir().join("bpf-linker");
    let version = output(command(&binary.to_string_lossy()).arg("--version"))
        .or_else(|| output(command("bpf-linker").arg("--version")))?;
    Some(version.trim().trim_start_matches("bpf-linker").trim().to_string())
}

fn bpf_linker_present() -> bool {
    bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION)
}

fn ensure_bpf_linker() -> Result {
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            eprintln!("setup: bpf-linker {v}: present");
            return Ok(());
        }
        Some(v) => eprintln!("setup: bpf-linker {v} found, {BPF_LINKER_VERSION} needed: installing"),
        None => eprintln!("setup: bpf-linker {BPF_LINKER_VERSION}: installing (a few minutes)"),
    }
    let prefix = llvm_prefix();
    let mut path = vec![prefix.join("bin")];
    path.extend(std::env::split_paths(&path_with_cargo_bin()));
    run(cmd::cargo(&userspace_toolchain())
        .args(["install", "bpf-linker", "--force", "--locked", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{LLVM_MAJOR}")])
        // bpf-linker's build finds LLVM through LLVM_PREFIX, else the first llvm-config on PATH
        // (Debian's default /usr/bin/llvm-config may be an older LLVM).
        .env("LLVM_PREFIX", &prefix)
        .env(format!("LLVM_SYS_{LLVM_MAJOR}1_PREFIX"), &prefix)
        .env("PATH", std::env::join_paths(path).expect("joinable PATH")))
}

/// A virtual environment under target/ with [`PYTHON_PACKAGES`], for the test servers.
pub fn python_env() -> PathBuf {
    cmd::root().join("target/pyenv")
}

pub fn python_env_python() -> PathBuf {
    python_env().join("bin/python")
}

fn python_env_marker() -> PathBuf {
    python_env().join("inferwatch-packages.txt")
}

fn python_env_present() -> bool {
    python_env_python().exists()
        && fs::read_to_string(python_env_marker()).is_ok_and(|m| m == PYTHON_PACKAGES.join("\n"))
}

fn ensure_python_env() -> Result {
    if python_env_present() {
        eprintln!("setup: Python test servers ({}): present", PYTHON_PACKAGES.join(", "));
        return Ok(());
    }
    eprintln!("setup: Python test servers: creating {}", python_env().display());
    if output(command("python3").args(["-c", "import venv, ensurepip"])).is_none() {
        let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
        if !(is_debian_like(&os_release) && cmd::is_root()) {
            return Err("python3 with the venv module is needed for the test servers: install python3 and python3-venv, then rerun".into());
        }
        apt_install("python3-venv")?;
    }
    let _ = fs::remove_dir_all(python_env());
    run(command("python3").args(["-m", "venv"]).arg(python_env()))?;
    run(command(&python_env_python().to_string_lossy())
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(PYTHON_PACKAGES))?;
    fs::write(python_env_marker(), PYTHON_PACKAGES.join("\n")).map_err(|e| format!("writing the marker: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pins_from_their_files() {
        assert_eq!(userspace_toolchain(), "1.98.0");
        assert_eq!(ebpf_toolchain(), "nightly-2026-08-01");
    }

    #[test]
    fn value_of_handles_comments_and_spacing() {
        let toml = "# c\nchannel = \"nightly-1\" # pinned\nprofile=\"minimal\"\n";
        assert_eq!(value_of(toml, "channel").as_deref(), Some("nightly-1"));
        assert_eq!(value_of(toml, "profile").as_deref(), Some("minimal"));
        assert_eq!(value_of(toml, "components"), None);
    }

    #[test]
    fn recognises_debian_family() {
        assert!(is_debian_like("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n"));
        assert!(is_debian_like("ID=ubuntu\nID_LIKE=debian\n"));
        assert!(is_debian_like("ID=pop\nID_LIKE=\"ubuntu debian\"\n"));
        assert!(!is_debian_like("ID=fedora\n"));
        assert!(!is_debian_like("ID=\"rhel\"\nID_LIKE=\"fedora\"\n"));
    }
}
