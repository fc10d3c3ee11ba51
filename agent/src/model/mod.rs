//! The types that cross stages: what the kernel reports, what discovery finds, what a scrape
//! or a GPU round returns, and what the agent's API serves. Plain data; this module imports
//! nothing else of the agent, so every stage may use it.

pub(crate) mod diagnosis;
pub(crate) mod duration;
pub(crate) mod family;
pub(crate) mod gpu;
pub(crate) mod health;
pub(crate) mod instance;
pub(crate) mod probe;
pub(crate) mod request;
pub(crate) mod scrape;
pub mod sock;
pub(crate) mod trace;
