//! The `/metrics` page: the agent's registry (its own families, snapshot families included),
//! then every instance's `vllm:*` families with their instance labels, then the OpenMetrics
//! terminator.

use super::reexport::{Source, write_sources};
use crate::aggregator::Store;

pub(crate) fn render(store: &Store) -> Result<String, std::fmt::Error> {
    let mut out = store.metrics.encode()?;
    if out.ends_with("# EOF\n") {
        out.truncate(out.len() - "# EOF\n".len());
    }
    let vllm = store.vllm.read();
    let labels: Vec<Vec<(&str, &str)>> =
        vllm.values().map(|s| s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()).collect();
    let sources: Vec<Source<'_>> =
        vllm.values().zip(&labels).map(|(s, l)| (s.families.as_slice(), l.as_slice())).collect();
    write_sources(&mut out, &sources);
    out.push_str("# EOF\n");
    Ok(out)
}
