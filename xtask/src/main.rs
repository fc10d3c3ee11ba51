//! `cargo xtask <task>`: everything a newcomer needs, from a fresh machine.
//!
//!   setup   install what is missing (pinned toolchains, LLVM 22, bpf-linker); with --e2e,
//!           also the cached vLLM of the end-to-end tests
//!   build   the kernel programs, then the agent that embeds them; `--target
//!           aarch64-unknown-linux-gnu` cross-builds the arm64 agent
//!   run     build, then run the agent as root with the given arguments
//!   test    format, lints, unit tests, the root-only kernel integration tests, the kernel
//!           matrix, then e2e
//!   kernel-matrix  `[--kernel NAME]`: kernelcheck natively and in VMs of Debian's kernels
//!   demo    a real vLLM (CPU, tiny model), the agent and a short load; serves :9420 until Ctrl-C
//!   e2e     the end-to-end suite on a real vLLM (CPU build, tiny model; cached install)
//!   bench   A/B benchmarks (not part of `test`)
//!   soak    `--minutes N [--restart-every M]`: real vLLM, mixed load, restarts; the agent's RSS,
//!           CPU and lost events sampled, a summary printed (not part of `test`)
//!   fuzz    `[--runs N] [TARGET ...]`: the fuzz targets of agent/fuzz, N executions each
//!           (default 10 million; not part of `test`)
//!   gpu-check  the GPU collector on a real NVIDIA GPU (xtask/gpu-check.sh; builds what it carries)
//!   nvml-standin  the stand-in libnvidia-ml.so.1 the tests use where there is no GPU
//!   vm      `[--kernel NAME] [-- CMD...]`: Debian's kernels under qemu (fetched and cached), CMD
//!           run in each (default: uname and the kernel's BTF)
//!
//! Every task but `setup` runs the setup check first and installs only what is missing.

mod bench;
mod cmd;
mod cross;
mod demo;
mod fuzz;
mod gpu_check;
mod matrix;
mod nvml_standin;
mod setup;
mod soak;
mod tasks;
mod vllm;
mod vm;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <setup [--e2e] | build [--release] [--target TRIPLE] | run [--debug] -- ARGS | test | e2e | demo | bench ... | soak --minutes N | fuzz [--runs N] | gpu-check | nvml-standin | kernel-matrix [--kernel NAME] | vm [--kernel NAME] [-- CMD...]>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") if args.get(1).map(String::as_str) == Some("--e2e") => {
            setup::ensure().and_then(|()| vllm::ensure())
        }
        Some("setup") => setup::ensure(),
        Some("build") => match args.iter().position(|a| a == "--target") {
            Some(i) => match args.get(i + 1) {
                Some(triple) => cross::build(triple, tasks::profile_from(&args[1..], tasks::Profile::Debug)),
                None => Err("--target needs a target triple".to_string()),
            },
            None => tasks::build(tasks::profile_from(&args[1..], tasks::Profile::Debug)),
        },
        Some("run") => tasks::run_agent(&args[1..]),
        Some("test") => tasks::test(),
        Some("kernel-matrix") => matrix::cli(&args[1..]),
        Some("e2e") => tasks::e2e(),
        Some("demo") => demo::demo(),
        Some("bench") => bench::bench(&args[1..]),
        Some("gpu-check") => gpu_check::gpu_check(),
        Some("nvml-standin") => nvml_standin::build().map(|_| ()),
        Some("soak") => soak::soak(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("vm") => vm::cli(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
