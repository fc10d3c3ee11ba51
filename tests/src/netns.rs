//! Network namespaces the tests make for themselves (root): a veth pair joins one to the host,
//! so a client or server inside it is a separate "host" with an address of its own. Only these
//! namespaces and loopback are ever addressed.

use std::{
    net::Ipv4Addr,
    process::{Command, Output},
};

pub struct Netns {
    pub name: String,
    host_link: String,
    /// The host's end of the link, and the namespace's.
    pub host: Ipv4Addr,
    pub inside: Ipv4Addr,
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

impl Netns {
    /// A namespace `10.213.<subnet>.2`, reached from the host at `10.213.<subnet>.1`; its
    /// loopback is up.
    pub fn new(tag: &str, subnet: u8) -> Netns {
        let name = format!("iw-{tag}-{}", std::process::id());
        let host_link = format!("iwh{subnet}-{}", std::process::id() % 10_000);
        let peer = format!("iwp{subnet}-{}", std::process::id() % 10_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_link]).output();
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_link, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        let host = Ipv4Addr::new(10, 213, subnet, 1);
        let inside = Ipv4Addr::new(10, 213, subnet, 2);
        ip(&["addr", "add", &format!("{host}/24"), "dev", &host_link]);
        ip(&["link", "set", &host_link, "up"]);
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{inside}/24"), "dev", &peer]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Netns { name, host_link, host, inside }
    }

    /// `program args…` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_link]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
