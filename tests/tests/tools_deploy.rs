//! deploy/: what can be checked without a cluster, a Docker engine or Grafana: the alert rules
//! with promtool (syntax and unit tests), Prometheus' configuration, the Kubernetes manifests
//! against the API schemas (kubernetes-validate, strict), and the wiring between files (ports,
//! labels, mounts, the dashboard's structure). The dashboard's queries run against real data in
//! vllm_deploy.rs.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use inferwatch_tests::prometheus::dashboard_queries;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

fn yaml(path: &Path) -> Value {
    yaml_documents(path).into_iter().next().unwrap()
}

/// Runs a tool; panics with its output unless it succeeds.
fn check(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (`cargo xtask setup` installs it)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let text = check(Command::new("promtool").args(["check", "rules"]).arg(deploy("prometheus/alerts.yml")));
    assert!(text.contains("SUCCESS: 11 rules found"), "{text}");
    let text = check(
        Command::new("promtool").args(["test", "rules", "alerts_test.yml"]).current_dir(deploy("prometheus")),
    );
    assert!(text.contains("SUCCESS"), "{text}");
    // Every alert has a unit test.
    let rules = yaml(&deploy("prometheus/alerts.yml"));
    let tests = std::fs::read_to_string(deploy("prometheus/alerts_test.yml")).unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(tests.contains(&format!("alertname: {name}")), "{name} has no unit test");
        }
    }
}

