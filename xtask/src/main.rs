//! `cargo xtask <task>`: everything a newcomer needs, from a fresh machine.
//!
//!   setup   install what is missing (pinned toolchains, LLVM 22, bpf-linker)
//!   build   the kernel programs, then the agent that embeds them
//!   run     build, then run the agent as root with the given arguments
//!   test    format, lints, unit tests, then the root-only kernel integration tests
//!   bench   A/B benchmarks (not part of `test`)
//!
//! Every task but `setup` runs the setup check first and installs only what is missing.

mod bench;
mod cmd;
mod setup;
mod tasks;

use std::process::ExitCode;

const USAGE: &str =
    "usage: cargo xtask <setup | build [--release] | run [--debug] -- ARGS | test | bench devnull>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::ensure(),
        Some("build") => tasks::build(tasks::profile_from(&args[1..], tasks::Profile::Debug)),
        Some("run") => tasks::run_agent(&args[1..]),
        Some("test") => tasks::test(),
        Some("bench") => bench::bench(&args[1..]),
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
