//! The single owner of the agent's state: every event arrives here through one channel, and
//! only this module writes the metric families and the list of recent requests.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, RwLock},
};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    connections::ConnectionTable,
    events::{self, AgentEvent, KernelEvent, SockOp},
    http::{FinishedRequest, Update},
    ipc::{IpcTracker, Phases},
    metrics::{
        FamilyLabels, InstanceLabels, LOST_MALFORMED, LostLabels, Metrics, PhaseLabels, ProgramLabels,
        ReasonLabels, ResetLabels, RuleLabels, ScrapeErrorLabels, SocketBytesLabels, SocketOpLabels,
        VllmInfoLabels,
    },
    procfs,
    scraper::ScrapeResult,
    watcher::InstanceView,
};

/// The series handles of one process: by system call, and bytes sent/received.
#[derive(Default)]
struct ProcessCounters {
    ops: Vec<(&'static str, prometheus_client::metrics::counter::Counter)>,
    sent: Option<prometheus_client::metrics::counter::Counter>,
    received: Option<prometheus_client::metrics::counter::Counter>,
}

/// Finished requests kept for `/api/v1/requests`.
pub const RECENT_REQUESTS: usize = 2048;
/// Distinct `model` label values; later names are exported as `other`.
pub const MAX_MODELS: usize = 32;

/// The latest good scrape of one vLLM instance, re-exported under vLLM's own names.
pub struct VllmSnapshot {
    pub families: Vec<crate::promtext::Family>,
    pub labels: Vec<(String, String)>,
}

/// What the exporters read. Written by the aggregator only.
pub struct Shared {
    pub metrics: Metrics,
    /// By instance id.
    pub vllm: RwLock<BTreeMap<String, VllmSnapshot>>,
    /// The instances of the latest discovery scan.
    pub instances: RwLock<Vec<InstanceView>>,
    /// Scheduler statistics per vLLM role, as families (see sched.rs).
    pub sched: RwLock<Vec<crate::promtext::Family>>,
    /// GPU families from the collector's latest round, joined to vLLM's processes.
    pub gpu: RwLock<Vec<crate::promtext::Family>>,
    /// One diagnosis sample per instance and scrape, for the last hour.
    pub diagnosis_samples: RwLock<VecDeque<crate::diagnosis::Sample>>,
    pub started: std::time::Instant,
    /// Newest last.
    pub recent: RwLock<VecDeque<RequestRecord>>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, to give kernel timestamps a wall-clock time.
    pub realtime_offset_ns: i128,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Self {
        Self {
            metrics: Metrics::new(),
            vllm: RwLock::new(BTreeMap::new()),
            instances: RwLock::new(Vec::new()),
            sched: RwLock::new(Vec::new()),
            gpu: RwLock::new(Vec::new()),
            diagnosis_samples: RwLock::new(VecDeque::new()),
            started: std::time::Instant::now(),
            recent: RwLock::new(VecDeque::new()),
            realtime_offset_ns: realtime_offset_ns(),
        }
    }
}

impl Shared {
    /// The whole `/metrics` page: the agent's registry, then every instance's `vllm:*`
    /// families with their instance labels, then the OpenMetrics terminator.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = self.metrics.encode()?;
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        let sched = self.sched.read().unwrap_or_else(|e| e.into_inner());
        let gpu = self.gpu.read().unwrap_or_else(|e| e.into_inner());
        crate::promtext::write_sources(&mut out, &[(sched.as_slice(), &[]), (gpu.as_slice(), &[])]);
        drop(sched);
        drop(gpu);
        let vllm = self.vllm.read().unwrap_or_else(|e| e.into_inner());
        let labels: Vec<Vec<(&str, &str)>> =
            vllm.values().map(|s| s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()).collect();
        let sources: Vec<crate::promtext::Source<'_>> =
            vllm.values().zip(&labels).map(|(s, l)| (s.families.as_slice(), l.as_slice())).collect();
        crate::promtext::write_sources(&mut out, &sources);
        write_own_usage(&mut out);
        out.push_str("# EOF\n");
        Ok(out)
    }
}

/// The agent's own CPU time and memory, read when scraped.
fn write_own_usage(out: &mut String) {
    use std::fmt::Write as _;
    if let Some(cpu) = crate::procfs::own_cpu_seconds() {
        let _ = write!(
            out,
            "# HELP inferwatch_agent_cpu_seconds CPU time (user + system) the agent used.\n\
             # TYPE inferwatch_agent_cpu_seconds counter\ninferwatch_agent_cpu_seconds_total {cpu}\n"
        );
    }
    if let Some(rss) = crate::procfs::own_resident_bytes() {
        let _ = write!(
            out,
            "# HELP inferwatch_agent_resident_memory_bytes Resident memory of the agent.\n\
             # TYPE inferwatch_agent_resident_memory_bytes gauge\ninferwatch_agent_resident_memory_bytes {rss}\n"
        );
    }
}

const SOCKET_OPS: &str = "inferwatch_process_socket_ops";
const SOCKET_BYTES: &str = "inferwatch_process_socket_bytes";
/// Samples re-exported per vLLM instance at most (vLLM 0.32 with one model: ~1,100).
pub const MAX_VLLM_SAMPLES: usize = 50_000;

