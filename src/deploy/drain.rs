//! Drain and watch: count what the old release still serves while watching the new
//! one (pidfd exit, engine events, health), so a failure can still switch back.

use super::*;

impl Releaser {
    /// Wait until the old release holds no connection (or its drain timeout passes),
    /// keeping it running at least `watch` long; meanwhile watch the new release. Err
    /// with the reason if the new release exits or fails its health check while the old
    /// one can still take the traffic back.
    pub(super) async fn drain_and_watch(&self, release: &Inflight<'_>, old: &Release, progress: &ProgressTx) -> Result<(), String> {
        let Inflight { service, to, manifest, info: ref new, .. } = *release;
        let timeout = old.manifest.drain_timeout;
        let watch = manifest.watch;
        let started = Instant::now();
        let pid = match self.engine.inspect(old.container_id.clone(), old.manifest.network.clone()).await {
            Ok(Some(info)) => info.pid,
            _ => None,
        };
        let ports: Vec<u16> =
            old.manifest.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.container).collect();
        // UDP never closes: the old release still serves a UDP flow until it has been idle
        // for `udp_idle`; then (or at the drain timeout) the caller deletes its entries.
        let udp_ports: Vec<u16> =
            old.manifest.ports.iter().filter(|p| p.protocol == Protocol::Udp).map(|p| p.host).collect();
        // Both families: an IPv6 flow holds the old release as long as an IPv4 one.
        // `None`: its flows cannot be found, so only the drain timeout ends the drain.
        let udp_addrs = if udp_ports.is_empty() {
            Some(Vec::new())
        } else {
            self.flow_addrs(old).await.inspect_err(|e| {
                tracing::warn!(service, error = %e, "cannot read the old release's addresses; waiting out the drain timeout");
            }).ok()
        };
        let mut next_probe = Instant::now();
        // The engine's events tell of a crash within milliseconds; polling alone would
        // leave clients on a dead release for up to a poll interval.
        let mut events = self.engine.events(self.settings.instance.clone());
        let mut exit = new.pid.and_then(|pid| self.effects.host.watch_exit(pid).ok());
        loop {
            // The new release first: a failure here is worth more than a drain count.
            if let Some(reason) = self.new_release_failed(manifest, new, &mut next_probe).await {
                return Err(reason);
            }
            let tcp_open = match pid {
                // No TCP port: an empty list would count every connection of the release.
                _ if ports.is_empty() => 0,
                None => self.effects.relay.open_to(service, old.number),
                // The `::1` relay's connections to it: sock_diag sees the connected ones
                // too, so the larger count, not the sum; the relay's also covers those
                // still connecting.
                Some(pid) => match self.effects.connections.open_connections(pid, ports.clone()).await {
                    Ok(n) => n.max(self.effects.relay.open_to(service, old.number)),
                    Err(e) => {
                        tracing::warn!(service, error = %e, "cannot count the old release's connections; waiting out the drain timeout");
                        usize::MAX
                    }
                },
            };
            let mut udp_busy = if udp_addrs.is_some() { 0 } else { usize::MAX };
            for (port, addr) in udp_ports.iter().flat_map(|p| udp_addrs.iter().flatten().map(move |a| (*p, *a))) {
                // A flow quiet for `udp_idle` is finished: its entry goes now, so its next
                // datagram (or a client reusing its source port) reaches the new release.
                let busy = match self.effects.host.drain_udp_flows(port, addr, old.manifest.udp_idle) {
                    Ok(crate::host::UdpDrain { busy, deleted }) => {
                        match deleted {
                            Ok(0) => {}
                            Ok(n) => tracing::debug!(service, port, flows = n, "quiet UDP flows moved to the new release"),
                            Err(e) => tracing::warn!(service, error = %e, "cannot delete the old release's quiet UDP flows"),
                        }
                        busy
                    }
                    Err(e) => {
                        tracing::warn!(service, error = %e, "cannot read the old release's UDP flows; waiting out the drain timeout");
                        usize::MAX
                    }
                };
                udp_busy = udp_busy.saturating_add(busy);
            }
            if !udp_ports.is_empty() {
                // The `::1` relay's flows to it: the same rule, in the daemon's own table.
                udp_busy = udp_busy.saturating_add(self.effects.relay.drain_udp(service, old.number, old.manifest.udp_idle));
            }
            let open = tcp_open.saturating_add(udp_busy);
            self.observe(|m| m.draining(service, old.number, (open != usize::MAX).then_some(open))); // metrics hook
            let elapsed = started.elapsed();
            let _ = progress.send(Progress {
                service: service.to_string(),
                release: to,
                step: "drain",
                message: drain_message(old.number, tcp_open, udp_busy),
                elapsed_ms: Some(ms(elapsed)),
                limit_ms: Some(ms(timeout)),
                connections: (open != usize::MAX).then_some(open),
            });
            if (open == 0 && elapsed >= watch) || elapsed >= timeout.max(watch) {
                return Ok(());
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.drain_poll) => {}
                () = async {
                    match exit.as_mut() {
                        Some(w) => w.exited().await,
                        None => std::future::pending().await,
                    }
                } => {
                    return Err("its main process exited".to_string());
                }
                event = futures_util::StreamExt::next(&mut events) => {
                    if let Some(Ok((id, action))) = event {
                        if id == new.id && matches!(action.as_str(), "die" | "oom" | "kill") {
                            next_probe = Instant::now();
                        }
                    } else {
                        // The stream ended (engine restarting): fall back to polling.
                        events = Box::pin(futures_util::stream::pending());
                    }
                }
            }
        }
    }

    /// Has the just-switched-to release died or become unhealthy?
    pub(super) async fn new_release_failed(&self, manifest: &Manifest, new: &ContainerInfo, next_probe: &mut Instant) -> Option<String> {
        let current = match self.engine.inspect(new.id.clone(), manifest.network.clone()).await {
            Ok(Some(c)) => c,
            Ok(None) => return Some("its container disappeared".into()),
            // The engine may be restarting: not a verdict on the release.
            Err(_) => return None,
        };
        if !current.running {
            return Some(format!("its container exited with code {}", current.exit_code.unwrap_or(-1)));
        }
        if current.restarts > new.restarts {
            return Some(format!("its container crashed (exit code {}) and was restarted", current.exit_code.unwrap_or(-1)));
        }
        if Instant::now() < *next_probe {
            return None;
        }
        *next_probe = crate::manifest::instant_after(Instant::now(), manifest.health.interval);
        let health = &manifest.health;
        match health.kind {
            HealthKind::None => None,
            HealthKind::Docker => (current.health.as_deref() == Some("unhealthy")).then(|| "Docker reports it unhealthy".to_string()),
            HealthKind::Http | HealthKind::Tcp => {
                let (Some(addr), Some(port)) = (current.addr, manifest.health_port()) else { return None };
                self.effects.probe.probe(health.clone(), (addr, port).into()).await.err().map(|e| e.to_string())
            }
        }
    }
}

