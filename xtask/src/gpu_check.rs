//! `cargo xtask gpu-check`: the GPU collector on a real NVIDIA GPU. Builds the release agent
//! and the agent's unit tests into target/gpu-check/ (stripped, to travel light), then runs
//! xtask/gpu-check.sh if this machine has a GPU; otherwise says how to run it on one.

use std::{fs, path::PathBuf, process::Command};

use crate::{
    cmd::{self, run},
    tasks::{self, Profile},
};

type Result<T = ()> = std::result::Result<T, String>;

pub fn gpu_check() -> Result {
    tasks::build(Profile::Release)?;
    let dir = cmd::root().join("target/gpu-check");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    copy_stripped(&tasks::agent_binary(Profile::Release), &dir.join("inferwatch"))?;
    copy_stripped(&unit_test_binary()?, &dir.join("inferwatch-unit-tests"))?;
    let has_gpu = cmd::output(Command::new("nvidia-smi").arg("-L")).is_some_and(|l| l.contains("GPU"));
    if !has_gpu {
        eprintln!(
            "xtask: no NVIDIA GPU here; {} is ready. On a GPU machine, from the repository's root:\n\
             \x20   bash xtask/gpu-check.sh        (carrying target/gpu-check)",
            dir.display()
        );
        return Ok(());
    }
    run(Command::new("bash").arg(cmd::root().join("xtask/gpu-check.sh")).current_dir(cmd::root()))
}

/// Builds the agent's unit tests (release) and returns the test executable.
fn unit_test_binary() -> Result<PathBuf> {
    let mut c = tasks::user_cargo();
    c.args(["test", "--release", "--package", "inferwatch", "--lib", "--no-run"]);
    c.args(["--message-format", "json"]);
    eprintln!("xtask: $ cargo test --release --package inferwatch --no-run");
    let out = c.output().map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the unit tests failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"profile\"") && l.contains("\"test\":true"))
        .find_map(|l| {
            let at = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[at..].find('"')?;
            Some(PathBuf::from(&l[at..at + end]))
        })
        .ok_or_else(|| "cargo did not name the unit-test executable".to_string())
}

fn copy_stripped(from: &PathBuf, to: &PathBuf) -> Result {
    fs::copy(from, to).map_err(|e| format!("copying {}: {e}", from.display()))?;
    run(Command::new("strip").arg("--strip-debug").arg(to))
}
