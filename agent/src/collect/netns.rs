//! Connecting inside another process's network namespace (a vLLM pod's) without keeping
//! `CAP_SYS_ADMIN` in the agent: a small helper process, forked at start while the agent is still
//! single-threaded, keeps `CAP_SYS_ADMIN` (for `setns`) and `CAP_SYS_PTRACE` (to open another
//! user's `/proc/PID/ns/net`) and nothing else, holds no other file, and does one thing: given a
//! pid and an address, it enters the pid's network namespace, starts a non-blocking TCP connect
//! there, returns to its own namespace and hands the socket back over `SCM_RIGHTS`. The agent
//! waits for the connection itself. The helper dies with the agent (`PR_SET_PDEATHSIG`).

use std::{
    io,
    mem::size_of,
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixDatagram,
    },
    sync::{Mutex, OnceLock},
    time::Duration,
};

/// A request: a pid and an IPv4 or IPv6 address, fixed size, validated by the helper.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Request {
    pid: u32,
    family: u16,
    port: u16,
    addr: [u8; 16],
}

const REQUEST_SIZE: usize = size_of::<Request>();
const _: () = assert!(REQUEST_SIZE == 24);

impl Request {
    fn new(pid: u32, addr: SocketAddr) -> Self {
        let mut bytes = [0u8; 16];
        let family = match addr {
            SocketAddr::V4(a) => {
                bytes[..4].copy_from_slice(&a.ip().octets());
                libc::AF_INET as u16
            }
            SocketAddr::V6(a) => {
                bytes.copy_from_slice(&a.ip().octets());
                libc::AF_INET6 as u16
            }
        };
        Self { pid, family, port: addr.port(), addr: bytes }
    }

    fn to_bytes(self) -> [u8; REQUEST_SIZE] {
        let mut out = [0u8; REQUEST_SIZE];
        out[..4].copy_from_slice(&self.pid.to_ne_bytes());
        out[4..6].copy_from_slice(&self.family.to_ne_bytes());
        out[6..8].copy_from_slice(&self.port.to_ne_bytes());
        out[8..].copy_from_slice(&self.addr);
        out
    }

    /// A request from its bytes, or None for anything that is not exactly one.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; REQUEST_SIZE] = bytes.try_into().ok()?;
        let pid = u32::from_ne_bytes(bytes[..4].try_into().ok()?);
        let family = u16::from_ne_bytes(bytes[4..6].try_into().ok()?);
        let port = u16::from_ne_bytes(bytes[6..8].try_into().ok()?);
        let valid = pid > 0 && pid <= i32::MAX as u32 && port > 0;
        let family_ok = family == libc::AF_INET as u16 || family == libc::AF_INET6 as u16;
        (valid && family_ok).then(|| Self {
            pid,
            family,
            port,
            addr: bytes[8..].try_into().unwrap_or_default(),
        })
    }
}

/// The agent's end of the helper.
pub(crate) struct Helper {
    socket: Mutex<UnixDatagram>,
    pid: u32,
}

static HELPER: OnceLock<Helper> = OnceLock::new();

/// The helper's pid, once started.
pub(crate) fn helper_pid() -> Option<u32> {
    HELPER.get().map(|h| h.pid)
}

/// Resolves if the helper process ends (it should live as long as the agent), saying how; never,
/// when no helper was started.
pub(crate) async fn helper_exit() -> String {
    let Some(pid) = helper_pid() else { return std::future::pending().await };
    let status = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        (r, status)
    })
    .await;
    match status {
        Ok((r, status)) if r == pid as i32 && libc::WIFSIGNALED(status) => {
            format!(
                "the network-namespace helper (pid {pid}) was killed by signal {}",
                libc::WTERMSIG(status)
            )
        }
        Ok((r, status)) if r == pid as i32 => {
            format!("the network-namespace helper (pid {pid}) exited with {}", libc::WEXITSTATUS(status))
        }
        _ => format!("the network-namespace helper (pid {pid}) is gone"),
    }
}

