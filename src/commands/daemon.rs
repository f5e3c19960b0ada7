//! `cutover daemon`: open state, connect to the engine, rebuild the rules from state,
//! then serve the control socket until SIGTERM/SIGINT. Stopping the daemon leaves the
//! rules in place: the data plane is the kernel's.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::DaemonArgs;
use crate::commands::{Exit, Failure};
use crate::daemon::Access;
use crate::deploy::{Effects, Releaser, Settings};
use crate::handoff::notify::notify_service_manager;
use crate::docker::DockerEngine;
use crate::state::StateStore;

/// nftables and label-safe names.
fn valid_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub async fn run(socket: PathBuf, args: DaemonArgs) -> anyhow::Result<()> {
    if !valid_identifier(&args.table) {
        return Err(Failure::new(Exit::Invalid, format!("--table `{}`: use letters, digits, '_' and '-'", args.table)).into());
    }
    let instance = args.instance.clone().unwrap_or_else(|| args.table.clone());
    if !valid_identifier(&instance) {
        return Err(Failure::new(Exit::Invalid, format!("--instance `{instance}`: use letters, digits, '_' and '-'")).into());
    }
    prepare_socket_path(&socket).await?;
    let store = StateStore::open(&args.state_dir)?;
    let engine = DockerEngine::connect(&args.docker).await?;
    check_docker_firewall(&args)?;
    let firewall = crate::nat::firewall(args.backend);
    tracing::info!(backend = %args.backend, "data plane");
    let settings = Settings { table: args.table.clone(), mark: args.mark, instance, drain_poll: Duration::from_millis(250), pause_at: args.pause_at };
    // Handoff-mode services: brokers in their namespaces, handoff-exec under <state-dir>/bin.
    let brokers = Arc::new(crate::handoff::brokers::DaemonBrokers::new(&args.state_dir));
    let mut releaser = Releaser::new(Arc::new(engine), firewall, Effects::real(), settings, store)?.with_handoff(brokers);
    // Bound before READY, so a taken address fails the start instead of going unnoticed.
    let metrics = match args.metrics {
        Some(addr) => {
            let listener = crate::metrics::bind(addr).await?;
            let metrics = Arc::new(crate::metrics::Metrics::new());
            releaser = releaser.with_metrics(metrics.clone());
            Some((listener, metrics))
        }
        None => None,
    };
    let releaser = Arc::new(releaser);
    notify_service_manager("STATUS=restoring rules from state");
    let notes = releaser.reconcile().await.context("restoring the rules from state")?;
    for n in notes {
        tracing::warn!("{n}");
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // Root only, or root and the one group the operator named (each request's peer
    // credentials are checked again in `daemon::serve`).
    let mode = if let Some(gid) = args.allow_group {
        nix::unistd::chown(&socket, None, Some(nix::unistd::Gid::from_raw(gid)))
            .with_context(|| format!("cannot give group {gid} access to {}", socket.display()))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {} to {mode:o}", socket.display()))?;
    let services = releaser.snapshot().await.services.len();
    tracing::info!(socket = %socket.display(), table = %args.table, services, "cutover daemon ready");
    notify_service_manager(&format!("READY=1\nSTATUS=serving {services} services\nMAINPID={}", std::process::id()));

    // Dropping `stop_metrics` stops the metrics server.
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some((listener, metrics)) = metrics {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics on /metrics");
        let source = releaser.clone();
        let scrape = move || {
            let source = source.clone();
            async move {
                let mut scrape = crate::metrics::Scrape::of_state(&source.snapshot().await);
                match source.traffic().await {
                    Ok(traffic) => scrape.traffic = traffic,
                    // The scrape still answers; the counter series are left out of it.
                    Err(e) => tracing::warn!(error = %e, "cannot read the traffic counters for a scrape"),
                }
                scrape
            }
        };
        tokio::spawn(crate::metrics::serve(listener, metrics, scrape, async move {
            let _ = metrics_stopped.await;
        }));
    }
    let watcher = releaser.clone();
    tokio::spawn(async move { watcher.watch_engine().await });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    crate::daemon::serve(listener, releaser, Access { allow_gid: args.allow_group }, shutdown).await;
    drop(stop_metrics);
    notify_service_manager("STOPPING=1");
    tracing::info!("cutover daemon stopping; the rules stay in place");
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Refuse an engine set-up in which cutover's forwarded traffic would be dropped (Docker
/// 29's nftables backend without a matching `bridge-accept-fwmark`).
fn check_docker_firewall(args: &DaemonArgs) -> anyhow::Result<()> {
    use crate::nat::{docker_fw, docker_user};
    let refused = |e: crate::nat::NatError| Failure::new(Exit::Refused, e.to_string());
    let facts = docker_fw::Facts::of_host(Path::new(docker_user::DEFAULT_IPTABLES), Path::new(docker_fw::DAEMON_JSON))
        .map_err(refused)?;
    let mode = docker_fw::detect(&facts).map_err(refused)?;
    let accept = docker_fw::forward_accept(&mode, &args.table, args.mark).map_err(refused)?;
    tracing::info!(?mode, ?accept, "Docker firewall");
    Ok(())
}

/// Refuse to start over a live daemon; remove a stale socket file.
async fn prepare_socket_path(socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Err(Failure::new(
                Exit::Refused,
                format!("another cutover daemon is serving {}; stop it first", socket.display()),
            )
            .into());
        }
        std::fs::remove_file(socket).with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    Ok(())
}