/// The drain's progress line: TCP connections and UDP flows named as what they are.
fn drain_message(release: u32, tcp_open: usize, udp_busy: usize) -> String {
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let parts: Vec<String> = [
        (tcp_open != usize::MAX && tcp_open > 0).then(|| plural(tcp_open, "connection", "connections")),
        (udp_busy != usize::MAX && udp_busy > 0).then(|| plural(udp_busy, "busy UDP flow", "busy UDP flows")),
    ]
    .into_iter()
    .flatten()
    .collect();
    match (tcp_open == usize::MAX || udp_busy == usize::MAX, parts.is_empty()) {
        (true, _) => format!("draining release {release}"),
        (false, true) => format!("draining release {release}: nothing left"),
        (false, false) => format!("draining release {release}: {} left", parts.join(" and ")),
    }
}

#[cfg(test)]
mod message_tests {
    use super::drain_message;

    #[test]
    fn connections_and_flows_are_named_apart() {
        assert_eq!(drain_message(1, 3, 0), "draining release 1: 3 connections left");
        assert_eq!(drain_message(1, 0, 1), "draining release 1: 1 busy UDP flow left");
        assert_eq!(drain_message(2, 1, 2), "draining release 2: 1 connection and 2 busy UDP flows left");
        assert_eq!(drain_message(2, 0, 0), "draining release 2: nothing left");
        assert_eq!(drain_message(2, usize::MAX, 0), "draining release 2");
    }
}
