//! `cutover history NAME [--json]`.

use std::path::Path;

use crate::api::{HistoryView, Request};
use crate::cli::HistoryArgs;
use crate::commands::{json_failure, print_text, Exit, Failure};
use crate::timefmt;

pub async fn run(socket: &Path, args: HistoryArgs) -> anyhow::Result<()> {
    let data = crate::client::call(socket, &Request::History { service: args.name }).await.map_err(|f| json_failure(args.json, f))?;
    if args.json {
        print_text(&format!("{}\n", serde_json::to_string_pretty(&with_times(data))?))?;
        return Ok(());
    }
    let h: HistoryView = serde_json::from_value(data)
        .map_err(|e| Failure::new(Exit::Refused, format!("unexpected answer from the daemon: {e}")))?;
    print_text(&table(&h))?;
    Ok(())
}

/// The history as a table: releases newest first (the active one starred), then the
/// operations with their local time.
fn table(h: &HistoryView) -> String {
    let mut out = format!("{:<8} {:<10} {:<30} CONTAINER\n", "RELEASE", "STATUS", "IMAGE");
    for r in h.releases.iter().rev() {
        let mark = if Some(r.number) == h.active { "*" } else { " " };
        out.push_str(&format!("{mark}{:<7} {:<10} {:<30} {}\n", r.number, format!("{:?}", r.status).to_lowercase(), r.image, r.container));
    }
    if !h.events.is_empty() {
        out.push('\n');
        out.push_str(&format!("{:<19}  {:<9} {:<5} {:<4} {:<24} DETAIL\n", "AT", "KIND", "FROM", "TO", "OUTCOME"));
        for e in h.events.iter().rev() {
            let from = e.from.map(|f| f.to_string()).unwrap_or_else(|| "-".into());
            let mut detail = e.message.clone();
            if let (Some(sw), true) = (e.switch_us, detail.is_empty()) {
                detail = format!("health {} ms, switch {} µs, drain {} ms", e.health_ms.unwrap_or(0), sw, e.drain_ms.unwrap_or(0));
            }
            out.push_str(&format!(
                "{:<19}  {:<9} {:<5} {:<4} {:<24} {}\n",
                timefmt::local(e.at),
                format!("{:?}", e.kind).to_lowercase(),
                from,
                e.to,
                e.outcome,
                detail.lines().next().unwrap_or("")
            ));
        }
    }
    out
}

/// The daemon's answer with an RFC 3339 (UTC) twin of every unix-seconds time field
/// (`at` -> `at_time`, `created_at` -> `created_at_time`, ...), so scripts need no
/// conversion; the seconds stay for those that compute with them.
fn with_times(mut data: serde_json::Value) -> serde_json::Value {
    fn add(obj: &mut serde_json::Value, fields: &[&str]) {
        let Some(map) = obj.as_object_mut() else { return };
        for f in fields {
            if let Some(secs) = map.get(*f).and_then(serde_json::Value::as_u64) {
                map.insert(format!("{f}_time"), serde_json::Value::String(timefmt::rfc3339_utc(secs)));
            }
        }
    }
    for key in ["releases", "events"] {
        if let Some(list) = data.get_mut(key).and_then(serde_json::Value::as_array_mut) {
            for item in list {
                add(item, &["at", "created_at", "activated_at", "stopped_at"]);
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_gets_rfc3339_twins_and_the_table_local_times() {
        let data = serde_json::json!({
            "service": "web", "active": 1,
            "releases": [{"number": 1, "image": "i", "container": "c", "status": "active", "created_at": 0, "activated_at": null, "stopped_at": null}],
            "events": [{"at": 1_796_009_535u64, "kind": "deploy", "from": null, "to": 1, "outcome": "switched"}]
        });
        let v = with_times(data.clone());
        assert_eq!(v["events"][0]["at_time"], "2026-11-30T03:32:15Z");
        assert_eq!(v["events"][0]["at"], 1_796_009_535u64, "the seconds stay");
        assert_eq!(v["releases"][0]["created_at_time"], "1970-01-01T00:00:00Z");
        let h: HistoryView = serde_json::from_value(data).unwrap();
        let t = table(&h);
        let row = t.lines().last().unwrap();
        assert!(row.starts_with(&timefmt::local(1_796_009_535)), "{row}");
        assert!(row.contains(" -     1    switched"), "the first release has no FROM: {row}");
        assert!(!t.contains("-->"), "{t}");
    }
}
