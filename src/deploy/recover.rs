//! Recovery: after a daemon restart (`reconcile`: finish or undo an interrupted
//! operation, re-program the rules) and after the engine came back (`refresh`, called by
//! `watch`). Must not start new releases.

use super::*;

impl Releaser {
    /// After a restart: rebuild the rules from state (one atomic transaction, so
    /// traffic never notices), finish or undo an interrupted operation, and re-assert
    /// the host settings.
    pub async fn reconcile(&self) -> Result<Vec<String>, ReleaseError> {
        // Services the state does not know but whose containers run: adopted, not wiped.
        let adopted = self.adopt().await?;
        let mut notes = adopted.notes;
        for c in &adopted.unaccounted {
            notes.push(format!("container {c} of this instance belongs to no service the state knows; left as it is"));
        }
        // Handoff-mode services are restored (brokers, interrupted operations) there.
        notes.extend(self.handoff_reconcile().await?);
        let state = self.snapshot().await;
        for (name, svc) in &state.services {
            if Mode::of(&svc.manifest) == Mode::Handoff {
                continue; // handoff mode: done by handoff_reconcile
            }
            // Re-read addresses: they change when the engine restarts containers.
            for number in svc.active.into_iter().chain(svc.operation.as_ref().map(|o| o.to)) {
                let Some(rel) = svc.release(number) else { continue };
                match self.engine.inspect(ServiceState::container_ref(rel), rel.manifest.network.clone()).await? {
                    Some(mut info) => {
                        if !info.running && Some(number) == svc.active {
                            self.engine.start(rel.container_id.clone()).await?;
                            notes.push(format!("{name}: started release {number}'s container again"));
                            // A start hands out the address anew.
                            info = match self.engine.inspect(ServiceState::container_ref(rel), rel.manifest.network.clone()).await? {
                                Some(i) => i,
                                None => continue,
                            };
                        }
                        let addr = info.addr;
                        if addr.is_some() && addr != rel.addr {
                            let n = name.clone();
                            self.commit(move |s| {
                                if let Some(r) = s.services.get_mut(&n).and_then(|svc| svc.release_mut(number)) {
                                    r.addr = addr;
                                }
                            })
                            .await?;
                        }
                    }
                    None => notes.push(format!("{name}: the container of release {number} is gone")),
                }
            }
        }
        // Interrupted operations.
        let state = self.snapshot().await;
        for (name, svc) in &state.services {
            let Some(op) = svc.operation.clone() else { continue };
            if Mode::of(&svc.manifest) == Mode::Handoff {
                continue; // handoff mode: done by handoff_reconcile
            }
            let note = self.recover(name, svc, &op).await?;
            notes.push(note);
        }
        let state = self.snapshot().await;
        self.dataplane.lock().await.applied = None;
        let desired = self.desired(&state, None).await?;
        if state.services.values().any(|s| Mode::of(&s.manifest) == Mode::Nat) {
            self.program(&desired).await?;
        } else if adopted.unaccounted.is_empty() {
            // Nothing to forward: leave no empty table behind.
            self.firewall.delete_table(&self.settings.table)?;
        } else {
            // Its rules may be what serves those containers' clients.
            notes.push(format!(
                "table {} is left as it is while containers of this instance that the state does not account for exist; \
                 restore the state file from a backup, or remove those containers once nobody needs them",
                self.settings.table
            ));
        }
        self.assert_host(&state, &desired).await?;
        // Adopted releases that run but do not serve, now that the rules point elsewhere.
        for (id, timeout) in adopted.to_stop {
            if let Err(e) = self.engine.stop(id.clone(), timeout).await {
                notes.push(format!("cannot stop the adopted container {id}, which does not serve: {e}"));
            }
        }
        for e in self.remove_leftovers().await {
            notes.push(format!("a removed service's container is still there: {e}"));
        }
        Ok(notes)
    }

