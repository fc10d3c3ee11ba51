//! The GPU collector's latest round as metric families, joined to the vLLM instances that own
//! its processes (model and role). Pure: tested on recorded samples; the sampling itself is
//! `collect::nvml`.

use std::collections::{BTreeMap, HashMap};

use crate::model::{
    family::{Family, Sample, family, sample},
    gpu::{GpuSnapshot, Owner},
};

/// NVML's clock-event reason bits (`nvmlClocksEventReason*`), by the names we export.
pub(crate) const CLOCK_EVENT_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Each known reason with whether it is active in `bits`.
pub(crate) fn clock_event_reasons(bits: u64) -> impl Iterator<Item = (&'static str, bool)> {
    CLOCK_EVENT_REASONS.into_iter().map(move |(bit, name)| (name, bits & bit != 0))
}

/// The families for a snapshot; `owners` maps the pids of vLLM's processes to their model.
pub(crate) fn families(snapshot: &GpuSnapshot, owners: &HashMap<u32, Owner>) -> Vec<Family> {
    let mut out = vec![family(
        "inferwatch_gpu_collector_up",
        "1 when NVML is loaded and sees at least one GPU.",
        "gauge",
        vec![sample("inferwatch_gpu_collector_up", &[], if snapshot.collector_up { 1.0 } else { 0.0 })],
    )];
    if !snapshot.collector_up {
        return out;
    }
    let mut per_gpu: BTreeMap<&'static str, (&'static str, &'static str, Vec<Sample>)> = BTreeMap::new();
    let mut push = |name: &'static str, help: &'static str, kind: &'static str, s: Sample| {
        per_gpu.entry(name).or_insert((help, kind, Vec::new())).2.push(s);
    };
    let mut model_memory: BTreeMap<String, f64> = BTreeMap::new();
    for d in &snapshot.devices {
        let index = d.index.to_string();
        let labels = [("gpu", index.as_str()), ("uuid", d.uuid.as_str()), ("name", d.name.as_str())];
        let gauge = |name: &str, value: f64| sample(name, &labels, value);
        push(
            "inferwatch_gpu_up",
            "1 while NVML answers for this GPU.",
            "gauge",
            gauge("inferwatch_gpu_up", bool_value(d.up)),
        );
        if !d.up {
            continue;
        }
        let ratio = |p: u32| p as f64 / 100.0;
        let fields: [(&'static str, &'static str, Option<f64>); 14] = [
            (
                "inferwatch_gpu_utilization_ratio",
                "Time a kernel ran on the GPU in the last sample period.",
                d.utilization_gpu_percent.map(ratio),
            ),
            (
                "inferwatch_gpu_memory_utilization_ratio",
                "Time device memory was read or written in the last sample period.",
                d.utilization_memory_percent.map(ratio),
            ),
            (
                "inferwatch_gpu_memory_used_bytes",
                "Device memory allocated.",
                d.memory_used_bytes.map(|b| b as f64),
            ),
            (
                "inferwatch_gpu_memory_total_bytes",
                "Device memory installed.",
                d.memory_total_bytes.map(|b| b as f64),
            ),
            (
                "inferwatch_gpu_memory_reserved_bytes",
                "Device memory reserved by the driver.",
                d.memory_reserved_bytes.map(|b| b as f64),
            ),
            ("inferwatch_gpu_power_watts", "Power draw.", d.power_milliwatts.map(|mw| mw as f64 / 1e3)),
            (
                "inferwatch_gpu_power_limit_watts",
                "Enforced power limit.",
                d.power_limit_milliwatts.map(|mw| mw as f64 / 1e3),
            ),
            (
                "inferwatch_gpu_temperature_celsius",
                "GPU die temperature.",
                d.temperature_celsius.map(|c| c as f64),
            ),
            ("inferwatch_gpu_sm_clock_hertz", "SM clock.", d.sm_clock_mhz.map(|m| m as f64 * 1e6)),
            (
                "inferwatch_gpu_memory_clock_hertz",
                "Memory clock.",
                d.memory_clock_mhz.map(|m| m as f64 * 1e6),
            ),
            (
                "inferwatch_gpu_pcie_rx_bytes_per_second",
                "PCIe bytes received by the GPU per second.",
                d.pcie_rx_bytes_per_second,
            ),
            (
                "inferwatch_gpu_pcie_tx_bytes_per_second",
                "PCIe bytes sent by the GPU per second.",
                d.pcie_tx_bytes_per_second,
            ),
            (
                "inferwatch_gpu_sm_activity_ratio",
                "GPM: fraction of SMs busy, over the last interval (Hopper and newer).",
                d.gpm_sm_activity_percent.map(|p| p / 100.0),
            ),
            (
                "inferwatch_gpu_tensor_activity_ratio",
                "GPM: tensor core activity over the last interval (Hopper and newer).",
                d.gpm_tensor_activity_percent.map(|p| p / 100.0),
            ),
        ];
        for (name, help, value) in fields {
            if let Some(v) = value {
                push(name, help, "gauge", gauge(name, v));
            }
        }
        if let Some(p) = d.gpm_dram_bandwidth_percent {
            let name = "inferwatch_gpu_dram_bandwidth_utilization_ratio";
            push(
                name,
                "GPM: DRAM bandwidth used over the last interval (Hopper and newer).",
                "gauge",
                gauge(name, p / 100.0),
            );
        }
        if let Some(mj) = d.energy_millijoules {
            let name = "inferwatch_gpu_energy_joules_total";
            push(name, "Energy used since the driver loaded.", "counter", gauge(name, mj as f64 / 1e3));
        }
        if let Some(bits) = d.clock_event_bits {
            for (reason, active) in clock_event_reasons(bits) {
                let name = "inferwatch_gpu_clock_event_active";
                let labels = [labels[0], labels[1], labels[2], ("reason", reason)];
                push(
                    name,
                    "1 while this reason holds the clocks down (throttling).",
                    "gauge",
                    sample(name, &labels, bool_value(active)),
                );
            }
        }
        for (kind, count) in [("corrected", d.ecc_corrected), ("uncorrected", d.ecc_uncorrected)] {
            if let Some(count) = count {
                let name = "inferwatch_gpu_ecc_errors_total";
                let labels = [labels[0], labels[1], ("type", kind)];
                push(
                    name,
                    "ECC errors since the driver loaded (volatile).",
                    "counter",
                    sample(name, &labels, count as f64),
                );
            }
        }
        let id = [labels[0], labels[1]];
        push(
            "inferwatch_gpu_xid_errors_total",
            "Critical XID errors seen since the agent started.",
            "counter",
            sample("inferwatch_gpu_xid_errors_total", &id, d.xid_errors as f64),
        );
        if let Some(xid) = d.last_xid {
            push(
                "inferwatch_gpu_last_xid",
                "Code of the last critical XID error.",
                "gauge",
                sample("inferwatch_gpu_last_xid", &id, xid as f64),
            );
        }
        for p in &d.processes {
            let owner = owners.get(&p.pid);
            let model = owner.map_or("", |o| o.model.as_str());
            let role = owner.map_or("", |o| o.role);
            let pid = p.pid.to_string();
            let labels = [id[0], id[1], ("pid", pid.as_str()), ("model", model), ("role", role)];
            if let Some(bytes) = p.memory_bytes {
                let name = "inferwatch_gpu_process_memory_bytes";
                push(
                    name,
                    "Device memory used by a process; model is empty for processes that are not vLLM's.",
                    "gauge",
                    sample(name, &labels, bytes as f64),
                );
                if owner.is_some() {
                    *model_memory.entry(model.to_string()).or_default() += bytes as f64;
                }
            }
            if let Some(sm) = p.sm_percent {
                let name = "inferwatch_gpu_process_sm_utilization_ratio";
                push(
                    name,
                    "SM utilisation of a process over the last interval.",
                    "gauge",
                    sample(name, &labels, sm as f64 / 100.0),
                );
            }
        }
    }
    for (name, (help, kind, samples)) in per_gpu {
        out.push(family(name.strip_suffix("_total").unwrap_or(name), help, kind, samples));
    }
    out.push(family(
        "inferwatch_gpu_model_memory_bytes",
        "Device memory of all processes of the vLLM instances serving a model, on all GPUs.",
        "gauge",
        model_memory
            .iter()
            .map(|(m, b)| sample("inferwatch_gpu_model_memory_bytes", &[("model", m)], *b))
            .collect(),
    ));
    let (mut calls, mut seconds) = (Vec::new(), Vec::new());
    for (call, n, s) in &snapshot.calls {
        calls.push(sample("inferwatch_gpu_nvml_calls_total", &[("call", call)], *n as f64));
        seconds.push(sample("inferwatch_gpu_nvml_call_seconds_total", &[("call", call)], *s));
    }
    out.push(family("inferwatch_gpu_nvml_calls", "NVML calls made, by function.", "counter", calls));
    out.push(family(
        "inferwatch_gpu_nvml_call_seconds",
        "Time spent in NVML, by function.",
        "counter",
        seconds,
    ));
    out
}

