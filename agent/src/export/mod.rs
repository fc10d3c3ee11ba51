//! Where the agent's data leaves it: the `/metrics` page ([`page`], with vLLM's own families
//! re-exported by [`reexport`]), the HTTP endpoints ([`server`]) on a bounded listener
//! ([`listener`]) with its own counters ([`stats`]), TLS and authentication ([`webconfig`]), and
//! request spans over OTLP ([`otlp`]).
//! Exporters only read the aggregator's store.

pub(crate) mod listener;
pub(crate) mod otlp;
pub(crate) mod page;
pub mod reexport;
pub(crate) mod server;
pub(crate) mod stats;
pub(crate) mod webconfig;
