//! From socket operations to requests: the bounded table of connections ([`connections`]),
//! HTTP/1.1 and SSE reassembly on each ([`http`]), and the API server ↔ engine hand-off that
//! splits a request's time into phases ([`handoff`]). Pure state machines, no I/O.

pub(crate) mod connections;
pub mod handoff;
pub mod http;
