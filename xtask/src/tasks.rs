//! build, run and test.

use std::path::PathBuf;

use crate::{
    cmd::{self, Result, cargo, run},
    setup,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// `--release` / `--debug` among the task's own flags (before any `--`).
pub fn profile_from(args: &[String], default: Profile) -> Profile {
    let own = args.iter().take_while(|a| *a != "--");
    let mut profile = default;
    for a in own {
        match a.as_str() {
            "--release" => profile = Profile::Release,
            "--debug" => profile = Profile::Debug,
            _ => {}
        }
    }
    profile
}

/// The agent's arguments: everything after the first `--`, or everything that is not ours.
pub fn passthrough_args(args: &[String]) -> Vec<String> {
    match args.iter().position(|a| a == "--") {
        Some(i) => args[i + 1..].to_vec(),
        None => args.iter().filter(|a| *a != "--release" && *a != "--debug").cloned().collect(),
    }
}

/// The kernel programs for `arch` (`x86_64` or `aarch64`): `variant` is `modern` (Linux 5.17+)
/// or `compat` (5.10 to 5.16); the agent embeds both.
pub fn ebpf_object(arch: &str, variant: &str) -> PathBuf {
    cmd::root().join(format!("target/ebpf/objects/{arch}/{variant}.bpf.o"))
}

/// The architecture of this machine, as Rust names it.
pub const HOST_ARCH: &str = std::env::consts::ARCH;

pub fn agent_binary(profile: Profile) -> PathBuf {
    cmd::root().join("target").join(profile.dir()).join("inferwatch")
}

fn ebpf_cargo() -> std::process::Command {
    let mut c = cargo(&setup::ebpf_toolchain());
    c.current_dir(cmd::root().join("ebpf/inferwatch-ebpf"))
        .env("PATH", setup::path_with_cargo_bin())
        .arg("--quiet");
    c
}

/// A userspace cargo that embeds the eBPF objects we just built (for this machine).
pub fn user_cargo() -> std::process::Command {
    let mut c = cargo(&setup::userspace_toolchain());
    embed_ebpf(&mut c, HOST_ARCH);
    c
}

/// Points the agent's build script at `arch`'s two eBPF objects.
pub fn embed_ebpf(c: &mut std::process::Command, arch: &str) {
    c.env("INFERWATCH_EBPF_OBJECT", ebpf_object(arch, "modern"))
        .env("INFERWATCH_EBPF_COMPAT_OBJECT", ebpf_object(arch, "compat"));
}

/// Builds the kernel programs for this machine's architecture.
pub fn build_ebpf() -> Result {
    build_ebpf_for(HOST_ARCH)
}

/// Builds both objects for `arch`: the registers and system call numbers the programs read are
/// the architecture's, the bytecode is the same. Each architecture has its own target folder,
/// so switching does not rebuild the other.
pub fn build_ebpf_for(arch: &str) -> Result {
    let target_dir = cmd::root().join(format!("target/ebpf/{arch}"));
    for (variant, features) in [("modern", None), ("compat", Some("compat"))] {
        let mut c = ebpf_cargo();
        c.env("AYA_BPF_TARGET_ARCH", arch).args(["build", "--release", "--target-dir"]).arg(&target_dir);
        if let Some(f) = features {
            c.args(["--features", f]);
        }
        run(&mut c)?;
        let built = target_dir.join("bpfel-unknown-none/release/inferwatch-ebpf");
        let object = ebpf_object(arch, variant);
        std::fs::create_dir_all(object.parent().expect("a folder"))
            .and_then(|()| std::fs::copy(&built, &object))
            .map_err(|e| format!("copying {} to {}: {e}", built.display(), object.display()))?;
    }
    Ok(())
}

pub fn build(profile: Profile) -> Result {
    setup::ensure_build_tools()?;
    build_ebpf()?;
    let mut c = user_cargo();
    c.args(["build", "--package", "inferwatch"]);
    if profile == Profile::Release {
        c.arg("--release");
    }
    run(&mut c)?;
    eprintln!("xtask: built {}", agent_binary(profile).display());
    Ok(())
}

/// Builds helper programs of the integration-test crate (`writeloop`, `sseload`, …) in release
/// mode; returns the folder that holds them.
pub fn build_test_programs(names: &[&str]) -> Result<PathBuf> {
    let mut c = cargo(&setup::userspace_toolchain());
    c.args(["build", "--release", "--quiet", "--package", "inferwatch-tests"]);
    for name in names {
        c.args(["--bin", name]);
    }
    run(&mut c)?;
    Ok(cmd::root().join("target/release"))
}

pub fn run_agent(args: &[String]) -> Result {
    let profile = profile_from(args, Profile::Release);
    build(profile)?;
    let mut c = cmd::as_root(&agent_binary(profile));
    c.args(passthrough_args(args));
    run(&mut c)
}

/// Format check, lints, unit tests, then the root-only integration tests on the real kernel.
pub fn test() -> Result {
    setup::ensure_quietly()?;
    let user = setup::userspace_toolchain();
    let root = cmd::root();
    let ebpf_manifest = root.join("ebpf/inferwatch-ebpf/Cargo.toml");

    step("format");
    run(cargo(&user).args(["fmt", "--all", "--check"]))?;
    run(cargo(&user).args(["fmt", "--check", "--manifest-path"]).arg(&ebpf_manifest))?;
    let fuzz_manifest = root.join("agent/fuzz/Cargo.toml");
    run(cargo(&user).args(["fmt", "--check", "--manifest-path"]).arg(&fuzz_manifest))?;

    step("kernel programs: build and clippy");
    build_ebpf()?;
    for features in [&[][..], &["--features", "compat"]] {
        run(ebpf_cargo()
            .args(["clippy", "--release", "--target-dir"])
            .arg(root.join("target/ebpf").join(HOST_ARCH))
            .args(features)
            .args(["--", "-D", "warnings"]))?;
    }

    step("userspace clippy (warnings denied)");
    run(user_cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;

    // The fuzz targets (their own workspace, nightly) must keep compiling; running them is
    // `cargo xtask fuzz`.
    step("fuzz targets: clippy");
    run(cargo(&setup::ebpf_toolchain())
        .args(["clippy", "--manifest-path"])
        .arg(&fuzz_manifest)
        .arg("--target-dir")
        .arg(root.join("target/fuzz/check"))
        .args(["--", "-D", "warnings"]))?;

    step("unit tests (the GPU collector against the NVML stand-in)");
    let standin = crate::nvml_standin::build()?;
    run(user_cargo()
        .args(["test", "--workspace", "--exclude", "inferwatch-tests"])
        .env("INFERWATCH_NVML_STANDIN", &standin)
        .env("INFERWATCH_NVML_SCENARIO", standin.with_file_name("unit-tests.json")))?;

    step("kernel integration tests (root) and the deploy files' tools");
    run(user_cargo().args(["build", "--package", "inferwatch"]))?;
    let mut selection = vec!["--lib".to_string(), "--bins".to_string()];
    selection.extend(test_files(&[ROOT_TESTS, TOOL_TESTS])?);
    run(&mut integration_tests(&selection))?;

    step("kernel matrix: this kernel, then Debian's 5.10, 6.1 and 6.12 kernels (x86-64 and arm64) in VMs");
    crate::matrix::run_matrix(&cmd::root().join("target/debug"), None)?;

    e2e_tests()?;
    step("all tests passed");
    Ok(())
}

/// What an integration test needs, told by its file name in tests/tests: `root_*` the kernel
/// programs (root), `tools_*` external tools only, `vllm_*` a real vLLM (and root).
const ROOT_TESTS: &str = "root_";
const TOOL_TESTS: &str = "tools_";
const VLLM_TESTS: &str = "vllm_";

/// `--test NAME` for every integration test whose file name starts with one of `prefixes`.
fn test_files(prefixes: &[&str]) -> Result<Vec<String>> {
    let dir = cmd::root().join("tests/tests");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".rs").map(str::to_string))
        .filter(|name| prefixes.iter().any(|p| name.starts_with(p)))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("no integration test named {prefixes:?}* in {}", dir.display()));
    }
    Ok(names.into_iter().flat_map(|n| ["--test".to_string(), n]).collect())
}

