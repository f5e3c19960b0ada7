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
        if let (Some(total), Some(start)) = (o.total_ms, o.start_ms) {
            let own = total.saturating_sub(start).saturating_sub(o.health_ms.unwrap_or(0)).saturating_sub(o.drain_ms.unwrap_or(0));
            parts.push(format!("{total} ms in all, {own} ms of it cutover's own"));
        }
        let detail = if parts.is_empty() { String::new() } else { format!(" ({})", parts.join(", ")) };
        println!("{}: {}{} {}{}", o.service, from, if o.to == 0 { "-".to_string() } else { format!("release {}", o.to) }, o.outcome, detail);
    }
    Ok(())
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
