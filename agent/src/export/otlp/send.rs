//! One OTLP/HTTP export: a POST of protobuf bytes over TCP or TLS, bounded in time. The caller
//! retries what this says may succeed later.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

use super::config::{Endpoint, OtlpConfig};

/// Longest one export may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Where Debian, Ubuntu and most container images keep the system's CA bundle.
const SYSTEM_CAS: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth trying again (a connection failure, a timeout, 429, 502, 503, 504), after the
    /// server's `Retry-After` when it gave one.
    #[error("{why}")]
    Retry { why: String, after: Option<Duration> },
    /// The collector refused the data: trying again would not help.
    #[error("{0}")]
    Rejected(String),
}

/// The TLS client configuration for an https endpoint: the given CA, or the system's.
pub fn tls_config(config: &OtlpConfig) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !config.url.tls {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    let files: Vec<std::path::PathBuf> = match &config.ca_file {
        Some(f) => vec![f.clone()],
        None => {
            SYSTEM_CAS.iter().map(Into::into).filter(|p: &std::path::PathBuf| p.exists()).take(1).collect()
        }
    };
    for file in &files {
        let certs = CertificateDer::pem_file_iter(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", file.display()))?;
        for cert in certs {
            roots.add(cert).map_err(|e| format!("{}: {e}", file.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "an https OTLP endpoint needs a CA: --otlp-certificate (OTEL_EXPORTER_OTLP_CERTIFICATE)".into()
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(tls)))
}

/// POSTs `body` to the endpoint.
pub async fn post(
    url: &Endpoint,
    headers: &[(String, String)],
    tls: Option<&Arc<rustls::ClientConfig>>,
    body: Bytes,
) -> Result<(), SendError> {
    match tokio::time::timeout(TIMEOUT, post_once(url, headers, tls, body)).await {
        Ok(result) => result,
        Err(_) => Err(SendError::Retry { why: "timed out".into(), after: None }),
    }
}

async fn post_once(
    url: &Endpoint,
    headers: &[(String, String)],
    tls: Option<&Arc<rustls::ClientConfig>>,
    body: Bytes,
) -> Result<(), SendError> {
    let retry = |why: String| SendError::Retry { why, after: None };
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| retry(format!("connecting to {}:{}: {e}", url.host, url.port)))?;
    let _ = tcp.set_nodelay(true);
    let mut request = Request::post(url.path.as_str())
        .header(header::HOST, host_header(url))
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .header(header::USER_AGENT, concat!("inferwatch/", env!("CARGO_PKG_VERSION")));
    for (k, v) in headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = request.body(Full::new(body)).map_err(|e| SendError::Rejected(e.to_string()))?;
    let response = match tls {
        None => send(TokioIo::new(tcp), request).await?,
        Some(config) => {
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| SendError::Rejected(format!("{}: {e}", url.host)))?;
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| retry(format!("TLS with {}: {e}", url.host)))?;
            send(TokioIo::new(stream), request).await?
        }
    };
    let (status, after) = response;
    match status {
        s if s.is_success() => Ok(()),
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Err(SendError::Retry { why: format!("HTTP {status}"), after }),
        s => Err(SendError::Rejected(format!("HTTP {s}"))),
    }
}

/// One request on a fresh HTTP/1.1 connection: the status and any `Retry-After` (seconds).
async fn send<IO>(
    io: TokioIo<IO>,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Option<Duration>), SendError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let retry = |why: String| SendError::Retry { why, after: None };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| retry(format!("HTTP: {e}")))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(|e| retry(format!("HTTP: {e}")));
    let result = match response {
        Ok(response) => {
            let status = response.status();
            let after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read (at most 64 KiB of) the body so the connection ends cleanly.
            let body = http_body_util::Limited::new(response.into_body(), 64 << 10);
            let _ = tokio::time::timeout(Duration::from_secs(1), body.collect()).await;
            Ok((status, after))
        }
        Err(e) => Err(e),
    };
    driver.abort();
    result
}

fn host_header(url: &Endpoint) -> String {
    let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
    match (url.tls, url.port) {
        (true, 443) | (false, 80) => host,
        (_, port) => format!("{host}:{port}"),
    }
}
