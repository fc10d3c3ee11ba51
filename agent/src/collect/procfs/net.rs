//! A process's network namespace as /proc shows it: listening sockets (`net/tcp`, `net/tcp6`
//! matched with the process's socket fds) and TCP counters (`net/netstat`).

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

/// Listening TCP sockets by inode, from `/proc/PID/net/tcp` or `tcp6`: the address to reach
/// each at (a wildcard address becomes loopback).
pub fn listening_ports(net_tcp: &str) -> HashMap<u64, SocketAddr> {
    net_tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (ip_hex, port_hex) = f.get(1)?.rsplit_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            let ip = parse_proc_ip(ip_hex)?;
            let ip = if ip.is_unspecified() {
                match ip {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                }
            } else {
                ip
            };
            let inode = f.get(9)?.parse().ok()?;
            Some((inode, SocketAddr::new(ip, port)))
        })
        .collect()
}

/// An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian) order.
pub(crate) fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()).collect();
    match words?.as_slice() {
        [w] => Some(IpAddr::V4(Ipv4Addr::from(w.swap_bytes()))),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// A counter of `/proc/net/netstat` (pairs of header and value lines, e.g. `TcpExt:`).
pub fn netstat_value(netstat: &str, section: &str, field: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = netstat.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// TCP addresses a process listens on: its socket inodes matched in its own network namespace.
pub(crate) fn listening_addresses_of(proc_dir: &Path) -> BTreeSet<SocketAddr> {
    let mut listening = HashMap::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = fs::read_to_string(proc_dir.join(table)) {
            listening.extend(listening_ports(&text));
        }
    }
    let Ok(fds) = fs::read_dir(proc_dir.join("fd")) else { return BTreeSet::new() };
    fds.flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            let inode = target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok()?;
            listening.get(&inode).copied()
        })
        .collect()
}

/// The addresses of a network namespace's own interfaces other than loopback, the way a pod's
/// address is found from outside it: IPv4 from `net/fib_trie` (its `/32 host LOCAL` routes) and
/// IPv6 from `net/if_inet6` (global scope).
pub fn local_addresses(fib_trie: &str, if_inet6: &str) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ").and_then(|a| a.parse().ok()) {
            last = Some(ip);
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
            && !found.contains(&IpAddr::V4(ip))
        {
            found.push(IpAddr::V4(ip));
        }
    }
    for line in if_inet6.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // address, interface index, prefix length, scope (00: global), flags, name
        if let (Some(hex), Some(&"00")) = (f.first(), f.get(3))
            && hex.len() == 32
            && let Ok(bits) = u128::from_str_radix(hex, 16)
        {
            found.push(IpAddr::V6(Ipv6Addr::from(bits)));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_own_addresses() {
        let fib_trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 10.244.1.0/24 2 0 2\n        |-- 10.244.1.0\n           /24 link UNICAST\n        |-- 10.244.1.17\n           /32 host LOCAL\n     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\nLocal:\n  +-- 10.244.1.17\n           /32 host LOCAL\n";
        let if_inet6 = "00000000000000000000000000000001 01 80 10 80       lo\nfd000000000000000000000000000011 02 40 00 80     eth0\nfe80000000000000000000fffe0a0b0c 02 40 20 80     eth0\n";
        assert_eq!(
            local_addresses(fib_trie, if_inet6),
            ["10.244.1.17".parse::<IpAddr>().unwrap(), "fd00::11".parse().unwrap()],
            "loopback and link-local left out, each address once"
        );
        assert!(local_addresses("", "").is_empty());
    }

    #[test]
    fn the_fixture_server_listens_on_its_wildcard_port() {
        let dir = crate::collect::procfs::fixture("vllm-node").join("4100");
        let found: Vec<SocketAddr> = listening_addresses_of(&dir).into_iter().collect();
        assert_eq!(found, ["127.0.0.1:8000".parse().unwrap()], "the established row is not a listener");
        let netstat = fs::read_to_string(dir.join("net/netstat")).unwrap();
        assert_eq!(netstat_value(&netstat, "TcpExt", "ListenOverflows"), Some(3));
    }

    #[test]
    fn parses_net_tcp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F4B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 45275 1 0 100 0 0 10 0\n\
   1: 0100007F:94E0 0100007F:1F4B 01 00000000:00000000 00:00000000 00000000     0        0 45999 1 0 20 4 30 10 -1\n";
        assert_eq!(listening_ports(tcp), HashMap::from([(45275, "127.0.0.1:8011".parse().unwrap())]));
        let any = "h\n 0: 00000000:1F40 00000000:0000 0A 0:0 0:0 0 0 0 7 1\n";
        assert_eq!(listening_ports(any), HashMap::from([(7, "127.0.0.1:8000".parse().unwrap())]));
        let v6 = "h\n 0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 8 1\n\
 1: 0000000000000000FFFF00000100007F:1F41 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 9 1\n";
        let ports = listening_ports(v6);
        assert_eq!(ports[&8], "[::1]:8000".parse().unwrap());
        assert_eq!(ports[&9], "[::ffff:127.0.0.1]:8001".parse().unwrap());
    }

    #[test]
    fn netstat_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 18\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(netstat_value(text, "TcpExt", "ListenOverflows"), Some(17));
        assert_eq!(netstat_value(text, "IpExt", "InNoRoutes"), Some(3));
        assert_eq!(netstat_value(text, "TcpExt", "Nope"), None);
        let own = std::fs::read_to_string("/proc/self/net/netstat").unwrap();
        assert!(netstat_value(&own, "TcpExt", "ListenOverflows").is_some());
    }
}
