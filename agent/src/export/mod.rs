//! Where the agent's data leaves it: the `/metrics` page ([`page`], with vLLM's own families
//! re-exported by [`reexport`]), the HTTP server and its API ([`server`]), and the server's TLS
//! and authentication ([`webconfig`]). Exporters only read the aggregator's store.

pub(crate) mod page;
pub mod reexport;
pub(crate) mod server;
pub(crate) mod webconfig;
