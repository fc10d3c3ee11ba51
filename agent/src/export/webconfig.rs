//! `--web-config-file`: optional TLS and basic auth for the HTTP endpoints, in the format of the
//! Prometheus exporters' `--web.config.file`, so existing files and Prometheus' `tls_config` /
//! `basic_auth` scrape settings work unchanged:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt        # relative paths are relative to this file
//!   key_file: server.key
//!   client_ca_file: ca.crt       # optional, with client_auth_type
//!   client_auth_type: RequireAndVerifyClientCert
//!   min_version: TLS12           # or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...       # bcrypt hashes (htpasswd -nBC 10)
//! ```
//!
//! The file is read once at start; a mistake in it stops the agent with a message naming the
//! key. `/healthz` stays open (liveness probes), every other path needs the credentials.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once: a flood of idle connections cannot take every fd.
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    min_version: Option<String>,
}

/// What the web config asks for, ready to use.
pub(crate) struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Option<Arc<BasicAuth>>,
}

/// A web config that cannot be used, and why (naming the key at fault).
#[derive(Debug, thiserror::Error)]
#[error("--web-config-file {}: {problem}", path.display())]
pub(crate) struct WebConfigError {
    path: PathBuf,
    problem: String,
}

impl WebConfig {
    pub(crate) fn load(path: &Path) -> Result<Self, WebConfigError> {
        let error = |problem: String| WebConfigError { path: path.to_path_buf(), problem };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read it: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| error(format!("{e:#}")))
    }

    fn parse(text: &str, base: &Path) -> Result<Self> {
        let file: WebConfigFile = serde_yaml::from_str(text).context("not a valid web config")?;
        let tls = file.tls_server_config.map(|t| tls_config(&t, base)).transpose()?.map(Arc::new);
        let auth = if file.basic_auth_users.is_empty() {
            None
        } else {
            for (user, hash) in &file.basic_auth_users {
                if user.contains(':') {
                    bail!("basic_auth_users: user name {user:?} contains ':'");
                }
                hash.parse::<bcrypt::HashParts>().map_err(|e| {
                    anyhow::anyhow!("basic_auth_users.{user}: not a bcrypt hash ({e}); make one with `htpasswd -nBC 10 {user}`")
                })?;
            }
            Some(Arc::new(BasicAuth { users: file.basic_auth_users, verified: Mutex::default() }))
        };
        Ok(Self { tls, auth })
    }
}

fn tls_config(t: &TlsServerConfig, base: &Path) -> Result<ServerConfig> {
    let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let cert_file = resolve(&t.cert_file);
    let key_file = resolve(&t.key_file);
    let certs = read_certs(&cert_file, "cert_file")?;
    if certs.is_empty() {
        bail!("tls_server_config.cert_file {}: no certificate in it", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .map_err(|e| anyhow::anyhow!("tls_server_config.key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(other) => bail!("tls_server_config.min_version {other:?}: use TLS12 or TLS13"),
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS versions")?;
    let auth_type = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    if auth_type == "NoClientCert" && t.client_ca_file.is_some() {
        // Silently dropping the CA would let an operator believe client certificates are checked.
        bail!(
            "tls_server_config.client_ca_file is set but client_auth_type is NoClientCert: set RequireAndVerifyClientCert or VerifyClientCertIfGiven"
        );
    }
    let builder = match auth_type {
        "NoClientCert" => builder.with_no_client_auth(),
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let Some(ca) = &t.client_ca_file else {
                bail!("tls_server_config.client_auth_type {auth_type} needs client_ca_file");
            };
            let ca = resolve(ca);
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(&ca, "client_ca_file")? {
                roots
                    .add(cert)
                    .with_context(|| format!("tls_server_config.client_ca_file {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if auth_type == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
        }
        other => bail!(
            "tls_server_config.client_auth_type {other:?}: use NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        ),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("tls_server_config: the key does not match the certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Every certificate of a PEM file; errors name the web-config key.
fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("tls_server_config.{key} {}: {e}", path.display()))
}

/// Users and their bcrypt hashes. bcrypt is slow on purpose (~50 ms a check at cost 10), so
/// credentials that passed are remembered; only successes are, and only a few.
pub(crate) struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
}

const VERIFIED_CACHE: usize = 64;

impl BasicAuth {
    pub(crate) fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(value) = authorization.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(value) {
            return true;
        }
        let Some(encoded) = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        let Some(hash) = self.users.get(user) else {
            return false;
        };
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return false;
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(value.to_string());
        true
    }
}

/// Middleware: every path but `/healthz` needs the credentials.
pub(crate) async fn require_basic_auth(
    State(auth): State<Arc<BasicAuth>>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    // bcrypt runs on the blocking pool, never on the runtime's workers.
    let header = request.headers().get(header::AUTHORIZATION).cloned();
    let check = auth.clone();
    let allowed = tokio::task::spawn_blocking(move || check.allows(header.as_ref())).await.unwrap_or(false);
    if allowed {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"inferwatch\"")],
            "Unauthorized\n",
        )
            .into_response()
    }
}

/// A listener handing axum finished TLS connections. Handshakes run in their own tasks, so a
/// slow or silent client never holds up the others; failed ones are logged at debug level.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub(crate) fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task never ends on its own; if it did, serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    #[test]
    fn basic_auth_checks_bcrypt_hashes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let config =
            WebConfig::parse(&format!("basic_auth_users:\n  prom: '{hash}'\n"), Path::new("/")).unwrap();
        let auth = config.auth.unwrap();
        assert!(config.tls.is_none());
        assert!(auth.allows(Some(&header("prom", "s3cret"))));
        assert!(auth.allows(Some(&header("prom", "s3cret"))), "second time from the cache");
        assert!(!auth.allows(Some(&header("prom", "wrong"))));
        assert!(!auth.allows(Some(&header("other", "s3cret"))));
        assert!(!auth.allows(None));
        assert!(!auth.allows(Some(&HeaderValue::from_static("Bearer abc"))));
        assert!(!auth.allows(Some(&HeaderValue::from_static("Basic !!!"))));
    }

    #[test]
    fn mistakes_name_the_key() {
        let err =
            |text: &str| format!("{:#}", WebConfig::parse(text, Path::new("/nonexistent")).err().unwrap());
        assert!(
            err("basic_auth_users:\n  prom: plain\n").contains("basic_auth_users.prom: not a bcrypt hash")
        );
        assert!(
            err("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n").contains("/nonexistent/a.crt")
        );
        assert!(err("tls_server_confg: {}\n").contains("unknown field `tls_server_confg`"));
        assert!(err("tls_server_config:\n  key_file: a\n").contains("missing field `cert_file`"));
        assert!(
            err("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n")
                .contains("unknown field `cipher_suites`")
        );
    }

    #[test]
    fn empty_file_changes_nothing() {
        let config = WebConfig::parse("{}", Path::new("/")).unwrap();
        assert!(config.tls.is_none() && config.auth.is_none());
    }
}
