//! `cargo xtask nvml-standin`: builds the STAND-IN NVML library (tests/nvml-standin) into
//! target/nvml-standin/libnvidia-ml.so.1, the name the agent's `--nvml-lib` and the loader
//! look for. Tests use it where no GPU exists; it is never part of the agent's image.

use std::path::PathBuf;

use crate::{
    cmd::{self, Result, cargo, run},
    setup,
};

pub fn path() -> PathBuf {
    cmd::root().join("target/nvml-standin/libnvidia-ml.so.1")
}

pub fn build() -> Result<PathBuf> {
    run(cargo(&setup::userspace_toolchain()).args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "inferwatch-nvml-standin",
    ]))?;
    let built = cmd::root().join("target/release/libnvidia_ml.so");
    let out = path();
    let dir = out.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::copy(&built, &out)
        .map_err(|e| format!("copying {} to {}: {e}", built.display(), out.display()))?;
    eprintln!("xtask: built the NVML stand-in {}", out.display());
    Ok(out)
}
