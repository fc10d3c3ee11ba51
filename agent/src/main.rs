//! `inferwatch`: the host agent and its commands (the library, src/lib.rs, holds them all).

fn main() -> std::process::ExitCode {
    inferwatch::main()
}
