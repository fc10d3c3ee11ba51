//! The agent's own metric families, all in one prometheus-client registry: typed families
//! updated as events arrive, and collectors that encode, at each scrape, the families the
//! aggregator rebuilds from snapshots (scheduler, GPU) and the agent's own CPU and memory.
//! Only the aggregator writes them; the page (`export::page`) encodes the registry.

use std::sync::{Arc, atomic::AtomicU64};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};

use super::{
    route_series::{TracedHistograms, traced_latency_histogram},
    store::Locked,
};
use crate::{collect::procfs, kernel::LOST_LABELS, model::family::Family as Snapshot};

/// Latency buckets: vLLM's own (1 ms to 7680 s), so both sides can be compared bucket by bucket.
pub const LATENCY_BUCKETS: [f64; 23] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0, 7680.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModelRoute {
    pub model: String,
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub model: String,
    pub route: &'static str,
    pub status: u16,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StreamEventLabels {
    pub model: String,
    pub route: &'static str,
    /// `content` (carries a token) or `other`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FamilyLabels {
    pub family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SocketOpLabels {
    pub pid: u32,
    pub comm: String,
    pub syscall: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SocketBytesLabels {
    pub pid: u32,
    pub comm: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WhatLabels {
    pub what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LostLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

pub(crate) struct Metrics {
    pub registry: Registry,
    pub socket_ops: Family<SocketOpLabels, Counter>,
    pub socket_bytes: Family<SocketBytesLabels, Counter>,
    pub events: Counter,
    pub payload_bytes: Counter,
    pub events_lost: Family<LostLabels, Counter>,
    pub watched_processes: Gauge,
    pub discovery_left_out: Family<WhatLabels, Gauge>,
    pub http_requests: Family<RequestLabels, Counter>,
    pub response_headers: Histograms<ModelRoute>,
    pub time_to_first_token: TracedHistograms<ModelRoute>,
    pub request_duration: TracedHistograms<ModelRoute>,
    pub chunk_gap: Histograms<ModelRoute>,
    pub stream_events: Family<StreamEventLabels, Counter>,
    pub in_flight: Family<ModelRoute, Gauge>,
    pub request_bytes: Family<ModelRoute, Counter>,
    pub response_bytes: Family<ModelRoute, Counter>,
    pub connections_tracked: Gauge,
    pub connections_evicted: Counter,
    pub requests_evicted: Counter,
    pub not_http: Family<ReasonLabels, Counter>,
    pub series_refused: Family<FamilyLabels, Counter>,
    pub vllm_up: Family<InstanceLabels, Gauge>,
    pub vllm_scrape_duration: Family<InstanceLabels, Gauge<f64, AtomicU64>>,
    pub vllm_scrape_errors: Family<ScrapeErrorLabels, Counter>,
    pub vllm_info: Family<VllmInfoLabels, Gauge>,
    pub request_phase: Histograms<PhaseLabels>,
    pub phase_unmatched: Family<ReasonLabels, Counter>,
    pub tcp_retransmits: Family<InstanceLabels, Counter>,
    pub tcp_resets: Family<ResetLabels, Counter>,
    pub tcp_listen_overflows: Family<InstanceLabels, Counter>,
    pub api_server_overhead: Family<InstanceLabels, Gauge<f64, AtomicU64>>,
    pub diagnosis_active: Family<RuleLabels, Gauge>,
    pub bpf_run_ns: Family<ProgramLabels, Counter>,
    pub bpf_runs: Family<ProgramLabels, Counter>,
    pub bpf_misses: Family<ProgramLabels, Counter>,
    pub probe_info: Family<ProbeLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProbeLabels {
    pub hook: &'static str,
    pub attach: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PhaseLabels {
    pub phase: &'static str,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProgramLabels {
    pub program: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RuleLabels {
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResetLabels {
    pub vllm_instance: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct InstanceLabels {
    pub vllm_instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ScrapeErrorLabels {
    pub vllm_instance: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VllmInfoLabels {
    pub vllm_instance: String,
    pub version: String,
    pub model: String,
    pub api_pid: String,
    pub engine_pid: String,
    pub port: String,
}

impl Metrics {
    /// The registry, with a collector for each of `snapshots` (families the aggregator
    /// replaces whole) and one for the agent's own CPU and memory.
    pub(crate) fn new(snapshots: &[Arc<Locked<Vec<Snapshot>>>]) -> Self {
        let mut registry = Registry::default();
        let socket_ops = Family::<SocketOpLabels, Counter>::default();
        registry.register(
            "inferwatch_process_socket_ops",
            "Socket operations of watched processes, by the system call that made them",
            socket_ops.clone(),
        );
        let socket_bytes = Family::<SocketBytesLabels, Counter>::default();
        registry.register(
            "inferwatch_process_socket_bytes",
            "Bytes moved through sockets by watched processes",
            socket_bytes.clone(),
        );
        let events = Counter::default();
        registry.register("inferwatch_agent_events", "Kernel events received by the agent", events.clone());
        let payload_bytes = Counter::default();
        registry.register(
            "inferwatch_agent_payload_bytes",
            "Payload bytes the kernel programs copied into the agent's events (at most --capture-bytes of each transfer's head, and its last bytes); read in memory, never exported",
            payload_bytes.clone(),
        );
        let events_lost = Family::<LostLabels, Counter>::default();
        for reason in LOST_LABELS {
            // Present from the start at 0, so `rate()` and alerts work before the first loss.
            let _ = events_lost.get_or_create(&LostLabels { reason });
        }
        registry.register(
            "inferwatch_agent_events_lost",
            "Kernel events dropped before they were counted, by reason",
            events_lost.clone(),
        );
        let watched_processes = Gauge::default();
        registry.register(
            "inferwatch_watched_processes",
            "Processes the kernel programs currently watch",
            watched_processes.clone(),
        );
        let discovery_left_out = Family::<WhatLabels, Gauge>::default();
        for what in ["instances", "processes"] {
            let _ = discovery_left_out.get_or_create(&WhatLabels { what });
        }
        registry.register(
            "inferwatch_discovery_left_out",
            "vLLM-like candidates the latest scan left out because of the agent's caps (instances, watched API-server processes); the most credible are kept",
            discovery_left_out.clone(),
        );
        registry.register(
            "inferwatch_build",
            "Build information",
            Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION") }),
        );
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "inferwatch_http_requests",
            "HTTP requests served by watched processes, as the kernel saw them end",
            http_requests.clone(),
        );
        let histograms = |registry: &mut Registry, name: &str, help: &str| {
            let family: Histograms<ModelRoute> = Family::new_with_constructor(latency_histogram);
            registry.register_with_unit(name, help, Unit::Seconds, family.clone());
            family
        };
        let response_headers = histograms(
            &mut registry,
            "inferwatch_http_response_headers",
            "From the first request byte received to the response head written",
        );
        let traced = |registry: &mut Registry, name: &str, help: &str| {
            let family: TracedHistograms<ModelRoute> = Family::new_with_constructor(traced_latency_histogram);
            registry.register_with_unit(name, help, Unit::Seconds, family.clone());
            family
        };
        let time_to_first_token = traced(
            &mut registry,
            "inferwatch_http_time_to_first_token",
            "From the first request byte received to the first SSE event carrying content written",
        );
        let request_duration = traced(
            &mut registry,
            "inferwatch_http_request_duration",
            "From the first request byte received to the end of the response (or the abort)",
        );
        let chunk_gap = histograms(
            &mut registry,
            "inferwatch_http_stream_chunk_gap",
            "Time between consecutive SSE events carrying content",
        );
        let stream_events = Family::<StreamEventLabels, Counter>::default();
        registry.register("inferwatch_http_stream_events", "SSE events written", stream_events.clone());
        let in_flight = Family::<ModelRoute, Gauge>::default();
        registry.register(
            "inferwatch_http_requests_in_flight",
            "Requests received whose response has not ended",
            in_flight.clone(),
        );
        let request_bytes = Family::<ModelRoute, Counter>::default();
        registry.register_with_unit(
            "inferwatch_http_request",
            "Request bytes received (head and body)",
            Unit::Bytes,
            request_bytes.clone(),
        );
        let response_bytes = Family::<ModelRoute, Counter>::default();
        registry.register_with_unit(
            "inferwatch_http_response",
            "Response bytes written (head and body, framing included)",
            Unit::Bytes,
            response_bytes.clone(),
        );
        let connections_tracked = Gauge::default();
        registry.register(
            "inferwatch_connections_tracked",
            "Connections the agent currently follows",
            connections_tracked.clone(),
        );
        let connections_evicted = Counter::default();
        registry.register(
            "inferwatch_connections_evicted",
            "Connections dropped from the bounded table before they ended",
            connections_evicted.clone(),
        );
        let requests_evicted = Counter::default();
        registry.register(
            "inferwatch_http_requests_evicted",
            "Requests lost with an evicted connection: never counted as complete or aborted",
            requests_evicted.clone(),
        );
        let not_http = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "inferwatch_connections_not_http",
            "Connections (or the rest of them) not followed as HTTP/1.1, by reason",
            not_http.clone(),
        );
        let series_refused = Family::<FamilyLabels, Counter>::default();
        registry.register(
            "inferwatch_series_refused",
            "Updates refused because their family reached --max-series-per-family (or a scraped page its sample cap)",
            series_refused.clone(),
        );
        let vllm_up = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "inferwatch_vllm_up",
            "1 if the last scrape of the instance's /metrics succeeded",
            vllm_up.clone(),
        );
        let vllm_scrape_duration = Family::<InstanceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "inferwatch_vllm_scrape_duration",
            "How long the last scrape of the instance's /metrics took",
            Unit::Seconds,
            vllm_scrape_duration.clone(),
        );
        let vllm_scrape_errors = Family::<ScrapeErrorLabels, Counter>::default();
        registry.register(
            "inferwatch_vllm_scrape_errors",
            "Failed scrapes of an instance's /metrics, by reason (nothing of a failed scrape is exported)",
            vllm_scrape_errors.clone(),
        );
        let vllm_info = Family::<VllmInfoLabels, Gauge>::default();
        registry.register(
            "inferwatch_vllm_info",
            "vLLM instances found on this node (value 1)",
            vllm_info.clone(),
        );
        let request_phase: Histograms<PhaseLabels> = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "inferwatch_request_phase",
            "Where generation requests' time went: queued (arrival in the server's socket → its first read, every generation request the kernel timed), frontend_in (first read → handed to the engine), engine_first (→ the output that became the first token), frontend_out (→ first token written), decode (→ end); engine for responses sent whole",
            Unit::Seconds,
            request_phase.clone(),
        );
        let phase_unmatched = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "inferwatch_request_phase_unmatched",
            "Generation requests whose engine IPC was not seen (no phases), by reason",
            phase_unmatched.clone(),
        );
        let tcp_retransmits = Family::<InstanceLabels, Counter>::default();
        registry.register(
            "inferwatch_tcp_retransmits",
            "TCP retransmissions on the connections of a vLLM instance's API servers",
            tcp_retransmits.clone(),
        );
        let tcp_resets = Family::<ResetLabels, Counter>::default();
        registry.register(
            "inferwatch_tcp_resets",
            "TCP resets on the connections of a vLLM instance's API servers, sent or received",
            tcp_resets.clone(),
        );
        let tcp_listen_overflows = Family::<InstanceLabels, Counter>::default();
        registry.register(
            "inferwatch_tcp_listen_overflows",
            "Connections dropped because an accept queue was full, in the instance's network namespace (host-wide when it shares the host's; /proc/net/netstat ListenOverflows)",
            tcp_listen_overflows.clone(),
        );
        let api_server_overhead = Family::<InstanceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "inferwatch_api_server_overhead",
            "Mean time to first token as the kernel saw it minus vLLM's own, over the last scrape interval: time spent before vLLM's clock starts (reading, parsing) and after it stops (writing)",
            Unit::Seconds,
            api_server_overhead.clone(),
        );
        let diagnosis_active = Family::<RuleLabels, Gauge>::default();
        registry.register(
            "inferwatch_diagnosis_active",
            "1 while a diagnosis rule fires over the last 5 minutes (see `inferwatch diagnose`)",
            diagnosis_active.clone(),
        );
        let bpf_run_ns = Family::<ProgramLabels, Counter>::default();
        registry.register(
            "inferwatch_bpf_program_run_nanoseconds",
            "Time the kernel spent in each inferwatch program; counted only while kernel.bpf_stats_enabled=1, which itself adds some 100 ns per run",
            bpf_run_ns.clone(),
        );
        let bpf_runs = Family::<ProgramLabels, Counter>::default();
        registry.register(
            "inferwatch_bpf_program_runs",
            "Runs of each inferwatch program (while kernel.bpf_stats_enabled=1)",
            bpf_runs.clone(),
        );
        let bpf_misses = Family::<ProgramLabels, Counter>::default();
        registry.register(
            "inferwatch_bpf_program_misses",
            "Runs of each inferwatch program the kernel skipped because it was already running on that CPU (fexit and tracepoint programs from Linux 5.12); a skipped socket program misses that operation, whoever made it",
            bpf_misses.clone(),
        );
        let probe_info = Family::<ProbeLabels, Gauge>::default();
        registry.register(
            "inferwatch_probe_info",
            "1 per kernel hook and how it is attached on this kernel (unavailable: this kernel cannot, see the agent's log)",
            probe_info.clone(),
        );
        for families in snapshots {
            registry.register_collector(Box::new(super::snapshots::Snapshots(families.clone())));
        }
        registry.register_collector(Box::new(OwnUsage));
        Self {
            registry,
            socket_ops,
            socket_bytes,
            events,
            payload_bytes,
            events_lost,
            watched_processes,
            discovery_left_out,
            http_requests,
            response_headers,
            time_to_first_token,
            request_duration,
            chunk_gap,
            stream_events,
            in_flight,
            request_bytes,
            response_bytes,
            connections_tracked,
            connections_evicted,
            requests_evicted,
            not_http,
            series_refused,
            vllm_up,
            vllm_scrape_duration,
            vllm_scrape_errors,
            vllm_info,
            request_phase,
            phase_unmatched,
            tcp_retransmits,
            tcp_resets,
            tcp_listen_overflows,
            api_server_overhead,
            diagnosis_active,
            bpf_run_ns,
            bpf_runs,
            bpf_misses,
            probe_info,
        }
    }

    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The text of `families` as the registry's collector encodes them (for tests of the
/// families' builders).
/// The agent's own CPU time and memory, read when scraped.
#[derive(Debug)]
struct OwnUsage;

impl Collector for OwnUsage {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = procfs::own_cpu_seconds() {
            let counter = prometheus_client::metrics::counter::ConstCounter::new(cpu);
            let metric = encoder.encode_descriptor(
                "inferwatch_agent_cpu_seconds",
                "CPU time (user + system) the agent used.",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        if let Some(rss) = procfs::own_resident_bytes() {
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(rss as i64);
            let metric = encoder.encode_descriptor(
                "inferwatch_agent_resident_memory_bytes",
                "Resident memory of the agent.",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_registry_exports_self_metrics() {
        let text = Metrics::new(&[]).encode().unwrap();
        assert!(text.contains("inferwatch_agent_events_total 0"), "{text}");
        assert!(text.contains("inferwatch_agent_events_lost_total{reason=\"ring_buffer_full\"} 0"));
        assert!(text.contains("inferwatch_build_info{version=\""));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn socket_ops_are_labelled_by_pid_comm_and_syscall() {
        let m = Metrics::new(&[]);
        m.socket_ops
            .get_or_create(&SocketOpLabels { pid: 7, comm: "python3".into(), syscall: "write" })
            .inc_by(3);
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                "inferwatch_process_socket_ops_total{pid=\"7\",comm=\"python3\",syscall=\"write\"} 3"
            ),
            "{text}"
        );
    }
}
