//! A small HTTP/1.1 GET client for the agent's own scrapes (`/metrics`, `/v1/models`,
//! `/version`) and the commands' reads of the agent's API: bounded in time and size, and able
//! to reach a server inside another network namespace (a container's) by opening the socket
//! there.

use std::{
    io,
    net::{SocketAddr, TcpStream as StdTcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub(crate) use crate::model::scrape::Target;
use crate::requests::http::chunked::{Dechunker, Piece};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("response too large")]
    TooLarge,
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
    #[error("HTTP status {0}")]
    Status(u16),
}

impl FetchError {
    /// A bounded label value.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Connect(_) => "connect",
            FetchError::Timeout => "timeout",
            FetchError::Io(_) => "io",
            FetchError::TooLarge => "too_large",
            FetchError::Malformed(_) => "malformed_http",
            FetchError::Status(_) => "http_status",
        }
    }
}

/// The address and `HOST:PORT` of an `http://HOST:PORT[/…]` URL.
pub(crate) fn http_url(url: &str) -> Result<(SocketAddr, String), UrlError> {
    use std::net::ToSocketAddrs as _;
    let rest = url.strip_prefix("http://").ok_or(UrlError::Scheme)?;
    let authority = rest.split('/').next().unwrap_or_default();
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| UrlError::Resolve(authority.to_string(), e))?
        .next()
        .ok_or_else(|| UrlError::NoAddress(authority.to_string()))?;
    Ok((addr, authority.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UrlError {
    #[error("only http:// URLs are supported")]
    Scheme,
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, #[source] io::Error),
    #[error("{0} has no address")]
    NoAddress(String),
}

/// GETs `path`; the whole exchange must finish within `timeout` and `max_bytes`.
pub(crate) async fn get(
    target: &Target,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Vec<u8>, FetchError> {
    tokio::time::timeout(timeout, get_inner(target, path, max_bytes))
        .await
        .map_err(|_| FetchError::Timeout)?
}

async fn get_inner(target: &Target, path: &str, max_bytes: usize) -> Result<Vec<u8>, FetchError> {
    let mut stream = connect(target).await.map_err(FetchError::Connect)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: inferwatch/{}\r\naccept-encoding: identity\r\nconnection: close\r\n\r\n",
        target.addr,
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes()).await.map_err(FetchError::Io)?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(FetchError::Io)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > max_bytes {
            return Err(FetchError::TooLarge);
        }
    }
    parse_response(&raw)
}

/// The body of a complete `connection: close` response, or why it is not one.
pub(crate) fn parse_response(raw: &[u8]) -> Result<Vec<u8>, FetchError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(FetchError::Malformed("incomplete head")),
        Err(_) => return Err(FetchError::Malformed("bad head")),
    };
    let status = resp.code.unwrap_or(0);
    if status != 200 {
        return Err(FetchError::Status(status));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let body = &raw[head_len..];
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        let mut d = Dechunker::default();
        d.feed(body, &mut |p| {
            if let Piece::Data(b) = p {
                out.extend_from_slice(b)
            }
        });
        return if d.is_done() { Ok(out) } else { Err(FetchError::Malformed("truncated chunked body")) };
    }
    if let Some(len) = header("content-length") {
        let len: usize = len.trim().parse().map_err(|_| FetchError::Malformed("bad content-length"))?;
        if body.len() < len {
            return Err(FetchError::Malformed("truncated body"));
        }
        return Ok(body[..len].to_vec());
    }
    Ok(body.to_vec())
}

