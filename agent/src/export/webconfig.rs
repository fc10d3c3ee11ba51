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
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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

use super::{listener::Client, stats::ServerStats};

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
            Some(Arc::new(BasicAuth::new(file.basic_auth_users)))
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
/// credentials that passed are remembered (only successes, only a few), one check runs at a
/// time, and a client that keeps failing is refused without one (429).
pub(crate) struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
    throttle: Throttle,
    checking: tokio::sync::Semaphore,
}

const VERIFIED_CACHE: usize = 64;

/// Failed logins counted over a window, per client address and in all.
#[derive(Default)]
struct Throttle {
    per_client: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    all: Mutex<Option<(Instant, u32)>>,
}

const FAILURE_WINDOW: Duration = Duration::from_secs(10);
const FAILURES_PER_CLIENT: u32 = 5;
const FAILURES_IN_ALL: u32 = 50;
/// Client addresses remembered at once (many addresses, IPv6 ones in particular, must not
/// grow the table).
const THROTTLED_CLIENTS: usize = 4096;

/// The count of a window that started at `start`, or a fresh window.
fn current(window: Option<(Instant, u32)>) -> (Instant, u32) {
    match window {
        Some((start, n)) if start.elapsed() < FAILURE_WINDOW => (start, n),
        _ => (Instant::now(), 0),
    }
}

impl Throttle {
    fn refuses(&self, ip: IpAddr) -> bool {
        let mine = self.per_client.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).copied();
        let all = *self.all.lock().unwrap_or_else(|e| e.into_inner());
        current(mine).1 >= FAILURES_PER_CLIENT || current(all).1 >= FAILURES_IN_ALL
    }

    fn failed(&self, ip: IpAddr) {
        let mut clients = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= THROTTLED_CLIENTS && !clients.contains_key(&ip) {
            clients.retain(|_, (start, _)| start.elapsed() < FAILURE_WINDOW);
            if clients.len() >= THROTTLED_CLIENTS {
                clients.clear();
            }
        }
        let (start, n) = current(clients.get(&ip).copied());
        clients.insert(ip, (start, n + 1));
        drop(clients);
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        let (start, n) = current(*all);
        *all = Some((start, n + 1));
    }
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Self {
        Self {
            users,
            verified: Mutex::default(),
            throttle: Throttle::default(),
            checking: tokio::sync::Semaphore::new(1),
        }
    }

    /// Credentials that passed before.
    fn remembered(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(value) = authorization.and_then(|v| v.to_str().ok()) else { return false };
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(value)
    }

    pub(crate) fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        if self.remembered(authorization) {
            return true;
        }
        let Some(value) = authorization.and_then(|v| v.to_str().ok()) else {
            return false;
        };
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

/// What the auth middleware needs: the users and the server's counters.
#[derive(Clone)]
pub(crate) struct AuthState {
    pub auth: Arc<BasicAuth>,
    pub stats: Arc<ServerStats>,
}

/// Middleware: every path but `/healthz` needs the credentials.
pub(crate) async fn require_basic_auth(
    State(state): State<AuthState>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let header = request.headers().get(header::AUTHORIZATION).cloned();
    let auth = &state.auth;
    if auth.remembered(header.as_ref()) {
        return next.run(request).await;
    }
    let client = request.extensions().get::<Client>().map(|c| c.0.ip());
    let too_many = || {
        state.stats.auth_throttled.inc();
        (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "10")], "Too many failed logins\n")
            .into_response()
    };
    if client.is_some_and(|ip| auth.throttle.refuses(ip)) {
        return too_many();
    }
    // One bcrypt check at a time, on the blocking pool: a flood of guesses costs at most one
    // core's share, never the runtime's workers.
    let Ok(_permit) = auth.checking.try_acquire() else { return too_many() };
    let check = auth.clone();
    let allowed = tokio::task::spawn_blocking(move || check.allows(header.as_ref())).await.unwrap_or(false);
    if allowed {
        next.run(request).await
    } else {
        if let Some(ip) = client {
            auth.throttle.failed(ip);
        }
        state.stats.auth_failed.inc();
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"inferwatch\"")],
            "Unauthorized\n",
        )
            .into_response()
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
