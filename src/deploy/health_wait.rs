//! The health gate before a switch: probes (or Docker's HEALTHCHECK) until the
//! deadline, then the IPv6 path of the release (see `dad`).

use super::*;

/// How often the IPv6 path of an otherwise healthy release is read again: duplicate
/// address detection ends at a moment the health interval knows nothing about.
pub(super) const IPV6_POLL: Duration = Duration::from_millis(50);

impl Releaser {
    /// Until the new release is healthy (Err: why it is not, by the deadline or for good).
    pub(super) async fn wait_healthy(&self, inflight: &Inflight<'_>, progress: &ProgressTx) -> Result<(), String> {
        let Inflight { service, to: release, manifest, ref info, .. } = *inflight;
        let health = &manifest.health;
        let started = Instant::now();
        let deadline = crate::manifest::instant_after(started, health.deadline);
        let mut healthy = false;
        loop {
            let current = self.still_running(info, manifest).await?;
            if current.restarts > info.restarts {
                return Err(format!("its container crashed (exit code {}) and was restarted", current.exit_code.unwrap_or(-1)));
            }
            let verdict = match health.kind {
                HealthKind::None => Ok(()),
                HealthKind::Docker => match current.health.as_deref() {
                    Some("healthy") => Ok(()),
                    Some(s) => Err(format!("Docker reports it {s}")),
                    None => return Err("health type `docker` but the image has no HEALTHCHECK".into()),
                },
                // Passed once: only the IPv6 path is left to wait for, polled faster than
                // the health endpoint should be.
                _ if healthy => Ok(()),
                HealthKind::Http | HealthKind::Tcp => {
                    let addr = current.addr.ok_or_else(|| "it has no IPv4 address on its network".to_string())?;
                    let port = manifest.health_port().ok_or_else(|| "no port to check; set health.port".to_string())?;
                    self.effects.probe.probe(health.clone(), (addr, port).into()).await.map_err(|e| e.to_string())
                }
            };
            // Healthy over IPv4 is not enough for IPv6 clients: the switch would send them
            // to an address the kernel still drops packets for.
            let (last, waiting, pause) = match verdict {
                Err(e) => (e, "health", health.interval),
                Ok(()) => {
                    healthy = true;
                    match self.ipv6_unready(&current).await? {
                        None => return Ok(()),
                        Some(what) => (what, "IPv6", health.interval.min(IPV6_POLL)),
                    }
                }
            };
            let now_ = Instant::now();
            if now_ >= deadline {
                return Err(format!("not healthy within {}: {last}", crate::manifest::format_duration(health.deadline)));
            }
            let _ = progress.send(Progress {
                service: service.to_string(),
                release,
                step: "health",
                message: format!("waiting for {waiting}: {last}"),
                elapsed_ms: Some(ms(now_ - started)),
                limit_ms: Some(ms(health.deadline)),
                connections: None,
            });
            tokio::time::sleep(pause.min(deadline - now_)).await;
        }
    }

    /// The new release's container as the engine sees it now (both modes' readiness
    /// gates); Err with the reason to refuse it when it is gone or has exited.
    pub(super) async fn still_running(&self, info: &ContainerInfo, manifest: &Manifest) -> Result<ContainerInfo, String> {
        let current = self
            .engine
            .inspect(info.id.clone(), manifest.network.clone())
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "its container disappeared".to_string())?;
        if !current.running {
            return Err(format!("its container exited with code {}", current.exit_code.unwrap_or(-1)));
        }
        Ok(current)
    }

    /// What keeps IPv6 traffic from a release with an IPv6 address (`Ok(None)`: nothing,
    /// or it has no IPv6 address). Err when it never will (an address failed duplicate
    /// address detection).
    pub(super) async fn ipv6_unready(&self, current: &ContainerInfo) -> Result<Option<String>, String> {
        let Some(addr6) = current.addr6 else { return Ok(None) };
        let Some(pid) = current.pid else { return Ok(Some(format!("the container's process (to read the state of {addr6})"))) };
        match self.effects.ipv6.readiness(pid, addr6).await {
            Ok(Ipv6Readiness::Usable) => Ok(None),
            Ok(Ipv6Readiness::Waiting(what)) => Ok(Some(what)),
            Ok(Ipv6Readiness::Failed(why)) => Err(why),
            // Unreadable flags are no reason to refuse a release that answers: its process
            // may just have restarted. Keep waiting, within the deadline, naming the error.
            Err(e) => Ok(Some(format!("reading the state of {addr6}: {e}"))),
        }
    }
}
