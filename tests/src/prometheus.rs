//! A real Prometheus (Debian's package) for the deploy tests: started on a free port with a
//! throwaway storage directory, queried through its HTTP API.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{free_port, http_get};

pub struct Prometheus {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) and waits until it is ready.
    pub fn start(config: &str) -> Prometheus {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "inferwatch-prometheus-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus (Debian package `prometheus`; `cargo xtask setup` installs it)");
        let mut prometheus = Prometheus { child: Some(child), addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
            if let Some(status) = prometheus.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 30 s:\n{}", prometheus.log());
            thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path; returns the parsed JSON, whatever its status. HTTP/1.0, so that
    /// large answers come whole rather than chunked.
    pub fn api(&self, path_and_query: &str) -> serde_json::Value {
        use std::io::{Read as _, Write as _};
        let get = || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(self.addr)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr)?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            Ok(raw.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
        };
        let body = get().unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path_and_query}: {e}: {body}"))
    }

    /// An instant query: `Ok(result vector)` or `Err(error message)`.
    pub fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", url_encode(expr)));
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Dashboard queries with Grafana's variables filled in as "All" and the rate interval fixed.
pub fn grafana_expr(expr: &str, rate_interval: &str) -> String {
    let mut out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval);
    for var in ["$node", "$vllm_instance", "$model"] {
        out = out.replace(var, ".*");
    }
    out
}

/// Every query of a Grafana dashboard: (panel title, expression).
pub fn dashboard_queries(path: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_promql() {
        assert_eq!(url_encode("a{b=~\".*\"} / 2"), "a%7Bb%3D~%22.%2A%22%7D%20%2F%202");
        assert_eq!(
            grafana_expr("rate(x{instance=~\"$node\", model=~\"$model\"}[$__rate_interval])", "30s"),
            "rate(x{instance=~\".*\", model=~\".*\"}[30s])"
        );
    }
}
