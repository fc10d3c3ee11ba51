//! `inferwatch diagnose`: the agent's troubleshooting rules over a window, printed.

use std::time::Duration;

use anyhow::Result;

use crate::{api, cli::DiagnoseArgs};

pub(crate) async fn run(args: DiagnoseArgs) -> Result<()> {
    let d = api::Client::new(&args.agent, Duration::from_secs(10))?.diagnosis(args.window).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    println!("diagnosis over the last {:.0} s, {} vLLM instance(s)", d.window_seconds, d.instances.len());
    if d.findings.is_empty() {
        println!("no problem found");
    }
    for f in &d.findings {
        println!("\n[{}] {}: {}", f.severity.to_uppercase(), f.rule, f.summary);
        for e in &f.evidence {
            println!("  evidence: {e}");
        }
        println!("  change:   {}", f.action);
    }
    for (rule, why) in &d.not_evaluated {
        println!("not evaluated: {rule} ({why})");
    }
    Ok(())
}
