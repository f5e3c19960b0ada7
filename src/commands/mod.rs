//! One file per subcommand. Orchestration only: each reads its arguments, talks to the
//! daemon (or runs the supervisor), prints, and returns a [`Failure`] whose exit code
//! `main` turns into the process status.

pub mod apply;
pub mod completions;
pub mod compose;
pub mod daemon;
pub mod demo;
pub mod demo_image;
pub mod deploy;
pub mod history;
pub mod plan;
pub mod reload;
pub mod remove;
pub mod rollback;
pub mod run;
pub mod status;

use std::io::Write;

use crate::cli::{Cli, Command};
/// The subcommands' failures and their exit codes live below both commands and client.
pub use crate::exit::{Exit, Failure};

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket;
    match cli.command {
        Command::Daemon(args) => daemon::run(socket, args).await,
        Command::Apply(args) => apply::run(&socket, args).await,
        Command::Deploy(args) => deploy::run(&socket, args).await,
        Command::Rollback(args) => rollback::run(&socket, args).await,
        Command::Status(args) => status::run(&socket, args).await,
        Command::History(args) => history::run(&socket, args).await,
        Command::Remove(args) => remove::run(&socket, args).await,
        Command::Plan(args) => plan::run(args),
        Command::Run(args) => run::run(args).await,
        Command::Reload(args) => reload::run(args).await,
        Command::DemoImage(args) => demo_image::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Completions(args) => completions::run(args),
    }
}

/// Print what deploy/rollback/apply did: a line per service, or JSON. An answer that is
/// not one or more outcomes is an error, not an empty print.
pub fn print_outcomes(data: &serde_json::Value, json: bool) -> Result<(), Failure> {
    if json {
        println!("{data}");
        return Ok(());
    }
    let list: Vec<crate::deploy::Outcome> = match data {
        serde_json::Value::Array(_) => serde_json::from_value(data.clone()),
        _ => serde_json::from_value(data.clone()).map(|o| vec![o]),
    }
    .map_err(|e| Failure::new(Exit::Refused, format!("unexpected answer from the daemon: {e}")))?;
    for o in list {
        let from = o.from.map(|f| format!("release {f} -> ")).unwrap_or_default();
        let mut parts = Vec::new();
        if let Some(h) = o.health_ms {
            parts.push(format!("healthy after {h} ms"));
        }
        if let Some(s) = o.switch_us {
            parts.push(format!("switch {s} µs"));
        }
        if let Some(d) = o.drain_ms {
            parts.push(format!("drained in {d} ms"));
        }
        if let Some(s) = o.stop_ms {
            parts.push(format!("old release stopped in {s} ms"));
        }
        if let (Some(total), Some(start)) = (o.total_ms, o.start_ms) {
            parts.push(format!("{total} ms in all, {} ms of it cutover's own", own_ms(&o, total, start)));
        }
        let detail = if parts.is_empty() { String::new() } else { format!(" ({})", parts.join(", ")) };
        println!("{}: {}{} {}{}", o.service, from, if o.to == 0 { "-".to_string() } else { format!("release {}", o.to) }, o.outcome, detail);
    }
    Ok(())
}

/// cutover's own part of an operation's `total` ms: what is left after starting the
/// container (`start`), the health wait, the drain and the engine's stop wait (a server
/// that ignores its stop signal costs `stop_timeout` there, which is not cutover's).
fn own_ms(o: &crate::deploy::Outcome, total: u64, start: u64) -> u64 {
    total
        .saturating_sub(start)
        .saturating_sub(o.health_ms.unwrap_or(0))
        .saturating_sub(o.drain_ms.unwrap_or(0))
        .saturating_sub(o.stop_ms.unwrap_or(0))
}

/// Print `text` on stdout. A reader that went away (`cutover history web | head`) ends
/// the output quietly instead of a panic: that is what it asked for.
pub fn print_text(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::new(Exit::Refused, format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// With `--json`, a failure is also printed as JSON on stdout (`{"error": {"exit": 2,
/// "message": "..."}}`), so a script reading stdout gets JSON either way; the exit code
/// and the message on stderr are the same as without `--json`.
pub fn json_failure(json: bool, failure: Failure) -> Failure {
    if json {
        let v = serde_json::json!({ "error": { "exit": failure.exit as u8, "message": failure.message } });
        let _ = print_text(&format!("{v}\n"));
    }
    failure
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_engines_stop_wait_is_not_cutovers_own_time() {
        let o = crate::deploy::Outcome {
            health_ms: Some(100),
            drain_ms: Some(200),
            stop_ms: Some(10_000),
            start_ms: Some(300),
            total_ms: Some(10_650),
            ..Default::default()
        };
        assert_eq!(super::own_ms(&o, 10_650, 300), 50);
    }
}
