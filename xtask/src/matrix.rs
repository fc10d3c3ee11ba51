//! The kernel matrix of `cargo xtask test`: `kernelcheck` (tests/src/bin/kernelcheck.rs) run
//! natively on this machine's kernel, then inside a VM booted from each distribution kernel of
//! [`vm::MATRIX`], with the agent built for that kernel's architecture. Every kernel runs it
//! with the hooks the agent chooses; kernels that have the socket tracepoints also run it with
//! `--socket-hook fexit`, so the fallback is proven where the preferred hooks exist too.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use crate::{
    cmd::{Result, run},
    cross,
    vm::{self, Kernel},
};

/// Extra runs per kernel (by name): `--socket-hook` values. fexit where the tracepoints exist
/// (arm64 has trampolines for kernel functions since 6.4), kprobes on x86-64 (arm64's 6.1 uses
/// them on its own).
const EXTRA_RUNS: [(&str, &str); 3] = [
    ("debian12-bpo-6.12-amd64", "fexit"),
    ("debian12-bpo-6.12-arm64", "fexit"),
    ("debian12-6.1-amd64", "kprobe"),
];

/// A TCG boot plus two runs: minutes, not seconds, on a 2-core host.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

const CHECK: &str = "/kernelcheck /inferwatch /sockload /sseserver";

/// `cargo xtask kernel-matrix [--kernel NAME]`: builds what the matrix runs, then runs it (or
/// only the named VM kernel).
pub fn cli(args: &[String]) -> Result {
    let only = match args {
        [] => None,
        [flag, name] if flag == "--kernel" => Some(name.as_str()),
        _ => return Err("usage: cargo xtask kernel-matrix [--kernel NAME]".into()),
    };
    crate::setup::ensure_quietly()?;
    crate::tasks::build(crate::tasks::Profile::Debug)?;
    let mut c = crate::tasks::user_cargo();
    c.args(["build", "--quiet", "--package", "inferwatch-tests"]);
    for name in ["kernelcheck", "sockload", "sseserver"] {
        c.args(["--bin", name]);
    }
    run(&mut c)?;
    run_matrix(&crate::cmd::root().join("target/debug"), only)
}

/// Runs the matrix (every VM kernel, or `only` the named one); every kernel is tried, and the
/// failures are reported together.
pub fn run_matrix(native_programs: &std::path::Path, only: Option<&str>) -> Result {
    let bin = |n: &str| native_programs.join(n).display().to_string();
    if only.is_none() {
        eprintln!("xtask: kernel matrix: this machine's kernel, natively");
        let mut check = crate::cmd::command(&bin("kernelcheck"));
        check.args([bin("inferwatch"), bin("sockload"), bin("sseserver")]);
        // A kernel with the socket tracepoints must get them (any machine's kernel may run this,
        // so the expectation comes from its BTF, not from a table).
        if native_has_socket_tracepoints() {
            check.args(["--expect", "tp_btf"]);
        }
        run(&mut check)?;
    }
    vm::ensure_tools()?;
    vm::ensure_kernels()?;
    let mut programs: HashMap<&str, Vec<(PathBuf, String)>> = HashMap::new();
    let mut failures = Vec::new();
    for kernel in vm::MATRIX.iter().filter(|k| only.is_none_or(|name| k.name == name)) {
        let arch = kernel.arch.rust();
        if !programs.contains_key(arch) {
            let built = cross::vm_programs(arch)?;
            programs.insert(arch, built.into_iter().map(|(path, name)| (path, format!("/{name}"))).collect());
        }
        eprintln!("xtask: kernel matrix: {} (qemu, TCG)", kernel.name);
        let started = std::time::Instant::now();
        match vm::boot(kernel, &programs[arch], &command(kernel), VM_TIMEOUT) {
            Ok(log) => {
                for line in log.lines().filter(|l| l.contains("KERNELCHECK")) {
                    eprintln!("  {}", line.trim_end());
                }
                let passes = log.lines().filter(|l| l.trim_end().ends_with("KERNELCHECK PASS")).count();
                let expected = runs(kernel);
                if passes != expected {
                    failures.push(format!("{}: {passes} of {expected} runs passed:\n{log}", kernel.name));
                }
                eprintln!("xtask: kernel matrix: {} passed in {:.0?}", kernel.name, started.elapsed());
            }
            Err(e) => failures.push(e),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("kernel matrix failed:\n{}", failures.join("\n\n")))
    }
}

/// Whether this machine's kernel has the `sock_send_length` tracepoint (Linux 6.3+), by its BTF.
fn native_has_socket_tracepoints() -> bool {
    const NAME: &[u8] = b"btf_trace_sock_send_length";
    std::fs::read("/sys/kernel/btf/vmlinux").is_ok_and(|btf| btf.windows(NAME.len()).any(|w| w == NAME))
}

fn extra(kernel: &Kernel) -> impl Iterator<Item = &'static str> + '_ {
    EXTRA_RUNS.iter().filter(move |(name, _)| *name == kernel.name).map(|(_, hook)| *hook)
}

fn runs(kernel: &Kernel) -> usize {
    1 + extra(kernel).count()
}

/// The guest's command: kernelcheck with the agent's own choices (which must be the expected
/// ones), then with each forced one.
fn command(kernel: &Kernel) -> String {
    std::iter::once(format!("{CHECK} --expect {}", kernel.socket_attach))
        .chain(extra(kernel).map(|hook| format!("{CHECK} --socket-hook {hook}")))
        .collect::<Vec<_>>()
        .join(" && ")
}
