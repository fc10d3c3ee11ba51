//! Tells the programs which architecture's registers they will read: the machine they run on,
//! i.e. the build host unless `CARGO_CFG_BPF_TARGET_ARCH` says otherwise.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\"))");
    println!("cargo::rerun-if-env-changed=CARGO_CFG_BPF_TARGET_ARCH");
    let arch = std::env::var("CARGO_CFG_BPF_TARGET_ARCH").unwrap_or_else(|_| {
        let host = std::env::var("HOST").expect("cargo sets HOST");
        host.split('-').next().unwrap_or_default().to_string()
    });
    println!("cargo::rustc-cfg=bpf_target_arch=\"{arch}\"");
}
