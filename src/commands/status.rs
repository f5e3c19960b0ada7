//! `cutover status [NAME] [--json]`.

use std::path::Path;

use crate::api::{Request, ServiceStatus};
use crate::cli::StatusArgs;
use crate::commands::{json_failure, print_text, Exit, Failure};

pub async fn run(socket: &Path, args: StatusArgs) -> anyhow::Result<()> {
    let data = crate::client::call(socket, &Request::Status { service: args.name }).await.map_err(|f| json_failure(args.json, f))?;
    if args.json {
        print_text(&format!("{}\n", serde_json::to_string_pretty(&data)?))?;
        return Ok(());
    }
    let services: Vec<ServiceStatus> = serde_json::from_value(data)
        .map_err(|e| Failure::new(Exit::Refused, format!("unexpected answer from the daemon: {e}")))?;
    if services.is_empty() {
        print_text("no services (register one with `cutover apply FILE`)\n")?;
        return Ok(());
    }
    let mut out = format!("{:<20} {:<8} {:<7} {:<28} {:<15} {:<22} KEPT\n", "SERVICE", "MODE", "ACTIVE", "IMAGE", "ADDRESS", "PORTS");
    for s in services {
        out.push_str(&format!(
            "{:<20} {:<8} {:<7} {:<28} {:<15} {:<22} {}{}\n",
            s.name,
            s.mode,
            s.active.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            s.image.unwrap_or_else(|| "-".into()),
            s.addr.unwrap_or_else(|| "-".into()),
            s.ports.join(", "),
            s.kept.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            s.operation.map(|o| format!("  (in progress: {o})")).unwrap_or_default()
                + &s.down.map(|d| format!("  (DOWN: {d})")).unwrap_or_default(),
        ));
    }
    print_text(&out)?;
    Ok(())
}
