//! `cutover history NAME [--json]`.

use std::path::Path;

use crate::api::{HistoryView, Request};
use crate::cli::HistoryArgs;
use crate::commands::{Exit, Failure};

pub async fn run(socket: &Path, args: HistoryArgs) -> anyhow::Result<()> {
    let data = crate::client::call(socket, &Request::History { service: args.name }).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let h: HistoryView = serde_json::from_value(data)
        .map_err(|e| Failure::new(Exit::Refused, format!("unexpected answer from the daemon: {e}")))?;
    println!("{:<8} {:<10} {:<30} CONTAINER", "RELEASE", "STATUS", "IMAGE");
    for r in h.releases.iter().rev() {
        let mark = if Some(r.number) == h.active { "*" } else { " " };
        println!("{mark}{:<7} {:<10} {:<30} {}", r.number, format!("{:?}", r.status).to_lowercase(), r.image, r.container);
    }
    if !h.events.is_empty() {
        println!();
        println!("{:<11} {:<9} {:<9} {:<24} DETAIL", "AT", "KIND", "FROM->TO", "OUTCOME");
        for e in h.events.iter().rev() {
            let from = e.from.map(|f| f.to_string()).unwrap_or_else(|| "-".into());
            let mut detail = e.message.clone();
            if let (Some(sw), true) = (e.switch_us, detail.is_empty()) {
                detail = format!("health {} ms, switch {} µs, drain {} ms", e.health_ms.unwrap_or(0), sw, e.drain_ms.unwrap_or(0));
            }
            println!("{:<11} {:<9} {:<9} {:<24} {}", e.at, format!("{:?}", e.kind).to_lowercase(), format!("{from}->{}", e.to), e.outcome, detail.lines().next().unwrap_or(""));
        }
    }
    Ok(())
}
