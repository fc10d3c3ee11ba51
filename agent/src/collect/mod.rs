//! The collectors: each owns its I/O and hands plain data onward, and none is awaited by an
//! HTTP handler. [`discovery`] (vLLM from /proc, the watch maps), [`scrape`] (vLLM's own
//! `/metrics`), [`nvml`] (GPUs); [`procfs`] and [`fetch`] are what they read with.

pub mod discovery;
pub(crate) mod fetch;
pub(crate) mod netns;
pub(crate) mod nvml;
pub mod procfs;
pub mod scrape;
