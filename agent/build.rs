//! Embeds the kernel programs built by `cargo xtask build` into the agent binary: two objects
//! for the target's architecture, one for Linux 5.17 and later and one for older kernels
//! (`kernel/plan.rs` picks one at start).
//!
//! They are looked up at `$INFERWATCH_EBPF_OBJECT` and `$INFERWATCH_EBPF_COMPAT_OBJECT`, else
//! where `cargo xtask build` puts them. Without them the agent still builds (so unit tests and
//! clippy need no nightly toolchain) but refuses to start, saying how to build it properly.
use std::{env, fs, path::PathBuf};

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (variable, variant, embedded) in [
        ("INFERWATCH_EBPF_OBJECT", "modern", "inferwatch.bpf.o"),
        ("INFERWATCH_EBPF_COMPAT_OBJECT", "compat", "inferwatch-compat.bpf.o"),
    ] {
        println!("cargo::rerun-if-env-changed={variable}");
        let object = env::var_os(variable).map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../target/ebpf/objects/{arch}/{variant}.bpf.o"))
        });
        println!("cargo::rerun-if-changed={}", object.display());
        match fs::read(&object) {
            Ok(bytes) => fs::write(out.join(embedded), bytes).expect("write embedded eBPF object"),
            Err(e) => {
                println!(
                    "cargo::warning=no eBPF object at {} ({e}): this agent will not start; build with `cargo xtask build`",
                    object.display()
                );
                fs::write(out.join(embedded), []).expect("write empty eBPF placeholder");
            }
        }
    }
}