/// Keeps the first `max` samples of a scraped page (whole families first come, first kept);
/// returns how many were dropped.
fn cap_samples(families: &mut Vec<crate::promtext::Family>, max: usize) -> u64 {
    let mut kept = 0usize;
    let mut dropped = 0u64;
    families.retain(|f| {
        if kept + f.samples.len() <= max {
            kept += f.samples.len();
            true
        } else {
            dropped += f.samples.len() as u64;
            false
        }
    });
    dropped
}

/// vLLM's own cumulative time to first token (sum, count) from its scraped families.
fn vllm_ttft(families: &[crate::promtext::Family]) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        families
            .iter()
            .filter(|f| f.name == "vllm:time_to_first_token_seconds")
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == format!("vllm:time_to_first_token_seconds{suffix}"))
            .map(|s| s.value)
            .sum()
    };
    (total("_sum"), total("_count"))
}

fn realtime_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid clock id and a pointer to an initialised timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// One finished request as `/api/v1/requests` shows it: sizes and times, never payload.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RequestRecord {
    pub pid: u32,
    pub method: &'static str,
    pub route: &'static str,
    pub model: String,
    pub status: u16,
    pub outcome: &'static str,
    pub stream: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub events: u32,
    pub content_events: u32,
    /// CLOCK_MONOTONIC of the first request byte (comparable with a client on the same host).
    pub received_monotonic_ns: u64,
    pub received_unix_seconds: f64,
    pub response_headers_seconds: Option<f64>,
    pub time_to_first_token_seconds: Option<f64>,
    pub duration_seconds: f64,
    pub max_chunk_gap_seconds: Option<f64>,
    /// Request received → handed to the engine (parsing, templating, tokenisation).
    pub frontend_in_seconds: Option<f64>,
    /// Handed over → the engine output that became the first token (queueing + prefill).
    pub engine_first_seconds: Option<f64>,
    /// Handed over → the last engine output (responses sent whole).
    pub engine_seconds: Option<f64>,
    /// That output received → written to the client (detokenisation, serialisation).
    pub frontend_out_seconds: Option<f64>,
    /// First token → end of the stream.
    pub decode_seconds: Option<f64>,
    /// Why the phases are missing, for a generation request whose IPC was not seen.
    pub phases_unmatched: Option<&'static str>,
}

/// Routes whose requests go through vLLM's engine.
const GENERATION_ROUTES: [&str; 3] = ["/v1/completions", "/v1/chat/completions", "/v1/responses"];

pub struct Aggregator {
    shared: Arc<Shared>,
    connections: ConnectionTable,
    /// Scratch space for what each transfer reveals, reused so a request allocates none.
    update: Update,
    /// Command names of watched processes, keyed by tgid.
    comms: HashMap<u32, String>,
    /// Last cumulative loss count seen per reason, to turn totals into counter increments.
    lost_totals: HashMap<&'static str, u64>,
    models: HashSet<String>,
    /// The served model of the instance each API server pid belongs to, when it serves one.
    instance_model: HashMap<u32, String>,
    ipc: IpcTracker,
    /// The instance id of each API server pid, for per-instance network counters.
    instance_of_pid: HashMap<u32, String>,
    /// Caps the families whose labels come from outside (status codes, pids).
    budget: crate::cardinality::SeriesBudget,
    /// Handles of the per-(model, route) request series.
    route_series: crate::route_series::RouteSeriesCache,
    /// Handles of each watched process's per-pid series (see `sock_op`).
    process_counters: foldhash::HashMap<u32, ProcessCounters>,
    /// Every vLLM process (API servers, engine cores, workers) → its model and role, for the GPU join.
    gpu_owners: HashMap<u32, crate::gpu::Owner>,
    /// Last `ListenOverflows` seen per instance.
    listen_overflows: HashMap<String, u64>,
    /// Per instance: kernel-measured TTFT (sum, count) since its last scrape, and vLLM's own
    /// cumulative TTFT (sum, count) at that scrape — their difference of means is the API
    /// server's overhead.
    ttft_since_scrape: HashMap<String, (f64, u64)>,
    vllm_ttft_seen: HashMap<String, (f64, f64)>,
    /// Per instance: cumulative TTFT and frontend-phase sums of matched streamed requests.
    phase_sums: HashMap<String, (f64, f64)>,
    /// The API servers' cumulative run-queue (sum seconds, count) from the last scheduler read.
    api_runqueue: (f64, f64),
    /// `--max-num-seqs` of each instance, from its command line.
    max_num_seqs: HashMap<String, f64>,
}

