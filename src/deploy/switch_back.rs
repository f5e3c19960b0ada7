//! Switching back to the old release when the new one failed after the switch: one
//! transaction back, the failed release's half-open flows forgotten, the release removed.
//! Only reached from `drain`, while the old release still runs; must not stop it.

use super::*;

impl Releaser {
    /// The new release failed while the old one was still running: point the host
    /// ports back at the old release, remove the new one, and report it.
    pub(super) async fn switch_back(
        &self,
        release: &Inflight<'_>,
        old: &Release,
        reason: &str,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        let Inflight { service, kind, to, info: ref new, .. } = *release;
        tracing::error!(service, release = to, reason, "the new release failed after the switch; switching back");
        self.observe(|m| m.release(service, kind, "reverted")); // metrics hook
        let switch_guard = self.switching.lock().await;
        let state = self.snapshot().await;
        let desired = self.desired(&state, Some((service, old.number))).await?;
        self.program(&desired).await?;
        // Connections NAT'd to the dead release whose handshake has not completed would
        // keep retrying it: forget them, so their retransmitted SYNs reach the old one.
        let addrs = new.addr.map(IpAddr::V4).into_iter().chain(new.addr6.map(IpAddr::V6));
        for addr in addrs {
            for p in &old.manifest.ports {
                if let Err(e) = self.effects.host.forget_flows(p.protocol, p.host, addr) {
                    tracing::warn!(service, error = %e, "could not delete the failed release's flows");
                }
            }
        }
        self.effects.relay.forget_udp(service, to);
        self.emit(progress, service, old.number, "reverted", format!(
            "release {to} failed after the switch ({reason}); traffic is back on release {}", old.number
        ));
        let logs = self.engine.logs_tail(new.id.clone(), 20).await.unwrap_or_default();
        let s = service.to_string();
        let (from, reason_s) = (old.number, reason.to_string());
        // The kernel changed: kept in memory even when the file cannot be written (a
        // restart from the file finds the new release not running and undoes it too).
        self.remember(&format!("the switch of `{service}` back to release {from}"), move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.active = Some(from);
                if let Some(r) = svc.release_mut(from) {
                    r.status = ReleaseStatus::Active;
                }
                if let Some(r) = svc.release_mut(to) {
                    r.status = match kind {
                        OperationKind::Deploy => ReleaseStatus::Failed,
                        OperationKind::Rollback => ReleaseStatus::Stopped,
                    };
                }
                if kind == OperationKind::Deploy {
                    svc.manifest.image = svc.release(from).map(|r| r.image.clone()).unwrap_or_default();
                }
                svc.operation = None;
                svc.record(HistoryEntry::untimed(kind, Some(from), to, "reverted", format!("failed after the switch: {reason_s}; switched back automatically")));
            }
        })
        .await;
        drop(switch_guard);
        let undo = match kind {
            OperationKind::Deploy => self.engine.remove(new.id.clone()).await,
            OperationKind::Rollback => self.engine.stop(new.id.clone(), Duration::from_secs(1)).await,
        };
        if let Err(e) = undo {
            tracing::warn!(service, error = %e, "removing the failed release");
        }
        Err(ReleaseError::Unhealthy {
            service: service.to_string(),
            release: to,
            reason: format!("{reason} after the switch; traffic is back on release {}", old.number),
            logs,
        })
    }
}
