//! Builds for another architecture than this machine's (arm64 from x86-64, or the reverse): the
//! eBPF objects for that architecture's registers, and the agent cross-compiled with Debian's
//! cross gcc (`gcc-aarch64-linux-gnu`, `gcc-x86-64-linux-gnu`) as linker.

use std::path::PathBuf;

use crate::{
    cmd::{self, Result, command, output, run},
    setup,
    tasks::{Profile, build_ebpf_for, embed_ebpf},
};

/// The Rust target triples `cargo xtask build --target` accepts, with their architectures.
pub const TARGETS: [(&str, &str); 2] =
    [("x86_64-unknown-linux-gnu", "x86_64"), ("aarch64-unknown-linux-gnu", "aarch64")];

/// The architecture of a target triple we build for.
pub fn arch_of(triple: &str) -> Result<&'static str> {
    TARGETS.iter().find(|(t, _)| *t == triple).map(|(_, a)| *a).ok_or_else(|| {
        let known: Vec<_> = TARGETS.iter().map(|(t, _)| *t).collect();
        format!("unsupported target {triple}: one of {}", known.join(", "))
    })
}

/// The target triple we build for `arch`.
fn triple_of(arch: &str) -> Result<&'static str> {
    TARGETS
        .iter()
        .find(|(_, a)| *a == arch)
        .map(|(t, _)| *t)
        .ok_or_else(|| format!("unknown architecture {arch}"))
}

/// A userspace cargo for `triple`, embedding that architecture's eBPF objects; `static_crt`
/// links glibc statically (the binaries the kernel matrix's VMs run have no libraries beside them).
pub fn cargo_for(triple: &str, static_crt: bool) -> Result<std::process::Command> {
    let arch = arch_of(triple)?;
    let mut c = cmd::cargo(&setup::userspace_toolchain());
    embed_ebpf(&mut c, arch);
    let upper = triple.to_uppercase().replace('-', "_");
    if arch != std::env::consts::ARCH {
        let prefix = gnu_prefix(arch);
        c.env(format!("CARGO_TARGET_{upper}_LINKER"), format!("{prefix}-gcc"))
            .env(format!("CC_{}", triple.replace('-', "_")), format!("{prefix}-gcc"))
            .env(format!("AR_{}", triple.replace('-', "_")), format!("{prefix}-ar"));
    }
    if static_crt {
        // glibc's NSS functions warn when linked statically; the agent uses none of them there.
        c.env(
            format!("CARGO_TARGET_{upper}_RUSTFLAGS"),
            "-C target-feature=+crt-static -C debuginfo=0 -A linker_messages",
        );
    }
    Ok(c)
}

/// `cargo xtask build --target TRIPLE`: the agent for that architecture.
pub fn build(triple: &str, profile: Profile) -> Result {
    let arch = arch_of(triple)?;
    setup::ensure_build_tools()?;
    ensure_cross_tools(arch)?;
    build_ebpf_for(arch)?;
    let mut c = cargo_for(triple, false)?;
    c.args(["build", "--package", "inferwatch", "--target", triple]);
    if profile == Profile::Release {
        c.arg("--release");
    }
    run(&mut c)?;
    let built = cmd::root().join("target").join(triple).join(profile.dir()).join("inferwatch");
    eprintln!("xtask: built {}", built.display());
    Ok(())
}

/// The statically linked programs a kernel-matrix VM runs, built for `arch`: the agent,
/// `kernelcheck` and the helpers it starts. Returns (host path, name).
pub fn vm_programs(arch: &str) -> Result<Vec<(PathBuf, &'static str)>> {
    let triple = triple_of(arch)?;
    ensure_cross_tools(arch)?;
    build_ebpf_for(arch)?;
    let target_dir = cmd::root().join("target/vm");
    let names = ["inferwatch", "kernelcheck", "sockload", "sseserver"];
    let mut c = cargo_for(triple, true)?;
    c.args(["build", "--quiet", "--target", triple, "--target-dir"]).arg(&target_dir).args([
        "--package",
        "inferwatch",
        "--package",
        "inferwatch-tests",
    ]);
    for name in names {
        c.args(["--bin", name]);
    }
    run(&mut c)?;
    Ok(names.iter().map(|n| (target_dir.join(triple).join("debug").join(n), *n)).collect())
}

/// The GNU triple prefix of Debian's cross tools for `arch`.
fn gnu_prefix(arch: &str) -> String {
    format!("{arch}-linux-gnu")
}

/// What cross-building to `arch` needs beyond the native build: the Rust standard library for
/// the target, and a linker (with its C library) from Debian.
pub fn ensure_cross_tools(arch: &str) -> Result {
    if arch == std::env::consts::ARCH {
        return Ok(());
    }
    let triple = triple_of(arch)?;
    if !cross_target_present(triple) {
        eprintln!("setup: Rust target {triple}: installing");
        run(command("rustup")
            .args(["target", "add", triple, "--toolchain"])
            .arg(setup::userspace_toolchain()))?;
    }
    let package = format!("gcc-{}", gnu_prefix(arch).replace('_', "-"));
    setup::ensure_debian_tool(&format!("{}-gcc", gnu_prefix(arch)), &package)
}

fn cross_target_present(triple: &str) -> bool {
    output(
        command("rustup")
            .args(["target", "list", "--installed", "--toolchain"])
            .arg(setup::userspace_toolchain()),
    )
    .is_some_and(|o| o.lines().any(|l| l.trim() == triple))
}

/// Quick check for `setup::is_complete`: this machine can build for every architecture.
pub fn cross_tools_present() -> bool {
    TARGETS.iter().filter(|(_, arch)| *arch != std::env::consts::ARCH).all(|(triple, arch)| {
        cross_target_present(triple)
            && output(command(&format!("{}-gcc", gnu_prefix(arch))).arg("--version")).is_some()
    })
}