#[test]
fn prometheus_config_passes_promtool() {
    // The compose stack mounts the rules at /etc/prometheus: point there from a copy.
    let dir = std::env::temp_dir().join(format!("inferwatch-promcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap();
    assert!(config.contains("/etc/prometheus/alerts.yml"));
    let rules = deploy("prometheus/alerts.yml").canonicalize().unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        config.replace("/etc/prometheus/alerts.yml", rules.to_str().unwrap()),
    )
    .unwrap();
    let text = check(Command::new("promtool").args(["check", "config"]).arg(dir.join("prometheus.yml")));
    assert!(text.contains("SUCCESS: 1 rule files found"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn manifests() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["kubernetes", "kubernetes/prometheus-operator"] {
        for entry in std::fs::read_dir(deploy(dir)).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "yaml") {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn kubernetes_manifests_validate_strictly() {
    let validator = root().join("target/pyenv/bin/kubernetes-validate");
    let text = check(Command::new(&validator).arg("--strict").args(manifests()));
    for kind in
        ["namespace/inferwatch", "serviceaccount/inferwatch", "daemonset/inferwatch", "service/inferwatch"]
    {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated:\n{text}");
    }
    // The validator itself catches mistakes (a check that cannot fail proves nothing).
    let bad = std::env::temp_dir().join(format!("inferwatch-bad-{}.yaml", std::process::id()));
    let daemonset = std::fs::read_to_string(deploy("kubernetes/daemonset.yaml")).unwrap();
    std::fs::write(&bad, daemonset.replace("hostPID: true", "hostPID: \"yes\"")).unwrap();
    let out = Command::new(&validator).arg("--strict").arg(&bad).output().unwrap();
    assert!(!out.status.success(), "a wrong type passed validation");
    std::fs::remove_file(&bad).unwrap();
}

/// All documents of all manifests, by kind.
fn objects(kind: &str) -> Vec<Value> {
    manifests().iter().flat_map(|p| yaml_documents(p)).filter(|d| d["kind"] == kind).collect()
}

/// What the agent needs to attach and to read other users' /proc; not SYS_ADMIN (pods are
/// scraped through their own address).
const NEEDED_CAPS: [&str; 4] = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];

#[test]
fn daemonset_service_and_monitors_fit_together() {
    let ds = objects("DaemonSet").remove(0);
    let pod = &ds["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert_eq!(&ds["spec"]["selector"]["matchLabels"], pod_labels);
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"], true, "vLLM is found through the host's /proc");
    let terms = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let keys: Vec<&str> = terms
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t["matchExpressions"][0]["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["nvidia.com/gpu.present", "cloud.google.com/gke-accelerator"], "GPU nodes only");
    assert!(spec["priorityClassName"].is_null(), "system-node-critical is not admitted everywhere");
    assert!(spec["tolerations"].as_sequence().unwrap().iter().any(|t| t["key"] == "nvidia.com/gpu"));
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false, "capabilities, not privileged");
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert!(container["resources"]["limits"]["cpu"].is_string(), "a CPU ceiling");
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    let added: BTreeSet<&str> =
        security["capabilities"]["add"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(added, NEEDED_CAPS.into_iter().collect(), "exactly what the agent needs to attach");
    let mounts: BTreeSet<&str> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in ["/sys/kernel/btf", "/sys/kernel/tracing", "/usr/local/nvidia"] {
        assert!(mounts.contains(path), "{path} not mounted: {mounts:?}");
    }
    assert_eq!(container["ports"][0]["name"], "metrics");
    assert_eq!(container["ports"][0]["containerPort"], 9420);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    // Only the monitoring namespace reaches the agents' port.
    let policy = objects("NetworkPolicy").remove(0);
    assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], pod_labels);
    assert_eq!(policy["spec"]["policyTypes"][0], "Ingress");
    let rule = &policy["spec"]["ingress"][0];
    assert_eq!(rule["from"].as_sequence().unwrap().len(), 1);
    assert_eq!(
        rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(rule["ports"][0]["port"], 9420);

    let service = objects("Service").remove(0);
    assert_eq!(&service["spec"]["selector"], pod_labels);
    assert_eq!(service["spec"]["clusterIP"], "None", "one target per node, not a load balancer");
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    let monitor = objects("ServiceMonitor").remove(0);
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]);
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    let pod_monitor = objects("PodMonitor").remove(0);
    assert_eq!(&pod_monitor["spec"]["selector"]["matchLabels"], pod_labels);
    assert_eq!(pod_monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    for object in [&ds, &service, &monitor, &pod_monitor, &policy] {
        assert_eq!(object["metadata"]["namespace"], "inferwatch");
    }
    // The alert InferwatchDown matches on job="inferwatch": the monitors' job label.
    assert_eq!(monitor["spec"]["jobLabel"], "app.kubernetes.io/name");
    assert_eq!(service["metadata"]["labels"]["app.kubernetes.io/name"], "inferwatch");
}

#[test]
fn compose_stack_mounts_files_that_exist() {
    let compose_dir = deploy("compose");
    let compose = yaml(&compose_dir.join("compose.yaml"));
    let services = compose["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(names, ["grafana", "inferwatch", "node-exporter", "prometheus", "vllm"].into_iter().collect());
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                let path = compose_dir.join(source);
                assert!(path.exists(), "{name:?}: {} does not exist", path.display());
            }
        }
    }
    let agent = &compose["services"]["inferwatch"];
    assert!(compose_dir.join(agent["build"]["context"].as_str().unwrap()).join("Dockerfile").exists());
    assert_eq!(agent["pid"], "host");
    let added: BTreeSet<&str> =
        agent["cap_add"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(added, NEEDED_CAPS.into_iter().collect());
    // Prometheus scrapes the agent by its service name, on the agent's port.
    let prometheus = yaml(&deploy("prometheus/prometheus.yml"));
    let jobs = prometheus["scrape_configs"].as_sequence().unwrap();
    let job = jobs.iter().find(|j| j["job_name"] == "inferwatch").unwrap();
    assert_eq!(job["static_configs"][0]["targets"][0], "inferwatch:9420");
    // Published on this host only, but Grafana, which has a password and no anonymous access.
    for (name, service) in services {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert_eq!(port.starts_with("127.0.0.1:"), name != "grafana", "{name:?} publishes {port}");
        }
    }
    assert!(agent["ports"][0].as_str().unwrap().ends_with(":9420"));
    let grafana_env = &compose["services"]["grafana"]["environment"];
    assert_eq!(grafana_env["GF_AUTH_ANONYMOUS_ENABLED"], "false");
    assert!(
        grafana_env["GF_SECURITY_ADMIN_PASSWORD"].as_str().unwrap().contains(":?"),
        "required, no default"
    );
    // Grafana's provisioning points at the mounted dashboards and the datasource the
    // dashboard's variable selects by type.
    let grafana = &compose["services"]["grafana"];
    let mounts: Vec<&str> =
        grafana["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let provider = yaml(&deploy("grafana/provisioning/dashboards/inferwatch.yml"));
    let path = provider["providers"][0]["options"]["path"].as_str().unwrap();
    assert!(mounts.iter().any(|m| m.starts_with("../grafana/dashboards:") && m.contains(path)), "{mounts:?}");
    let datasource = yaml(&deploy("grafana/provisioning/datasources/prometheus.yml"));
    assert_eq!(datasource["datasources"][0]["type"], "prometheus");
    assert_eq!(datasource["datasources"][0]["url"], "http://prometheus:9090");
}

#[test]
fn dashboard_is_well_formed() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/dashboards/inferwatch.json")).unwrap())
            .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut rows = Vec::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate panel id");
        let grid = &panel["gridPos"];
        assert!(grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24, "{panel}");
        if panel["type"] == "row" {
            rows.push(panel["title"].as_str().unwrap());
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
            assert!(!target["expr"].as_str().unwrap().is_empty());
        }
    }
    for wanted in ["vLLM", "kernel", "GPU", "inferwatch itself"] {
        assert!(rows.iter().any(|r| r.contains(wanted)), "no row about {wanted}: {rows:?}");
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "node", "vllm_instance", "model"]);
    // Every query uses only these variables, and every one filters on the node.
    for (title, expr) in dashboard_queries(&deploy("grafana/dashboards/inferwatch.json")) {
        assert!(expr.contains("instance=~\"$node\""), "{title}: {expr}");
        let rest = expr
            .replace("$__rate_interval", "")
            .replace("$node", "")
            .replace("$vllm_instance", "")
            .replace("$model", "");
        assert!(!rest.contains('$'), "{title}: unknown variable in {expr}");
    }
}
