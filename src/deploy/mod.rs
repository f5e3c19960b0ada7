//! The release state machine: deploy, rollback, apply, remove and the restart-time
//! reconcile, over the [`Engine`] and [`Firewall`] traits and the narrow [`Effects`].
//!
//! This file holds the [`Releaser`], its public operations and the types they share; each
//! step of a release has a file of its own:
//! - `start`: record the intent, start the new release unpublished;
//! - `cut_over`: the [`Mode`] dispatch, then (NAT) health gate, switch, drain, stop;
//! - `health_wait`: the health gate and the IPv6 path (`dad`);
//! - `drain`: drain the old release while watching the new one;
//! - `switch_back`: back to the old release when the new one fails after the switch;
//! - `finish`: keep, prune and record a switched release, or undo a refused one;
//! - `dataplane`: desired state, programming the firewall, traffic, host settings, ports;
//! - `recover`: reconcile after a restart, refresh after the engine came back;
//! - `watch`: the engine's events and the active releases while no operation runs;
//! - `handoff_mode`: the same steps for services whose listeners are handed over.
//!
//! Owns the order of the steps and what is recorded before each (see `state::Phase`):
//! start the new release unpublished, gate on health (and on its IPv6 path being usable,
//! see `dad`), switch the host ports in one transaction, drain and stop the old release,
//! prune, record. Any failure before the switch undoes the new release and leaves the old
//! one and every rule untouched. Does not know how rules or containers are made: that is
//! `nat` and `docker`.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Mutex};

use crate::dad::{Ipv6Paths, Ipv6Readiness};
use crate::drain::Connections;
use crate::health::Probe;
use crate::host::{HostError, HostNet};
use crate::docker::{ContainerInfo, ContainerSpec, DockerError, Engine, LABEL_INSTANCE, LABEL_MANIFEST, LABEL_RELEASE, LABEL_SERVICE};
use crate::manifest::{HealthKind, Manifest, OnFailure, PortSpec, Protocol, PullPolicy};
use crate::nat::{Firewall, NatError};
use crate::plan::{self, Bridge, Desired, Ruleset, Target, Traffic};
use crate::state::{
    now, HistoryEntry, Operation, OperationKind, Phase, Release, ReleaseStatus, ServiceState, State, StateError,
    StateStore,
};
use dataplane::Dataplane;
pub use dataplane::targets_of;

/// Why a release operation did not happen. The old release still serves in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("service `{0}` is busy with another operation; wait for it to finish and try again")]
    Busy(String),
    #[error("no service `{0}` is registered (see `cutover status`)")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("release {release} of `{service}` is refused: {reason}{}", logs_suffix(.logs))]
    Unhealthy { service: String, release: u32, reason: String, logs: String },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Nat(#[from] NatError),
    #[error(transparent)]
    State(#[from] StateError),
    /// A step of a release could not be recorded before its effect, so the release was
    /// undone before the kernel changed.
    #[error(
        "release {release} of `{service}` was undone before the switch, nothing changed for clients: {source}; \
         free space on the state directory's file system (or fix its permissions), then run the release again"
    )]
    NotRecorded {
        service: String,
        release: u32,
        #[source]
        source: StateError,
    },
    #[error(transparent)]
    Handoff(#[from] crate::handoff::brokers::BrokersError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("cannot enable route_localnet on {ifname}: {source}")]
    RouteLocalnet {
        ifname: String,
        #[source]
        source: HostError,
    },
}

fn logs_suffix(logs: &str) -> String {
    if logs.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of its log ---\n{}", logs.trim_end())
    }
}

/// The OS effects a release needs besides the engine and the firewall, each behind its
/// own narrow trait with a typed error (the real ones: [`Effects::real`]).
#[derive(Clone)]
pub struct Effects {
    pub probe: Arc<dyn Probe>,
    pub connections: Arc<dyn Connections>,
    pub host: Arc<dyn HostNet>,
    pub ipv6: Arc<dyn Ipv6Paths>,
    /// IPv6 host clients on `::1`, which the kernel cannot NAT: the daemon relays them.
    pub relay: Arc<dyn crate::relay::Relay>,
}

impl Effects {
    /// The host's own: network probes, sock_diag, /proc and conntrack, address flags, the
    /// `::1` relay.
    pub fn real() -> Effects {
        Effects {
            probe: Arc::new(crate::health::NetworkProbe),
            connections: Arc::new(crate::drain::SockDiag),
            host: Arc::new(crate::host::RealHost::default()),
            ipv6: Arc::new(crate::dad::NetlinkAddresses),
            relay: Arc::new(crate::relay::LoopbackRelay::default()),
        }
    }
}

