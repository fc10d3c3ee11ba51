//! `cargo xtask vm`: Debian's distribution kernels booted under qemu, so that the kernel-side
//! code is exercised on the kernels users run (their BTF, their config, their verifier), not
//! only on the host's one.
//!
//! The kernels come from Debian's archive through a private apt configuration under the cache
//! (its own sources, lists, package cache and an empty dpkg status), so the machine's own apt
//! setup is neither read for packages nor changed. Only `/boot` of each package is kept. The
//! guest runs from an initramfs written here (busybox, an `/init` script and the given files):
//! no disk image, no root filesystem, nothing that needs root on the host.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufWriter, Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::cmd::{self, Result, command, output, run};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// Debian's name of the architecture.
    fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// Rust's name of the architecture (`std::env::consts::ARCH`).
    pub fn rust(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    fn host() -> Option<Arch> {
        Self::ALL.into_iter().find(|a| a.rust() == std::env::consts::ARCH)
    }
}

pub struct Kernel {
    /// The cache directory's name and what `--kernel` selects.
    pub name: &'static str,
    pub arch: Arch,
    /// Upstream version prefix of Debian's `linux-image-<arch>` metapackage: the newest
    /// metapackage version with it names the image package to fetch.
    pub series: &'static str,
    /// Extra kernel arguments of its boots.
    pub cmdline: &'static str,
    /// How the agent attaches the socket programs here on its own (`inferwatch_probe_info`'s
    /// `attach`): a program this kernel's verifier refused would fall back silently otherwise.
    pub socket_attach: &'static str,
}

/// Debian 11's and 12's kernels, 12's backported one, and 12's and its backported one on arm64
/// (the tracepoints and trampolines of the arm64 GPU nodes' 6.x kernels). The private sources
/// hold bullseye and bookworm (with their security and backports suites) and nothing newer,
/// so each series is found in exactly one release.
pub const MATRIX: &[Kernel] = &[
    Kernel {
        name: "debian11-5.10-amd64",
        arch: Arch::X86_64,
        series: "5.10.",
        cmdline: "",
        socket_attach: "fexit",
    },
    Kernel {
        name: "debian11-5.10-arm64",
        arch: Arch::Aarch64,
        series: "5.10.",
        cmdline: "",
        socket_attach: "kprobe",
    },
    // Kernel code preemptible (fexit programs are, there): the fexit path's record-slot claim.
    Kernel {
        name: "debian12-6.1-amd64",
        arch: Arch::X86_64,
        series: "6.1.",
        cmdline: "preempt=full",
        socket_attach: "fexit",
    },
    Kernel {
        name: "debian12-bpo-6.12-amd64",
        arch: Arch::X86_64,
        series: "6.12.",
        cmdline: "",
        socket_attach: "tp_btf",
    },
    Kernel {
        name: "debian12-6.1-arm64",
        arch: Arch::Aarch64,
        series: "6.1.",
        cmdline: "",
        socket_attach: "kprobe",
    },
    Kernel {
        name: "debian12-bpo-6.12-arm64",
        arch: Arch::Aarch64,
        series: "6.12.",
        cmdline: "",
        socket_attach: "tp_btf",
    },
];

/// The private apt's suites: (archive, suite) on Debian's mirror.
const SUITES: &[(&str, &str)] = &[
    ("debian", "bullseye"),
    ("debian-security", "bullseye-security"),
    ("debian", "bookworm"),
    ("debian-security", "bookworm-security"),
    ("debian", "bookworm-backports"),
];
const SOURCE_OPTIONS: &str = "[arch=amd64,arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";

/// Written last into a kernel's directory: `<package> <version>`. Its presence is the cache hit.
const VERSION_MARKER: &str = "version";
const START_MARKER: &str = "INFERWATCH-VM-START";
const EXIT_MARKER: &str = "INFERWATCH-VM-EXIT ";
/// Boots reach /init in under 10 s here, 15 s with the host loaded: a boot that has not after
/// this long has hung.
const BOOT_LIMIT: Duration = Duration::from_secs(120);
const SMOKE_COMMAND: &str = "uname -a && ls -l /sys/kernel/btf/vmlinux";

fn kernels_dir() -> PathBuf {
    crate::vllm::cache_dir().join("kernels")
}

