//! What the agent reads from /proc on arbitrary bytes: command lines (role, models, redacted
//! flags), /proc/PID/stat, /proc/net/tcp, /proc/net/netstat and cgroup paths.
#![no_main]

use inferwatch::collect::{
    discovery::classify::classify,
    procfs::{self, cgroup, cmdline, net},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let comm = text.split('\0').next().unwrap_or_default();
    let _ = classify(data, comm);
    let _ = cmdline::models_from_cmdline(data);
    let flags = cmdline::redacted_flags(data);
    for secret in ["--api-key", "--hf-token"] {
        if let Some(value) = cmdline::flag_value(&flags, secret) {
            assert_eq!(value, "***", "a secret flag leaked: {flags:?}");
        }
    }
    // Secrets planted among arbitrary arguments, the ways a command line carries them: values of
    // a secret flag, JSON of an allowed one, a URL's user and password. None may be shown.
    let mut planted = data.to_vec();
    planted.extend_from_slice(
        b"\0--api-key\0PLANTEDa\0PLANTEDb\0--kv-transfer-config\0{\"k\":\"PLANTEDc\"}\0\
          --otlp-traces-endpoint\0https://u:PLANTEDd@h/x\0--model={\"PLANTEDe\":1}\0--x-new\0PLANTEDf\0",
    );
    let shown = cmdline::redacted_flags(&planted).join("\n");
    assert!(!shown.contains("PLANTED"), "a planted secret was shown: {shown}");
    let _ = procfs::ppid_from_stat(&text);
    let _ = procfs::comm_from_stat(&text);
    let _ = procfs::parse_start_time(&text);
    let _ = procfs::parse_cap_eff(&text);
    let _ = net::listening_ports(&text);
    let _ = net::netstat_value(&text, "TcpExt", "ListenOverflows");
    let (container, pod) = cgroup::container_from_cgroup(&text);
    for id in [container, pod].into_iter().flatten() {
        assert!(!id.is_empty() && id.len() <= text.len(), "{id:?}");
    }
});
