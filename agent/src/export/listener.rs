//! Accepting and serving the agent's HTTP connections, bounded against a hostile node: a cap on
//! connections in all and per client address (excess closed at once, counted), a deadline for
//! each request head (and for the next one on a kept-alive connection), a head size limit (431),
//! and TLS handshakes that take a permit only once the client has spoken, a few per client.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::Router;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use super::stats::ServerStats;

/// Longest request head accepted (request line and headers): larger gets 431.
const MAX_HEAD: usize = 16 * 1024;
/// Read buffer of a connection.
const MAX_BUFFER: usize = 64 * 1024;
/// Longest a TLS client may take to finish its handshake once it has spoken.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once, and per client address.
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKES_PER_CLIENT: usize = 4;

#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub max_per_client: usize,
    /// Longest a client may take to send a request head, or to start the next one.
    pub header_timeout: Duration,
}

/// The client of a request, as axum handlers read it (a request extension).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Client(pub SocketAddr);

/// Open connections per client address, so no one address takes every slot.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

impl PerClient {
    fn try_take(&self, ip: IpAddr, max: usize) -> bool {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, ip: IpAddr) {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// A slot of [`PerClient`], given back when the connection ends.
struct Slot {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.give_back(self.ip);
    }
}

/// Serves `app` on `listener` until the process ends (or `shutdown` resolves).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<ServerConfig>>,
    limits: Limits,
    stats: Arc<ServerStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_client = Arc::new(PerClient::default());
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let handshakes_per_client = Arc::new(PerClient::default());
    let tls = tls.map(TlsAcceptor::from);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUFFER)
        .max_header_size(MAX_HEAD);
    let http = Arc::new(http);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            stats.refused("limit");
            continue; // dropping the socket closes it
        };
        if !per_client.try_take(peer.ip(), limits.max_per_client) {
            stats.refused("client_limit");
            continue;
        }
        let slot = Slot { owner: per_client.clone(), ip: peer.ip() };
        let (app, http, stats, tls) = (app.clone(), http.clone(), stats.clone(), tls.clone());
        let (handshakes, handshakes_per_client) = (handshakes.clone(), handshakes_per_client.clone());
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _held = (permit, slot);
            stats.opened();
            let _ = tcp.set_nodelay(true);
            match tls {
                None => serve_connection(&http, tcp, peer, app).await,
                Some(acceptor) => {
                    let Some(tls) =
                        handshake(acceptor, tcp, peer, header_timeout, &handshakes, &handshakes_per_client)
                            .await
                    else {
                        stats.closed();
                        return;
                    };
                    serve_connection(&http, tls, peer, app).await;
                }
            }
            stats.closed();
        });
    }
}

async fn serve_connection<I>(http: &http1::Builder, io: I, peer: SocketAddr, app: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(Client(peer));
        let app = app.clone();
        async move {
            let response = match app.oneshot(request.map(axum::body::Body::new)).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response)
        }
    });
    if let Err(e) = http.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%peer, "HTTP connection: {e}");
    }
}

/// The TLS handshake, begun only once the client has sent something (a silent socket takes no
/// permit) and within a few permits per client address, so neither silence nor one address can
/// lock the others out.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    first_byte_within: Duration,
    handshakes: &Arc<Semaphore>,
    per_client: &Arc<PerClient>,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    if tokio::time::timeout(first_byte_within, tcp.readable()).await.is_err() {
        tracing::debug!(%peer, "TLS client sent nothing");
        return None;
    }
    if !per_client.try_take(peer.ip(), MAX_HANDSHAKES_PER_CLIENT) {
        tracing::debug!(%peer, "too many TLS handshakes from this client");
        return None;
    }
    let _slot = Slot { owner: per_client.clone(), ip: peer.ip() };
    let _permit = handshakes.clone().acquire_owned().await.ok()?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_slots_are_bounded_and_given_back() {
        let slots = Arc::new(PerClient::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..3)
            .map(|_| {
                assert!(slots.try_take(ip, 3));
                Slot { owner: slots.clone(), ip }
            })
            .collect();
        assert!(!slots.try_take(ip, 3), "the fourth is refused");
        assert!(slots.try_take("10.0.0.2".parse().unwrap(), 3), "others are not");
        drop(held);
        assert!(slots.try_take(ip, 3));
        assert_eq!(slots.0.lock().unwrap().len(), 2);
    }
}