/// Forks the helper. `drop_privileges` runs first in the child (keeping what the helper needs);
/// must be called while the process is single-threaded.
pub(crate) fn start(drop_privileges: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let (ours, theirs) = UnixDatagram::pair()?;
    ours.set_read_timeout(Some(Duration::from_secs(5)))?;
    ours.set_write_timeout(Some(Duration::from_secs(5)))?;
    let parent = std::process::id();
    // SAFETY: the process is single-threaded here (see the caller), so the child may run
    // arbitrary code; it never returns from `serve`.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(ours);
            let code = match child_setup(theirs, parent, drop_privileges) {
                Ok(socket) => serve(&socket),
                Err(e) => {
                    eprintln!("inferwatch netns helper: {e}");
                    1
                }
            };
            // SAFETY: ends the child without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        pid => {
            drop(theirs);
            let _ = HELPER.set(Helper { socket: Mutex::new(ours), pid: pid as u32 });
            Ok(())
        }
    }
}

/// In the child: die with the agent, close every inherited file (the kernel programs' maps
/// and links above all), name itself, and drop privileges.
fn child_setup(
    socket: UnixDatagram,
    parent: u32,
    drop_privileges: impl FnOnce() -> io::Result<()>,
) -> io::Result<UnixDatagram> {
    // SAFETY: plain prctl/dup2/close calls on our own process and descriptors.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() as u32 != parent {
            return Err(io::Error::other("the agent exited before its helper started"));
        }
        libc::prctl(libc::PR_SET_NAME, c"iw-netns-helper".as_ptr());
        if libc::dup2(socket.as_raw_fd(), 3) == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    std::mem::forget(socket);
    close_from(4);
    // SAFETY: fd 3 is the socket just duplicated there, owned from here on.
    let socket = unsafe { UnixDatagram::from_raw_fd(3) };
    drop_privileges()?;
    Ok(socket)
}

/// Closes every descriptor from `first` up.
fn close_from(first: RawFd) {
    // SAFETY: close_range only closes descriptors; where the kernel lacks it (before 5.9), fall
    // back to closing what /proc/self/fd lists.
    if unsafe { libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0) } == 0 {
        return;
    }
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for fd in open.into_iter().filter(|fd| *fd >= first) {
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
}

/// The helper's loop: one request, one reply, until the agent closes its end.
fn serve(socket: &UnixDatagram) -> i32 {
    let Ok(own) = std::fs::File::open("/proc/self/ns/net") else { return 1 };
    let mut buf = [0u8; 64];
    loop {
        let n = match socket.recv(&mut buf) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => n,
        };
        let (errno, fd) = match Request::from_bytes(&buf[..n]) {
            None => (libc::EINVAL, None),
            Some(request) => match connect_in(&request, &own) {
                Ok(fd) => (0, Some(fd)),
                Err(e) if e.kind() == io::ErrorKind::Other && e.raw_os_error().is_none() => return 1,
                Err(e) => (e.raw_os_error().unwrap_or(libc::EIO), None),
            },
        };
        if send_reply(socket, errno, fd.as_ref().map(AsRawFd::as_raw_fd)).is_err() {
            return 0;
        }
    }
}

