//! Command lines as /proc shows them (`/proc/PID/cmdline`): the arguments, the models a vLLM
//! serves, and the flags with their secrets hidden.

/// The arguments of a /proc cmdline. A process that retitled itself (setproctitle) shows one
/// space-separated string instead of NUL-separated arguments.
pub(crate) fn arguments(cmdline: &[u8]) -> Vec<String> {
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    match args.as_slice() {
        [title] if title.contains(' ') => title.split_whitespace().map(str::to_string).collect(),
        _ => args,
    }
}

/// `--served-model-name` (all its values), else `--model`, else the positional model of
/// `vllm serve MODEL`.
pub fn models_from_cmdline(cmdline: &[u8]) -> Vec<String> {
    let args = arguments(cmdline);
    let values_of = |flag: &str| -> Vec<String> {
        let mut out = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                out.push(v.to_string());
            } else if a == flag {
                out.extend(args[i + 1..].iter().take_while(|v| !v.starts_with("--")).cloned());
            }
        }
        out
    };
    let served = values_of("--served-model-name");
    if !served.is_empty() {
        return served;
    }
    if let Some(m) = values_of("--model").into_iter().next() {
        return vec![m];
    }
    args.iter()
        .position(|a| a == "serve")
        .and_then(|i| args.get(i + 1))
        .filter(|m| !m.starts_with('-'))
        .map(|m| vec![m.clone()])
        .unwrap_or_default()
}

/// Flags whose values are shown (by allowlist: every other flag's values are hidden, so a new
/// secret-bearing flag of a future vLLM is hidden too). vLLM's own names, long and short.
const SHOWN: &[&str] = &[
    // python -m MODULE
    "-m",
    "--model",
    "--served-model-name",
    "--tokenizer",
    "--revision",
    "--tokenizer-revision",
    "--port",
    "--host",
    "--api-server-count",
    "--tensor-parallel-size",
    "-tp",
    "--pipeline-parallel-size",
    "-pp",
    "--data-parallel-size",
    "-dp",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--max-model-len",
    "--gpu-memory-utilization",
    "--dtype",
    "--kv-cache-dtype",
    "--quantization",
    "-q",
    "--block-size",
    "--swap-space",
    "--cpu-offload-gb",
    "--seed",
    "--load-format",
    "--task",
    "--runner",
    "--device",
    "--distributed-executor-backend",
    "--scheduling-policy",
    "--max-logprobs",
    "--max-loras",
    "--max-lora-rank",
    "--tool-call-parser",
    "--reasoning-parser",
    "--uvicorn-log-level",
    "--otlp-traces-endpoint",
    "--compilation-config",
    "-O",
];

/// Longest value shown; longer ones are hidden.
const MAX_SHOWN_VALUE: usize = 256;

/// Whether `arg` is a flag (not a value such as `-1`).
fn is_flag(arg: &str) -> bool {
    arg.starts_with('-') && !arg[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.') && arg.len() > 1
}

/// A value of a shown flag as it may be shown: JSON (which can carry anything) hidden, the user
/// and password of a URL hidden, overlong values hidden.
fn shown_value(value: &str) -> String {
    let trimmed = value.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') || value.len() > MAX_SHOWN_VALUE {
        return "***".to_string();
    }
    match value.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => value.to_string(),
            }
        }
        None => value.to_string(),
    }
}

/// Command-line arguments as they may be shown: the program, its subcommand and positional
/// arguments (`vllm serve MODEL`), every flag's name, and the values of [`SHOWN`] flags only
/// (with JSON and URL credentials hidden); every value of every other flag, up to the next
/// flag, is `***`. The environment is never read.
pub fn redacted_flags(cmdline: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    // The flag whose values follow, and whether they may be shown; None before any flag.
    let mut current: Option<bool> = None;
    for arg in arguments(cmdline) {
        if is_flag(&arg) {
            match arg.split_once('=') {
                Some((flag, value)) => {
                    let value = if SHOWN.contains(&flag) { shown_value(value) } else { "***".to_string() };
                    out.push(format!("{flag}={value}"));
                    current = None;
                }
                None => {
                    current = Some(SHOWN.contains(&arg.as_str()));
                    out.push(arg);
                }
            }
            continue;
        }
        match current {
            // Before any flag: the program, `-m module`, `serve`, the model.
            None => out.push(arg),
            Some(true) => out.push(shown_value(&arg)),
            Some(false) => out.push("***".to_string()),
        }
    }
    out
}

