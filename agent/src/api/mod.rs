//! The agent's HTTP API as its clients see it: the types it serves (`Serialize` on the agent's
//! side, `Deserialize` on the commands'), the paths, and [`Client`], which `inferwatch top`,
//! `diagnose`, `baseline` and `bench --agent` use instead of reading JSON by string keys.

mod client;

pub(crate) use self::client::Client;
pub(crate) use crate::model::{
    diagnosis::Diagnosis,
    family::{Family, total},
    instance::{InstanceView, Role},
    request::RequestRecord,
};

/// `GET /metrics`: OpenMetrics text.
pub(crate) const METRICS: &str = "/metrics";
/// `GET /api/v1/requests?limit=N`: the most recent finished requests, newest first.
pub(crate) const REQUESTS: &str = "/api/v1/requests";
/// `GET /api/v1/instances`: the vLLM instances on the node.
pub(crate) const INSTANCES: &str = "/api/v1/instances";
/// `GET /api/v1/diagnosis?window=SECONDS`: the troubleshooting rules over a window.
pub(crate) const DIAGNOSIS: &str = "/api/v1/diagnosis";
