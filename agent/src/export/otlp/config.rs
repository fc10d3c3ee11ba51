//! Where and what to export, from the OpenTelemetry SDK's standard environment variables (or
//! the matching flags): endpoint, headers, service name, sampler, CA certificate.

use std::{path::PathBuf, time::Duration};

pub use crate::model::trace::Sampler;

/// What `run` was given (flags, or the environment variables clap reads for them).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct OtlpArgs {
    /// OTLP/HTTP traces URL, used as is (e.g. http://collector:4318/v1/traces). Off unless this
    /// or --otlp-endpoint is set.
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_traces_endpoint: Option<String>,
    /// OTLP/HTTP base URL; traces go to its /v1/traces.
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Headers sent with every export: `key=value,key2=value2` (values percent-decoded).
    #[arg(long, value_name = "LIST", env = "OTEL_EXPORTER_OTLP_HEADERS")]
    pub otlp_headers: Option<String>,
    /// Only `http/protobuf` is spoken.
    #[arg(long, value_name = "PROTOCOL", env = "OTEL_EXPORTER_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// PEM file of the CA that signed the collector's certificate (https endpoints); the system's
    /// bundle otherwise.
    #[arg(long, value_name = "FILE", env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otlp_certificate: Option<PathBuf>,
    /// The `service.name` of the agent's spans.
    #[arg(long, default_value = "inferwatch", env = "OTEL_SERVICE_NAME")]
    pub otlp_service_name: String,
    /// `parentbased_always_on` (default), `parentbased_traceidratio`, `parentbased_always_off`,
    /// `always_on`, `traceidratio`, `always_off`.
    #[arg(long, default_value = "parentbased_always_on", env = "OTEL_TRACES_SAMPLER")]
    pub otlp_sampler: String,
    /// The ratio of `*traceidratio` samplers (0 to 1).
    #[arg(long, value_name = "RATIO", env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otlp_sampler_arg: Option<String>,
    /// Aborted requests, and requests whose time to first token (or duration, for responses sent
    /// whole) is longer than this, are exported whatever the sampler says.
    #[arg(long, default_value = "5s", value_parser = crate::model::duration::parse_duration)]
    pub otlp_keep_slower_than: Duration,
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub url: Endpoint,
    pub headers: Vec<(String, String)>,
    pub service_name: String,
    pub sampler: Sampler,
    pub keep_slower_than: Duration,
    pub ca_file: Option<PathBuf>,
}

/// An `http://` or `https://` URL taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url}: an OTLP endpoint is an http:// or https:// URL"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse::<u16>() {
                Ok(port) => (h, port),
                Err(_) if authority.starts_with('[') && authority.ends_with(']') => {
                    (authority, if tls { 443 } else { 80 })
                }
                Err(_) => return Err(format!("{url}: bad port {p:?}")),
            },
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
            return Err(format!("{url}: no host"));
        }
        let path = if path.is_empty() { "/".to_string() } else { path.to_string() };
        Ok(Self { tls, host: host.to_string(), port, path })
    }
}

