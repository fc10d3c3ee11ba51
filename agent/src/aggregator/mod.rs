//! The single owner of the agent's state: everything the agent learns arrives here as an
//! [`Input`] through one channel, and only this module writes the metric families, the recent
//! requests and the joins (request ↔ engine hand-off, process ↔ GPU ↔ model) in the [`Store`]
//! the exporters read.
//!
//! Split along its concerns: [`processes`] (per-process socket counters), [`requests`]
//! (finished requests, phases, records), [`instances`] (discovery's instances, TCP counters),
//! [`scrapes`] (vLLM's own metrics, overhead, diagnosis samples), [`sched`] and [`gpu`]
//! (snapshot families), over [`families`] (the registry) and [`cardinality`] (series caps).

pub(crate) mod cardinality;
pub(crate) mod diagnosis;
pub(crate) mod families;
pub(crate) mod gpu;
mod instances;
mod processes;
mod requests;
mod route_series;
pub(crate) mod sched;
mod scrapes;
pub(crate) mod snapshots;
pub(crate) mod store;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use inferwatch_common::{
    sched::{Role as KernelRole, Slot, index},
    sock::AF_UNIX,
};
use tokio::sync::mpsc;

pub(crate) use self::store::Store;
use self::{
    families::{LostLabels, ProgramLabels, WhatLabels},
    processes::ProcessCounters,
};
use crate::{
    collect::discovery::DiscoveryReport,
    kernel::{KernelReport, LOST_MALFORMED, decode},
    model::{
        gpu::{GpuSnapshot, Owner},
        scrape::ScrapeResult,
        sock::{Direction, KernelEvent},
        trace::{Ids, SpanSink},
    },
    requests::{connections::ConnectionTable, handoff::HandoffTracker, http::Progress},
};

/// What the aggregator is told, by whom.
#[derive(Debug)]
pub(crate) enum Input {
    Kernel(KernelReport),
    Discovery(DiscoveryReport),
    Scrape(ScrapeResult),
    Gpu(GpuSnapshot),
}

impl From<KernelReport> for Input {
    fn from(r: KernelReport) -> Self {
        Input::Kernel(r)
    }
}

impl From<DiscoveryReport> for Input {
    fn from(r: DiscoveryReport) -> Self {
        Input::Discovery(r)
    }
}

impl From<ScrapeResult> for Input {
    fn from(r: ScrapeResult) -> Self {
        Input::Scrape(r)
    }
}

impl From<GpuSnapshot> for Input {
    fn from(s: GpuSnapshot) -> Self {
        Input::Gpu(s)
    }
}

pub(crate) struct Aggregator {
    store: Arc<Store>,
    connections: ConnectionTable,
    /// Scratch space for what each transfer reveals, reused so a request allocates none.
    progress: Progress,
    /// Command names of watched processes, keyed by tgid.
    comms: HashMap<u32, String>,
    /// Last cumulative loss count seen per reason, to turn totals into counter increments.
    lost_totals: HashMap<&'static str, u64>,
    /// Model label values admitted from successful requests, for processes whose served models
    /// discovery does not know (at most `requests::MAX_MODELS`).
    models: HashSet<String>,
    /// The models the instance of each API server pid serves (`/v1/models`, else its command
    /// line), when discovery knows them.
    instance_served: HashMap<u32, Vec<String>>,
    /// The model label each in-flight request started with, per connection.
    in_flight_labels: requests::InFlightLabels,
    handoff: HandoffTracker,
    /// The instance id of each API server pid, for per-instance network counters.
    instance_of_pid: HashMap<u32, String>,
    /// Caps the families whose labels come from outside (status codes, pids).
    budget: cardinality::SeriesBudget,
    /// Handles of the per-(model, route) request series.
    route_series: route_series::RouteSeriesCache,
    /// Handles of each watched process's per-pid series (see `sock_op`).
    process_counters: foldhash::HashMap<u32, ProcessCounters>,
    /// Every vLLM process (API servers, engine cores, workers) → its model and role, for the GPU join.
    gpu_owners: HashMap<u32, Owner>,
    /// Last `ListenOverflows` seen per instance.
    listen_overflows: HashMap<String, u64>,
    /// Per instance: kernel-measured TTFT (sum, count) since its last scrape, and vLLM's own
    /// cumulative TTFT (sum, count) at that scrape — their difference of means is the API
    /// server's overhead.
    ttft_since_scrape: HashMap<String, (f64, u64)>,
    vllm_ttft_seen: HashMap<String, (f64, f64)>,
    /// Per instance: cumulative phase sums of matched streamed requests.
    phase_sums: HashMap<String, PhaseSums>,
    /// The API servers' cumulative run-queue (sum seconds, count) from the last scheduler read.
    api_runqueue: (f64, f64),
    /// `--max-num-seqs` of each instance, from its command line.
    max_num_seqs: HashMap<String, f64>,
    /// Instances with series: discovered ones and `--vllm-url` ones (these never go).
    known_instances: HashSet<String>,
    explicit_instances: HashSet<String>,
    /// Where finished requests go as trace spans, when OTLP export is on; and the ids of the
    /// traces it starts for requests that came without one.
    spans: Option<SpanSink>,
    trace_ids: Ids,
}

/// Cumulative sums (seconds) over an instance's streamed requests whose phases matched.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PhaseSums {
    pub ttft: f64,
    /// The API server's share: queued + frontend_in + frontend_out.
    pub frontend: f64,
    pub queued: f64,
}