/// The value of `--flag V` or `--flag=V` among redacted flags (the last one, as argparse takes).
pub fn flag_value(flags: &[String], flag: &str) -> Option<String> {
    flags.iter().enumerate().rev().find_map(|(i, a)| {
        a.strip_prefix(&format!("{flag}=")).map(str::to_string).or_else(|| {
            (a == flag).then(|| flags.get(i + 1).filter(|v| !v.starts_with("--")).cloned()).flatten()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_server_command_line() {
        let cmdline =
            std::fs::read(crate::collect::procfs::fixture("vllm-node").join("4100/cmdline")).unwrap();
        assert_eq!(models_from_cmdline(&cmdline), ["qwen-small"]);
        let flags = redacted_flags(&cmdline);
        assert!(!flags.iter().any(|f| f.contains("sk-live")), "{flags:?}");
        assert_eq!(flag_value(&flags, "--max-num-seqs").as_deref(), Some("64"));
        assert_eq!(flag_value(&flags, "--api-key").as_deref(), Some("***"));
    }

    fn nul(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    /// Found by `cargo xtask fuzz` (procfs): a secret flag with no value is followed by
    /// another flag, which is not its value.
    #[test]
    fn a_valueless_flag_does_not_take_the_next_flag_as_its_value() {
        let cmdline = b"pym\0--appythmodel\0\0/m\0--api-key\0\0--appythmodel\0se;i-key\0secret\0";
        let flags = redacted_flags(cmdline);
        assert_eq!(flag_value(&flags, "--api-key"), None, "{flags:?}");
        assert_eq!(flag_value(&["--port".into(), "8000".into()], "--port").as_deref(), Some("8000"));
        assert_eq!(flag_value(&["--api-key".into(), "***".into()], "--api-key").as_deref(), Some("***"));
    }

    #[test]
    fn models_from_command_lines() {
        assert_eq!(
            models_from_cmdline(&nul(&[
                "python",
                "-m",
                "x",
                "--model",
                "/srv/m",
                "--served-model-name",
                "tiny",
                "t2",
                "--port",
                "1"
            ])),
            ["tiny", "t2"]
        );
        assert_eq!(models_from_cmdline(&nul(&["python", "-m", "x", "--model=/srv/m"])), ["/srv/m"]);
        assert_eq!(
            models_from_cmdline(&nul(&["vllm", "serve", "Qwen/Qwen3-8B", "--port", "8000"])),
            ["Qwen/Qwen3-8B"]
        );
        assert!(models_from_cmdline(&nul(&["vllm", "serve", "--help"])).is_empty());
        assert_eq!(models_from_cmdline(b"vllm serve /m/tiny --served-model-name tiny --port 1"), ["tiny"]);
    }

    #[test]
    fn only_allowed_values_are_shown() {
        let flags = redacted_flags(&nul(&[
            "python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            "meta-llama/Llama-3.1-8B",
            "--api-key",
            "k1",
            "k2",
            "--kv-transfer-config",
            r#"{"kv_connector":"x","key":"s3cr3t"}"#,
            "--model-loader-extra-config={\"token\":\"t0k\"}",
            "--otlp-traces-endpoint",
            "https://user:pa55@collector:4318/v1/traces",
            "--some-future-flag",
            "hidden-value",
            "--seed",
            "-1",
            "--compilation-config",
            "{\"level\":3}",
            "--port=8000",
        ]));
        let text = flags.join(" ");
        for secret in ["k1", "k2", "s3cr3t", "t0k", "pa55", "user", "hidden-value"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(flag_value(&flags, "--model").as_deref(), Some("meta-llama/Llama-3.1-8B"));
        assert_eq!(
            flag_value(&flags, "--otlp-traces-endpoint").as_deref(),
            Some("https://***@collector:4318/v1/traces")
        );
        assert_eq!(flag_value(&flags, "--seed").as_deref(), Some("-1"), "a negative number is a value");
        assert_eq!(flag_value(&flags, "--compilation-config").as_deref(), Some("***"), "JSON is hidden");
        assert_eq!(flag_value(&flags, "--port").as_deref(), Some("8000"));
        assert_eq!(flags[..3], ["python3", "-m", "vllm.entrypoints.openai.api_server"]);
        // Retitled (one string), as `vllm serve` shows itself.
        let flags = redacted_flags(b"vllm serve /m/tiny --hf-token hf_abc --max-num-seqs 8");
        assert_eq!(flags, ["vllm", "serve", "/m/tiny", "--hf-token", "***", "--max-num-seqs", "8"]);
    }

    #[test]
    fn flags_hide_secrets() {
        let flags = redacted_flags(&nul(&[
            "vllm",
            "serve",
            "m",
            "--api-key",
            "sk-123",
            "--max-num-seqs",
            "8",
            "--hf-token=abc",
        ]));
        assert_eq!(
            flags,
            ["vllm", "serve", "m", "--api-key", "***", "--max-num-seqs", "8", "--hf-token=***"]
        );
        assert_eq!(flag_value(&flags, "--max-num-seqs").as_deref(), Some("8"));
        assert_eq!(flag_value(&["--max-num-seqs=4".to_string()], "--max-num-seqs").as_deref(), Some("4"));
        assert_eq!(flag_value(&flags, "--port"), None);
        let twice: Vec<String> = ["--max-num-seqs", "16", "--max-num-seqs", "2"].map(String::from).to_vec();
        assert_eq!(flag_value(&twice, "--max-num-seqs").as_deref(), Some("2"), "the last one wins");
    }
}
