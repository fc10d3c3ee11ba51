//! A/B benchmarks. Placeholder replaced below.
use crate::cmd::Result;

pub fn bench(_args: &[String]) -> Result {
    Err("no benchmarks yet".into())
}
