//! The describe stage: what an instance says about itself (`/version`, `/v1/models`), asked
//! once per instance and again until it answers.

use std::{collections::HashMap, time::Duration};

use crate::{
    collect::fetch,
    model::{
        instance::{Instance, Role},
        scrape::Target,
    },
};

/// `/version` and `/v1/models` of an instance.
pub(crate) type Description = (Option<String>, Vec<String>);

/// An instance's root process and listening addresses: a restart changes it.
type InstanceKey = (u32, Vec<std::net::SocketAddr>);

/// Descriptions of the instances of the last scan.
#[derive(Default)]
pub(crate) struct Descriptions(HashMap<InstanceKey, Description>);

impl Descriptions {
    /// The description of each of `instances`, asking those that have not answered yet.
    pub(crate) async fn of(&mut self, instances: &[Instance]) -> Vec<Description> {
        self.0.retain(|k, _| instances.iter().any(|i| (i.root_pid, i.listen.clone()) == *k));
        let mut out = Vec::with_capacity(instances.len());
        for i in instances {
            let key = (i.root_pid, i.listen.clone());
            let entry = match self.0.get(&key) {
                Some(d) if d.0.is_some() => d.clone(),
                _ => {
                    let d = describe(i).await;
                    self.0.insert(key, d.clone());
                    d
                }
            };
            out.push(entry);
        }
        out
    }
}

/// `/version` and `/v1/models` of an instance (empty when it does not answer yet).
pub(crate) async fn describe(i: &Instance) -> Description {
    let (Some(addr), Some(api)) = (i.listen.first().copied(), i.pids(Role::ApiServer).next()) else {
        return (None, Vec::new());
    };
    let target = Target { addr, netns_of: Some(api) };
    let timeout = Duration::from_secs(2);
    let version = fetch::get(&target, "/version", timeout, 1 << 16)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<Version>(&b).ok())
        .map(|v| v.version);
    let models = fetch::get(&target, "/v1/models", timeout, 1 << 20)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<Models>(&b).ok())
        .map(|m| m.data.into_iter().map(|m| m.id).collect())
        .unwrap_or_default();
    (version, models)
}

/// vLLM's `/version`.
#[derive(serde::Deserialize)]
struct Version {
    version: String,
}

/// The OpenAI `/v1/models` list, as far as it matters here.
#[derive(serde::Deserialize)]
struct Models {
    data: Vec<Model>,
}

#[derive(serde::Deserialize)]
struct Model {
    id: String,
}
