//! Watching the engine and the active releases while no operation runs.
//!
//! `watch_engine` follows the engine's container events (refresh when the engine or a
//! container of ours comes back), its network events, and probes the active release of
//! every NAT service with its manifest's health check. An active release is lost when
//! it dies, is killed (by a signal or for memory), is removed, is disconnected from its
//! network while it runs, or fails `health.failures` checks in a row. A loss is always
//! logged, shown in `status` (DOWN) and counted in the metrics, and then handled as the
//! manifest's `on_failure` says: `restart` it, `rollback` to the newest kept release, or
//! `none`. DOWN clears when the release serves again (a handled loss, or a check that
//! passes again).
//!
//! Never acts on a service while an operation is in flight (the operation watches its own
//! releases), and never starts a new release.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::docker::NetworkEvent;

/// The watch never probes an active release more often than this, whatever
/// `health.interval` says (the health gate of a new release may poll faster).
pub(super) const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The longest the watch waits for one check's answer (a longer `health.timeout` is cut
/// to it), so that one service's hanging check cannot stall the others' for long.
const MAX_PROBE_WAIT: Duration = Duration::from_secs(30);
/// How often the health watch looks for checks that are due.
const PROBE_TICK: Duration = Duration::from_millis(250);

/// How an active release was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Loss {
    /// Its main process exited.
    Died { exit_code: Option<i64> },
    /// Killed by the kernel for lack of memory.
    Oom,
    /// Killed by a signal (`docker kill`, `docker stop`).
    Killed,
    /// Its container was removed.
    Removed,
    /// Still running, but no longer on its network: nothing reaches it.
    Disconnected { network: String },
    /// Still running, but it failed `failures` health checks in a row.
    Unhealthy { failures: u32, last: String },
}

impl Loss {
    /// The `reason` label of `cutover_active_lost_total` (see `metrics::LOSS_REASONS`).
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Loss::Died { .. } => "died",
            Loss::Oom => "oom",
            Loss::Killed => "killed",
            Loss::Removed => "removed",
            Loss::Disconnected { .. } => "disconnected",
            Loss::Unhealthy { .. } => "unhealthy",
        }
    }

    /// What happened to release `number`, as `status` and the log say it.
    fn describe(&self, number: u32) -> String {
        match self {
            Loss::Died { exit_code: Some(code) } => format!("release {number} died (exit code {code})"),
            Loss::Died { exit_code: None } => format!("release {number} died"),
            Loss::Oom => format!("release {number} died (killed for lack of memory)"),
            Loss::Killed => format!("release {number} died (killed by a signal)"),
            Loss::Removed => format!("release {number} was removed"),
            Loss::Disconnected { network } => format!("release {number} was disconnected from network {network}"),
            Loss::Unhealthy { failures, last } => format!("release {number} failed {failures} health checks in a row: {last}"),
        }
    }
}

/// What one check of an active release found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Pass,
    Fail(String),
    /// Nothing to check with (no address, a check type the events cover already).
    Unknown,
}

/// The health watch of one service's active release.
#[derive(Debug, Clone)]
struct ProbeTrack {
    release: u32,
    /// Checks failed in a row.
    failures: u32,
    next: Instant,
}

/// What the watch remembers between events and checks, shared by the event loop and the
/// health loop (held only between awaits).
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// The last `kill` or `oom` event of a container, for the `die` that follows it.
    signalled: HashMap<String, Loss>,
    /// Services whose loss is being handled (`on_failure` runs).
    handling: HashSet<String>,
    probes: HashMap<String, ProbeTrack>,
}

impl Watch {
    fn lock(cell: &StdMutex<Watch>) -> std::sync::MutexGuard<'_, Watch> {
        // Plain bookkeeping, valid after any partial update.
        cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Marks a service's loss as being handled for the guard's lifetime.
struct Handling<'a> {
    watch: &'a StdMutex<Watch>,
    service: String,
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        Watch::lock(self.watch).handling.remove(&self.service);
    }
}