fn bool_value(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregator::snapshots::encode_snapshots,
        model::gpu::{DeviceSample, ProcessSample},
    };

    fn h100() -> DeviceSample {
        DeviceSample {
            index: 0,
            uuid: "GPU-8f5e".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            up: true,
            utilization_gpu_percent: Some(97),
            utilization_memory_percent: Some(41),
            memory_used_bytes: Some(70 << 30),
            memory_total_bytes: Some(80 << 30),
            memory_reserved_bytes: Some(512 << 20),
            power_milliwatts: Some(612_345),
            power_limit_milliwatts: Some(700_000),
            energy_millijoules: Some(123_456_789),
            temperature_celsius: Some(64),
            sm_clock_mhz: Some(1980),
            memory_clock_mhz: Some(2619),
            clock_event_bits: Some(0x4 | 0x20),
            pcie_rx_bytes_per_second: Some(1.5e9),
            pcie_tx_bytes_per_second: None,
            ecc_corrected: Some(2),
            ecc_uncorrected: None,
            gpm_sm_activity_percent: Some(88.5),
            gpm_tensor_activity_percent: Some(40.0),
            gpm_dram_bandwidth_percent: None,
            xid_errors: 1,
            last_xid: Some(79),
            processes: vec![
                ProcessSample { pid: 4242, memory_bytes: Some(60 << 30), sm_percent: Some(95) },
                ProcessSample { pid: 77, memory_bytes: Some(1 << 30), sm_percent: None },
            ],
        }
    }

    fn render(families: &[Family]) -> String {
        encode_snapshots(families.to_vec())
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn converts_units_and_skips_what_is_not_supported() {
        let snapshot = GpuSnapshot {
            collector_up: true,
            devices: vec![h100()],
            calls: vec![("power_usage", 10, 0.002)],
        };
        let text = render(&families(&snapshot, &HashMap::new()));
        let gpu = r#"{gpu="0",uuid="GPU-8f5e",name="NVIDIA H100 80GB HBM3"}"#;
        assert_eq!(value(&text, "inferwatch_gpu_collector_up"), Some(1.0));
        assert_eq!(value(&text, &format!("inferwatch_gpu_up{gpu}")), Some(1.0));
        assert_eq!(value(&text, &format!("inferwatch_gpu_utilization_ratio{gpu}")), Some(0.97));
        assert_eq!(value(&text, &format!("inferwatch_gpu_memory_utilization_ratio{gpu}")), Some(0.41));
        assert_eq!(value(&text, &format!("inferwatch_gpu_power_watts{gpu}")), Some(612.345));
        assert_eq!(value(&text, &format!("inferwatch_gpu_power_limit_watts{gpu}")), Some(700.0));
        assert_eq!(value(&text, &format!("inferwatch_gpu_energy_joules_total{gpu}")), Some(123_456.789));
        assert_eq!(value(&text, &format!("inferwatch_gpu_sm_clock_hertz{gpu}")), Some(1.98e9));
        assert_eq!(
            value(&text, &format!("inferwatch_gpu_memory_total_bytes{gpu}")),
            Some((80u64 << 30) as f64)
        );
        assert_eq!(value(&text, &format!("inferwatch_gpu_sm_activity_ratio{gpu}")), Some(0.885));
        assert_eq!(value(&text, &format!("inferwatch_gpu_pcie_rx_bytes_per_second{gpu}")), Some(1.5e9));
        assert!(!text.contains("inferwatch_gpu_pcie_tx"), "unsupported fields are skipped");
        assert!(!text.contains("inferwatch_gpu_dram_bandwidth"), "unsupported fields are skipped");
        assert!(!text.contains("type=\"uncorrected\""));
        assert!(text.contains("# TYPE inferwatch_gpu_energy_joules counter"));
        let id = r#"{gpu="0",uuid="GPU-8f5e"}"#;
        assert_eq!(value(&text, &format!("inferwatch_gpu_xid_errors_total{id}")), Some(1.0));
        assert_eq!(value(&text, &format!("inferwatch_gpu_last_xid{id}")), Some(79.0));
        assert_eq!(value(&text, r#"inferwatch_gpu_nvml_calls_total{call="power_usage"}"#), Some(10.0));
    }

    #[test]
    fn decodes_clock_event_reasons() {
        let active: Vec<_> = clock_event_reasons(0x4 | 0x20).filter(|(_, on)| *on).map(|(r, _)| r).collect();
        assert_eq!(active, ["sw_power_cap", "sw_thermal_slowdown"]);
        assert_eq!(clock_event_reasons(0).filter(|(_, on)| *on).count(), 0);
        assert_eq!(clock_event_reasons(u64::MAX).count(), 9, "bounded: unknown bits are not labels");
        let text = render(&families(
            &GpuSnapshot { collector_up: true, devices: vec![h100()], calls: vec![] },
            &HashMap::new(),
        ));
        let series = |reason: &str| {
            format!(
                r#"inferwatch_gpu_clock_event_active{{gpu="0",uuid="GPU-8f5e",name="NVIDIA H100 80GB HBM3",reason="{reason}"}}"#
            )
        };
        assert_eq!(value(&text, &series("sw_thermal_slowdown")), Some(1.0));
        assert_eq!(value(&text, &series("hw_slowdown")), Some(0.0));
    }

    #[test]
    fn joins_processes_to_vllm_models() {
        let owners = HashMap::from([(4242, Owner { model: "llama-70b".into(), role: "engine_core" })]);
        let mut second = h100();
        second.index = 1;
        second.uuid = "GPU-aa".into();
        second.processes =
            vec![ProcessSample { pid: 4242, memory_bytes: Some(10 << 30), sm_percent: Some(50) }];
        let snapshot = GpuSnapshot { collector_up: true, devices: vec![h100(), second], calls: vec![] };
        let text = render(&families(&snapshot, &owners));
        let vllm = r#"{gpu="0",uuid="GPU-8f5e",pid="4242",model="llama-70b",role="engine_core"}"#;
        assert_eq!(
            value(&text, &format!("inferwatch_gpu_process_memory_bytes{vllm}")),
            Some((60u64 << 30) as f64)
        );
        assert_eq!(value(&text, &format!("inferwatch_gpu_process_sm_utilization_ratio{vllm}")), Some(0.95));
        let other = r#"{gpu="0",uuid="GPU-8f5e",pid="77",model="",role=""}"#;
        assert_eq!(
            value(&text, &format!("inferwatch_gpu_process_memory_bytes{other}")),
            Some((1u64 << 30) as f64)
        );
        assert!(!text.contains(&format!("inferwatch_gpu_process_sm_utilization_ratio{other}")));
        // Per model: both GPUs, not the foreign process.
        assert_eq!(
            value(&text, r#"inferwatch_gpu_model_memory_bytes{model="llama-70b"}"#),
            Some((70u64 << 30) as f64)
        );
        assert!(!text.contains(r#"inferwatch_gpu_model_memory_bytes{model="""#));
    }

    #[test]
    fn a_lost_gpu_is_down_and_nothing_else_is_reported_for_it() {
        let mut lost = h100();
        lost.up = false;
        let text = render(&families(
            &GpuSnapshot { collector_up: true, devices: vec![lost], calls: vec![] },
            &HashMap::new(),
        ));
        assert_eq!(
            value(&text, r#"inferwatch_gpu_up{gpu="0",uuid="GPU-8f5e",name="NVIDIA H100 80GB HBM3"}"#),
            Some(0.0)
        );
        assert!(!text.contains("inferwatch_gpu_power_watts{"));
        assert!(!text.contains("inferwatch_gpu_process_memory_bytes{"));
    }

    #[test]
    fn without_nvml_only_the_collector_state_is_exported() {
        let text = render(&families(&GpuSnapshot::default(), &HashMap::new()));
        assert_eq!(value(&text, "inferwatch_gpu_collector_up"), Some(0.0));
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 1, "{text}");
    }
}