    /// After the engine came back (or a container of ours restarted): re-read the
    /// addresses of the active releases, stop kept releases the engine restarted, and
    /// re-assert the rules and host settings. Safe while an operation runs: it programs
    /// what the recorded state says.
    pub async fn refresh(&self) -> Result<(), ReleaseError> {
        let _ = self.remove_leftovers().await;
        let state = self.snapshot().await;
        let mut addrs = Vec::new();
        let mut serving_v6 = Vec::new();
        for (name, svc) in &state.services {
            for rel in &svc.releases {
                let network = rel.manifest.network.clone();
                if matches!(rel.status, ReleaseStatus::Failed | ReleaseStatus::Removed) {
                    // Removing it may have failed while the engine was away.
                    if !rel.container_id.is_empty() {
                        self.engine.remove(rel.container_id.clone()).await?;
                    }
                    continue;
                }
                let Some(info) = self.engine.inspect(ServiceState::container_ref(rel), network).await? else { continue };
                let serving = Some(rel.number) == svc.active || svc.operation.as_ref().is_some_and(|o| o.to == rel.number || o.from == Some(rel.number));
                if rel.status == ReleaseStatus::Stopped && info.running && !serving {
                    tracing::warn!(service = %name, release = rel.number, "a kept release was started by the engine; stopping it");
                    self.engine.stop(rel.container_id.clone(), rel.manifest.stop_timeout).await?;
                }
                if info.addr.is_some() && info.addr != rel.addr {
                    addrs.push((name.clone(), rel.number, info.addr));
                }
                if Some(rel.number) == svc.active && info.running && info.addr6.is_some() && Mode::of(&svc.manifest) == Mode::Nat {
                    serving_v6.push((name.clone(), rel.number, info, rel.manifest.health.deadline));
                }
            }
        }
        if !addrs.is_empty() {
            tracing::info!(changed = addrs.len(), "release addresses changed; updating the rules");
            // The rules must follow the new addresses even when the file cannot be written.
            self.remember("the releases' new addresses", move |s| {
                for (name, number, addr) in addrs {
                    if let Some(r) = s.services.get_mut(&name).and_then(|svc| svc.release_mut(number)) {
                        r.addr = addr;
                    }
                }
            })
            .await;
        }
        {
            let _switching = self.switching.lock().await;
            let state = self.snapshot().await;
            let desired = self.desired(&state, None).await?;
            self.program(&desired).await?;
            self.assert_host(&state, &desired).await?;
        }
        for (name, number, info, deadline) in serving_v6 {
            self.ipv6_back(&name, number, &info, deadline).await;
        }
        Ok(())
    }

    /// After the engine started an active release again (a crash, an engine restart), its
    /// IPv6 address and the bridge's may be in duplicate address detection for a second
    /// or two, during which IPv6 clients are not answered. Wait for that path (within the
    /// release's health deadline, at most 10 s), and say when it is back; an address that
    /// failed detection will never carry IPv6 traffic: logged as an error.
    async fn ipv6_back(&self, service: &str, release: u32, info: &ContainerInfo, deadline: Duration) {
        const LONGEST: Duration = Duration::from_secs(10);
        let started = Instant::now();
        let until = crate::manifest::instant_after(started, deadline.min(LONGEST));
        let mut waited_for = None;
        loop {
            match self.ipv6_unready(info).await {
                Ok(None) => {
                    if let Some(what) = waited_for {
                        tracing::info!(service, release, waited_ms = ms(started.elapsed()), "release {release} answers over IPv6 again (waited for {what})");
                    }
                    return;
                }
                Ok(Some(what)) => {
                    if Instant::now() >= until {
                        tracing::warn!(service, release, "release {release} is not reachable over IPv6 yet: waiting for {what}");
                        return;
                    }
                    waited_for = Some(what);
                }
                Err(why) => {
                    // IPv4 still serves (the health watch says so), so this is no DOWN: an
                    // error for the operator, who has to free the address (see troubleshooting.md).
                    tracing::error!(service, release, "release {release} cannot be reached over IPv6: {why}");
                    return;
                }
            }
            tokio::time::sleep(super::health_wait::IPV6_POLL).await;
        }
    }

