//! Tells the programs which architecture's registers they will read: the machine they run on,
//! i.e. the build host unless `CARGO_CFG_BPF_TARGET_ARCH` (a `--cfg`) or `AYA_BPF_TARGET_ARCH`
//! (what `cargo xtask build` sets for arm64) says otherwise.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\"))");
    println!("cargo::rerun-if-env-changed=CARGO_CFG_BPF_TARGET_ARCH");
    println!("cargo::rerun-if-env-changed=AYA_BPF_TARGET_ARCH");
    if std::env::var_os("CARGO_CFG_BPF_TARGET_ARCH").is_some() {
        return;
    }
    let arch = std::env::var("AYA_BPF_TARGET_ARCH").unwrap_or_else(|_| {
        let host = std::env::var("HOST").expect("cargo sets HOST");
        host.split('-').next().unwrap_or_default().to_string()
    });
    println!("cargo::rustc-cfg=bpf_target_arch=\"{arch}\"");
}