impl Releaser {
    /// Follow the engine and the active releases until the daemon stops: the engine's
    /// container and network events, and the active releases' health checks.
    pub async fn watch_engine(&self) {
        let watch = StdMutex::new(Watch::default());
        tokio::join!(self.watch_events(&watch), self.watch_health(&watch));
    }

    /// Refresh on our containers' lifecycle events and whenever the event stream comes
    /// back after the engine went away; notice active releases that die, are removed or
    /// lose their network.
    async fn watch_events(&self, watch: &StdMutex<Watch>) {
        use futures_util::StreamExt;
        let mut was_down = false;
        loop {
            let mut events = self.engine.events(self.settings.instance.clone());
            let mut networks = self.engine.network_events();
            if was_down {
                tracing::info!("the Docker engine is back; re-asserting releases and rules");
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "refresh after the engine came back");
                }
            }
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok((id, action))) if matches!(action.as_str(), "start" | "restart" | "unpause") => {
                            Watch::lock(watch).signalled.remove(&id);
                            if let Err(e) = self.refresh().await {
                                tracing::warn!(error = %e, "refresh after a container event");
                            }
                        }
                        Some(Ok((id, action))) if matches!(action.as_str(), "die" | "oom" | "kill" | "destroy") => {
                            let loss = {
                                let mut w = Watch::lock(watch);
                                match action.as_str() {
                                    "kill" => {
                                        w.signalled.entry(id.clone()).or_insert(Loss::Killed);
                                        Loss::Killed
                                    }
                                    "oom" => {
                                        w.signalled.insert(id.clone(), Loss::Oom);
                                        Loss::Oom
                                    }
                                    "die" => w.signalled.remove(&id).unwrap_or(Loss::Died { exit_code: None }),
                                    _ => {
                                        w.signalled.remove(&id);
                                        Loss::Removed
                                    }
                                }
                            };
                            self.active_lost(&id, loss, watch).await;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "lost the Docker engine's event stream");
                            break;
                        }
                        None => break,
                    },
                    event = networks.next() => match event {
                        Some(Ok(event)) => self.network_event(&event, watch).await,
                        // Subscribed again a second later; when the engine is away the
                        // container events say so and both are subscribed anew.
                        other => {
                            if let Some(Err(e)) = other {
                                tracing::debug!(error = %e, "the engine's network events ended; subscribing again");
                            }
                            let again = futures_util::stream::once(tokio::time::sleep(Duration::from_secs(1)))
                                .flat_map(move |()| self.engine.network_events());
                            networks = Box::pin(again);
                        }
                    },
                }
            }
            was_down = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A container joined or left a network. An active release that leaves its network
    /// while it runs is lost (stopping or dying containers leave their networks too: those
    /// are the container events' to report). One that joins it again gets its new address
    /// into the rules; its DOWN clears once its health check passes.
    pub(super) async fn network_event(&self, event: &NetworkEvent, watch: &StdMutex<Watch>) {
        let state = self.snapshot().await;
        let found = state.services.values().find_map(|svc| {
            let rel = svc.active_release()?;
            (Mode::of(&svc.manifest) == Mode::Nat && rel.container_id == event.container && event.is_on(&rel.manifest.network))
                .then(|| rel.clone())
        });
        let Some(rel) = found else { return };
        if event.connected {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "refresh after a release joined its network");
            }
            return;
        }
        self.active_lost(&rel.container_id, Loss::Disconnected { network: rel.manifest.network.clone() }, watch).await;
    }

    /// Something that may mean the active release of a service is lost: when container
    /// `id` is the active release of a NAT service with no operation in flight, not known
    /// to be down already, and the engine confirms it (not running; or running but off its
    /// network for a disconnect), handle the loss.
    pub(super) async fn active_lost(&self, id: &str, mut loss: Loss, watch: &StdMutex<Watch>) {
        let state = self.snapshot().await;
        let found = state.services.iter().find_map(|(name, svc)| {
            let rel = svc.active_release()?;
            (Mode::of(&svc.manifest) == Mode::Nat && svc.operation.is_none() && rel.container_id == id)
                .then(|| (name.clone(), svc.down.is_some(), rel.clone()))
        });
        let Some((service, down, rel)) = found else { return };
        if down || Watch::lock(watch).handling.contains(&service) {
            return;
        }
        let info = self.engine.inspect(rel.container_id.clone(), rel.manifest.network.clone()).await;
        match (&mut loss, info) {
            (Loss::Disconnected { network }, Ok(Some(info))) => {
                // Off its network only if it still runs and the engine no longer has it there.
                let on = self.engine.connected(rel.container_id.clone(), network.clone()).await;
                if !info.running || !matches!(on, Ok(Some(false))) {
                    return;
                }
            }
            (Loss::Disconnected { .. }, _) => return,
            // Failed checks count against a release the engine says runs at the address
            // they probed, or that is gone or dead (then as that); one the engine restarted
            // elsewhere (it came back) needs the rules to follow it; and while the engine
            // does not answer nothing is known. Counted afresh in the last two cases.
            (Loss::Unhealthy { .. }, Ok(Some(info))) if info.running && (info.addr.is_none() || info.addr == rel.addr) => {}
            (Loss::Unhealthy { .. }, Ok(Some(info))) if info.running => {
                tracing::info!(service = %service, release = rel.number, "the active release has a new address; updating the rules");
                if let Some(t) = Watch::lock(watch).probes.get_mut(&service) {
                    t.failures = 0;
                }
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "refresh after the active release moved");
                }
                return;
            }
            // Gone or dead with no event to say so (it happened while the daemon was not
            // running): the failed checks found it.
            (Loss::Unhealthy { .. }, Ok(None)) => loss = Loss::Removed,
            (Loss::Unhealthy { .. }, Ok(Some(info))) if !info.running => loss = Loss::Died { exit_code: info.exit_code },
            (Loss::Unhealthy { .. }, Err(_)) => {
                if let Some(t) = Watch::lock(watch).probes.get_mut(&service) {
                    t.failures = 0;
                }
                return;
            }
            (Loss::Unhealthy { .. }, _) => return,
            // `kill` with a signal the release survives, or a late event of a restarted one.
            (_, Ok(Some(info))) if info.running => return,
            (Loss::Died { exit_code }, Ok(Some(info))) => *exit_code = info.exit_code,
            (_, Ok(None)) => loss = Loss::Removed,
            _ => {}
        }
        self.lose(&service, &rel, loss, watch).await;
    }

    /// Handle the loss of `rel`, the active release of `service`: log it, record it as
    /// DOWN, count it, and do what `on_failure` says.
    async fn lose(&self, service: &str, rel: &Release, loss: Loss, watch: &StdMutex<Watch>) {
        {
            let mut w = Watch::lock(watch);
            if !w.handling.insert(service.to_string()) {
                return;
            }
            w.probes.remove(service);
        }
        let _handling = Handling { watch, service: service.to_string() };
        let policy = self.snapshot().await.services.get(service).map_or(OnFailure::None, |s| s.manifest.on_failure);
        let reason = loss.describe(rel.number);
        tracing::warn!(service, release = rel.number, reason = loss.reason(), ?policy, "the active release is down: {reason}");
        self.observe(|m| m.active_lost(service, loss.reason())); // metrics hook
        let (s, r) = (service.to_string(), reason.clone());
        if let Err(e) = self
            .commit(move |st| {
                if let Some(svc) = st.services.get_mut(&s) {
                    svc.down = Some(r);
                }
            })
            .await
        {
            tracing::warn!(service, error = %e, "cannot record that the active release is down");
        }
        let id = rel.container_id.clone();
        let recovered = match (policy, &loss) {
            (OnFailure::None, _) => {
                tracing::info!(service, "on_failure is none: the service stays down until a release serves again");
                return;
            }
            (OnFailure::Restart, Loss::Disconnected { network }) => {
                match self.engine.connect_network(id, network.clone(), rel.manifest.network_aliases.clone()).await {
                    Ok(()) => self.refresh().await.map(|()| format!("connected release {} to network {network} again", rel.number)),
                    Err(e) => Err(e.into()),
                }
            }
            // A release that runs but fails its checks is not restarted: under overload (a
            // full accept queue, slow answers) a restart would turn slow clients into
            // failed ones. It is reported; `on_failure: rollback` switches to the kept one.
            (OnFailure::Restart, Loss::Unhealthy { .. }) => {
                tracing::info!(
                    service,
                    "on_failure is restart, which restarts releases that died, not one that runs and fails its checks; \
                     it stays down until its checks pass (on_failure: rollback switches to the kept release instead)"
                );
                return;
            }
            (OnFailure::Restart, loss) if *loss != Loss::Removed => match self.engine.start(id).await {
                Ok(()) => self.refresh().await.map(|()| format!("restarted release {}", rel.number)),
                Err(e) => Err(e.into()),
            },
            (OnFailure::Restart | OnFailure::Rollback, _) => {
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                let rolled = self.rollback(service, None, &tx).await.map(|o| format!("rolled back to release {}", o.to));
                if let (Ok(_), Loss::Disconnected { network }) = (&rolled, &loss) {
                    // Kept for a later rollback: a kept release must be able to serve again.
                    if let Err(e) = self.engine.connect_network(id, network.clone(), rel.manifest.network_aliases.clone()).await {
                        tracing::warn!(service, release = rel.number, error = %e, "cannot connect the kept release to its network again");
                    }
                }
                rolled
            }
        };
        match recovered {
            Ok(what) => {
                tracing::info!(service, "{reason}: {what}");
                let s = service.to_string();
                if let Err(e) = self
                    .commit(move |st| {
                        if let Some(svc) = st.services.get_mut(&s) {
                            svc.down = None;
                        }
                    })
                    .await
                {
                    tracing::warn!(service, error = %e, "cannot record that the service serves again");
                }
            }
            Err(e) => tracing::warn!(service, error = %e, "{reason}; on_failure could not bring the service back"),
        }
    }

    /// Check the active releases every `health.interval` (at least [`MIN_PROBE_INTERVAL`]).
    async fn watch_health(&self, watch: &StdMutex<Watch>) {
        loop {
            self.probe_round(watch, Instant::now()).await;
            tokio::time::sleep(PROBE_TICK).await;
        }
    }

    /// One round of the health watch at `now`: check each active release that is due (at
    /// once, together), count failures in a row, and handle a release that reached
    /// `health.failures` as lost. A check that passes again clears DOWN.
    pub(super) async fn probe_round(&self, watch: &StdMutex<Watch>, now: Instant) {
        let state = self.snapshot().await;
        let due: Vec<(String, ServiceState, Release)> = {
            let mut w = Watch::lock(watch);
            w.probes.retain(|name, _| state.services.get(name).is_some_and(|s| s.active.is_some()));
            let busy = self.busy.lock().map(|b| b.clone()).unwrap_or_default();
            let mut due = Vec::new();
            for (name, svc) in &state.services {
                let Some(rel) = svc.active_release() else { continue };
                if Mode::of(&svc.manifest) != Mode::Nat || svc.operation.is_some() || busy.contains(name) || w.handling.contains(name) {
                    continue;
                }
                let track = w.probes.entry(name.clone()).or_insert(ProbeTrack { release: rel.number, failures: 0, next: now });
                if track.release != rel.number {
                    *track = ProbeTrack { release: rel.number, failures: 0, next: now };
                }
                if track.next > now {
                    continue;
                }
                track.next = now + svc.manifest.health.interval.max(MIN_PROBE_INTERVAL);
                due.push((name.clone(), svc.clone(), rel.clone()));
            }
            due
        };
        let verdicts = futures_util::future::join_all(due.iter().map(|(_, svc, rel)| self.check_active(svc, rel))).await;
        for ((service, svc, rel), verdict) in due.into_iter().zip(verdicts) {
            self.judge(&service, &svc, &rel, verdict, watch).await;
        }
    }

    /// Check the active release `rel` of `svc` once, as its health check says.
    async fn check_active(&self, svc: &ServiceState, rel: &Release) -> Verdict {
        let health = &svc.manifest.health;
        match health.kind {
            HealthKind::Http | HealthKind::Tcp => {
                let (Some(addr), Some(port)) = (rel.addr, svc.manifest.health_port()) else { return Verdict::Unknown };
                let wait = health.timeout.min(MAX_PROBE_WAIT);
                let mut spec = health.clone();
                spec.timeout = wait;
                match tokio::time::timeout(wait + Duration::from_millis(100), self.effects.probe.probe(spec, (addr, port).into())).await {
                    Ok(Ok(())) => Verdict::Pass,
                    Ok(Err(e)) => Verdict::Fail(e.to_string()),
                    Err(_) => Verdict::Fail(format!("no answer within {}", crate::manifest::format_duration(wait))),
                }
            }
            // A container gone or stopped is usually reported by its events first; these
            // catch what happened while the daemon was not running (no event then).
            HealthKind::Docker => match self.engine.inspect(rel.container_id.clone(), rel.manifest.network.clone()).await {
                Ok(None) => Verdict::Fail("its container is gone".into()),
                Ok(Some(info)) if !info.running => Verdict::Fail("its container is not running".into()),
                Ok(Some(info)) => match info.health.as_deref() {
                    Some("healthy") => Verdict::Pass,
                    Some("unhealthy") => Verdict::Fail("Docker reports it unhealthy".into()),
                    _ => Verdict::Unknown,
                },
                _ => Verdict::Unknown,
            },
            // Running and on its network is all there is to check; losing either is an
            // engine event.
            HealthKind::None => match self.engine.inspect(rel.container_id.clone(), rel.manifest.network.clone()).await {
                Ok(Some(info)) if info.running && info.addr.is_some() => Verdict::Pass,
                Ok(None) => Verdict::Fail("its container is gone".into()),
                Ok(Some(info)) if !info.running => Verdict::Fail("its container is not running".into()),
                _ => Verdict::Unknown,
            },
        }
    }

    /// Count `verdict` for `service`'s active release `rel`.
    async fn judge(&self, service: &str, svc: &ServiceState, rel: &Release, verdict: Verdict, watch: &StdMutex<Watch>) {
        let threshold = svc.manifest.health.failures.clamp(1, crate::manifest::MAX_HEALTH_FAILURES);
        match verdict {
            Verdict::Unknown => {}
            Verdict::Pass => {
                if let Some(t) = Watch::lock(watch).probes.get_mut(service) {
                    t.failures = 0;
                }
                if svc.down.is_some() && self.serves_again(rel).await {
                    let (s, n) = (service.to_string(), rel.number);
                    let cleared = self
                        .commit(move |st| match st.services.get_mut(&s) {
                            Some(svc) if svc.active == Some(n) && svc.down.is_some() => svc.down.take().is_some(),
                            _ => false,
                        })
                        .await;
                    match cleared {
                        Ok(true) => tracing::info!(service, release = rel.number, "the active release passes its health check again; no longer down"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(service, error = %e, "cannot record that the service serves again"),
                    }
                }
            }
            Verdict::Fail(why) => {
                let failures = {
                    let mut w = Watch::lock(watch);
                    let Some(t) = w.probes.get_mut(service) else { return };
                    t.failures = t.failures.saturating_add(1);
                    t.failures
                };
                if svc.down.is_some() {
                    return; // known already; it stays down until a check passes
                }
                if failures < threshold {
                    tracing::info!(service, release = rel.number, failures, of = threshold, "a health check of the active release failed: {why}");
                    return;
                }
                let loss = Loss::Unhealthy { failures, last: why };
                self.active_lost(&rel.container_id, loss, watch).await;
            }
        }
    }

    /// A release that passed a check while DOWN: is it really ours that answered (running,
    /// on its network), not another container that got its old address?
    async fn serves_again(&self, rel: &Release) -> bool {
        let running = matches!(
            self.engine.inspect(rel.container_id.clone(), rel.manifest.network.clone()).await,
            Ok(Some(info)) if info.running
        );
        running && matches!(self.engine.connected(rel.container_id.clone(), rel.manifest.network.clone()).await, Ok(Some(true)))
    }
}
