//! The classify stage: which vLLM role, if any, a process plays, from its command line and
//! command name.

use crate::{collect::procfs::cmdline::arguments, model::instance::Role};

/// The role of a process from its command line (NUL-separated, as in /proc) and comm.
/// vLLM retitles its processes (`VLLM::EngineCore`, …), which rewrites both.
pub fn classify(cmdline: &[u8], comm: &str) -> Option<Role> {
    let args = arguments(cmdline);
    let first = args.first().map(String::as_str).unwrap_or("");
    let titled =
        |prefix: &str| first.starts_with(prefix) || comm.starts_with(&prefix[..prefix.len().min(15)]);
    if titled("VLLM::EngineCore") {
        return Some(Role::EngineCore);
    }
    if titled("VLLM::Worker") {
        return Some(Role::Worker);
    }
    if titled("VLLM::APIServer") {
        return Some(Role::ApiServer);
    }
    let is_python = first.rsplit('/').next().is_some_and(|b| b.starts_with("python"));
    let module = args.windows(2).any(|w| w[0] == "-m" && w[1] == "vllm.entrypoints.openai.api_server");
    // `vllm serve …` (the console script, run directly or through python).
    let serve = args.windows(2).any(|w| w[0].rsplit('/').next() == Some("vllm") && w[1] == "serve");
    let serve_script =
        first.rsplit('/').next() == Some("vllm") && args.get(1).map(String::as_str) == Some("serve");
    if (is_python && (module || serve)) || serve_script {
        return Some(Role::ApiServer);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nul(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    #[test]
    fn recognises_vllm_processes() {
        use Role::*;
        let cases: &[(&[&str], &str, Option<Role>)] = &[
            (
                &["venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"],
                "python",
                Some(ApiServer),
            ),
            (
                &["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "meta-llama/Llama-3.1-8B"],
                "python3",
                Some(ApiServer),
            ),
            (&["/usr/local/bin/vllm", "serve", "m"], "vllm", Some(ApiServer)),
            (&["VLLM::APIServer_1"], "VLLM::APIServer", Some(ApiServer)),
            // The launcher of several API servers, retitled by setproctitle.
            (&["vllm serve /models/tiny --api-server-count 2"], "vllm serve /mod", Some(ApiServer)),
            (&["VLLM::EngineCore"], "VLLM::EngineCor", Some(EngineCore)),
            (&["VLLM::EngineCore_DP0"], "VLLM::EngineCor", Some(EngineCore)),
            (&["VLLM::Worker_TP1"], "VLLM::Worker_TP", Some(Worker)),
            (&["python", "-m", "uvicorn", "app:app"], "python", None),
            (&["grep", "vllm serve"], "grep", None),
            (
                &["/usr/bin/python3", "-c", "from multiprocessing.resource_tracker import main"],
                "python3",
                None,
            ),
        ];
        for (args, comm, want) in cases {
            assert_eq!(classify(&nul(args), comm), *want, "{args:?}");
        }
    }
}
