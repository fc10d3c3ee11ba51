//! The commands besides `run`: clients of the agent's API ([`top`], [`diagnose`], [`baseline`],
//! and `bench --agent`), a load generator for OpenAI-compatible servers ([`bench`]), and a one-off
//! look at this node's vLLM ([`discover`]).

pub(crate) mod baseline;
pub(crate) mod bench;
pub(crate) mod diagnose;
pub(crate) mod discover;
mod stats;
pub mod top;
