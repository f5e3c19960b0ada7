//! The cutover of a started release: health gate, one-transaction switch, drain of
//! the old release, stop, finish; and recording the switch (both modes).

use super::*;

impl Releaser {
    /// Take the traffic over to a started release, the way its mode does it.
    pub(super) async fn cut_over(&self, release: Inflight<'_>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        match Mode::of(release.manifest) {
            Mode::Nat => self.nat_cut_over(release, progress).await,
            Mode::Handoff => self.handoff_cut_over(release, progress).await, // see handoff_mode
        }
    }

    /// Health gate, switch, drain, stop, prune, record.
    async fn nat_cut_over(&self, release: Inflight<'_>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let Inflight { service, kind, from, to, manifest, ref info } = release;
        let health_started = Instant::now();
        if let Err(reason) = self.wait_healthy(&release, progress).await {
            let logs = self.engine.logs_tail(info.id.clone(), 20).await.unwrap_or_default();
            self.abandon(service, to, kind, from, "refused", &reason).await;
            return Err(ReleaseError::Unhealthy { service: service.into(), release: to, reason, logs });
        }
        let health_ms = ms(health_started.elapsed());
        self.observe(|m| m.health_wait(service, Duration::from_millis(health_ms))); // metrics hook
        self.record_or_undo(&release, Phase::Healthy).await?;
        self.emit(progress, service, to, "healthy", format!("release {to} is healthy after {health_ms} ms"));

        // The switch: recorded as begun before the transaction (a restart then knows to
        // look), one transaction, recorded as done before anyone else programs.
        let switch_guard = self.switching.lock().await;
        self.record_or_undo(&release, Phase::Switching).await?;
        let state = self.snapshot().await;
        let desired = self.desired(&state, Some((service, to))).await?;
        let switched = match self.program(&desired).await {
            Ok(t) => t,
            Err(e) => {
                self.abandon(service, to, kind, from, "failed", &e.to_string()).await;
                return Err(e);
            }
        };
        if let Err(e) = self.assert_host(&self.snapshot().await, &desired).await {
            tracing::warn!(service, error = %e, "host settings");
        }
        let switch_us = u64::try_from(switched.as_micros()).unwrap_or(u64::MAX);
        // Test hook: the kernel points at the new release, the file still says `switching`.
        self.checkpoint(service, Phase::Switching).await;
        self.record_switched(service, from, to).await;
        drop(switch_guard);
        self.observe(|m| m.switched(service, switched)); // metrics hook
        self.emit(progress, service, to, "switched", format!("host ports now point at release {to} (switch took {switch_us} µs)"));
        self.checkpoint(service, Phase::Switched).await;

        // Drain and stop the old release.
        let mut drain_ms = None;
        let mut stop_ms = None;
        if let Some(old) = from.and_then(|f| state.services.get(service).and_then(|svc| svc.release(f)).cloned()) {
            self.note_phase(service, Phase::Draining).await;
            let started = Instant::now();
            if let Err(reason) = self.drain_and_watch(&release, &old, progress).await {
                return self.switch_back(&release, &old, &reason, progress).await;
            }
            drain_ms = Some(ms(started.elapsed()));
            self.observe(|m| m.drained(service, started.elapsed())); // metrics hook
            if manifest.ports.iter().any(|p| p.protocol == Protocol::Udp) {
                let addrs = self.flow_addrs(&old).await.unwrap_or_else(|e| {
                    // An IPv6 flow left bound to the old release loses its datagrams until
                    // its entry goes (expiry, or the engine's cleanup once it stopped).
                    tracing::warn!(service, error = %e, "cannot read the old release's IPv6 address; deleting its IPv4 UDP flows only");
                    old.addr.map(IpAddr::V4).into_iter().collect()
                });
                for p in manifest.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
                    for addr in &addrs {
                        if let Err(e) = self.effects.host.forget_flows(Protocol::Udp, p.host, *addr) {
                            tracing::warn!(service, error = %e, "could not delete old UDP flows");
                        }
                    }
                }
                self.effects.relay.forget_udp(service, old.number);
            }
            self.emit(progress, service, old.number, "stop", format!("stopping release {} ({})", old.number, old.manifest.stop_signal));
            let stopping = Instant::now();
            if let Err(e) = self.engine.stop(old.container_id.clone(), old.manifest.stop_timeout).await {
                tracing::warn!(service, error = %e, "stopping the old release failed");
            }
            stop_ms = Some(ms(stopping.elapsed()));
            self.note_phase(service, Phase::Stopped).await;
        }

        let timings = Timings { health_ms: Some(health_ms), switch_us: Some(switch_us), drain_ms };
        self.finish_release(&release, timings).await;
        self.observe(|m| m.release(service, kind, "switched")); // metrics hook
        self.warn_if_unsaved(progress, service, to);
        self.emit(progress, service, to, "done", format!("release {to} of {service} is live"));
        Ok(Outcome {
            service: service.to_string(),
            from,
            to,
            outcome: "switched".into(),
            health_ms: Some(health_ms),
            switch_us: Some(switch_us),
            drain_ms,
            stop_ms,
            ..Default::default()
        })
    }

    /// The switch is in effect (both modes): `to` serves, `from` drains. Kept in memory
    /// even when the file cannot be written (the kernel changed: the state must say so);
    /// the file then says `switching`, from which a restart finishes the release too.
    pub(super) async fn record_switched(&self, service: &str, from: Option<u32>, to: u32) {
        let s = service.to_string();
        self.remember(&format!("the switch of `{service}` to release {to}"), move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.active = Some(to);
                if let Some(r) = svc.release_mut(to) {
                    r.status = ReleaseStatus::Active;
                    r.activated_at = Some(now());
                }
                if let Some(r) = from.and_then(|f| svc.release_mut(f)) {
                    r.status = ReleaseStatus::Draining;
                }
                if let Some(op) = svc.operation.as_mut() {
                    op.phase = Phase::Switched;
                }
            }
        })
        .await;
    }

    /// Record a step before the switch; when that fails, undo the release (the kernel
    /// has not changed) and say why.
    pub(super) async fn record_or_undo(&self, release: &Inflight<'_>, phase: Phase) -> Result<(), ReleaseError> {
        let Inflight { service, kind, from, to, .. } = *release;
        match self.set_phase(service, phase).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.undo_unrecorded(service, to, kind, from, e).await),
        }
    }

    /// A record before the switch failed: undo the release, and the error to return.
    pub(super) async fn undo_unrecorded(
        &self,
        service: &str,
        to: u32,
        kind: OperationKind,
        from: Option<u32>,
        e: ReleaseError,
    ) -> ReleaseError {
        self.abandon(service, to, kind, from, "failed", &format!("could not be recorded: {e}")).await;
        match e {
            ReleaseError::State(source) => ReleaseError::NotRecorded { service: service.into(), release: to, source },
            other => other,
        }
    }
}