impl OtlpConfig {
    /// None when no endpoint is configured (or `OTEL_SDK_DISABLED=true`): tracing is off.
    pub fn from_args(args: &OtlpArgs) -> Result<Option<Self>, String> {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let url = match (&args.otlp_traces_endpoint, &args.otlp_endpoint) {
            (Some(url), _) if !url.trim().is_empty() => Endpoint::parse(url.trim())?,
            (_, Some(base)) if !base.trim().is_empty() => {
                Endpoint::parse(&format!("{}/v1/traces", base.trim().trim_end_matches('/')))?
            }
            _ => return Ok(None),
        };
        if let Some(p) = args.otlp_protocol.as_deref().map(str::trim)
            && !p.is_empty()
            && p != "http/protobuf"
        {
            return Err(format!("OTLP protocol {p:?}: only http/protobuf is supported"));
        }
        let ratio = match args.otlp_sampler_arg.as_deref().map(str::trim) {
            None | Some("") => 1.0,
            Some(r) => match r.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => return Err(format!("sampler argument {r:?}: a ratio from 0 to 1")),
            },
        };
        // 'static inner samplers for the parent-based ones: one small leak per agent start.
        let inner = |s: Sampler| -> &'static Sampler { Box::leak(Box::new(s)) };
        let sampler = match args.otlp_sampler.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Ratio(ratio),
            "parentbased_always_on" => Sampler::ParentBased(inner(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(inner(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => Sampler::ParentBased(inner(Sampler::Ratio(ratio))),
            other => return Err(format!("sampler {other:?}: not one the OpenTelemetry SDKs define")),
        };
        Ok(Some(Self {
            url,
            headers: parse_headers(args.otlp_headers.as_deref().unwrap_or(""))?,
            service_name: args.otlp_service_name.clone(),
            sampler,
            keep_slower_than: args.otlp_keep_slower_than,
            ca_file: args.otlp_certificate.clone(),
        }))
    }
}

/// `key=value,key2=value2`, values percent-decoded (the SDKs' format). Names and values that
/// would break an HTTP head are refused.
pub fn parse_headers(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| format!("OTLP header {item:?}: not key=value"))?;
        let (k, v) = (k.trim(), percent_decode(v.trim()));
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        // Visible ASCII, spaces and tabs: what an HTTP/1.1 head carries (checked here, so that a
        // bad value stops the start instead of every export).
        let value = |c: char| c == ' ' || c == '\t' || c.is_ascii_graphic();
        if k.is_empty() || !k.chars().all(token) || !v.chars().all(value) {
            return Err(format!("OTLP header {k:?}: not a valid HTTP header"));
        }
        // The exporter sets these itself: a second copy would break the request.
        const OWN: [&str; 6] =
            ["host", "content-length", "content-type", "transfer-encoding", "connection", "user-agent"];
        if OWN.iter().any(|own| k.eq_ignore_ascii_case(own)) {
            return Err(format!("OTLP header {k:?}: set by the exporter itself"));
        }
        out.push((k.to_string(), v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: &str) -> OtlpArgs {
        OtlpArgs {
            otlp_endpoint: Some(endpoint.into()),
            otlp_service_name: "inferwatch".into(),
            otlp_sampler: "parentbased_always_on".into(),
            otlp_keep_slower_than: Duration::from_secs(10),
            ..OtlpArgs::default()
        }
    }

    #[test]
    fn endpoints_the_sdk_way() {
        let c = OtlpConfig::from_args(&args("http://collector:4318")).unwrap().unwrap();
        assert_eq!(
            c.url,
            Endpoint { tls: false, host: "collector".into(), port: 4318, path: "/v1/traces".into() }
        );
        let mut a = args("http://ignored:1");
        a.otlp_traces_endpoint = Some("https://tempo.example/otlp/v1/traces".into());
        let c = OtlpConfig::from_args(&a).unwrap().unwrap();
        assert_eq!(
            c.url,
            Endpoint { tls: true, host: "tempo.example".into(), port: 443, path: "/otlp/v1/traces".into() }
        );
        assert_eq!(Endpoint::parse("http://[::1]:4318/v1/traces").unwrap().host, "::1");
        assert!(OtlpConfig::from_args(&OtlpArgs::default()).unwrap().is_none(), "off unless configured");
        assert!(Endpoint::parse("grpc://x:4317").is_err());
        assert!(Endpoint::parse("http://x:port/").is_err());
        let mut grpc = args("http://c:4317");
        grpc.otlp_protocol = Some("grpc".into());
        assert!(OtlpConfig::from_args(&grpc).unwrap_err().contains("http/protobuf"));
    }

    #[test]
    fn headers_and_samplers() {
        assert_eq!(
            parse_headers("api-key=abc%3D%3D, x-tenant = t1").unwrap(),
            [("api-key".to_string(), "abc==".to_string()), ("x-tenant".to_string(), "t1".to_string())]
        );
        assert!(parse_headers("bad header=x").is_err());
        assert!(parse_headers("k=a%0d%0aInjected: yes").is_err(), "no CRLF into the HTTP head");
        assert!(parse_headers("k=caf%C3%A9").is_err(), "no bytes an HTTP head cannot carry");
        assert!(parse_headers("Host=evil").is_err() && parse_headers("content-length=1").is_err());
        let id = |low: u64| {
            let mut t = [0u8; 16];
            t[8..].copy_from_slice(&low.to_be_bytes());
            t
        };
        let half = Sampler::Ratio(0.5);
        assert!(half.keeps(&id(1), None) && !half.keeps(&id(u64::MAX - 1), None));
        let parent = Sampler::ParentBased(&Sampler::AlwaysOff);
        assert!(
            parent.keeps(&id(7), Some(true))
                && !parent.keeps(&id(7), Some(false))
                && !parent.keeps(&id(7), None)
        );
        let mut a = args("http://c:4318");
        a.otlp_sampler = "parentbased_traceidratio".into();
        a.otlp_sampler_arg = Some("2".into());
        assert!(OtlpConfig::from_args(&a).is_err(), "a ratio above 1");
        a.otlp_sampler = "sometimes".into();
        a.otlp_sampler_arg = None;
        assert!(OtlpConfig::from_args(&a).is_err());
    }
}
