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

/// Command-line arguments with secrets hidden.
pub fn redacted_flags(cmdline: &[u8]) -> Vec<String> {
    let args = arguments(cmdline);
    let secret = |a: &str| {
        let a = a.to_ascii_lowercase();
        a.starts_with("--") && ["key", "token", "secret", "password"].iter().any(|w| a.contains(w))
    };
    let mut out = Vec::new();
    let mut hide_next = false;
    for a in args {
        if hide_next && !a.starts_with("--") {
            out.push("***".to_string());
        } else if let Some((flag, _)) = a.split_once('=').filter(|(f, _)| secret(f)) {
            out.push(format!("{flag}=***"));
        } else {
            out.push(a.clone());
        }
        hide_next = secret(&a) && !a.contains('=');
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