    /// Finish (after the switch) or undo (before it) an interrupted operation. Either
    /// way the state is recorded first, then the rules are pointed where it says, and
    /// only then is a container stopped or removed: never the one the kernel serves.
    pub(super) async fn recover(&self, name: &str, svc: &ServiceState, op: &Operation) -> Result<String, ReleaseError> {
        let to = svc.release(op.to).cloned();
        let from = op.from.and_then(|n| svc.release(n)).cloned();
        // `switching`: the transaction may or may not have run. The release is finished
        // when its container runs (it may be serving already), undone otherwise.
        let finish = match op.phase {
            Phase::Starting | Phase::Healthy => false,
            Phase::Switching => match &to {
                Some(r) => self.engine.inspect(ServiceState::container_ref(r), r.manifest.network.clone()).await?.is_some_and(|i| i.running),
                None => false,
            },
            Phase::Switched | Phase::Draining | Phase::Stopped => true,
        };
        let name2 = name.to_string();
        let op2 = op.clone();
        if !finish {
            // Undo: the old release keeps serving.
            self.commit(move |s| {
                if let Some(svc) = s.services.get_mut(&name2) {
                    if let Some(r) = svc.release_mut(op2.to) {
                        r.status = match op2.kind {
                            OperationKind::Deploy => ReleaseStatus::Failed,
                            OperationKind::Rollback => ReleaseStatus::Stopped,
                        };
                    }
                    svc.operation = None;
                    svc.record(HistoryEntry::untimed(op2.kind, op2.from, op2.to, "undone", "the daemon stopped before the switch; undone at restart"));
                }
            })
            .await?;
            self.repoint_from_state().await?;
            if let Some(to) = &to {
                match op.kind {
                    OperationKind::Deploy => self.engine.remove(ServiceState::container_ref(to)).await?,
                    OperationKind::Rollback => self.engine.stop(ServiceState::container_ref(to), to.manifest.stop_timeout).await?,
                }
            }
            self.observe(|m| m.release(name, op.kind, "undone")); // metrics hook
            Ok(format!("{name}: undid the interrupted {:?} to release {} (it had not been switched)", op.kind, op.to))
        } else {
            self.commit(move |s| {
                if let Some(svc) = s.services.get_mut(&name2) {
                    svc.active = Some(op2.to);
                    if let Some(r) = svc.release_mut(op2.to) {
                        r.status = ReleaseStatus::Active;
                    }
                    if let Some(r) = op2.from.and_then(|f| svc.release_mut(f)) {
                        r.status = ReleaseStatus::Stopped;
                        r.stopped_at = Some(now());
                    }
                    svc.operation = None;
                    svc.record(HistoryEntry::untimed(op2.kind, op2.from, op2.to, "finished_after_restart", "the daemon stopped after the switch; finished at restart"));
                }
            })
            .await?;
            self.repoint_from_state().await?;
            if let Some(to) = &to {
                self.engine.keep_running(to.container_id.clone()).await?;
            }
            if let Some(from) = &from {
                self.engine.stop(from.container_id.clone(), from.manifest.stop_timeout).await?;
            }
            self.observe(|m| m.release(name, op.kind, "finished_after_restart")); // metrics hook
            Ok(format!("{name}: finished the interrupted {:?} to release {}", op.kind, op.to))
        }
    }

    /// Point the host ports where the recorded state says (one transaction), before a
    /// recovery stops or removes a container the kernel may still send traffic to.
    async fn repoint_from_state(&self) -> Result<(), ReleaseError> {
        let state = self.snapshot().await;
        if !state.services.values().any(|s| Mode::of(&s.manifest) == Mode::Nat) {
            return Ok(());
        }
        let desired = self.desired(&state, None).await?;
        self.program(&desired).await?;
        Ok(())
    }
}
