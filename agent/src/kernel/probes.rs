//! Loading and attaching the kernel programs, and the maps the agent writes.
//!
//! The programs are dropped (and so detached) with [`Programs`]; nothing is pinned.

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit, KProbe},
};
use inferwatch_common::{kernel::KERNEL_LAYOUT_GLOBAL, maps, sched::SchedStats, sock::MAX_CAPTURE};

use super::{
    Error, ProgramStats,
    btf::KernelBtf,
    kretprobe::{self, TracefsKretprobe},
    plan::{OPTIONAL_TRACEPOINTS, Object, Plan, SOCKET_TRACEPOINTS, SocketHook},
};
use crate::model::probe::ProbeChoice;

/// The programs for Linux 5.17 and later, and for 5.10 to 5.16 (see `plan.rs`).
static MODERN: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inferwatch.bpf.o"));
static COMPAT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inferwatch-compat.bpf.o"));

/// The attached programs: dropping this detaches them.
pub(crate) struct Programs {
    ebpf: Ebpf,
    attached: Vec<&'static str>,
    /// How each hook is attached on this kernel.
    pub choices: Vec<ProbeChoice>,
    /// The kretprobes made through tracefs: removed from the kernel when dropped.
    _kretprobes: Vec<TracefsKretprobe>,
}

/// The maps that say what the programs watch; discovery keeps them in step with vLLM.
pub(crate) struct WatchMaps {
    /// The watched-process bitmap (see `maps::WATCHED_TGIDS`); only this owner writes it.
    watched: Array<MapData, u64>,
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

/// Chooses the programs for this kernel (see `plan.rs`), loads and attaches them;
/// `capture_bytes` payload bytes are copied per transfer. Where fexit cannot attach to kernel
/// functions (arm64 before Linux 6.4: no BPF trampolines for them), kprobes take its place.
pub(crate) fn load(
    capture_bytes: u32,
    socket_hook: SocketHook,
    kretprobe_instances: u32,
) -> Result<(Programs, WatchMaps, Outputs), Error> {
    let options = Options { capture_bytes, kretprobe_instances };
    let facts = KernelBtf::from_sys_fs().map_err(Error::KernelBtf)?;
    let btf = Btf::from_sys_fs().map_err(Error::Btf)?;
    let first = super::plan::plan(&facts, socket_hook).map_err(Error::Plan)?;
    let (plan, loaded) = match load_plan(&first, &btf, options) {
        Err(Error::NoSocketHook(why))
            if socket_hook == SocketHook::Auto && first.socket == SocketHook::Fexit =>
        {
            // The likely cause on arm64; elsewhere the reason alone (a verifier's refusal is ours
            // to fix, and says so in its log).
            let hint = if cfg!(target_arch = "aarch64") {
                "; arm64 kernels before 6.4 have no BPF trampolines for kernel functions"
            } else {
                ""
            };
            tracing::warn!("fexit cannot attach here ({why}{hint}): using kprobes");
            let plan = super::plan::plan(&facts, SocketHook::Kprobe).map_err(Error::Plan)?;
            let loaded = load_plan(&plan, &btf, options)?;
            (plan, loaded)
        }
        loaded => (first, loaded?),
    };
    // Once, for the plan in force (not again for a plan given up for kprobes).
    for limit in &plan.limits {
        tracing::warn!("this kernel: {limit}");
    }
    Ok(loaded)
}

/// What the user chose about the programs.
#[derive(Clone, Copy)]
struct Options {
    capture_bytes: u32,
    /// Instances of each kretprobe (0: the kernel's default); see `kretprobe.rs`.
    kretprobe_instances: u32,
}

fn load_plan(plan: &Plan, btf: &Btf, options: Options) -> Result<(Programs, WatchMaps, Outputs), Error> {
    let object = match plan.object {
        Object::Modern => MODERN,
        Object::Compat => COMPAT,
    };
    if object.is_empty() {
        return Err(Error::NoObject);
    }
    let capture_bytes = options.capture_bytes.min(MAX_CAPTURE as u32);
    // One record-assembly slot per CPU the kernel may ever run on.
    let cpus = aya::util::nr_cpus().map_err(|(path, e)| Error::Cpus(path, e))?.get();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::SCRATCH, cpus)
        .override_global(maps::CAPTURE_BYTES_GLOBAL, &capture_bytes, true)
        .override_global(KERNEL_LAYOUT_GLOBAL, &plan.layout, true)
        // The scheduler probes' task storage and the arrival's socket storage: aya creates
        // them but has no userspace type for them, and none is needed.
        .allow_unsupported_maps()
        .load(object)
        .map_err(|e| Error::Object(Box::new(e)))?;
    let kernel_log = aya_log::EbpfLogger::init(&mut ebpf)
        .inspect_err(|e| tracing::debug!("kernel-side logging unavailable: {e}"))
        .ok();
    let Attached { programs: attached, choices, kretprobes } =
        attach_all(&mut ebpf, btf, plan, options.kretprobe_instances)?;
    let watched = Array::try_from(take_map(&mut ebpf, maps::WATCHED_TGIDS)?).map_err(map_error)?;
    let events = RingBuf::try_from(take_map(&mut ebpf, maps::EVENTS)?).map_err(map_error)?;
    let lost = PerCpuArray::try_from(take_map(&mut ebpf, maps::LOST)?).map_err(map_error)?;
    let sched_roles = HashMap::try_from(take_map(&mut ebpf, maps::SCHED_ROLES)?).map_err(map_error)?;
    let sched = PerCpuArray::try_from(take_map(&mut ebpf, maps::SCHED_STATS)?).map_err(map_error)?;
    let listen_ports = HashMap::try_from(take_map(&mut ebpf, maps::LISTEN_PORTS)?).map_err(map_error)?;
    Ok((
        Programs { ebpf, attached, choices, _kretprobes: kretprobes },
        WatchMaps { watched, sched_roles, listen_ports },
        Outputs { events, lost, sched, kernel_log },
    ))
}

