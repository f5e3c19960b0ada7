//! `cutover run`: supervise a socket-activation server (see `handoff::supervisor`).

use std::str::FromStr;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

use super::{Exit, Failure};
use crate::cli::RunArgs;
use crate::handoff::listeners::ListenSpec;
use crate::handoff::probe::Probe;
use crate::handoff::supervisor::{Supervisor, SupervisorConfig, SupervisorError, Triggers};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = config(args)?;
    let supervisor = Supervisor::new(config).map_err(|e| match e {
        SupervisorError::InvalidName(_) => Failure::new(Exit::Invalid, e.to_string()),
        e => Failure::new(Exit::Refused, e.to_string()),
    })?;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Failure::new(Exit::Refused, format!("cannot watch SIGHUP: {e}")))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            if reload_tx.send(()).await.is_err() {
                return;
            }
        }
    });
    let mut term = signal(SignalKind::terminate()).map_err(|e| Failure::new(Exit::Refused, format!("cannot watch SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Failure::new(Exit::Refused, format!("cannot watch SIGINT: {e}")))?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    };
    supervisor
        .run(Triggers { reload: reload_rx, shutdown })
        .await
        .map_err(|e| Failure::new(Exit::Refused, e.to_string()).into())
}

fn config(args: RunArgs) -> Result<SupervisorConfig, Failure> {
    let invalid = |m: String| Failure::new(Exit::Invalid, m);
    let single = args.listen.len() == 1;
    let listen = args
        .listen
        .iter()
        .enumerate()
        .map(|(i, l)| ListenSpec::parse(l, &if single { args.name.clone() } else { format!("{}-{i}", args.name) }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("--listen {e}")))?;
    let stop_signal = parse_signal(&args.stop_signal).map_err(invalid)?;
    Ok(SupervisorConfig {
        name: args.name,
        listen,
        command: args.command,
        ready_timeout: args.ready_timeout,
        drain_timeout: args.drain_timeout,
        stop_signal,
        ready_delay: args.ready_delay,
        health: args.health.as_deref().map(Probe::parse).transpose().map_err(|e| invalid(format!("--health {e}")))?,
        watch: args.watch,
        restart_limit: args.restart_limit,
        restart_window: args.restart_window,
        run_dir: args.run_dir,
    })
}

fn parse_signal(s: &str) -> Result<Signal, String> {
    let upper = s.to_ascii_uppercase();
    let named = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    Signal::from_str(&named)
        .or_else(|_| s.parse::<i32>().map_err(|_| ()).and_then(|n| Signal::try_from(n).map_err(|_| ())))
        .map_err(|_| format!("--stop-signal `{s}` is not a signal; write e.g. SIGTERM, QUIT or 15"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_in_every_spelling() {
        assert_eq!(parse_signal("SIGTERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("quit"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("15"), Ok(Signal::SIGTERM));
        assert!(parse_signal("SIGNOPE").is_err());
    }
}
