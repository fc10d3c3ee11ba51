//! vLLM on this node as discovery finds it: processes by role, grouped into instances.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ApiServer,
    EngineCore,
    Worker,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::ApiServer, Role::EngineCore, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ApiServer => "api_server",
            Role::EngineCore => "engine_core",
            Role::Worker => "worker",
        }
    }

    /// Its index in the kernel's scheduler statistics.
    pub fn sched_index(self) -> u8 {
        use inferwatch_common::sched::Role as Kernel;
        match self {
            Role::ApiServer => Kernel::ApiServer as u8,
            Role::EngineCore => Kernel::EngineCore as u8,
            Role::Worker => Kernel::Worker as u8,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub role: Role,
    pub comm: String,
}

/// One vLLM deployment: the process tree under its first API server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The root process (the first API server, or the launcher of several).
    pub root_pid: u32,
    pub processes: Vec<Process>,
    /// Addresses the API servers listen on (wildcards as loopback), in their network namespace.
    pub listen: Vec<SocketAddr>,
    /// From the command line (`/v1/models` is asked later, when the server answers).
    pub cmdline_models: Vec<String>,
    /// The API server's command-line arguments, with the values of secret-looking flags
    /// (`--api-key`, `*token*`, `*secret*`, `*password*`) replaced by `***`.
    pub flags: Vec<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// The API server has vLLM's or PyTorch's code mapped (/proc/PID/maps), not only its
    /// title: preferred when there are more candidates than the agent follows.
    #[serde(default)]
    pub verified: bool,
}

impl Instance {
    pub fn pids(&self, role: Role) -> impl Iterator<Item = u32> + '_ {
        self.processes.iter().filter(move |p| p.role == role).map(|p| p.pid)
    }

    /// A stable, readable identity: the API port and where it runs.
    pub fn id(&self) -> String {
        let port =
            self.listen.first().map_or_else(|| format!("pid{}", self.root_pid), |a| a.port().to_string());
        match &self.container_id {
            Some(c) => format!("{}:{port}", &c[..12.min(c.len())]),
            None => format!("localhost:{port}"),
        }
    }
}

/// An instance as the agent describes it (`/api/v1/instances`, `inferwatch discover --json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    #[serde(flatten)]
    pub instance: Instance,
    pub version: Option<String>,
    /// From `/v1/models` when it answered, else from the command line.
    pub models: Vec<String>,
    /// `ListenOverflows` of the instance's network namespace (/proc/PID/net/netstat).
    pub listen_overflows: Option<u64>,
}
