//! `cargo xtask fuzz [--runs N] [TARGET ...]`: the fuzz targets of agent/fuzz (libFuzzer through
//! cargo-fuzz, on the eBPF toolchain's nightly, debug assertions on), each for N executions
//! (default 10,000,000), from a corpus seeded with the vLLM captures. Prints the executions and
//! time per target; a crash stops with its input saved under target/fuzz/artifacts/.

use std::{fs, path::Path, process::Command};

use crate::{
    cmd::{self, Result, output, run},
    setup,
};

const TARGETS: [&str; 3] = ["http_assembly", "promtext", "procfs"];
const CARGO_FUZZ: &str = "0.13.2";

pub fn fuzz(args: &[String]) -> Result {
    let mut runs: u64 = 10_000_000;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).ok_or("--runs needs a number")?,
            t if TARGETS.contains(&t) => targets.push(t),
            other => return Err(format!("unknown fuzz argument {other:?}; targets: {}", TARGETS.join(", "))),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    setup::ensure_build_tools()?;
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none_or(|v| !v.contains(CARGO_FUZZ)) {
        run(Command::new("cargo")
            .args(["+".to_string() + &setup::userspace_toolchain(), "install".into(), "cargo-fuzz".into()])
            .args(["--version", CARGO_FUZZ, "--locked"]))?;
    }
    let root = cmd::root();
    let work = root.join("target/fuzz");
    seed(&root, &work)?;
    let mut summary = Vec::new();
    for target in targets {
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        fs::create_dir_all(&artifacts).map_err(|e| e.to_string())?;
        let mut c = Command::new("cargo");
        c.arg(format!("+{}", setup::ebpf_toolchain()))
            // Safe Rust needs no AddressSanitizer to find panics, overflows (debug assertions
            // are on) and runaway memory; without it the targets run ~5x faster. Resource bounds
            // are findings too: an input that takes over 2 s (-timeout), makes one allocation
            // over 64 MiB (-malloc_limit_mb) or grows the process past 512 MiB fails the run.
            .args(["fuzz", "run", "--sanitizer", "none", "--fuzz-dir"])
            .arg(root.join("agent/fuzz"))
            .arg(target)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-runs={runs}"))
            .args([
                "-max_len=4096",
                "-timeout=2",
                "-rss_limit_mb=512",
                "-malloc_limit_mb=64",
                "-print_final_stats=1",
            ])
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .env("CARGO_TARGET_DIR", work.join("build"));
        eprintln!("xtask: fuzzing {target} for {runs} executions");
        let out = c.output().map_err(|e| format!("cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        fs::write(work.join(format!("{target}.log")), &log).map_err(|e| e.to_string())?;
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            return Err(format!(
                "{target} failed (inputs in {}):\n{}",
                artifacts.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        let done = log.lines().find(|l| l.starts_with("Done ")).unwrap_or("(no summary)").to_string();
        let execs =
            log.lines().find(|l| l.contains("stat::number_of_executed_units")).unwrap_or("").to_string();
        eprintln!("xtask: {target}: {done}");
        summary.push(format!("{target}: {done} {}", execs.trim()));
    }
    println!("{}", summary.join("\n"));
    Ok(())
}

/// Seeds: the vLLM captures as transfer sequences (http_assembly), the /metrics captures
/// (promtext), and a vLLM command line, stat line and cgroup path (procfs).
fn seed(root: &Path, work: &Path) -> Result {
    let fixtures = root.join("tests/fixtures/vllm-0.32.0-cpu");
    let write = |target: &str, name: &str, bytes: &[u8]| -> Result {
        let dir = work.join("corpus").join(target);
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        fs::write(dir.join(name), bytes).map_err(|e| e.to_string())
    };
    let request = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 52\r\n\r\n{\"model\":\"tiny\",\"prompt\":\"hi\",\"stream\":true,\"n\":1}";
    for entry in fs::read_dir(&fixtures).map_err(|e| format!("{}: {e}", fixtures.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let bytes = fs::read(entry.path()).map_err(|e| e.to_string())?;
        if name.ends_with(".raw") {
            let mut seq = Vec::new();
            for (control, data) in
                [(0u8, &request[..])].into_iter().chain(bytes.chunks(200).map(|c| (1u8, c)))
            {
                for piece in data.chunks(255) {
                    seq.push(control);
                    seq.push(piece.len() as u8);
                    seq.extend_from_slice(piece);
                }
            }
            write("http_assembly", &name, &seq)?;
        } else if name.starts_with("metrics") {
            write("promtext", &name, &bytes[..bytes.len().min(4096)])?;
        }
    }
    write(
        "procfs",
        "cmdline",
        b"python3\0-m\0vllm.entrypoints.openai.api_server\0--model\0/m\0--api-key\0secret\0--port\08000\0",
    )?;
    write("procfs", "cgroup", b"0::/kubepods.slice/kubepods-pod1234_5678.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n")?;
    write(
        "procfs",
        "stat",
        b"4242 (VLLM::EngineCore) S 4200 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 987654 1000 10\n",
    )
}
