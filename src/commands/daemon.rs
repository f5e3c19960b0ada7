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
use crate::daemon::{table_lock, Access};
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
    // Before anything that could touch a rule: a second daemon on this table would
    // program it from another state and delete the first one's rules.
    let table_lock = table_lock::acquire(Path::new(table_lock::LOCK_DIR), &args.table, &args.state_dir)
        .map_err(|e| Failure::new(Exit::Refused, e.to_string()))?;
    tracing::debug!(lock = %table_lock.path().display(), table = %args.table, "table claimed");
    prepare_socket_path(&socket).await?;
    let store = StateStore::open(&args.state_dir)?;
    let engine = DockerEngine::connect(&args.docker).await?;
    let firewall_mode = check_docker_firewall(&args)?;
    match engine.facts().await {
        Ok(f) => tracing::info!(
            engine = %f.product,
            version = %f.version,
            api = %f.api_version,
            negotiated_api = %f.negotiated,
            firewall = firewall_mode.name(),
            endpoint = %args.docker,
            "container engine"
        ),
        Err(e) => tracing::warn!(error = %e, firewall = firewall_mode.name(), "container engine (its version is unknown)"),
    }
    let firewall = crate::nat::firewall(args.backend);
    tracing::info!(backend = %args.backend, "data plane");
    let settings = Settings { table: args.table.clone(), mark: args.mark, instance, drain_poll: Duration::from_millis(250), pause_at: args.pause_at, pause_for: args.pause_for };
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
    reassert_route_localnet(&releaser, &args.table).await;
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
    // Held to the very end: the rules stay, and so does this daemon's claim until it exits.
    drop(table_lock);
    Ok(())
}

/// Refuse an engine set-up in which cutover's forwarded traffic would be dropped (Docker
/// 29's nftables backend without a matching `bridge-accept-fwmark`); the engine's
/// firewall otherwise.
fn check_docker_firewall(args: &DaemonArgs) -> anyhow::Result<crate::nat::docker_fw::DockerFirewall> {
    use crate::nat::{docker_fw, docker_user};
    let refused = |e: crate::nat::NatError| Failure::new(Exit::Refused, e.to_string());
    let facts = docker_fw::Facts::of_host(Path::new(docker_user::DEFAULT_IPTABLES), &args.docker_config).map_err(refused)?;
    let mode = docker_fw::detect(&facts).map_err(refused)?;
    let accept = docker_fw::forward_accept(&mode, &args.table, args.mark).map_err(refused)?;
    if let Some(why) = docker_fw::ipv6_warning(&facts) {
        tracing::warn!("{why}");
    }
    tracing::info!(?mode, ?accept, "Docker firewall");
    Ok(mode)
}

/// Daemon start: `route_localnet` back on for every bridge this daemon's services use
/// (it may have been switched off while the daemon was down): the bridges its state
/// recorded, and those it holds a marker for in [`crate::localnet`]. No marker is made
/// here: markers are made and released by the release code, so that none outlives the
/// service that needed it. A failure is logged, not fatal: only host clients on
/// 127.0.0.1 depend on it.
async fn reassert_route_localnet(releaser: &crate::deploy::Releaser, table: &str) {
    let bridges: Vec<(String, bool)> = releaser.snapshot().await.route_localnet_before.into_iter().collect();
    let table = table.to_string();
    let done = tokio::task::spawn_blocking(move || {
        let localnet = crate::localnet::Localnet::default();
        let mut done = Vec::new();
        for (ifname, _before) in bridges {
            match crate::host::set_route_localnet(&ifname, true) {
                Ok(_) => done.push(ifname),
                Err(e) => tracing::warn!(bridge = %ifname, error = %e, "cannot turn route_localnet back on; host clients on 127.0.0.1 may not reach the release"),
            }
        }
        match localnet.reassert(&table) {
            Ok(held) => done.extend(held.into_iter().filter(|b| !done.contains(b)).collect::<Vec<_>>()),
            Err(e) => tracing::warn!(error = %e, "cannot re-assert route_localnet from its markers"),
        }
        done
    })
    .await
    .unwrap_or_default();
    if !done.is_empty() {
        tracing::info!(bridges = ?done, "route_localnet re-asserted");
    }
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