/// Attaches what the plan chose; every hook that cannot be attached is logged once and named
/// in the returned choices. Only socket I/O is required.
fn attach_all(ebpf: &mut Ebpf, btf: &Btf, plan: &Plan, kretprobe_instances: u32) -> Result<Attached, Error> {
    let mut attached = Vec::new();
    let mut kretprobes = Vec::new();
    let mut choices = plan.hooks.clone();
    let unavailable = |choices: &mut Vec<ProbeChoice>, hook| {
        choices.retain(|(h, _)| *h != hook);
        choices.push((hook, "unavailable"));
    };
    match plan.socket {
        SocketHook::Kprobe => {
            let (names, returns, how) = attach_kprobes(ebpf, plan, kretprobe_instances)?;
            attached.extend(names);
            kretprobes = returns;
            choices.push(("socket_io", "kprobe"));
            choices.push(("kretprobe_instances", how));
        }
        SocketHook::Fexit => {
            let mut failed = Vec::new();
            for target in &plan.fexit {
                match attach_fexit(ebpf, btf, target.program, target.function) {
                    Ok(()) => attached.push(target.program),
                    Err(e) => failed.push(format!("{e}: {} is not watched", target.function)),
                }
            }
            // None attached: one reason is enough (the caller may fall back to kprobes).
            if attached.is_empty() {
                return Err(Error::NoSocketHook(failed.into_iter().next().unwrap_or_default()));
            }
            for failure in failed {
                tracing::warn!("{failure}");
            }
            choices.push(("socket_io", "fexit"));
        }
        _ => {
            for name in SOCKET_TRACEPOINTS {
                attach_tracepoint(ebpf, btf, name)?;
                attached.push(name);
            }
            choices.push(("socket_io", "tp_btf"));
        }
    }
    let arrival = plan.layout.features & inferwatch_common::kernel::FEATURE_ARRIVAL != 0;
    let compat_sched = plan.object == Object::Compat;
    let optional = OPTIONAL_TRACEPOINTS
        .into_iter()
        .chain(compat_sched.then_some(("sched_process_exit", "sched")))
        .chain(arrival.then_some(("sk_data_ready", "arrival")));
    for (name, hook) in optional {
        if hook == "sched" && !plan.sched {
            unavailable(&mut choices, hook);
            continue;
        }
        match attach_tracepoint(ebpf, btf, name) {
            Ok(()) => attached.push(name),
            Err(e) => {
                tracing::warn!("{e}: the {hook} hook is unavailable on this kernel");
                unavailable(&mut choices, hook);
            }
        }
        if !choices.iter().any(|(h, _)| *h == hook) {
            choices.push((hook, "tp_btf"));
        }
    }
    if !arrival {
        choices.push(("arrival", "unavailable"));
    }
    tracing::info!(object = ?plan.object, hooks = ?choices, "kernel programs attached");
    Ok(Attached { programs: attached, choices, kretprobes })
}

/// What [`attach_all`] attached.
struct Attached {
    programs: Vec<&'static str>,
    choices: Vec<ProbeChoice>,
    kretprobes: Vec<TracefsKretprobe>,
}