/// `cargo test` of the integration-test crate, run as root, with the paths the tests need.
fn integration_tests(selection: &[String]) -> std::process::Command {
    let mut c = user_cargo();
    c.args(["test", "--package", "inferwatch-tests"])
        .args(selection)
        .args(["--", "--test-threads=1", "--nocapture"])
        .env("INFERWATCH_BIN", agent_binary(Profile::Debug))
        .env("INFERWATCH_PYTHON", setup::python_env_python())
        .env("INFERWATCH_VLLM_PYTHON", crate::vllm::python())
        .env("INFERWATCH_TINY_MODEL", crate::vllm::tiny_model())
        .env("INFERWATCH_NVML_STANDIN", crate::nvml_standin::path());
    if !cmd::is_root() {
        // cargo runs each test binary through this runner.
        c.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    c
}

/// The end-to-end suite on a real vLLM (provisioned and cached on first use).
pub fn e2e() -> Result {
    setup::ensure_quietly()?;
    build_ebpf()?;
    crate::nvml_standin::build()?;
    run(user_cargo().args(["build", "--package", "inferwatch"]))?;
    e2e_tests()
}

fn e2e_tests() -> Result {
    step("end-to-end tests on a real vLLM");
    crate::vllm::ensure()?;
    run(&mut integration_tests(&test_files(&[VLLM_TESTS])?))
}

fn step(name: &str) {
    eprintln!("\nxtask: ===== {name} =====");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_passes_arguments_after_double_dash() {
        assert_eq!(passthrough_args(&s(&["--", "--pid", "7"])), s(&["--pid", "7"]));
        assert_eq!(passthrough_args(&s(&["--debug", "--", "--release"])), s(&["--release"]));
        assert_eq!(passthrough_args(&s(&["--pid", "7"])), s(&["--pid", "7"]));
    }

    #[test]
    fn profile_flags_before_double_dash_only() {
        assert_eq!(profile_from(&s(&["--debug", "--", "--pid", "1"]), Profile::Release), Profile::Debug);
        assert_eq!(profile_from(&s(&["--", "--release"]), Profile::Debug), Profile::Debug);
        assert_eq!(profile_from(&s(&[]), Profile::Release), Profile::Release);
    }
}