/// Enters the namespace of `request.pid`, starts the connect, and comes back. Failing to come
/// back is the one error without an errno: the helper then exits rather than serve from a
/// foreign namespace.
fn connect_in(request: &Request, own: &std::fs::File) -> io::Result<OwnedFd> {
    let theirs = std::fs::File::open(format!("/proc/{}/ns/net", request.pid))?;
    // SAFETY: setns on a namespace descriptor we hold; this process is single-threaded.
    if unsafe { libc::setns(theirs.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let connected = start_connect(request);
    // SAFETY: as above.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::other("cannot return to the helper's own network namespace"));
    }
    connected
}

/// A non-blocking TCP socket connecting (or connected) to the request's address.
fn start_connect(request: &Request) -> io::Result<OwnedFd> {
    let family = request.family as i32;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from socket(2).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = if family == libc::AF_INET {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: request.port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(request.addr[..4].try_into().unwrap_or_default()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
        unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
        size_of::<libc::sockaddr_in>()
    } else {
        let sin6 = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: request.port.to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr { s6_addr: request.addr },
            sin6_scope_id: 0,
        };
        // SAFETY: as above.
        unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
        size_of::<libc::sockaddr_in6>()
    };
    // SAFETY: a valid socket and address of the stated length.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len as libc::socklen_t) };
    if r == 0 {
        return Ok(fd);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) { Ok(fd) } else { Err(e) }
}

/// The reply: an errno (0 for success) and, on success, the socket as SCM_RIGHTS.
fn send_reply(socket: &UnixDatagram, errno: i32, fd: Option<RawFd>) -> io::Result<()> {
    let payload = errno.to_ne_bytes();
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut _, iov_len: payload.len() };
    // Room for one descriptor's control message.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as _;
        // SAFETY: the control buffer is large enough for one descriptor (CMSG_SPACE above).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: a valid socket and message.
    if unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The errno and the descriptor of a reply.
fn recv_reply(socket: &UnixDatagram) -> io::Result<(i32, Option<OwnedFd>)> {
    let mut payload = [0u8; 4];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    let mut control = [0u64; 4];
    // SAFETY: as in send_reply.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: a valid socket; MSG_CMSG_CLOEXEC keeps the received descriptor from leaking.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != payload.len() {
        return Err(io::Error::other("the netns helper sent a malformed reply"));
    }
    let mut fd = None;
    // SAFETY: walking the control messages recvmsg filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((i32::from_ne_bytes(payload), fd))
}

/// A socket connecting to `addr` inside `pid`'s network namespace (blocking: call it from a
/// blocking thread), or None when no helper runs (then the caller enters the namespace itself,
/// as a privileged one-off command may).
pub(crate) fn connect(pid: u32, addr: SocketAddr) -> Option<io::Result<TcpStream>> {
    let helper = HELPER.get()?;
    let socket = helper.socket.lock().unwrap_or_else(|e| e.into_inner());
    let result = (|| {
        socket.send(&Request::new(pid, addr).to_bytes())?;
        match recv_reply(&socket)? {
            (0, Some(fd)) => Ok(TcpStream::from(fd)),
            (0, None) => Err(io::Error::other("the netns helper answered without a socket")),
            (errno, _) => Err(io::Error::from_raw_os_error(errno)),
        }
    })();
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        for addr in ["127.0.0.1:8000", "[::1]:9000", "10.1.2.3:1"] {
            let r = Request::new(4242, addr.parse().unwrap());
            assert_eq!(Request::from_bytes(&r.to_bytes()), Some(r), "{addr}");
        }
        assert_eq!(Request::from_bytes(&[0u8; 23]), None, "short");
        assert_eq!(Request::from_bytes(&[0u8; 25]), None, "long");
        let mut zero_pid = Request::new(1, "127.0.0.1:1".parse().unwrap());
        zero_pid.pid = 0;
        assert_eq!(Request::from_bytes(&zero_pid.to_bytes()), None);
        let mut unix = Request::new(1, "127.0.0.1:1".parse().unwrap());
        unix.family = libc::AF_UNIX as u16;
        assert_eq!(Request::from_bytes(&unix.to_bytes()), None, "TCP over IPv4 or IPv6 only");
    }

    #[test]
    fn a_reply_carries_its_descriptor() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let request = Request::new(std::process::id(), listener.local_addr().unwrap());
        let fd = start_connect(&request).unwrap();
        send_reply(&a, 0, Some(fd.as_raw_fd())).unwrap();
        let (errno, received) = recv_reply(&b).unwrap();
        assert_eq!(errno, 0);
        let stream = TcpStream::from(received.unwrap());
        let port = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            stream.peer_addr().ok().map(|p| p.port())
        });
        assert_eq!(
            port,
            Some(listener.local_addr().unwrap().port()),
            "the descriptor is the connecting socket"
        );
        send_reply(&a, libc::ECONNREFUSED, None).unwrap();
        assert_eq!(recv_reply(&b).unwrap().0, libc::ECONNREFUSED);
    }
}