fn attach_tracepoint(ebpf: &mut Ebpf, btf: &Btf, name: &'static str) -> Result<(), Error> {
    let tracepoint: &mut BtfTracePoint = program(ebpf, name)?;
    tracepoint.load(name, btf).map_err(failed(name, "loading"))?;
    tracepoint.attach().map_err(failed(name, "attaching"))?;
    Ok(())
}

/// The program `name` of the object, as its type `P`.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Missing { what: "program", name })?
        .try_into()
        .map_err(failed(name, "typing"))
}

/// What `action` on the program `name` failed with, as an [`Error`].
fn failed(name: &'static str, action: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |e| Error::Program { name, action, source: Box::new(e) }
}

/// The kprobe programs: one entry program on every function of the plan, a return program per
/// direction. A function that cannot be probed is skipped, with a warning. The returns are
/// kretprobes made through tracefs with `instances` instances each where it can (see
/// `kretprobe.rs`), else aya's with the kernel's default; the third value says which.
fn attach_kprobes(
    ebpf: &mut Ebpf,
    plan: &Plan,
    instances: u32,
) -> Result<(Vec<&'static str>, Vec<TracefsKretprobe>, &'static str), Error> {
    const ENTRY: &str = "socket_call_entry";
    const PROGRAMS: [&str; 3] = [ENTRY, "socket_send_return", "socket_recv_return"];
    for name in PROGRAMS {
        program::<KProbe>(ebpf, name)?.load().map_err(failed(name, "loading"))?;
    }
    let mut tracefs = match kretprobe::tracefs() {
        Ok(path) if instances > 0 => {
            kretprobe::remove_stale(&path);
            Some(path)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(
                "{e}: kretprobes get the kernel's default instances (a few per CPU); calls beyond them return unseen and are counted lost"
            );
            None
        }
    };
    let mut kretprobes = Vec::new();
    let mut hooked = 0;
    for target in &plan.fexit {
        let ret =
            if target.function.contains("sendmsg") { "socket_send_return" } else { "socket_recv_return" };
        let entry = match program::<KProbe>(ebpf, ENTRY)?.attach(target.function, 0) {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!("{}: {} is not watched", failed(ENTRY, "attaching")(e), target.function);
                continue;
            }
        };
        let returns = (|| {
            if let Some(path) = &tracefs {
                let fd = program::<KProbe>(ebpf, ret)?.fd().map_err(failed(ret, "attaching"))?;
                match kretprobe::attach(path, std::os::fd::AsFd::as_fd(fd), target.function, instances) {
                    Ok(probe) => {
                        kretprobes.push(probe);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(
                            "a kretprobe with {instances} instances on {} through tracefs: {e}; kretprobes get the kernel's default instances (a few per CPU) from here",
                            target.function
                        );
                        tracefs = None;
                    }
                }
            }
            program::<KProbe>(ebpf, ret)?
                .attach(target.function, 0)
                .map(|_| ())
                .map_err(failed(ret, "attaching"))
        })();
        match returns {
            Ok(()) => hooked += 1,
            Err(e) => {
                // Without its return, the entry would only leave open calls behind (each
                // counted as a missed return): detached.
                let _ = program::<KProbe>(ebpf, ENTRY)?.detach(entry);
                tracing::warn!("{e}: {} is not watched", target.function);
            }
        }
    }
    if hooked == 0 {
        return Err(Error::NoSocketHook("no kprobe could be attached (see the warnings above)".into()));
    }
    // Mixed (tracefs gave out midway) reads as the default: the weaker guarantee.
    let how = if tracefs.is_some() && kretprobes.len() == hooked { "tracefs" } else { "kernel_default" };
    Ok((PROGRAMS.to_vec(), kretprobes, how))
}

fn attach_fexit(ebpf: &mut Ebpf, btf: &Btf, name: &'static str, function: &str) -> Result<(), Error> {
    let fexit: &mut FExit = program(ebpf, name)?;
    fexit.load(function, btf).map_err(failed(name, "loading"))?;
    fexit.attach().map_err(failed(name, "attaching"))?;
    Ok(())
}

fn map_error(e: aya::maps::MapError) -> Error {
    Error::Map(Box::new(e))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::Missing { what: "map", name })
}