impl Aggregator {
    pub fn new(shared: Arc<Shared>, max_connections: usize, max_series_per_family: usize) -> Self {
        Self {
            shared,
            budget: crate::cardinality::SeriesBudget::new(max_series_per_family),
            process_counters: foldhash::HashMap::default(),
            route_series: Default::default(),
            connections: ConnectionTable::new(max_connections),
            update: Update::default(),
            comms: HashMap::new(),
            lost_totals: HashMap::new(),
            models: HashSet::new(),
            instance_model: HashMap::new(),
            ipc: IpcTracker::default(),
            instance_of_pid: HashMap::new(),
            gpu_owners: HashMap::new(),
            listen_overflows: HashMap::new(),
            ttft_since_scrape: HashMap::new(),
            vllm_ttft_seen: HashMap::new(),
            phase_sums: HashMap::new(),
            api_runqueue: (0.0, 0.0),
            max_num_seqs: HashMap::new(),
        }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<AgentEvent>) {
        while let Some(event) = events.recv().await {
            self.apply(event);
        }
    }

    pub fn apply(&mut self, event: AgentEvent) {
        let metrics = &self.shared.metrics;
        match event {
            AgentEvent::Batch(batch) => {
                for record in batch.records() {
                    match events::decode(record) {
                        Ok(event) => self.kernel_event(event),
                        Err(e) => {
                            tracing::debug!("dropping a ring-buffer record: {e}");
                            let lost = &self.shared.metrics.events_lost;
                            lost.get_or_create(&LostLabels { reason: LOST_MALFORMED }).inc();
                        }
                    }
                }
            }
            AgentEvent::Watched { tgid, comm } => {
                self.comms.insert(tgid, comm);
                metrics.watched_processes.set(self.comms.len() as i64);
            }
            AgentEvent::KernelLost { reason, total } => {
                let seen = self.lost_totals.entry(reason).or_insert(0);
                // Totals only grow while the maps live; a smaller one means a reload: start over.
                let delta = total.checked_sub(*seen).unwrap_or(total);
                *seen = total;
                metrics.events_lost.get_or_create(&LostLabels { reason }).inc_by(delta);
            }
            AgentEvent::Unwatched { tgid } => {
                self.process_counters.remove(&tgid);
                // Its per-pid series go: a process that is gone adds nothing more, and vLLM's
                // restarts must not pile up series of dead pids.
                if let Some(comm) = self.comms.remove(&tgid) {
                    self.remove_process_series(tgid, &comm);
                }
                self.shared.metrics.watched_processes.set(self.comms.len() as i64);
            }
            AgentEvent::Instances(instances) => self.instances(instances),
            AgentEvent::Scrape(result) => self.scrape(result),
            AgentEvent::ProgramStats(stats) => {
                for (program, ns, runs) in stats {
                    let labels = ProgramLabels { program };
                    let (c_ns, c_runs) =
                        (metrics.bpf_run_ns.get_or_create(&labels), metrics.bpf_runs.get_or_create(&labels));
                    // Kernel totals only grow; catch the counters up to them.
                    c_ns.inc_by(ns.saturating_sub(c_ns.get()));
                    c_runs.inc_by(runs.saturating_sub(c_runs.get()));
                }
            }
            AgentEvent::Gpu(snapshot) => {
                *self.shared.gpu.write().unwrap_or_else(|e| e.into_inner()) =
                    crate::gpu::families(&snapshot, &self.gpu_owners);
            }
            AgentEvent::Sched(slots) => {
                let at = |slot: u32| {
                    let i = (inferwatch_common::ROLE_API_SERVER as u32 * inferwatch_common::SCHED_SLOTS
                        + slot) as usize;
                    slots.get(i).copied().unwrap_or(0) as f64
                };
                self.api_runqueue = (
                    at(inferwatch_common::SLOT_RUNQUEUE_NS) / 1e9,
                    at(inferwatch_common::SLOT_RUNQUEUE_COUNT),
                );
                crate::sched::update(
                    &mut self.shared.sched.write().unwrap_or_else(|e| e.into_inner()),
                    &slots,
                );
            }
        }
        let metrics = &self.shared.metrics;
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

    /// One decoded kernel record.
    pub fn kernel_event(&mut self, event: KernelEvent<'_>) {
        match event {
            KernelEvent::Sock(op) => {
                self.sock_op(&op);
                let mut update = std::mem::take(&mut self.update);
                let (tgid, http) = self.connections.on_sock(&op, &mut update);
                if !http && op.ret > 0 && !op.payload.is_empty() {
                    // Not a client connection: vLLM's IPC with its engine, or something else.
                    self.ipc.observe(op.ts_ns, op.direction == crate::events::Direction::Sent, op.payload);
                }
                self.http_update(tgid, &mut update);
                self.update = update;
            }
            KernelEvent::State(st) => {
                let mut update = std::mem::take(&mut self.update);
                let tgid = self.connections.on_state(&st, &mut update);
                self.http_update(tgid, &mut update);
                self.update = update;
            }
            KernelEvent::Net(net) => {
                let vllm_instance = self
                    .instance_of_pid
                    .get(&net.tgid)
                    .cloned()
                    .unwrap_or_else(|| format!("pid:{}", net.tgid));
                let m = &self.shared.metrics;
                match net.what {
                    crate::events::NetWhat::Retransmit => {
                        m.tcp_retransmits.get_or_create(&InstanceLabels { vllm_instance }).inc();
                    }
                    crate::events::NetWhat::ResetSent => {
                        m.tcp_resets.get_or_create(&ResetLabels { vllm_instance, direction: "sent" }).inc();
                    }
                    crate::events::NetWhat::ResetReceived => {
                        m.tcp_resets
                            .get_or_create(&ResetLabels { vllm_instance, direction: "received" })
                            .inc();
                    }
                }
            }
        }
    }

    fn remove_process_series(&mut self, pid: u32, comm: &str) {
        let metrics = &self.shared.metrics;
        for syscall in crate::syscalls::LABELS {
            let ops = SocketOpLabels { pid, comm: comm.to_string(), syscall };
            metrics.socket_ops.remove(&ops);
            self.budget.release(SOCKET_OPS, &ops);
        }
        for direction in ["sent", "received"] {
            let bytes = SocketBytesLabels { pid, comm: comm.to_string(), direction };
            metrics.socket_bytes.remove(&bytes);
            self.budget.release(SOCKET_BYTES, &bytes);
        }
    }

    /// Per-process counters. The handles of a process's series are kept after their first
    /// use, so a socket operation costs two atomic increments, not label hashing and copies.
    fn sock_op(&mut self, op: &SockOp<'_>) {
        let metrics = &self.shared.metrics;
        metrics.events.inc();
        let handles = self.process_counters.entry(op.tgid).or_default();
        let comms = &mut self.comms;
        let mut comm =
            |tgid: u32| comms.entry(tgid).or_insert_with(|| procfs::comm(tgid).unwrap_or_default()).clone();
        match handles.ops.iter().find(|(syscall, _)| *syscall == op.syscall) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let ops = SocketOpLabels { pid: op.tgid, comm: comm(op.tgid), syscall: op.syscall };
                if self.budget.admit(SOCKET_OPS, &ops) {
                    let counter = metrics.socket_ops.get_or_create(&ops).clone();
                    counter.inc();
                    handles.ops.push((op.syscall, counter));
                } else {
                    metrics.series_refused.get_or_create(&FamilyLabels { family: SOCKET_OPS }).inc();
                }
            }
        }
        if op.ret > 0 {
            let slot = match op.direction {
                crate::events::Direction::Sent => &mut handles.sent,
                crate::events::Direction::Received => &mut handles.received,
            };
            match slot {
                Some(counter) => {
                    counter.inc_by(op.ret as u64);
                }
                None => {
                    let bytes = SocketBytesLabels {
                        pid: op.tgid,
                        comm: comm(op.tgid),
                        direction: op.direction.as_str(),
                    };
                    if self.budget.admit(SOCKET_BYTES, &bytes) {
                        let counter = metrics.socket_bytes.get_or_create(&bytes).clone();
                        counter.inc_by(op.ret as u64);
                        *slot = Some(counter);
                    } else {
                        metrics.series_refused.get_or_create(&FamilyLabels { family: SOCKET_BYTES }).inc();
                    }
                }
            }
        }
    }

    fn instances(&mut self, instances: Vec<InstanceView>) {
        let m = &self.shared.metrics;
        self.instance_model.clear();
        self.instance_of_pid.clear();
        self.gpu_owners.clear();
        m.vllm_info.clear();
        let ids: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        for i in &instances {
            let api: Vec<u32> = i.instance.pids(crate::discovery::Role::ApiServer).collect();
            if let [model] = i.models.as_slice() {
                for pid in &api {
                    self.instance_model.insert(*pid, model.clone());
                }
            }
            for pid in &api {
                self.instance_of_pid.insert(*pid, i.id.clone());
            }
            let model = i.models.first().or(i.instance.cmdline_models.first()).cloned().unwrap_or_default();
            for p in &i.instance.processes {
                self.gpu_owners
                    .insert(p.pid, crate::gpu::Owner { model: model.clone(), role: p.role.as_str() });
            }
            if let Some(n) =
                crate::discovery::flag_value(&i.instance.flags, "--max-num-seqs").and_then(|v| v.parse().ok())
            {
                self.max_num_seqs.insert(i.id.clone(), n);
            }
            // Zero-valued from the start, so rates and alerts see the first retransmit or reset.
            m.tcp_retransmits.get_or_create(&InstanceLabels { vllm_instance: i.id.clone() }).inc_by(0);
            for direction in ["sent", "received"] {
                m.tcp_resets.get_or_create(&ResetLabels { vllm_instance: i.id.clone(), direction }).inc_by(0);
            }
            if let Some(total) = i.listen_overflows {
                let seen = self.listen_overflows.entry(i.id.clone()).or_insert(total);
                let counter =
                    m.tcp_listen_overflows.get_or_create(&InstanceLabels { vllm_instance: i.id.clone() });
                counter.inc_by(total.saturating_sub(*seen));
                *seen = total;
            }
            let engine = i.instance.pids(crate::discovery::Role::EngineCore).next();
            m.vllm_info
                .get_or_create(&VllmInfoLabels {
                    vllm_instance: i.id.clone(),
                    version: i.version.clone().unwrap_or_default(),
                    model: i.models.join(","),
                    api_pid: api.first().map(|p| p.to_string()).unwrap_or_default(),
                    engine_pid: engine.map(|p| p.to_string()).unwrap_or_default(),
                    port: i.instance.listen.first().map(|a| a.port().to_string()).unwrap_or_default(),
                })
                .set(1);
        }
        // Instances that are gone: stop exporting their vLLM metrics and their up/down state.
        let mut vllm = self.shared.vllm.write().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = vllm.keys().filter(|k| !ids.contains(k.as_str())).cloned().collect();
        for id in gone {
            vllm.remove(&id);
            m.vllm_up.remove(&InstanceLabels { vllm_instance: id.clone() });
            m.vllm_scrape_duration.remove(&InstanceLabels { vllm_instance: id });
        }
        drop(vllm);
        *self.shared.instances.write().unwrap_or_else(|e| e.into_inner()) = instances;
    }

    fn scrape(&mut self, result: ScrapeResult) {
        let m = &self.shared.metrics;
        let id = result.target.id.clone();
        let labels = InstanceLabels { vllm_instance: id.clone() };
        m.vllm_scrape_duration.get_or_create(&labels).set(result.duration.as_secs_f64());
        let mut vllm = self.shared.vllm.write().unwrap_or_else(|e| e.into_inner());
        match result.outcome {
            Ok(mut families) => {
                m.vllm_up.get_or_create(&labels).set(1);
                let refused = cap_samples(&mut families, MAX_VLLM_SAMPLES);
                if refused > 0 {
                    m.series_refused.get_or_create(&FamilyLabels { family: "vllm" }).inc_by(refused);
                }
                self.record_diagnosis_sample(&id, &families);
                let theirs = vllm_ttft(&families);
                let previous = self.vllm_ttft_seen.insert(id.clone(), theirs);
                let ours = self.ttft_since_scrape.remove(&id).unwrap_or((0.0, 0));
                if let Some((sum0, count0)) = previous {
                    let (dsum, dcount) = (theirs.0 - sum0, theirs.1 - count0);
                    if dcount >= 1.0 && ours.1 > 0 {
                        let overhead = ours.0 / ours.1 as f64 - dsum / dcount;
                        m.api_server_overhead.get_or_create(&labels).set(overhead);
                    }
                }
                vllm.insert(id, VllmSnapshot { families, labels: result.target.labels });
            }
            Err((reason, detail)) => {
                tracing::debug!(instance = id, "scrape failed: {detail}");
                m.vllm_up.get_or_create(&labels).set(0);
                m.vllm_scrape_errors
                    .get_or_create(&ScrapeErrorLabels { vllm_instance: id.clone(), reason })
                    .inc();
                // Nothing stale or half-parsed stays exported.
                vllm.remove(&id);
            }
        }
    }

    /// One diagnosis sample for `id` from its fresh scrape and the agent's own counters; then the
    /// rules' verdict over the default window as `inferwatch_diagnosis_active`.
    fn record_diagnosis_sample(&self, id: &str, families: &[crate::promtext::Family]) {
        let total = |name: &str, sample: &str, combine: fn(f64, f64) -> f64| {
            families
                .iter()
                .filter(|f| f.name == name)
                .flat_map(|f| &f.samples)
                .filter(|s| s.name == sample)
                .map(|s| s.value)
                .fold(0.0, combine)
        };
        let sum = |name: &str| total(name, name, |a, b| a + b);
        let m = &self.shared.metrics;
        let labels = InstanceLabels { vllm_instance: id.to_string() };
        let resets: f64 = ["sent", "received"]
            .iter()
            .map(|d| {
                m.tcp_resets.get_or_create(&ResetLabels { vllm_instance: id.to_string(), direction: d }).get()
                    as f64
            })
            .sum();
        let (ttft_sum, frontend_sum) = self.phase_sums.get(id).copied().unwrap_or_default();
        let sample = crate::diagnosis::Sample {
            t: self.shared.started.elapsed().as_secs_f64(),
            instance: id.to_string(),
            waiting: sum("vllm:num_requests_waiting"),
            running: sum("vllm:num_requests_running"),
            kv_cache_usage: total("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", f64::max),
            preemptions: sum("vllm:num_preemptions_total"),
            requests_succeeded: sum("vllm:request_success_total"),
            max_num_seqs: self.max_num_seqs.get(id).copied(),
            ttft_sum,
            frontend_sum,
            api_runqueue_sum: self.api_runqueue.0,
            api_runqueue_count: self.api_runqueue.1,
            retransmits: m.tcp_retransmits.get_or_create(&labels).get() as f64,
            resets,
            gpu_memory_ratio: None,
        };
        let now = sample.t;
        let mut samples = self.shared.diagnosis_samples.write().unwrap_or_else(|e| e.into_inner());
        samples.push_back(sample);
        while samples.front().is_some_and(|s| s.t < now - 3600.0) {
            samples.pop_front();
        }
        let verdict = crate::diagnosis::diagnose(samples.make_contiguous(), now, 300.0);
        drop(samples);
        for rule in crate::diagnosis::RULES {
            let active = verdict.findings.iter().any(|f| f.rule == rule);
            m.diagnosis_active.get_or_create(&RuleLabels { rule }).set(i64::from(active));
        }
    }

    /// A bounded model label: the model the request named, else its instance's (`tgid`), if it
    /// is one of the first few seen.
    fn model_label(&mut self, named: Option<&str>, tgid: u32) -> String {
        match named.or_else(|| self.instance_model.get(&tgid).map(String::as_str)) {
            None => "unknown".into(),
            Some(m) if self.models.contains(m) => m.to_string(),
            Some(m) if self.models.len() < MAX_MODELS => {
                self.models.insert(m.to_string());
                m.to_string()
            }
            Some(_) => "other".into(),
        }
    }

    /// Takes what one transfer revealed out of `update` (leaving it empty, its room kept).
    fn http_update(&mut self, tgid: u32, update: &mut Update) {
        if let Some(reason) = update.not_http.take() {
            self.shared.metrics.not_http.get_or_create(&ReasonLabels { reason }).inc();
        }
        for (route, model) in update.started.drain(..) {
            let model = self.model_label(model.as_deref(), tgid);
            self.route_series.get(&model, route).in_flight(&self.shared.metrics).inc();
        }
        for req in update.finished.drain(..) {
            self.finished(tgid, req);
        }
    }

    fn finished(&mut self, tgid: u32, req: FinishedRequest) {
        let model = self.model_label(req.model.as_deref(), tgid);
        let m = &self.shared.metrics;
        let series = self.route_series.get(&model, req.route);
        series.in_flight(m).dec();
        let outcome = req.outcome.as_str();
        series.count_request(m, &mut self.budget, req.status, outcome);
        let since = |t: u64| t.saturating_sub(req.received_ns) as f64 / 1e9;
        let headers = req.headers_ns.map(since);
        let ttft = req.first_token_ns.map(since);
        if let (Some(t), Some(instance)) = (ttft, self.instance_of_pid.get(&tgid)) {
            let acc = self.ttft_since_scrape.entry(instance.clone()).or_insert((0.0, 0));
            acc.0 += t;
            acc.1 += 1;
        }
        let duration = since(req.end_ns);
        if let Some(h) = headers {
            series.response_headers(m).observe(h);
        }
        if let Some(t) = ttft {
            series.time_to_first_token(m).observe(t);
        }
        series.request_duration(m).observe(duration);
        if !req.chunk_gaps_ns.is_empty() {
            let gaps = series.chunk_gap(m);
            for g in &req.chunk_gaps_ns {
                gaps.observe(*g as f64 / 1e9);
            }
        }
        if req.events > 0 {
            series.stream_events(m, true).inc_by(req.content_events as u64);
            series.stream_events(m, false).inc_by((req.events - req.content_events) as u64);
        }
        series.request_bytes(m).inc_by(req.request_bytes);
        series.response_bytes(m).inc_by(req.response_bytes);

        let ipc = req.response_id.as_deref().and_then(|id| self.ipc.take(id));
        let generation = GENERATION_ROUTES.contains(&req.route) && req.status == 200;
        let (phases, unmatched) =
            match crate::ipc::phases(req.received_ns, req.first_token_ns, req.end_ns, ipc.as_ref()) {
                Ok(p) => (Some(p), None),
                Err(reason) if generation => (None, Some(reason)),
                Err(_) => (None, None),
            };
        let m = &self.shared.metrics;
        if let Some(reason) = unmatched {
            m.phase_unmatched.get_or_create(&ReasonLabels { reason }).inc();
        }
        if let (Some(p), Some(t), Some(instance)) = (&phases, ttft, self.instance_of_pid.get(&tgid)) {
            let sums = self.phase_sums.entry(instance.clone()).or_insert((0.0, 0.0));
            sums.0 += t;
            sums.1 += p.frontend_in + p.frontend_out;
        }
        let m = &self.shared.metrics;
        if let Some(p) = &phases {
            let observe = |phase: &'static str, v: Option<f64>| {
                if let Some(v) = v {
                    m.request_phase.get_or_create(&PhaseLabels { phase, model: model.clone() }).observe(v);
                }
            };
            observe("frontend_in", Some(p.frontend_in));
            observe("engine_first", p.engine_first);
            observe("engine", p.engine);
            observe("frontend_out", Some(p.frontend_out));
            observe("decode", p.decode);
        }
        let phase = |f: fn(&Phases) -> Option<f64>| phases.as_ref().and_then(f);

        let record = RequestRecord {
            pid: tgid,
            method: req.method,
            route: req.route,
            model,
            status: req.status,
            outcome,
            stream: req.stream,
            request_bytes: req.request_bytes,
            response_bytes: req.response_bytes,
            events: req.events,
            content_events: req.content_events,
            received_monotonic_ns: req.received_ns,
            received_unix_seconds: (req.received_ns as i128 + self.shared.realtime_offset_ns) as f64 / 1e9,
            response_headers_seconds: headers,
            time_to_first_token_seconds: ttft,
            duration_seconds: duration,
            max_chunk_gap_seconds: req.chunk_gaps_ns.iter().max().map(|g| *g as f64 / 1e9),
            frontend_in_seconds: phase(|p| Some(p.frontend_in)),
            engine_first_seconds: phase(|p| p.engine_first),
            engine_seconds: phase(|p| p.engine),
            frontend_out_seconds: phase(|p| Some(p.frontend_out)),
            decode_seconds: phase(|p| p.decode),
            phases_unmatched: unmatched,
        };
        let mut recent = self.shared.recent.write().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT_REQUESTS {
            recent.pop_front();
        }
        recent.push_back(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::Direction, metrics::LOST_RING_BUFFER_FULL};

    fn op(tgid: u32, syscall: &'static str, direction: Direction, ret: i32) -> KernelEvent<'static> {
        KernelEvent::Sock(SockOp {
            ts_ns: 1,
            conn_id: 0,
            tgid,
            tid: tgid,
            ret,
            syscall,
            direction,
            payload: b"",
        })
    }

    fn io(conn_id: u64, ts_ns: u64, direction: Direction, bytes: &[u8]) -> KernelEvent<'_> {
        KernelEvent::Sock(SockOp {
            ts_ns,
            conn_id,
            tgid: 10,
            tid: 10,
            ret: bytes.len() as i32,
            syscall: "read",
            direction,
            payload: bytes,
        })
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn series_of_an_unwatched_process_go_and_their_room_is_freed() {
        let shared = Arc::new(Shared::new());
        let mut agg = Aggregator::new(shared.clone(), 16, 4);
        agg.apply(AgentEvent::Watched { tgid: 10, comm: "vllm".into() });
        agg.kernel_event(op(10, "write", Direction::Sent, 100));
        agg.kernel_event(op(10, "read", Direction::Received, 7));
        agg.apply(AgentEvent::Unwatched { tgid: 10 });
        let text = shared.metrics.encode().unwrap();
        assert!(!text.contains("pid=\"10\""), "{text}");
        assert_eq!(value(&text, "inferwatch_watched_processes"), Some(0.0));
        // The freed room serves the next process (pid reuse or a restart).
        agg.apply(AgentEvent::Watched { tgid: 11, comm: "vllm".into() });
        agg.kernel_event(op(11, "write", Direction::Sent, 1));
        let text = shared.metrics.encode().unwrap();
        let write = "inferwatch_process_socket_ops_total{pid=\"11\",comm=\"vllm\",syscall=\"write\"}";
        assert_eq!(value(&text, write), Some(1.0));
        assert_eq!(
            value(&text, "inferwatch_series_refused_total{family=\"inferwatch_process_socket_ops\"}"),
            None
        );
    }

    #[test]
    fn a_family_stops_growing_at_its_cap_and_counts_what_it_refused() {
        let shared = Arc::new(Shared::new());
        let mut agg = Aggregator::new(shared.clone(), 64, 3);
        // Five status codes from a misbehaving server: three series, two refused requests.
        for (conn, status) in [200u16, 201, 299, 298, 297].into_iter().enumerate() {
            let conn = conn as u64 + 1;
            agg.kernel_event(io(conn, 1, Direction::Received, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"));
            let head = format!("HTTP/1.1 {status} OK\r\ncontent-length: 0\r\n\r\n");
            agg.kernel_event(io(conn, 2, Direction::Sent, head.as_bytes()));
        }
        let text = shared.metrics.encode().unwrap();
        let series = text.lines().filter(|l| l.starts_with("inferwatch_http_requests_total{")).count();
        assert_eq!(series, 3, "{text}");
        let refused = "inferwatch_series_refused_total{family=\"inferwatch_http_requests\"}";
        assert_eq!(value(&text, refused), Some(2.0));
        // Timing families have bounded labels (model, route) and still saw all five.
        assert!(
            text.contains(
                "inferwatch_http_request_duration_seconds_count{model=\"unknown\",route=\"/health\"} 5"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_huge_scraped_page_is_cut_at_the_cap() {
        use crate::promtext::{family, sample};
        let mut families: Vec<_> = (0..10)
            .map(|i| {
                family(
                    &format!("vllm:f{i}"),
                    "",
                    "gauge",
                    (0..10).map(|j| sample(&format!("vllm:f{i}"), &[("j", &j.to_string())], 1.0)).collect(),
                )
            })
            .collect();
        assert_eq!(cap_samples(&mut families, 35), 70);
        assert_eq!(families.len(), 3, "whole families are kept or dropped");
    }

    #[test]
    fn counts_ops_and_bytes_per_process_and_call() {
        let shared = Arc::new(Shared::new());
        let mut agg = Aggregator::new(shared.clone(), 16, 2000);
        agg.apply(AgentEvent::Watched { tgid: 10, comm: "vllm".into() });
        for _ in 0..3 {
            agg.kernel_event(op(10, "write", Direction::Sent, 100));
        }
        agg.kernel_event(op(10, "sendto", Direction::Sent, -11));
        agg.kernel_event(op(10, "read", Direction::Received, 7));
        let text = shared.metrics.encode().unwrap();
        let ops = |s: &str| {
            value(
                &text,
                &format!("inferwatch_process_socket_ops_total{{pid=\"10\",comm=\"vllm\",syscall=\"{s}\"}}"),
            )
        };
        assert_eq!(ops("write"), Some(3.0));
        assert_eq!(ops("sendto"), Some(1.0), "failed calls are operations too");
        assert_eq!(ops("read"), Some(1.0));
        let bytes = |d: &str| {
            value(
                &text,
                &format!(
                    "inferwatch_process_socket_bytes_total{{pid=\"10\",comm=\"vllm\",direction=\"{d}\"}}"
                ),
            )
        };
        assert_eq!(bytes("sent"), Some(300.0), "errors move no bytes");
        assert_eq!(bytes("received"), Some(7.0));
        assert_eq!(value(&text, "inferwatch_agent_events_total"), Some(5.0));
        assert_eq!(value(&text, "inferwatch_watched_processes"), Some(1.0));
    }

    #[test]
    fn kernel_loss_totals_become_increments() {
        let shared = Arc::new(Shared::new());
        let mut agg = Aggregator::new(shared.clone(), 16, 2000);
        let series = "inferwatch_agent_events_lost_total{reason=\"ring_buffer_full\"}";
        for (total, expect) in [(5, 5.0), (5, 5.0), (12, 12.0), (3, 15.0)] {
            agg.apply(AgentEvent::KernelLost { reason: LOST_RING_BUFFER_FULL, total });
            assert_eq!(value(&shared.metrics.encode().unwrap(), series), Some(expect), "after total {total}");
        }
        // A record too short for its header is counted as malformed.
        agg.apply(AgentEvent::Batch(crate::events::RecordBatch::from_records([&[1u8, 2, 3][..]])));
        let text = shared.metrics.encode().unwrap();
        assert_eq!(value(&text, "inferwatch_agent_events_lost_total{reason=\"malformed\"}"), Some(1.0));
    }

    #[test]
    fn a_streamed_request_becomes_metrics_and_a_record() {
        let shared = Arc::new(Shared::new());
        let mut agg = Aggregator::new(shared.clone(), 16, 2000);
        let body = br#"{"model":"tiny","prompt":"hi","stream":true}"#;
        let head =
            format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
        let request = [head.as_bytes(), body].concat();
        agg.kernel_event(io(5, 1_000_000, Direction::Received, &request));
        let text = shared.metrics.encode().unwrap();
        let in_flight = "inferwatch_http_requests_in_flight{model=\"tiny\",route=\"/v1/completions\"}";
        assert_eq!(value(&text, in_flight), Some(1.0));
        let head =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        agg.kernel_event(io(5, 3_000_000, Direction::Sent, head));
        let event = |t: &str| {
            let e = format!("data: {{\"choices\":[{{\"text\":\"{t}\"}}]}}\n\n");
            format!("{:x}\r\n{e}\r\n", e.len())
        };
        agg.kernel_event(io(5, 11_000_000, Direction::Sent, event("").as_bytes()));
        agg.kernel_event(io(5, 21_000_000, Direction::Sent, event("a").as_bytes()));
        agg.kernel_event(io(5, 41_000_000, Direction::Sent, event("b").as_bytes()));
        agg.kernel_event(io(5, 42_000_000, Direction::Sent, b"e\r\ndata: [DONE]\n\n\r\n"));
        agg.kernel_event(io(5, 43_000_000, Direction::Sent, b"0\r\n\r\n"));
        let text = shared.metrics.encode().unwrap();
        assert_eq!(value(&text, in_flight), Some(0.0));
        let total = "inferwatch_http_requests_total{model=\"tiny\",route=\"/v1/completions\",status=\"200\",outcome=\"complete\"}";
        assert_eq!(value(&text, total), Some(1.0), "{text}");
        let recent = shared.recent.read().unwrap();
        let r = &recent[0];
        assert_eq!((r.model.as_str(), r.status, r.outcome, r.stream), ("tiny", 200, "complete", true));
        assert_eq!((r.events, r.content_events), (4, 2));
        assert_eq!(r.response_headers_seconds, Some(0.002));
        assert_eq!(r.time_to_first_token_seconds, Some(0.020));
        assert_eq!(r.duration_seconds, 0.042);
        assert_eq!(r.max_chunk_gap_seconds, Some(0.020));
        assert_eq!(r.request_bytes, request.len() as u64);
        let json = serde_json::to_string(r).unwrap();
        assert!(!json.contains("hi"), "no payload in the record: {json}");
    }

    #[test]
    fn model_labels_are_bounded() {
        let shared = Arc::new(Shared::new());
        let mut agg = Aggregator::new(shared, 16, 2000);
        for i in 0..MAX_MODELS {
            assert_eq!(agg.model_label(Some(&format!("m{i}")), 1), format!("m{i}"));
        }
        assert_eq!(agg.model_label(Some("one-too-many"), 1), "other");
        assert_eq!(agg.model_label(Some("m0"), 1), "m0");
        assert_eq!(agg.model_label(None, 1), "unknown");
    }
}
