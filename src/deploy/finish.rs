//! The two ends of an operation: `finish_release` after a switch (keep the old release,
//! prune, record) and `abandon` for a release never switched to (undo it, record why).

use super::*;

impl Releaser {
    /// The old release has stopped (both modes): let the engine restart the new one from
    /// now on, keep the old one for rollback, prune beyond `keep`, close the operation
    /// and record it in the history.
    /// The record is kept in memory when the file cannot be written (see `remember`).
    pub(super) async fn finish_release(&self, release: &Inflight<'_>, timings: Timings) {
        let Inflight { service, kind, from, to, ref info, .. } = *release;
        let Timings { health_ms, switch_us, drain_ms } = timings;
        // Established: from now on the engine restarts it after a crash or a reboot.
        if let Err(e) = self.engine.keep_running(info.id.clone()).await {
            tracing::warn!(service, error = %e, "cannot set the new release's restart policy");
        }
        let s = service.to_string();
        let pruned = self
            .remember(&format!("the end of release {to} of `{service}`"), move |st| {
                let Some(svc) = st.services.get_mut(&s) else { return Vec::new() };
                if let Some(r) = from.and_then(|f| svc.release_mut(f)) {
                    r.status = ReleaseStatus::Stopped;
                    r.stopped_at = Some(now());
                }
                let mut ids = Vec::new();
                for n in svc.beyond_keep(from) {
                    if let Some(r) = svc.release_mut(n) {
                        r.status = ReleaseStatus::Removed;
                        ids.push(r.container_id.clone());
                    }
                }
                svc.operation = None;
                svc.down = None;
                svc.record(HistoryEntry {
                    at: now(),
                    kind,
                    from,
                    to,
                    outcome: "switched".into(),
                    message: String::new(),
                    health_ms,
                    switch_us,
                    drain_ms,
                });
                ids
            })
            .await;
        for id in pruned {
            if let Err(e) = self.engine.remove(id).await {
                tracing::warn!(service, error = %e, "pruning an old release failed");
            }
        }
    }

    /// Undo a release that never got switched to: remove (deploy) or stop (rollback) its
    /// container, record why. The rules do not point at it (never did, or a failed
    /// transaction left them as they were).
    pub(super) async fn abandon(
        &self,
        service: &str,
        to: u32,
        kind: OperationKind,
        from: Option<u32>,
        outcome: &str,
        reason: &str,
    ) {
        self.observe(|m| m.release(service, kind, outcome)); // metrics hook: refused / failed
        let svc = self.snapshot().await.services.get(service).cloned();
        if let Some(rel) = svc.as_ref().and_then(|s| s.release(to)) {
            let id = ServiceState::container_ref(rel);
            let undone = match kind {
                OperationKind::Deploy => self.engine.remove(id).await,
                OperationKind::Rollback => self.engine.stop(id, rel.manifest.stop_timeout).await,
            };
            if let Err(e) = undone {
                tracing::warn!(service, error = %e, "undoing the refused release");
            }
        }
        let s = service.to_string();
        let (outcome, reason) = (outcome.to_string(), reason.to_string());
        // Kept in memory when the file cannot be written: the file then still says the
        // release is under way before its switch, which a restart undoes the same way.
        self.remember(&format!("that release {to} of `{service}` was undone"), move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                if let Some(r) = svc.release_mut(to) {
                    r.status = match kind {
                        OperationKind::Deploy => ReleaseStatus::Failed,
                        OperationKind::Rollback => ReleaseStatus::Stopped,
                    };
                }
                svc.operation = None;
                svc.record(HistoryEntry::untimed(kind, from, to, &outcome, reason));
            }
        })
        .await;
    }
}