/// What the state machine reports while it works (sent to the CLI as progress).
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub service: String,
    pub release: u32,
    pub step: &'static str,
    pub message: String,
    /// (done, total) for bars: health wait in ms of the deadline, drain connections left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

pub type ProgressTx = mpsc::UnboundedSender<Progress>;

/// What a completed operation reports.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Outcome {
    pub service: String,
    pub from: Option<u32>,
    pub to: u32,
    pub outcome: String,
    pub health_ms: Option<u64>,
    pub switch_us: Option<u64>,
    pub drain_ms: Option<u64>,
    /// Creating and starting (deploy) or restarting (rollback) the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    /// The whole operation, as the daemon saw it. `total - start - health` is cutover's
    /// own cost of a release (plus the drain, when connections were open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// Stopping the old release: the engine's wait for it to exit after its stop signal
    /// (up to `stop_timeout` for a server that ignores the signal), not cutover's own time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_ms: Option<u64>,
    /// `remove --volumes`: the volumes deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_removed: Option<Vec<String>>,
}

/// Settings of the daemon that shape every release.
#[derive(Debug, Clone)]
pub struct Settings {
    pub table: String,
    pub mark: u32,
    pub instance: String,
    /// Poll interval of the drain watcher.
    pub drain_poll: Duration,
    /// Test hook: stop at this step of every release (as if the daemon hung there), so
    /// a test can kill the daemon at a known step.
    pub pause_at: Option<Phase>,
    /// With `pause_at`: go on after this long instead of hanging (a test changes the
    /// world at a known step, e.g. fills the state disk).
    pub pause_for: Option<Duration>,
}

/// How a service's releases take over its traffic, chosen by its manifest. Matched where
/// the two ways part (starting a release, cutting over to it); everywhere else a
/// service's mode is asked with [`Mode::of`], never read off the manifest's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Host ports switched by one NAT map transaction (`ports`).
    Nat,
    /// Listeners handed from one generation to the next in a shared namespace (`handoff`).
    Handoff,
}

impl Mode {
    pub fn of(manifest: &Manifest) -> Mode {
        if manifest.handoff.is_some() {
            Mode::Handoff
        } else {
            Mode::Nat
        }
    }

    /// As `status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Handoff => "handoff",
        }
    }
}

/// A release in flight, from its started container to the finish: what every step of a
/// cutover needs, passed as one value.
pub(super) struct Inflight<'a> {
    pub service: &'a str,
    pub kind: OperationKind,
    /// The release serving until the switch (none for a service's first release).
    pub from: Option<u32>,
    pub to: u32,
    /// The manifest the new release runs with.
    pub manifest: &'a Manifest,
    /// The new release's container as it was started.
    pub info: ContainerInfo,
}

/// What a finished release took, as recorded in its history entry.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Timings {
    pub health_ms: Option<u64>,
    pub switch_us: Option<u64>,
    pub drain_ms: Option<u64>,
}

/// The release engine of one daemon.
pub struct Releaser {
    engine: Arc<dyn Engine>,
    firewall: Arc<dyn Firewall>,
    effects: Effects,
    settings: Settings,
    store: StateStore,
    state: Mutex<State>,
    dataplane: Mutex<Dataplane>,
    /// Held from reading the state to recording a switch, so a refresh can never
    /// program a state that a concurrent switch has already moved past.
    switching: Mutex<()>,
    busy: StdMutex<HashSet<String>>,
    /// Brokers of handoff-mode services (see `handoff_mode`); None: such services are refused.
    handoff: Option<Arc<dyn crate::handoff::brokers::ServiceBrokers>>,
    /// metrics hook: where outcomes and timings are recorded (`--metrics`); None: nowhere.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Why the state file is behind the state in memory (see `remember`); None: it is not.
    unsaved: StdMutex<Option<String>>,
}

