//! What the agent's own HTTP server saw: connections open and refused, API requests refused,
//! failed logins throttled. A registry of its own, written by the server and encoded on the page
//! after the aggregator's.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

pub(crate) struct ServerStats {
    pub registry: Registry,
    open: Gauge,
    refused: Family<ReasonLabels, Counter>,
    pub api_forbidden: Counter,
    pub auth_throttled: Counter,
    pub auth_failed: Counter,
}

impl Default for ServerStats {
    fn default() -> Self {
        let mut registry = Registry::default();
        let open = Gauge::default();
        registry.register(
            "inferwatch_agent_http_connections",
            "Connections to the agent's HTTP server now open",
            open.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        for reason in ["limit", "client_limit"] {
            let _ = refused.get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "inferwatch_agent_http_connections_refused",
            "Connections closed at once: too many open in all (limit) or from one address (client_limit)",
            refused.clone(),
        );
        let api_forbidden = Counter::default();
        registry.register(
            "inferwatch_agent_http_api_forbidden",
            "Requests to /api/v1 refused (403) because the client is not on loopback (see --api-access)",
            api_forbidden.clone(),
        );
        let auth_failed = Counter::default();
        registry.register(
            "inferwatch_agent_http_auth_failed",
            "Requests refused (401) for missing or wrong credentials",
            auth_failed.clone(),
        );
        let auth_throttled = Counter::default();
        registry.register(
            "inferwatch_agent_http_auth_throttled",
            "Requests refused (429) without checking their credentials, after too many failures",
            auth_throttled.clone(),
        );
        Self { registry, open, refused, api_forbidden, auth_throttled, auth_failed }
    }
}

impl ServerStats {
    pub(crate) fn opened(&self) {
        self.open.inc();
    }

    pub(crate) fn closed(&self) {
        self.open.dec();
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