async fn connect(target: &Target) -> io::Result<TcpStream> {
    let Some(pid) = target.netns_of.filter(|pid| !same_netns(*pid)) else {
        return TcpStream::connect(target.addr).await;
    };
    let addr = target.addr;
    let std_stream = tokio::task::spawn_blocking(move || match super::netns::connect(pid, addr) {
        // The agent's helper opens the socket in the namespace (it keeps CAP_SYS_ADMIN; the
        // agent does not).
        Some(connecting) => connecting,
        // No helper: the agent without CAP_SYS_ADMIN (as the DaemonSet runs it) reaches a server
        // that listens on every address through the pod's own address.
        None if !can_setns() => connect_through_pod_address(pid, addr),
        // A one-off command run as root: setns() affects only the calling thread, so open the
        // socket on a thread of its own that ends right after; the socket stays in the
        // namespace it was created in.
        None => std::thread::spawn(move || connect_in_netns(pid, addr))
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("connect thread panicked"))),
    })
    .await
    .map_err(io::Error::other)??;
    std_stream.set_nonblocking(true)?;
    let stream = TcpStream::from_std(std_stream)?;
    // The helper's connect may still be in progress: wait for it, and for its outcome.
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// Whether this thread may enter another network namespace (CAP_SYS_ADMIN).
fn can_setns() -> bool {
    super::procfs::effective_capabilities().is_ok_and(|caps| caps & (1 << super::procfs::CAP_SYS_ADMIN) != 0)
}

/// A server inside `pid`'s network namespace, reached from ours: a loopback address becomes
/// each of the namespace's own addresses in turn (a server listening on all of them answers
/// there); any other address is reached as it is.
fn connect_through_pod_address(pid: u32, addr: SocketAddr) -> io::Result<StdTcpStream> {
    if !addr.ip().is_loopback() {
        return StdTcpStream::connect_timeout(&addr, Duration::from_secs(2));
    }
    let read = |file: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
    let addresses = super::procfs::net::local_addresses(&read("fib_trie"), &read("if_inet6"));
    let mut last = io::Error::other(format!(
        "{addr} is loopback inside the network namespace of pid {pid}, which has no other address"
    ));
    for ip in addresses {
        match StdTcpStream::connect_timeout(&SocketAddr::new(ip, addr.port()), Duration::from_secs(2)) {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                last = io::Error::new(
                    e.kind(),
                    format!(
                        "{ip}:{}: {e} (a server listening on loopback only inside its pod needs the \
                         agent to have CAP_SYS_ADMIN for its namespace helper)",
                        addr.port()
                    ),
                )
            }
        }
    }
    Err(last)
}

fn same_netns(pid: u32) -> bool {
    match (std::fs::metadata(format!("/proc/{pid}/ns/net")), std::fs::metadata("/proc/self/ns/net")) {
        (Ok(a), Ok(b)) => {
            use std::os::unix::fs::MetadataExt;
            a.ino() == b.ino() && a.dev() == b.dev()
        }
        _ => true,
    }
}

fn connect_in_netns(pid: u32, addr: SocketAddr) -> io::Result<StdTcpStream> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // SAFETY: a valid namespace fd; only this short-lived thread changes namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    StdTcpStream::connect_timeout(&addr, Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sized_chunked_and_close_delimited_bodies() {
        let sized = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(sized).unwrap(), b"hello");
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"hello");
        let close = b"HTTP/1.0 200 OK\r\n\r\nhello";
        assert_eq!(parse_response(close).unwrap(), b"hello");
    }

    #[test]
    fn refuses_what_is_not_a_whole_good_response() {
        let cases: [(&[u8], &str); 5] = [
            (b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n", "http_status"),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello", "malformed_http"),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel", "malformed_http"),
            (b"SSH-2.0-OpenSSH_9.2\r\n", "malformed_http"),
            (b"HTTP/1.1 200 OK\r\ncontent-le", "malformed_http"),
        ];
        for (raw, reason) in cases {
            assert_eq!(
                parse_response(raw).unwrap_err().reason(),
                reason,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_closed_port_fails_fast() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, never answers.
        let hold = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let err =
            get(&Target { addr, netns_of: None }, "/metrics", Duration::from_millis(200), 1 << 20).await;
        assert_eq!(err.unwrap_err().reason(), "timeout");
        hold.abort();
        let closed: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = get(&Target { addr: closed, netns_of: None }, "/", Duration::from_secs(2), 1024).await;
        assert_eq!(err.unwrap_err().reason(), "connect");
    }
}
