//! Embeds the kernel programs built by `cargo xtask build` into the agent binary.
//!
//! The object is looked up at `$INFERWATCH_EBPF_OBJECT`, else where `cargo xtask build` puts it.
//! Without it the agent still builds (so unit tests and clippy need no nightly toolchain) but
//! refuses to start, saying how to build it properly.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=INFERWATCH_EBPF_OBJECT");
    let object = env::var_os("INFERWATCH_EBPF_OBJECT").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/inferwatch-ebpf")
    });
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("inferwatch.bpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded eBPF object"),
        Err(e) => {
            println!(
                "cargo::warning=no eBPF object at {} ({e}): this agent will not start; build with `cargo xtask build`",
                object.display()
            );
            fs::write(&out, []).expect("write empty eBPF placeholder");
        }
    }
}
