//! A typed client of a running agent's HTTP API.

use std::time::Duration;

use super::{DIAGNOSIS, Diagnosis, Family, INSTANCES, InstanceView, METRICS, REQUESTS, RequestRecord};
use crate::collect::{
    fetch::{self, FetchError, Target},
    scrape::parse::{ParseError, parse},
};

/// Largest answer accepted (2048 request records are ~2 MiB).
const MAX_ANSWER: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("{url}: not an http://HOST:PORT address ({why})")]
    Url { url: String, why: String },
    #[error("the agent at {agent}{path}: {source}")]
    Fetch {
        agent: String,
        path: String,
        #[source]
        source: FetchError,
    },
    #[error("the agent at {agent}{path} answered something that is not its API: {source}")]
    Json {
        agent: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the agent at {agent}/metrics: {source}")]
    Metrics {
        agent: String,
        #[source]
        source: ParseError,
    },
}

/// One agent, by its `http://HOST:PORT` address.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    agent: String,
    target: Target,
    timeout: Duration,
}

impl Client {
    pub(crate) fn new(agent: &str, timeout: Duration) -> Result<Self, Error> {
        let (addr, _) = fetch::http_url(agent)
            .map_err(|why| Error::Url { url: agent.to_string(), why: why.to_string() })?;
        Ok(Self { agent: agent.to_string(), target: Target { addr, netns_of: None }, timeout })
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>, Error> {
        fetch::get(&self.target, path, self.timeout, MAX_ANSWER).await.map_err(|source| Error::Fetch {
            agent: self.agent.clone(),
            path: path.to_string(),
            source,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let body = self.get(path).await?;
        serde_json::from_slice(&body).map_err(|source| Error::Json {
            agent: self.agent.clone(),
            path: path.to_string(),
            source,
        })
    }

    /// The `limit` most recent finished requests, newest first.
    pub(crate) async fn requests(&self, limit: usize) -> Result<Vec<RequestRecord>, Error> {
        self.json(&format!("{REQUESTS}?limit={limit}")).await
    }

    pub(crate) async fn instances(&self) -> Result<Vec<InstanceView>, Error> {
        self.json(INSTANCES).await
    }

    pub(crate) async fn diagnosis(&self, window: Duration) -> Result<Diagnosis, Error> {
        self.json(&format!("{DIAGNOSIS}?window={}", window.as_secs_f64())).await
    }

    /// The agent's `/metrics` page, parsed.
    pub(crate) async fn metrics(&self) -> Result<Vec<Family>, Error> {
        let body = self.get(METRICS).await?;
        parse(&String::from_utf8_lossy(&body))
            .map_err(|source| Error::Metrics { agent: self.agent.clone(), source })
    }
}