fn kernel_dir(kernel: &Kernel) -> PathBuf {
    kernels_dir().join(kernel.name)
}

fn busybox(arch: Arch) -> PathBuf {
    kernels_dir().join(format!("busybox-{}", arch.debian()))
}

/// qemu for both architectures, from the machine's own apt. No cpio: the initramfs is
/// written here.
pub fn ensure_tools() -> Result {
    let missing: Vec<&str> =
        [("qemu-system-x86_64", "qemu-system-x86"), ("qemu-system-aarch64", "qemu-system-arm")]
            .into_iter()
            .filter(|(binary, _)| output(command(binary).arg("--version")).is_none())
            .map(|(_, package)| package)
            .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        return Err(format!("qemu is missing: install {}, then rerun", missing.join(" and ")));
    }
    run(command("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(command("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Fetches what the cache lacks; a cached kernel is kept even when Debian has a newer one.
pub fn ensure_kernels() -> Result {
    let kernels: Vec<&Kernel> =
        MATRIX.iter().filter(|k| !kernel_dir(k).join(VERSION_MARKER).exists()).collect();
    let busyboxes: Vec<Arch> = Arch::ALL.into_iter().filter(|a| !busybox(*a).exists()).collect();
    if kernels.is_empty() && busyboxes.is_empty() {
        return Ok(());
    }
    let apt = Apt::update(&kernels_dir().join("apt"))?;
    for kernel in kernels {
        fetch_kernel(&apt, kernel)?;
    }
    for arch in busyboxes {
        let work = apt.download(&format!("busybox-static:{}", arch.debian()))?;
        extract(&work, &["./bin/busybox"])?;
        rename(&work.join("bin/busybox"), &busybox(arch))?;
        let _ = fs::remove_dir_all(&work);
    }
    // The lists are only good for this run: a later miss updates them anyway.
    let _ = fs::remove_dir_all(&apt.dir);
    Ok(())
}

fn fetch_kernel(apt: &Apt, kernel: &Kernel) -> Result {
    let arch = kernel.arch.debian();
    let meta = format!("linux-image-{arch}:{arch}");
    let versions = apt.query(&["madison", &meta])?;
    // madison lists the newest first. A mirror may lack the newest image of a series (Debian's
    // security archive answered 404 for 5.10's arm64 one while listing it), so each version of
    // the series is tried in turn.
    let candidates: Vec<&str> = versions
        .lines()
        .filter_map(|l| l.split('|').nth(1).map(str::trim))
        .filter(|v| v.starts_with(kernel.series))
        .collect();
    if candidates.is_empty() {
        return Err(format!("no {meta} {}* in Debian's archive", kernel.series));
    }
    let mut failures = Vec::new();
    let mut fetched = None;
    for version in candidates {
        match download_image(apt, &meta, version) {
            Ok((package, work)) => {
                fetched = Some((package, version, work));
                break;
            }
            Err(e) => {
                eprintln!("xtask: vm: {}: {version} not fetched ({e}); trying an older one", kernel.name);
                failures.push(format!("{version}: {e}"));
            }
        }
    }
    let Some((package, version, work)) = fetched else {
        return Err(format!("no {meta} {}* could be fetched: {}", kernel.series, failures.join("; ")));
    };
    eprintln!("xtask: vm: {}: {package} {version}", kernel.name);
    extract(&work, &["./boot/vmlinuz-*", "./boot/config-*"])?;
    let staging = kernels_dir().join(format!("{}.partial", kernel.name));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    for name in ["vmlinuz", "config"] {
        rename(&boot_file(&work.join("boot"), name)?, &staging.join(name))?;
    }
    fs::write(staging.join(VERSION_MARKER), format!("{package} {version}\n"))
        .map_err(|e| format!("{}: {e}", staging.display()))?;
    let _ = fs::remove_dir_all(kernel_dir(kernel));
    rename(&staging, &kernel_dir(kernel))?;
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// The image package `meta` at `version` depends on, downloaded: (package, work dir).
fn download_image(apt: &Apt, meta: &str, version: &str) -> Result<(String, PathBuf)> {
    let arch = meta.rsplit(':').next().unwrap_or_default();
    let show = apt.query(&["show", &format!("{meta}={version}")])?;
    let package = show
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .and_then(|d| d.split_whitespace().next())
        .ok_or_else(|| format!("{meta}={version} depends on no image"))?
        .to_string();
    let work = apt.download(&format!("{package}:{arch}={version}"))?;
    Ok((package, work))
}

/// The one `<name>-<release>` in a kernel package's /boot.
fn boot_file(boot: &Path, name: &str) -> Result<PathBuf> {
    let prefix = format!("{name}-");
    fs::read_dir(boot)
        .map_err(|e| format!("{}: {e}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&prefix)))
        .ok_or_else(|| format!("no {prefix}* in {}", boot.display()))
}

fn rename(from: &Path, to: &Path) -> Result {
    fs::rename(from, to).map_err(|e| format!("moving {} to {}: {e}", from.display(), to.display()))
}

/// Unpacks the members matching `patterns` of the one .deb in `work` into `work`, without
/// writing the rest (a kernel package's modules are hundreds of MB).
fn extract(work: &Path, patterns: &[&str]) -> Result {
    let deb = fs::read_dir(work)
        .map_err(|e| format!("{}: {e}", work.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let mut unpack = command("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start dpkg-deb: {e}"))?;
    let tarball = unpack.stdout.take().expect("piped stdout");
    let extracted =
        run(command("tar").arg("-x").arg("-C").arg(work).arg("--wildcards").args(patterns).stdin(tarball));
    let status = unpack.wait().map_err(|e| format!("dpkg-deb: {e}"))?;
    extracted?;
    if !status.success() {
        return Err(format!("dpkg-deb --fsys-tarfile {} failed ({status})", deb.display()));
    }
    fs::remove_file(&deb).map_err(|e| format!("{}: {e}", deb.display()))
}

/// apt with its own sources, lists, cache and (empty) dpkg status under `dir`.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn update(dir: &Path) -> Result<Apt> {
        let apt = Apt { dir: dir.to_path_buf() };
        let _ = fs::remove_dir_all(dir);
        for sub in ["lists/partial", "cache/archives/partial", "parts"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let sources: String = SUITES
            .iter()
            .map(|(archive, suite)| {
                format!("deb {SOURCE_OPTIONS} http://deb.debian.org/{archive} {suite} main\n")
            })
            .collect();
        fs::write(dir.join("sources.list"), sources)
            .and_then(|()| fs::write(dir.join("status"), ""))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        run(apt.command("apt-get").args(["update", "-q"]))?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let d = self.dir.display();
        let mut c = command(program);
        for option in [
            format!("Dir::Etc::sourcelist={d}/sources.list"),
            format!("Dir::Etc::sourceparts={d}/parts"),
            format!("Dir::Etc::preferencesparts={d}/parts"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::State::status={d}/status"),
            format!("Dir::Cache={d}/cache"),
            "APT::Architectures::=amd64".into(),
            "APT::Architectures::=arm64".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            // The download goes to the cache under $HOME, which apt's _apt user cannot write.
            "APT::Sandbox::User=root".into(),
        ] {
            c.arg("-o").arg(option);
        }
        c
    }

    fn query(&self, args: &[&str]) -> Result<String> {
        let mut c = self.command("apt-cache");
        c.args(args);
        output(&mut c).ok_or_else(|| format!("`{}` failed", cmd::describe(&c)))
    }

    /// Downloads `spec` into a fresh work directory and returns it.
    fn download(&self, spec: &str) -> Result<PathBuf> {
        let work = self.dir.join("work");
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        run(self.command("apt-get").args(["download", "-q", spec]).current_dir(&work))?;
        Ok(work)
    }
}

/// The guest's PID 1. Optional filesystems may be missing from a kernel: their errors are
/// ignored. The command's status is printed for [`boot`] to read, as the console is all that
/// comes back.
fn init() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ip link set lo up
hostname inferwatch-vm
cd /root
echo {START_MARKER}
sh -c "$(cat /etc/inferwatch-command)"
echo "{EXIT_MARKER}$?"
poweroff -f
"#
    )
}

/// Small files some programs expect: a root user and `localhost`.
const ETC: &[(&str, &str)] = &[
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
    ("etc/group", "root:x:0:\n"),
    ("etc/hosts", "127.0.0.1 localhost inferwatch-vm\n::1 localhost\n"),
];

/// Boots `kernel` with `files` (host path, absolute guest path) in its initramfs, runs `command`
/// with `sh -c` as the guest's root and returns the console log. Fails when the command exits
/// non-zero, when the guest stops before it finishes, or after `timeout` (qemu is then killed;
/// a boot that hangs before /init is killed after [`BOOT_LIMIT`] and retried once, with a
/// fresh `timeout`); the message ends with the log's tail. The kernel must be cached
/// ([`ensure_kernels`]).
pub fn boot(
    kernel: &Kernel,
    files: &[(PathBuf, String)],
    command: &str,
    timeout: Duration,
) -> Result<String> {
    let dir = kernel_dir(kernel);
    if !dir.join(VERSION_MARKER).exists() {
        return Err(format!("{} is not in the cache: run ensure_kernels first", kernel.name));
    }
    let initrd = scratch_file(kernel);
    let result = write_initramfs(&initrd, kernel.arch, files, command)
        .and_then(|()| boot_initrd(kernel, &dir.join("vmlinuz"), &initrd, timeout));
    let _ = fs::remove_file(&initrd);
    let log = result.map_err(|e| format!("{}: {e}", kernel.name))?;
    // The whole console, for a failure whose cause scrolled past the tail (a verifier's log).
    let saved = cmd::root().join(format!("target/vm/{}.console.log", kernel.name));
    let _ = fs::create_dir_all(saved.parent().expect("a folder")).and_then(|()| fs::write(&saved, &log));
    match exit_status(&log) {
        Some(0) => Ok(log),
        Some(rc) => Err(format!("{}: the command exited with {rc}{}", kernel.name, tail(&log))),
        None if log.contains(START_MARKER) => {
            Err(format!("{}: the guest stopped before the command finished{}", kernel.name, tail(&log)))
        }
        None => Err(format!("{}: the guest stopped before /init ran the command{}", kernel.name, tail(&log))),
    }
}

/// Boots twice at most: under TCG a boot rarely hangs before /init (seen once in some 70 boots:
/// a soft lockup in early boot). A hung boot is told from a slow command by /init's start
/// marker not showing within [`BOOT_LIMIT`].
fn boot_initrd(kernel: &Kernel, vmlinuz: &Path, initrd: &Path, timeout: Duration) -> Result<String> {
    let limit = BOOT_LIMIT.as_secs();
    let mut stalled = false;
    loop {
        match run_qemu(qemu(kernel, vmlinuz, initrd), timeout)? {
            Run::Exited(log) => return Ok(log),
            Run::Stalled(log) if stalled => {
                return Err(format!("/init not reached after {limit}s, twice{}", tail(&log)));
            }
            Run::Stalled(log) => {
                eprintln!(
                    "xtask: vm: {}: /init not reached after {limit}s, booting again{}",
                    kernel.name,
                    tail(&log)
                );
                stalled = true;
            }
        }
    }
}

/// A file name no concurrent boot (of this process or another) uses.
fn scratch_file(kernel: &Kernel) -> PathBuf {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("inferwatch-vm-{}-{}-{n}.cpio", kernel.name, std::process::id()))
}

fn qemu(kernel: &Kernel, vmlinuz: &Path, initrd: &Path) -> Command {
    // x86-64 guests run both vCPUs on one host thread: x86 kernels patch static branches through
    // an int3 (attaching and detaching tracepoints does), and with a host thread per vCPU, TCG
    // let the other vCPU run the int3 after the patch was done (6.12 oopsed in
    // ttwu_do_activate as the agent detached sched_wakeup). arm64 patches a branch in one
    // write, which either vCPU may see late without harm.
    let (binary, machine, accel, console): (_, &[&str], _, _) = match kernel.arch {
        Arch::X86_64 => ("qemu-system-x86_64", &["-cpu", "max"], "tcg,thread=single", "ttyS0"),
        Arch::Aarch64 => {
            ("qemu-system-aarch64", &["-M", "virt", "-cpu", "max,pauth-impdef=on"], "tcg", "ttyAMA0")
        }
    };
    let mut c = command(binary);
    c.args(machine)
        .args(["-accel", accel, "-m", "2048", "-smp", "2", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        // No crypto self-tests: up to a fifth of a boot under TCG, and the one hung boot seen
        // here was stuck in one.
        .arg(format!("console={console} panic=-1 quiet cryptomgr.notests {}", kernel.cmdline));
    c
}

/// How one qemu run ended: by itself, or killed for not reaching /init in time.
enum Run {
    Exited(String),
    Stalled(String),
}

/// Runs qemu with no stdin and its stdout and stderr in one log, for at most `timeout`, and
/// for at most [`BOOT_LIMIT`] before /init's start marker.
fn run_qemu(mut qemu: Command, timeout: Duration) -> Result<Run> {
    let line = cmd::describe(&qemu);
    let (reader, writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let stdout = writer.try_clone().map_err(|e| format!("pipe: {e}"))?;
    qemu.stdin(Stdio::null()).stdout(stdout).stderr(writer);
    let started = Instant::now();
    let mut child = qemu.spawn().map_err(|e| format!("cannot start `{line}`: {e}"))?;
    // The command holds the pipe's writing ends: the log ends only when they are all closed.
    drop(qemu);
    let reached_init = Arc::new(AtomicBool::new(false));
    let collector = thread::spawn({
        let reached_init = Arc::clone(&reached_init);
        move || collect(reader, &reached_init)
    });
    let status = loop {
        let elapsed = started.elapsed();
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None)
                if elapsed < timeout && (elapsed < BOOT_LIMIT || reached_init.load(Ordering::Relaxed)) =>
            {
                thread::sleep(Duration::from_millis(100))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let log = collector.join().expect("the log reader does not panic");
    match status {
        Some(s) if s.success() => Ok(Run::Exited(log)),
        Some(s) => Err(format!("`{line}` failed ({s}){}", tail(&log))),
        None if !reached_init.load(Ordering::Relaxed) && timeout > BOOT_LIMIT => Ok(Run::Stalled(log)),
        None => Err(format!("timed out after {}s: `{line}`{}", timeout.as_secs(), tail(&log))),
    }
}

/// Reads the console to its end, raising `reached_init` once /init's start marker shows.
fn collect(mut console: std::io::PipeReader, reached_init: &AtomicBool) -> String {
    let mut log = Vec::new();
    let mut chunk = [0; 8192];
    while let Ok(n @ 1..) = console.read(&mut chunk) {
        log.extend_from_slice(&chunk[..n]);
        if !reached_init.load(Ordering::Relaxed)
            && log.windows(START_MARKER.len()).any(|w| w == START_MARKER.as_bytes())
        {
            reached_init.store(true, Ordering::Relaxed);
        }
    }
    String::from_utf8_lossy(&log).into_owned()
}

/// The status `/init` printed after the command, if it got that far.
fn exit_status(log: &str) -> Option<i32> {
    log.lines().rev().find_map(|l| l.split(EXIT_MARKER).nth(1)?.trim().parse().ok())
}

fn tail(log: &str) -> String {
    if log.trim().is_empty() {
        return " (the console printed nothing)".into();
    }
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(60);
    format!(
        "\n--- console, last {} lines (all of it in target/vm/<kernel>.console.log) ---\n{}",
        lines.len() - start,
        lines[start..].join("\n")
    )
}

fn write_initramfs(path: &Path, arch: Arch, files: &[(PathBuf, String)], command: &str) -> Result {
    let mut cpio = Cpio::create(path)?;
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root"] {
        cpio.dir(dir)?;
    }
    // The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    cpio.entry("dev/console", 0o020_600, (5, 1), &[])?;
    cpio.file("bin/busybox", 0o755, &read(&busybox(arch))?)?;
    cpio.file("init", 0o755, init().as_bytes())?;
    cpio.file("etc/inferwatch-command", 0o644, command.as_bytes())?;
    for (name, text) in ETC {
        cpio.file(name, 0o644, text.as_bytes())?;
    }
    for (host, guest) in with_libraries(arch, files) {
        let mode = fs::metadata(&host).map_err(|e| format!("{}: {e}", host.display()))?.permissions().mode();
        cpio.file(guest.trim_start_matches('/'), mode & 0o7777, &read(&host)?)?;
    }
    cpio.finish()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `files`, plus the libraries and loader `ldd` names for those that are dynamic binaries of
/// the host's architecture (the guest has no other libraries).
fn with_libraries(arch: Arch, files: &[(PathBuf, String)]) -> Vec<(PathBuf, String)> {
    let mut all = files.to_vec();
    if Arch::host() != Some(arch) {
        return all;
    }
    let libraries: BTreeSet<String> = files
        .iter()
        .filter_map(|(host, _)| output(command("ldd").arg(host)))
        .flat_map(|ldd| {
            ldd.lines()
                .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    all.extend(libraries.into_iter().map(|l| (PathBuf::from(&l), l)));
    all
}

/// A `newc` archive, the format the kernel unpacks an initramfs from. Uncompressed: under
/// TCG the guest decompresses slowly, and the archive lives only for one boot.
struct Cpio {
    out: BufWriter<fs::File>,
    path: PathBuf,
    dirs: BTreeSet<String>,
    inode: u32,
}

impl Cpio {
    fn create(path: &Path) -> Result<Cpio> {
        let file = fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Cpio { out: BufWriter::new(file), path: path.to_path_buf(), dirs: BTreeSet::new(), inode: 0 })
    }

    /// `name` and its parents, each once.
    fn dir(&mut self, name: &str) -> Result {
        if name.is_empty() || self.dirs.contains(name) {
            return Ok(());
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(name.to_string());
        self.entry(name, 0o040_755, (0, 0), &[])
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) -> Result {
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(name, 0o100_000 | permissions, (0, 0), data)
    }

    /// One entry: a header of 13 hexadecimal fields, the name, the data, each 4-byte aligned.
    fn entry(&mut self, name: &str, mode: u32, (major, minor): (u32, u32), data: &[u8]) -> Result {
        self.inode += 1;
        let size = u32::try_from(data.len()).map_err(|_| format!("{name}: too large for an initramfs"))?;
        let name_size = name.len() as u32 + 1;
        let fields = [self.inode, mode, 0, 0, 1, 0, size, 0, 0, major, minor, name_size, 0];
        let header: String = fields.iter().map(|f| format!("{f:08x}")).collect();
        let written = (|| {
            write!(self.out, "070701{header}{name}\0")?;
            self.out.write_all(&[0; 3][..padding(110 + name.len() + 1)])?;
            self.out.write_all(data)?;
            self.out.write_all(&[0; 3][..padding(data.len())])
        })();
        written.map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn finish(mut self) -> Result {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush().map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// `cargo xtask vm [--kernel NAME] [-- CMD...]`: boots each kernel of [`MATRIX`] (or the named
/// one) and runs CMD in it (by default, one that shows the kernel and its BTF).
pub fn cli(args: &[String]) -> Result {
    let (name, command) = match args {
        [flag, name, rest @ ..] if flag == "--kernel" => (Some(name.as_str()), rest),
        rest => (None, rest),
    };
    let command = match command {
        [] => SMOKE_COMMAND.to_string(),
        [dashes, words @ ..] if dashes == "--" && !words.is_empty() => words.join(" "),
        _ => return Err("usage: cargo xtask vm [--kernel NAME] [-- CMD...]".into()),
    };
    let kernels: Vec<&Kernel> = MATRIX.iter().filter(|k| name.is_none_or(|n| n == k.name)).collect();
    if kernels.is_empty() {
        let names: Vec<&str> = MATRIX.iter().map(|k| k.name).collect();
        return Err(format!("no kernel {}: one of {}", name.unwrap_or_default(), names.join(", ")));
    }
    ensure_tools()?;
    ensure_kernels()?;
    let mut failed = Vec::new();
    for kernel in kernels {
        let version = fs::read_to_string(kernel_dir(kernel).join(VERSION_MARKER)).unwrap_or_default();
        let started = Instant::now();
        let result = boot(kernel, &[], &command, Duration::from_secs(600));
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(log) => println!("{log}"),
            Err(e) => {
                eprintln!("xtask: vm: {e}");
                failed.push(kernel.name);
            }
        }
        eprintln!("xtask: vm: {} ({}): {seconds:.1}s", kernel.name, version.trim());
    }
    if failed.is_empty() { Ok(()) } else { Err(format!("failed on {}", failed.join(", "))) }
}
