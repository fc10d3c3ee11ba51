//! `inferwatch discover`: the vLLM instances on this node, once.

use std::path::Path;

use anyhow::Result;

use crate::{
    api::{InstanceView, Role},
    cli::DiscoverArgs,
    collect::discovery::{describe::describe, scan},
};

pub(crate) async fn run(args: DiscoverArgs) -> Result<()> {
    let instances =
        tokio::task::spawn_blocking(|| scan::scan(Path::new("/proc"), &mut Default::default())).await?;
    let mut views = Vec::new();
    for i in instances {
        let (version, mut models) = describe(&i).await;
        if models.is_empty() {
            models = i.cmdline_models.clone();
        }
        views.push(InstanceView { id: i.id(), instance: i, version, models, listen_overflows: None });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!(
            "no vLLM found on this node (looked in /proc for `vllm serve`, `python -m vllm.entrypoints.openai.api_server` and VLLM::* processes)"
        );
        return Ok(());
    }
    for v in &views {
        println!(
            "vLLM instance {}: version {}, model {}",
            v.id,
            v.version.as_deref().unwrap_or("unknown (no /version answer)"),
            if v.models.is_empty() { "unknown".to_string() } else { v.models.join(", ") }
        );
        for role in [Role::ApiServer, Role::EngineCore, Role::Worker] {
            for p in v.instance.processes.iter().filter(|p| p.role == role) {
                println!("  {:<12} pid {:<8} {}", role.as_str(), p.pid, p.comm);
            }
        }
        let listen: Vec<String> = v.instance.listen.iter().map(|a| a.to_string()).collect();
        println!(
            "  listening    {}",
            if listen.is_empty() { "nothing yet".into() } else { listen.join(", ") }
        );
        if let Some(c) = &v.instance.container_id {
            println!("  container    {c}");
        }
        if let Some(p) = &v.instance.pod_uid {
            println!("  pod uid      {p}");
        }
    }
    Ok(())
}