/// Marks a service busy for the lifetime of the guard.
pub struct BusyGuard<'a> {
    busy: &'a StdMutex<HashSet<String>>,
    service: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(&self.service);
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Releaser {
    pub fn new(
        engine: Arc<dyn Engine>,
        firewall: Arc<dyn Firewall>,
        effects: Effects,
        settings: Settings,
        store: StateStore,
    ) -> Result<Releaser, ReleaseError> {
        let state = store.load()?;
        Ok(Releaser {
            engine,
            firewall,
            effects,
            settings,
            store,
            state: Mutex::new(state),
            dataplane: Mutex::new(Dataplane::default()),
            switching: Mutex::new(()),
            busy: StdMutex::new(HashSet::new()),
            handoff: None,
            metrics: None, // metrics hook
            unsaved: StdMutex::new(None),
        })
    }

    /// metrics hook: record outcomes and timings into `metrics` (`daemon --metrics`).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Releaser {
        self.metrics = Some(metrics);
        self
    }

    /// metrics hook: a no-op when the daemon serves no metrics.
    fn observe(&self, record: impl FnOnce(&crate::metrics::Metrics)) {
        if let Some(m) = &self.metrics {
            record(m);
        }
    }

    /// A copy of the current state.
    pub async fn snapshot(&self) -> State {
        self.state.lock().await.clone()
    }

    /// Refuse a second operation on `service` while one runs.
    pub fn claim(&self, service: &str) -> Result<BusyGuard<'_>, ReleaseError> {
        let mut busy = self.busy.lock().map_err(|_| ReleaseError::Busy(service.to_string()))?;
        if !busy.insert(service.to_string()) {
            return Err(ReleaseError::Busy(service.to_string()));
        }
        Ok(BusyGuard { busy: &self.busy, service: service.to_string() })
    }

    /// Change the state in memory, and on disk when it can be written: for what happens
    /// after the effect it records, when the daemon goes on either way (an undo, the steps
    /// after the switch). A state file left behind is safe to restart from, since each
    /// step was recorded before its effect: the restart finishes or undoes the same way.
    /// The next write that succeeds catches the file up; the error is logged and shown at
    /// the end of the release (`warn_if_unsaved`).
    async fn remember<T>(&self, what: &str, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().await;
        let out = f(&mut state);
        state.forget_gone_releases();
        let saved = self.store.save(&state);
        self.note_saved(saved.as_ref().err());
        if let Err(e) = saved {
            tracing::error!(error = %e, "cannot record {what}; going on with it in memory (the file catches up at the next write)");
        }
        out
    }

    fn note_saved(&self, error: Option<&StateError>) {
        if let Ok(mut u) = self.unsaved.lock() {
            *u = error.map(ToString::to_string);
        }
    }

    /// Say so in the progress of a release when the state file fell behind during it.
    fn warn_if_unsaved(&self, progress: &ProgressTx, service: &str, release: u32) {
        let unsaved = self.unsaved.lock().ok().and_then(|u| u.clone());
        if let Some(e) = unsaved {
            self.emit(progress, service, release, "warning", format!(
                "the state file is behind ({e}): the release is done and the daemon knows it; free space on the state \
                 directory's file system and the next write catches the file up (a restart before that finishes this \
                 release again from the file)"
            ));
        }
    }

    /// Change the state and persist it before anything relies on the change.
    async fn commit<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, ReleaseError> {
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        let out = f(&mut next);
        next.forget_gone_releases();
        self.store.save(&next)?;
        self.note_saved(None);
        *state = next;
        Ok(out)
    }

    /// `apply`: register or update a service; deploy when what the container runs changed.
    pub async fn apply(&self, manifest: Manifest, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        self.apply_with(manifest, None, progress).await
    }

    /// [`Releaser::apply`], with the manifest's pull policy overridden for this release.
    pub async fn apply_with(&self, manifest: Manifest, pull: Option<PullPolicy>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(&manifest.name)?;
        self.forget_bridges().await;
        // Handoff mode: refuse mode switches, serve the listeners (see handoff_mode).
        self.handoff_prepare(&manifest).await?;
        self.check_ports(&manifest).await?;
        let name = manifest.name.clone();
        let existing = self.snapshot().await.services.get(&name).cloned();
        match existing {
            None => {
                let m = manifest.clone();
                self.commit(move |s| {
                    s.services.insert(m.name.clone(), ServiceState::new(m));
                })
                .await?;
                let result = self.release_new(&name, manifest.image.clone(), pull, progress).await;
                if result.is_err() {
                    // A service whose first release failed was never there.
                    // (In memory when the file cannot be written: the release's error is
                    // what to report, and a restart from the file undoes it all the same.)
                    let n = name.clone();
                    self.remember(&format!("that `{name}` is not registered"), move |s| {
                        s.services.remove(&n);
                    })
                    .await;
                }
                result
            }
            Some(svc) => {
                let active = svc.active_release().cloned();
                let needs_release = match &active {
                    None => true,
                    Some(r) => container_differs(&r.manifest, &manifest),
                };
                let m = manifest.clone();
                let n = name.clone();
                let old_manifest = svc.manifest.clone();
                self.commit(move |s| {
                    if let Some(svc) = s.services.get_mut(&n) {
                        svc.manifest = m;
                    }
                })
                .await?;
                if needs_release {
                    let result = self.release_new(&name, manifest.image.clone(), pull, progress).await;
                    if result.is_err() {
                        let n = name.clone();
                        self.remember(&format!("the manifest of `{name}` as it was"), move |s| {
                            if let Some(svc) = s.services.get_mut(&n) {
                                svc.manifest = old_manifest;
                            }
                        })
                        .await;
                    }
                    result
                } else {
                    let state = self.snapshot().await;
                    let desired = self.desired(&state, None).await?;
                    let took = self.program(&desired).await?;
                    let to = active.map(|r| r.number).unwrap_or(0);
                    Ok(Outcome {
                        service: name,
                        from: Some(to),
                        to,
                        outcome: "updated".into(),
                        health_ms: None,
                        switch_us: Some(u64::try_from(took.as_micros()).unwrap_or(u64::MAX)),
                        drain_ms: None,
                        ..Default::default()
                    })
                }
            }
        }
    }

    /// `deploy NAME --image REF`.
    pub async fn deploy(&self, service: &str, image: &str, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        self.deploy_with(service, image, None, progress).await
    }

    /// [`Releaser::deploy`], with the manifest's pull policy overridden for this release.
    pub async fn deploy_with(
        &self,
        service: &str,
        image: &str,
        pull: Option<PullPolicy>,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(service)?;
        self.forget_bridges().await;
        if !self.snapshot().await.services.contains_key(service) {
            return Err(ReleaseError::NotFound(service.to_string()));
        }
        // Checked before anything is recorded: a typo spends no release number.
        crate::docker::registry::check_reference(image).map_err(ReleaseError::Invalid)?;
        self.release_image(service, image, pull, progress).await
    }

    /// A new release of `service` running `image`: the service's image becomes `image`
    /// (and goes back to what it was if the release fails). The caller holds the claim.
    async fn release_image(&self, service: &str, image: &str, pull: Option<PullPolicy>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let name = service.to_string();
        let img = image.to_string();
        let old = self
            .commit(move |s| {
                s.services.get_mut(&name).map(|svc| std::mem::replace(&mut svc.manifest.image, img))
            })
            .await?;
        let result = self.release_new(service, image.to_string(), pull, progress).await;
        if result.is_err() {
            let name = service.to_string();
            self.remember(&format!("the image of `{service}` as it was"), move |s| {
                if let (Some(svc), Some(old)) = (s.services.get_mut(&name), old) {
                    svc.manifest.image = old;
                }
            })
            .await;
        }
        result
    }

    /// `rollback NAME [--to N]`.
    pub async fn rollback(&self, service: &str, to: Option<u32>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        self.rollback_with(service, to, None, progress).await
    }

    /// [`Releaser::rollback`]; with `pull`, a release whose container is gone is started
    /// again from its image as a new release (pulled as `pull` says).
    pub async fn rollback_with(
        &self,
        service: &str,
        to: Option<u32>,
        pull: Option<PullPolicy>,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(service)?;
        self.forget_bridges().await;
        let svc = self.snapshot().await.services.get(service).cloned().ok_or_else(|| ReleaseError::NotFound(service.into()))?;
        let target = match to {
            Some(n) => svc.release(n).cloned().ok_or_else(|| {
                ReleaseError::Invalid(format!("`{service}` has no release {n} (see `cutover history {service}`)"))
            })?,
            None => svc.previous_kept().cloned().ok_or_else(|| {
                ReleaseError::Refused(format!("`{service}` has no earlier release kept to roll back to"))
            })?,
        };
        if Some(target.number) == svc.active {
            return Err(ReleaseError::Refused(format!("release {} of `{service}` is already active", target.number)));
        }
        // A kept release whose container was removed outside cutover: no longer kept.
        let gone = target.status == ReleaseStatus::Stopped
            && self.engine.inspect(target.container_id.clone(), target.manifest.network.clone()).await?.is_none();
        if gone {
            let (s, n) = (service.to_string(), target.number);
            self.commit(move |st| {
                if let Some(r) = st.services.get_mut(&s).and_then(|svc| svc.release_mut(n)) {
                    r.status = ReleaseStatus::Removed;
                }
            })
            .await?;
        }
        if gone || target.status == ReleaseStatus::Removed {
            if let Some(policy) = pull {
                self.emit(progress, service, target.number, "start", format!(
                    "the container of release {} is gone; starting its image {} as a new release",
                    target.number, target.image
                ));
                return self.release_image(service, &target.image, Some(policy), progress).await;
            }
            let next = self.snapshot().await.services.get(service).and_then(|s| s.previous_kept().map(|r| r.number));
            let offer = match next {
                Some(m) => format!("roll back to release {m} with `cutover rollback {service} --to {m}`, or "),
                None => String::new(),
            };
            return Err(ReleaseError::Refused(format!(
                "the container of release {} of `{service}` ({}) is gone, removed outside cutover, so it is no longer kept: \
                 {offer}start its image {} again with `cutover rollback {service} --to {} --pull missing`",
                target.number, target.container, target.image, target.number
            )));
        }
        if target.status != ReleaseStatus::Stopped {
            return Err(ReleaseError::Refused(format!(
                "release {} of `{service}` is {:?}, not kept; only stopped, kept releases can be rolled back to",
                target.number, target.status
            )));
        }
        let from = svc.active;
        let number = target.number;
        let s = service.to_string();
        self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.operation = Some(Operation { kind: OperationKind::Rollback, from, to: number, phase: Phase::Starting, started_at: now() });
                if let Some(r) = svc.release_mut(number) {
                    r.status = ReleaseStatus::Starting;
                }
            }
        })
        .await?;
        self.emit(progress, service, number, "start", format!("starting kept release {number} ({})", target.container));
        let start_began = Instant::now();
        let started = async {
            self.engine.start(target.container_id.clone()).await?;
            self.engine
                .inspect(target.container_id.clone(), target.manifest.network.clone())
                .await?
                .ok_or_else(|| ReleaseError::Refused(format!("the container of release {number} is gone")))
        }
        .await;
        let start_ms = ms(start_began.elapsed());
        let info = match started {
            Ok(i) => i,
            Err(e) => {
                self.abandon(service, number, OperationKind::Rollback, from, "failed", &e.to_string()).await;
                return Err(e);
            }
        };
        let s = service.to_string();
        let addr = info.addr;
        if let Err(e) = self
            .commit(move |st| {
                if let Some(r) = st.services.get_mut(&s).and_then(|svc| svc.release_mut(number)) {
                    r.addr = addr;
                }
            })
            .await
        {
            return Err(self.undo_unrecorded(service, number, OperationKind::Rollback, from, e).await);
        }
        self.checkpoint(service, Phase::Starting).await;
        let manifest = target.manifest.clone();
        let release = Inflight { service, kind: OperationKind::Rollback, from, to: number, manifest: &manifest, info };
        let mut outcome = self.cut_over(release, progress).await?;
        outcome.start_ms = Some(start_ms);
        outcome.total_ms = Some(ms(start_began.elapsed()));
        Ok(outcome)
    }

    /// Record a step before its effect: Err when it cannot be written (the caller undoes
    /// the release; nothing relied on the step yet).
    async fn set_phase(&self, service: &str, phase: Phase) -> Result<(), ReleaseError> {
        let s = service.to_string();
        self.commit(move |st| {
            if let Some(op) = st.services.get_mut(&s).and_then(|svc| svc.operation.as_mut()) {
                op.phase = phase;
            }
        })
        .await?;
        // The test hook of `switching` is after the transaction (see `nat_cut_over`).
        if phase != Phase::Switching {
            self.checkpoint(service, phase).await;
        }
        Ok(())
    }

    /// Record a step after the switch, where the release goes on whether or not the file
    /// can be written (see [`Releaser::remember`]).
    async fn note_phase(&self, service: &str, phase: Phase) {
        let s = service.to_string();
        self.remember(&format!("the {phase:?} step of `{service}`"), move |st| {
            if let Some(op) = st.services.get_mut(&s).and_then(|svc| svc.operation.as_mut()) {
                op.phase = phase;
            }
        })
        .await;
        self.checkpoint(service, phase).await;
    }

    /// The test hook of [`Settings::pause_at`].
    async fn checkpoint(&self, service: &str, phase: Phase) {
        if self.settings.pause_at == Some(phase) {
            tracing::warn!(service, ?phase, "paused at this step (--pause-at test hook)");
            match self.settings.pause_for {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// `remove NAME`: its host ports stop being forwarded, its containers are removed.
    /// [`Releaser::remove`], and with `volumes` the named volumes cutover created for the
    /// service too (as `docker compose down -v`); volumes it did not create are kept.
    pub async fn remove_with(&self, service: &str, volumes: bool) -> Result<Outcome, ReleaseError> {
        let mut outcome = self.remove(service).await?;
        if volumes {
            let removed = self.engine.remove_volumes(service.to_string(), self.settings.instance.clone()).await?;
            outcome.volumes_removed = Some(removed);
        }
        Ok(outcome)
    }

    pub async fn remove(&self, service: &str) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(service)?;
        let svc = self.snapshot().await.services.get(service).cloned().ok_or_else(|| ReleaseError::NotFound(service.into()))?;
        let switching = self.switching.lock().await;
        let mut state = self.snapshot().await;
        state.services.remove(service);
        let desired = self.desired(&state, None).await?;
        self.program(&desired).await?;
        let s = service.to_string();
        // Its containers are recorded as to be removed in the same write: a restart before
        // they are gone removes them, instead of adopting them back as a service.
        let leftovers: Vec<String> = svc
            .releases
            .iter()
            .filter(|r| !matches!(r.status, ReleaseStatus::Failed | ReleaseStatus::Removed) && !r.container_id.is_empty())
            .map(|r| r.container_id.clone())
            .collect();
        let restore = self
            .commit(move |st| {
                st.services.remove(&s);
                for id in leftovers {
                    if !st.removed_containers.contains(&id) {
                        st.removed_containers.push(id);
                    }
                }
                if st.services.is_empty() {
                    std::mem::take(&mut st.route_localnet_before)
                } else {
                    BTreeMap::new()
                }
            })
            .await?;
        drop(switching);
        let mut errors = self.remove_leftovers().await;
        self.handoff_close(service); // handoff mode: the daemon's listeners close
        let state = self.snapshot().await;
        if state.services.is_empty() {
            if let Err(e) = self.firewall.remove_forward_accept(&self.settings.table, self.settings.mark) {
                errors.push(e.to_string());
            }
            if let Err(e) = self.firewall.delete_table(&self.settings.table) {
                errors.push(e.to_string());
            }
            let mut dp = self.dataplane.lock().await;
            dp.applied = None;
            dp.carried.clear();
            drop(dp);
            // Restored once no daemon needs it any more (the claims in `assert_host`).
            for ifname in restore.into_keys() {
                if let Err(e) = self.effects.host.release_route_localnet(&ifname, &self.settings.table) {
                    errors.push(e.to_string());
                }
            }
        }
        if !errors.is_empty() {
            return Err(ReleaseError::Refused(format!(
                "`{service}` is no longer served, but cleaning up failed: {}",
                errors.join("; ")
            )));
        }
        Ok(Outcome {
            service: service.to_string(),
            from: svc.active,
            to: 0,
            outcome: "removed".into(),
            health_ms: None,
            switch_us: None,
            drain_ms: None,
            ..Default::default()
        })
    }

    fn emit(&self, progress: &ProgressTx, service: &str, release: u32, step: &'static str, message: String) {
        tracing::info!(service, release, step, "{message}");
        let _ = progress.send(Progress {
            service: service.to_string(),
            release,
            step,
            message,
            elapsed_ms: None,
            limit_ms: None,
            connections: None,
        });
    }
}

/// Does `new` need a new container, compared with what `old` runs?
pub fn container_differs(old: &Manifest, new: &Manifest) -> bool {
    let ports = |m: &Manifest| m.ports.iter().map(|p| (p.protocol, p.container)).collect::<Vec<_>>();
    old.image != new.image
        || old.env != new.env
        || old.container_options() != new.container_options()
        || old.command != new.command
        || old.network != new.network
        || old.stop_signal != new.stop_signal
        || ports(old) != ports(new)
}

mod adopt;
mod cut_over;
mod dataplane;
mod drain;
mod finish;
mod handoff_mode;
mod health_wait;
mod recover;
mod start;
mod switch_back;
mod watch;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod fakes;
#[cfg(test)]
mod tests;
