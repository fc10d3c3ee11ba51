//! Loading and attaching the kernel programs, and the maps the agent writes.
//!
//! The programs are dropped (and so detached) with [`Programs`]; nothing is pinned.

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use inferwatch_common::{
    maps,
    sched::SchedStats,
    sock::{MAX_CAPTURE, WatchFlags},
};

use super::Error;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inferwatch.bpf.o"));

/// The BTF tracepoints, each a program of the same name: the socket-level ones (Linux >= 6.3)
/// and the scheduler's.
const TRACEPOINTS: [&str; 9] = [
    "sock_send_length",
    "sock_recv_length",
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
    "sched_switch",
    "sched_wakeup",
    "sched_wakeup_new",
];

/// Tracepoints the agent runs without where the kernel lacks them: `sk_data_ready` (Linux 6.3
/// and later) times a request's arrival in its socket; without it requests are timed from the
/// connection's establishment (first requests) or the server's first read.
const OPTIONAL_TRACEPOINTS: [&str; 1] = ["sk_data_ready"];

/// The attached programs: dropping this detaches them.
pub(crate) struct Programs {
    ebpf: Ebpf,
    attached: Vec<&'static str>,
}

/// The maps that say what the programs watch; discovery keeps them in step with vLLM.
pub(crate) struct WatchMaps {
    watched: HashMap<MapData, u32, WatchFlags>,
    sched_roles: HashMap<MapData, u32, u8>,
    listen_ports: HashMap<MapData, u16, u32>,
}

/// The readable ends of the kernel maps, handed to their reader tasks.
pub(crate) struct Outputs {
    pub events: RingBuf<MapData>,
    pub lost: PerCpuArray<MapData, u64>,
    pub sched: PerCpuArray<MapData, SchedStats>,
    /// The programs' log channel, read by `ring::spawn_kernel_log` once the runtime runs.
    pub kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Loads and attaches the programs; `capture_bytes` payload bytes are copied per transfer.
pub(crate) fn load(capture_bytes: u32) -> Result<(Programs, WatchMaps, Outputs), Error> {
    if OBJECT.is_empty() {
        return Err(Error::NoObject);
    }
    let btf = Btf::from_sys_fs().map_err(Error::Btf)?;
    let capture_bytes = capture_bytes.min(MAX_CAPTURE as u32);
    let mut ebpf = EbpfLoader::new()
        .override_global(maps::CAPTURE_BYTES_GLOBAL, &capture_bytes, true)
        // The scheduler probes' task storage: aya creates it but has no userspace type for
        // it, and none is needed (only the kernel programs use it).
        .allow_unsupported_maps()
        .load(OBJECT)
        .map_err(|e| Error::Object(Box::new(e)))?;
    let kernel_log = aya_log::EbpfLogger::init(&mut ebpf)
        .inspect_err(|e| tracing::debug!("kernel-side logging unavailable: {e}"))
        .ok();
    let mut attached = Vec::from(TRACEPOINTS);
    for name in TRACEPOINTS {
        attach(&mut ebpf, &btf, name)?;
    }
    for name in OPTIONAL_TRACEPOINTS {
        match attach(&mut ebpf, &btf, name) {
            Ok(()) => attached.push(name),
            Err(e) => tracing::warn!(
                "{e}: requests are timed from their connection's establishment or the server's first read, \
                 and their queued phase is not reported (this kernel lacks the tracepoint, Linux >= 6.3)"
            ),
        }
    }
    let watched = HashMap::try_from(take_map(&mut ebpf, maps::WATCHED_TGIDS)?).map_err(map_error)?;
    let events = RingBuf::try_from(take_map(&mut ebpf, maps::EVENTS)?).map_err(map_error)?;
    let lost = PerCpuArray::try_from(take_map(&mut ebpf, maps::LOST)?).map_err(map_error)?;
    let sched_roles = HashMap::try_from(take_map(&mut ebpf, maps::SCHED_ROLES)?).map_err(map_error)?;
    let sched = PerCpuArray::try_from(take_map(&mut ebpf, maps::SCHED_STATS)?).map_err(map_error)?;
    let listen_ports = HashMap::try_from(take_map(&mut ebpf, maps::LISTEN_PORTS)?).map_err(map_error)?;
    Ok((
        Programs { ebpf, attached },
        WatchMaps { watched, sched_roles, listen_ports },
        Outputs { events, lost, sched, kernel_log },
    ))
}

fn attach(ebpf: &mut Ebpf, btf: &Btf, name: &'static str) -> Result<(), Error> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(Error::Missing { what: "program", name })?
        .try_into()
        .map_err(|e| Error::Program { name, action: "typing", source: Box::new(e) })?;
    program.load(name, btf).map_err(|e| Error::Program { name, action: "loading", source: Box::new(e) })?;
    program.attach().map_err(|e| Error::Program { name, action: "attaching", source: Box::new(e) })?;
    Ok(())
}

fn map_error(e: aya::maps::MapError) -> Error {
    Error::Map(Box::new(e))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::Missing { what: "map", name })
}

impl Programs {
    /// Each program's cumulative run time (ns) and run count, as the kernel keeps them while
    /// `kernel.bpf_stats_enabled=1` (zero otherwise).
    pub(crate) fn stats(&self) -> Vec<(&'static str, u64, u64)> {
        self.attached
            .iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((*name, info.run_time().as_nanos() as u64, info.run_count()))
            })
            .collect()
    }
}

impl WatchMaps {
    /// Starts watching a process: its socket I/O reaches the ring buffer from now on.
    pub(crate) fn watch(&mut self, tgid: u32) -> Result<(), Error> {
        self.watched.insert(&tgid, &WatchFlags::default(), 0).map_err(map_error)
    }

    /// Stops watching a process.
    pub(crate) fn unwatch(&mut self, tgid: u32) -> Result<(), Error> {
        self.watched.remove(&tgid).map_err(map_error)
    }

    /// Tracks the accepted connections of a TCP port a process listens on from their
    /// establishment, or stops (`tgid` None).
    pub(crate) fn set_listen_port(&mut self, port: u16, tgid: Option<u32>) -> Result<(), Error> {
        match tgid {
            Some(tgid) => self.listen_ports.insert(&port, &tgid, 0),
            None => self.listen_ports.remove(&port),
        }
        .map_err(map_error)
    }

    /// Measures a process's scheduling under `role` (an index of `SchedStats`), or stops.
    pub(crate) fn set_sched_role(&mut self, tgid: u32, role: Option<u8>) -> Result<(), Error> {
        match role {
            Some(role) => self.sched_roles.insert(&tgid, &role, 0),
            None => self.sched_roles.remove(&tgid),
        }
        .map_err(map_error)
    }
}
