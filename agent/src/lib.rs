//! The inferwatch agent as a library: the binary (src/main.rs) is a thin entry point, and the
//! fuzz targets (agent/fuzz) reach the parsers and state machines through here.
//!
//! Data flows one way (see README): kernel probes → ring buffer → [`events`] decoding →
//! a channel → the [`aggregator`], sole owner of state → the [`server`]'s exporters.

pub mod aggregator;
pub mod bench;
pub mod cardinality;
pub mod cli;
pub mod connections;
pub mod diagnosis;
pub mod discover;
pub mod discovery;
pub mod events;
pub mod gpu;
pub mod http;
pub mod httpclient;
pub mod ipc;
pub mod metrics;
pub mod preflight;
pub mod privileges;
pub mod probes;
pub mod procfs;
pub mod promtext;
pub mod route_series;
pub mod run;
pub mod sched;
pub mod scraper;
pub mod server;
pub mod syscalls;
pub mod toolkit;
pub mod top;
pub mod topview;
pub mod watcher;
pub mod webconfig;