impl Programs {
    /// Each program's cumulative statistics: run time and runs as the kernel keeps them while
    /// `kernel.bpf_stats_enabled=1` (zero otherwise), and the runs it skipped.
    pub(crate) fn stats(&self) -> Vec<ProgramStats> {
        self.attached
            .iter()
            .filter_map(|name| {
                let program = self.ebpf.program(name)?;
                let info = program.info().ok()?;
                let misses = program
                    .fd()
                    .ok()
                    .and_then(|fd| recursion_misses(std::os::fd::AsFd::as_fd(fd)))
                    .unwrap_or(0);
                Some(ProgramStats {
                    program: name,
                    run_ns: info.run_time().as_nanos() as u64,
                    runs: info.run_count(),
                    misses,
                })
            })
            .collect()
    }
}

/// The runs of a program the kernel skipped because it was already running on that CPU
/// (`bpf_prog_info.recursion_misses`, Linux 5.12+; aya does not expose it). None where the
/// kernel does not say.
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    /// `union bpf_attr` as `BPF_OBJ_GET_INFO_BY_FD` reads it.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: a plain-data kernel struct, valid zeroed.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: the attribute names a buffer of `info_len` bytes that lives across the call; the
    // kernel writes at most that much (less where its struct is smaller, and says so).
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw mut attr, size_of::<InfoByFd>() as u32)
    };
    let end = std::mem::offset_of!(aya_obj::generated::bpf_prog_info, recursion_misses) + size_of::<u64>();
    (r == 0 && attr.info_len as usize >= end).then_some(info.recursion_misses)
}

impl WatchMaps {
    /// Starts watching a process: its socket I/O reaches the ring buffer from now on.
    pub(crate) fn watch(&mut self, tgid: u32) -> Result<(), Error> {
        self.set_watched(tgid, true)
    }

    /// Stops watching a process.
    pub(crate) fn unwatch(&mut self, tgid: u32) -> Result<(), Error> {
        self.set_watched(tgid, false)
    }

    /// Sets or clears the process's bit. The word is read and written back whole: the programs
    /// only read it, and this is its one writer, so no other bit can change in between (a word
    /// copied byte by byte still shows every other bit as it was).
    fn set_watched(&mut self, tgid: u32, on: bool) -> Result<(), Error> {
        if tgid >= maps::TGID_LIMIT {
            return Err(Error::TgidLimit(tgid));
        }
        let (word, bit) = maps::watched_bit(tgid);
        let old = self.watched.get(&word, 0).map_err(map_error)?;
        let new = if on { old | bit } else { old & !bit };
        self.watched.set(word, &new, 0).map_err(map_error)
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

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// The programs that run on every socket operation of a watched process (or on every one of
    /// the node, before the filter). A call of LLVM's `memset`/`memcpy`/`memmove` there is a
    /// BPF-to-BPF call and return on each operation (dear where every `ret` goes through a
    /// mitigation thunk), which zeroing or copying a few words does not need.
    const PER_OPERATION: &[&str] = &[
        "tp_btf/sock_send_length",
        "tp_btf/sock_recv_length",
        "tp_btf/sk_data_ready",
        "kprobe",
        "kretprobe",
    ];

    fn per_operation(section: &str) -> bool {
        PER_OPERATION.contains(&section) || section.starts_with("fexit/")
    }

    #[test]
    fn the_socket_programs_call_no_memory_subprograms() {
        for (name, bytes) in [("modern", super::MODERN), ("compat", super::COMPAT)] {
            if bytes.is_empty() {
                // A plain `cargo test` without `cargo xtask build`; `cargo xtask test` embeds them.
                assert!(
                    std::env::var_os("INFERWATCH_EBPF_OBJECT").is_none(),
                    "the {name} object should be embedded: INFERWATCH_EBPF_OBJECT is set"
                );
                eprintln!("no {name} eBPF object embedded: nothing to check");
                continue;
            }
            let file = object::File::parse(bytes).expect("an ELF object");
            let mut checked = 0;
            for section in file.sections() {
                let Ok(section_name) = section.name() else { continue };
                if !per_operation(section_name) {
                    continue;
                }
                checked += 1;
                for (offset, relocation) in section.relocations() {
                    let RelocationTarget::Symbol(index) = relocation.target() else { continue };
                    let symbol = file.symbol_by_index(index).expect("a relocation's symbol");
                    let target = symbol.name().unwrap_or_default();
                    assert!(
                        !matches!(target, "memset" | "memcpy" | "memmove"),
                        "{name} object: {section_name} calls {target} (instruction at byte {offset})"
                    );
                }
            }
            // sock_send_length, sock_recv_length, kprobe, kretprobe, 8 fexit (and sk_data_ready: modern).
            assert!(checked >= 12, "{name} object: only {checked} per-operation sections found");
        }
    }
}