impl Aggregator {
    pub(crate) fn new(store: Arc<Store>, max_connections: usize, max_series_per_family: usize) -> Self {
        Self {
            store,
            budget: cardinality::SeriesBudget::new(max_series_per_family),
            process_counters: foldhash::HashMap::default(),
            route_series: Default::default(),
            connections: ConnectionTable::new(max_connections),
            progress: Progress::default(),
            comms: HashMap::new(),
            lost_totals: HashMap::new(),
            models: HashSet::new(),
            instance_served: HashMap::new(),
            in_flight_labels: Default::default(),
            handoff: HandoffTracker::default(),
            instance_of_pid: HashMap::new(),
            gpu_owners: HashMap::new(),
            listen_overflows: HashMap::new(),
            ttft_since_scrape: HashMap::new(),
            vllm_ttft_seen: HashMap::new(),
            phase_sums: HashMap::new(),
            api_runqueue: (0.0, 0.0),
            max_num_seqs: HashMap::new(),
            known_instances: HashSet::new(),
            explicit_instances: HashSet::new(),
            spans: None,
            trace_ids: Ids::new(),
        }
    }

    /// Offers every finished request to `sink` as a trace span.
    pub(crate) fn with_spans(mut self, sink: Option<SpanSink>) -> Self {
        self.spans = sink;
        self
    }

    pub(crate) async fn run(mut self, mut inputs: mpsc::Receiver<Input>) {
        while let Some(input) = inputs.recv().await {
            self.apply(input);
        }
    }

    pub(crate) fn apply(&mut self, input: Input) {
        self.store.heartbeat.beat();
        match input {
            Input::Kernel(report) => self.kernel_report(report),
            Input::Discovery(DiscoveryReport::Watched { tgid, comm }) => self.watched(tgid, comm),
            Input::Discovery(DiscoveryReport::Unwatched { tgid }) => self.unwatched(tgid),
            Input::Discovery(DiscoveryReport::Instances(instances)) => self.instances(instances),
            Input::Discovery(DiscoveryReport::Explicit(ids)) => self.explicit_instances.extend(ids),
            Input::Discovery(DiscoveryReport::LeftOut { instances, processes }) => {
                let left_out = &self.store.metrics.discovery_left_out;
                left_out.get_or_create(&WhatLabels { what: "instances" }).set(instances as i64);
                left_out.get_or_create(&WhatLabels { what: "processes" }).set(processes as i64);
            }
            Input::Scrape(result) => self.scrape(result),
            Input::Gpu(snapshot) => {
                *self.store.gpu.write() = gpu::families(&snapshot, &self.gpu_owners);
            }
        }
        let metrics = &self.store.metrics;
        metrics.connections_tracked.set(self.connections.len() as i64);
        let evicted = self.connections.evicted_connections;
        if evicted > metrics.connections_evicted.get() {
            metrics.connections_evicted.inc_by(evicted - metrics.connections_evicted.get());
        }
        let evicted = self.connections.evicted_requests;
        if evicted > metrics.requests_evicted.get() {
            metrics.requests_evicted.inc_by(evicted - metrics.requests_evicted.get());
        }
    }

    fn kernel_report(&mut self, report: KernelReport) {
        let metrics = &self.store.metrics;
        match report {
            KernelReport::Batch(batch) => {
                for record in batch.records() {
                    match decode::decode(record) {
                        Ok(event) => self.kernel_event(event),
                        Err(e) => {
                            tracing::debug!("dropping a ring-buffer record: {e}");
                            let lost = &self.store.metrics.events_lost;
                            lost.get_or_create(&LostLabels { reason: LOST_MALFORMED }).inc();
                        }
                    }
                }
            }
            KernelReport::Lost { reason, total } => {
                let seen = self.lost_totals.entry(reason).or_insert(0);
                // Totals only grow while the maps live; a smaller one means a reload: start over.
                let delta = total.checked_sub(*seen).unwrap_or(total);
                *seen = total;
                metrics.events_lost.get_or_create(&LostLabels { reason }).inc_by(delta);
            }
            KernelReport::ProgramStats(stats) => {
                for s in stats {
                    let labels = ProgramLabels { program: s.program };
                    // Kernel totals only grow; catch the counters up to them.
                    for (family, total) in [
                        (&metrics.bpf_run_ns, s.run_ns),
                        (&metrics.bpf_runs, s.runs),
                        (&metrics.bpf_misses, s.misses),
                    ] {
                        let counter = family.get_or_create(&labels);
                        counter.inc_by(total.saturating_sub(counter.get()));
                    }
                }
            }
            KernelReport::Sched(slots) => {
                let at = |slot: Slot| {
                    slots.get(index(KernelRole::ApiServer as u8, slot, 0)).copied().unwrap_or(0) as f64
                };
                self.api_runqueue = (at(Slot::RunqueueNs) / 1e9, at(Slot::RunqueueCount));
                sched::update(&mut self.store.sched.write(), &slots);
            }
        }
    }

    /// One decoded kernel record.
    pub(crate) fn kernel_event(&mut self, event: KernelEvent<'_>) {
        match event {
            KernelEvent::Sock(op) => {
                self.sock_op(&op);
                let mut progress = std::mem::take(&mut self.progress);
                let (tgid, http) = self.connections.on_sock(&op, &mut progress);
                if !http && op.family == AF_UNIX && op.ret > 0 && !op.payload.is_empty() {
                    // vLLM's ZMQ IPC with its engine (Unix sockets; never a TCP peer's bytes).
                    self.handoff.observe(op.ts_ns, op.direction == Direction::Sent, op.payload);
                }
                self.http_update(tgid, &mut progress);
                self.progress = progress;
            }
            KernelEvent::State(st) => {
                let mut progress = std::mem::take(&mut self.progress);
                let tgid = self.connections.on_state(&st, &mut progress);
                self.http_update(tgid, &mut progress);
                self.progress = progress;
            }
            KernelEvent::Net(net) => self.net_event(net),
        }
    }
}
