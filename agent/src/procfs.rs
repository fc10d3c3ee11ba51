//! Small readers of /proc.

use std::{fs, io, path::Path};

/// The command name of a process (`/proc/PID/comm`), without the trailing newline.
pub fn comm(pid: u32) -> io::Result<String> {
    comm_at(Path::new("/proc"), pid)
}

fn comm_at(proc_root: &Path, pid: u32) -> io::Result<String> {
    let raw = fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))?;
    Ok(raw.trim_end_matches('\n').to_string())
}

/// The effective capability mask of this process (`CapEff` in /proc/self/status).
pub fn effective_capabilities() -> io::Result<u64> {
    parse_cap_eff(&fs::read_to_string("/proc/self/status")?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff line in /proc/self/status"))
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_comm() {
        let me = std::process::id();
        let c = comm(me).unwrap();
        assert!(!c.is_empty() && !c.ends_with('\n'), "{c:?}");
    }

    #[test]
    fn missing_process_is_an_error() {
        let dir = std::env::temp_dir().join(format!("inferwatch-procfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(comm_at(&dir, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }
}
