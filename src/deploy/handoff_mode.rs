//! Handoff-mode releases (manifest `handoff:`): both generations share one network
//! namespace (`host`, or `container:<name>`), so no NAT switch is possible. Instead the
//! daemon holds the service's listeners in that namespace and serves them through a
//! broker ([`ServiceBrokers`]); every release container runs its image's server under
//! the static handoff-exec helper, which fetches the listeners and execs the server with
//! socket activation (LISTEN_FDS).
//!
//! The order of a release, and why:
//! 1. start the new container (the old one keeps serving on the same kernel sockets);
//! 2. trust its main process (allow its pid; handoff-exec retries the early refusal);
//! 3. wait until it took the listeners *and* reported ready (`READY=1` on NOTIFY_SOCKET,
//!    or Docker health, or nothing more with `health.type: none`) within the health
//!    deadline; otherwise stop and remove it: the old one never stopped serving;
//! 4. record the switch, then stop the old container (its stop signal, its stop
//!    timeout): it stops accepting while the new one accepts on the same sockets, so
//!    no connection is refused; keep it stopped for rollback.
//!
//! State, phases, history, keep and pruning are the NAT mode's (`state::Phase`), so an
//! interrupted operation is undone or finished at restart by the same `recover`. This
//! module must not touch nftables.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::docker::ImageCommand;
use crate::handoff::brokers::{notify_socket_name, BrokerSpec, Opened, ServiceBrokers, HELPER_IN_CONTAINER};
use crate::handoff::{ListenSpec, Namespace};

/// How often the readiness gate looks at the broker (cheap, in-process); Docker is asked
/// only every `health.interval`.
const READY_POLL: Duration = Duration::from_millis(25);
/// How long handoff-exec asks again while its refusal may only mean "not allowed yet".
const FETCH_RETRY_MS: u64 = 5000;

/// The container of release `number` of a handoff-mode service: the image's own command
/// (`image` ENTRYPOINT + the manifest's `command` or the image's CMD) run under
/// handoff-exec, in the service's namespace, with the helper mounted read-only.
pub fn container_spec(
    service: &str,
    number: u32,
    instance: &str,
    manifest: &Manifest,
    image: &ImageCommand,
    helper: &Path,
) -> Result<ContainerSpec, String> {
    let handoff = manifest.handoff.as_ref().ok_or_else(|| format!("service `{service}` has no handoff section"))?;
    // The manifest's `entrypoint` replaces the image's, as it would without handoff.
    let mut program = manifest.entrypoint.clone().unwrap_or_else(|| image.entrypoint.clone());
    program.extend(manifest.command.clone().unwrap_or_else(|| image.cmd.clone()));
    if program.is_empty() {
        return Err(format!(
            "image `{}` has neither ENTRYPOINT nor CMD and the manifest has no `command`: nothing to run with the listeners",
            manifest.image
        ));
    }
    let mut env = manifest.env.clone();
    // The server reports readiness here (sd_notify); the daemon judges each datagram by
    // its sender's pid, so the name being reachable by anyone in the namespace is fine.
    env.insert("NOTIFY_SOCKET".into(), format!("@{}", notify_socket_name(service)));
    env.insert("CUTOVER_SERVICE".into(), service.to_string());
    let network = if handoff.namespace == "host" { "host".to_string() } else { handoff.namespace.clone() };
    Ok(ContainerSpec {
        name: format!("cutover-{service}-{number}"),
        image: manifest.image.clone(),
        env,
        command: Some(program),
        entrypoint: Some(vec![
            HELPER_IN_CONTAINER.to_string(),
            "--service".into(),
            service.to_string(),
            // The daemon allows the container's pid only once `docker start` returned.
            "--retry-ms".into(),
            FETCH_RETRY_MS.to_string(),
            "--".into(),
        ]),
        network,
        labels: BTreeMap::from([
            (LABEL_SERVICE.to_string(), service.to_string()),
            (LABEL_RELEASE.to_string(), number.to_string()),
            (LABEL_INSTANCE.to_string(), instance.to_string()),
        ]),
        stop_signal: manifest.stop_signal.clone(),
        stop_timeout: manifest.stop_timeout,
        mounts: vec![(helper.display().to_string(), HELPER_IN_CONTAINER.to_string())],
        // The wrapper is the container's entrypoint; the operator's runs under it.
        options: crate::manifest::ContainerOptions { entrypoint: None, ..manifest.container_options() },
    })
}

impl Releaser {
    /// Runs handoff-mode services with `brokers`; without them such manifests are refused.
    pub fn with_handoff(mut self, brokers: Arc<dyn ServiceBrokers>) -> Releaser {
        self.handoff = Some(brokers);
        self
    }

    fn brokers(&self, service: &str) -> Result<Arc<dyn ServiceBrokers>, ReleaseError> {
        self.handoff.clone().ok_or_else(|| {
            ReleaseError::Invalid(format!("service `{service}` uses handoff mode, which this daemon was started without"))
        })
    }

    /// What the broker of `manifest` serves, its namespace resolved to a namespace file.
    async fn broker_spec(&self, manifest: &Manifest) -> Result<BrokerSpec, ReleaseError> {
        let handoff = manifest
            .handoff
            .as_ref()
            .ok_or_else(|| ReleaseError::Invalid(format!("service `{}` has no handoff section", manifest.name)))?;
        let namespace = match handoff.namespace.strip_prefix("container:") {
            // `host` is the daemon's own namespace: the daemon runs where Docker's host
            // network is (NAT mode needs that too), and entering pid 1's namespace is
            // refused where pid 1 is not the host's init (a sandbox, a container).
            None => Namespace::Current,
            Some(container) => {
                let info = self.engine.inspect(container.to_string(), String::new()).await?;
                let pid = info.filter(|i| i.running).and_then(|i| i.pid).ok_or_else(|| {
                    ReleaseError::Refused(format!(
                        "handoff.namespace: container `{container}` is not running; its network namespace is where `{}` listens",
                        manifest.name
                    ))
                })?;
                Namespace::of_pid(i32::try_from(pid).unwrap_or(i32::MAX))
            }
        };
        let mut listeners = Vec::new();
        for l in &handoff.listeners {
            let addr = crate::manifest::parse_listen(&l.listen)
                .ok_or_else(|| ReleaseError::Invalid(format!("listener `{}`: `{}` is not tcp://ADDR:PORT", l.name, l.listen)))?;
            listeners.push(ListenSpec { name: l.name.clone(), addr });
        }
        Ok(BrokerSpec { namespace, listeners, allow_uids: handoff.allow_uids.clone() })
    }

    /// `apply` of any manifest: refuses switching a service between NAT and handoff mode
    /// or changing a served handoff section (its sockets are shared by running
    /// releases), and makes sure a handoff service's listeners are served before its
    /// first release starts.
    pub(super) async fn handoff_prepare(&self, manifest: &Manifest) -> Result<(), ReleaseError> {
        let existing = self.snapshot().await.services.get(&manifest.name).map(|s| s.manifest.handoff.clone());
        let name = &manifest.name;
        match (&manifest.handoff, existing) {
            (None, None) | (None, Some(None)) => return Ok(()),
            (None, Some(Some(_))) | (Some(_), Some(None)) => {
                return Err(ReleaseError::Conflict(format!(
                    "service `{name}` cannot switch between NAT mode (`ports`) and handoff mode: `cutover remove {name}` first"
                )))
            }
            (Some(new), Some(Some(old))) if *new != old => {
                return Err(ReleaseError::Conflict(format!(
                    "service `{name}`: its `handoff` section cannot change while releases share its listeners; `cutover remove {name}` and apply again"
                )))
            }
            (Some(_), _) => {}
        }
        let brokers = self.brokers(name)?;
        let spec = self.broker_spec(manifest).await?;
        brokers.open(name, &spec, None)?;
        Ok(())
    }

    /// `release_new` of a handoff-mode service.
    pub(super) async fn handoff_release_new(&self, service: &str, image: String, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let result = self.handoff_release_inner(service, image, progress).await;
        if result.is_err() {
            self.handoff_close_if_unused(service).await;
        }
        result
    }

    /// A service whose first release failed serves nothing: its listeners are closed.
    async fn handoff_close_if_unused(&self, service: &str) {
        let active = self.snapshot().await.services.get(service).and_then(|s| s.active);
        if active.is_none() {
            self.handoff_close(service);
        }
    }

    async fn handoff_release_inner(&self, service: &str, image: String, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let svc = self.snapshot().await.services.get(service).cloned().ok_or_else(|| ReleaseError::NotFound(service.into()))?;
        let number = svc.next_release;
        let from = svc.active;
        let mut manifest = svc.manifest.clone();
        manifest.image = image.clone();
        let brokers = self.brokers(service)?;
        let bspec = self.broker_spec(&manifest).await?;
        brokers.open(service, &bspec, None)?;
        let helper = brokers.helper()?;
        let command = self.engine.image_command(image.clone()).await?;
        let spec = container_spec(service, number, &self.settings.instance, &manifest, &command, &helper)
            .map_err(ReleaseError::Invalid)?;
        let container = spec.name.clone();
        // Record the intent first: a crash from here on is undone at restart.
        self.record_new_release(service, number, from, &manifest, &container, &image).await?;
        self.emit(progress, service, number, "start", format!("starting release {number} ({image}) as {container} under handoff-exec"));
        let info = match self.engine.run(spec).await {
            Ok(info) => info,
            Err(e) => {
                self.abandon(service, number, OperationKind::Deploy, from, "failed", &e.to_string()).await;
                return Err(e.into());
            }
        };
        let s = service.to_string();
        let id = info.id.clone();
        if let Err(e) = self
            .commit(move |st| {
                if let Some(r) = st.services.get_mut(&s).and_then(|svc| svc.release_mut(number)) {
                    r.container_id = id;
                }
            })
            .await
        {
            return Err(self.undo_unrecorded(service, number, OperationKind::Deploy, from, e).await);
        }
        let release = Inflight { service, kind: OperationKind::Deploy, from, to: number, manifest: &manifest, info };
        self.cut_over(release, progress).await
    }

    /// Readiness gate, stop of the old release, prune, record (deploy and rollback).
    pub(super) async fn handoff_cut_over(&self, release: Inflight<'_>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let Inflight { service, kind, from, to, manifest, ref info } = release;
        let brokers = self.brokers(service)?;
        if !brokers.is_open(service) {
            // E.g. restoring it at restart failed; a started release would wait in vain.
            let spec = self.broker_spec(manifest).await?;
            brokers.open(service, &spec, None)?;
        }
        let ready_started = Instant::now();
        if let Err(reason) = self.handoff_wait_ready(&*brokers, service, to, manifest, info, progress).await {
            if let Some(pid) = info.pid {
                brokers.forget(service, i32::try_from(pid).unwrap_or(i32::MAX));
            }
            // Stop before removing: a release that took the listeners may have accepted
            // connections already; its stop signal lets it answer them.
            if let Err(e) = self.engine.stop(info.id.clone(), manifest.stop_timeout).await {
                tracing::warn!(service, error = %e, "stopping the refused release");
            }
            let logs = self.engine.logs_tail(info.id.clone(), 20).await.unwrap_or_default();
            self.abandon(service, to, kind, from, "refused", &reason).await;
            self.handoff_close_if_unused(service).await;
            return Err(ReleaseError::Unhealthy { service: service.into(), release: to, reason, logs });
        }
        let health_ms = ms(ready_started.elapsed());
        // The new release accepts on the shared listeners already: from here on the
        // release goes on whether or not each step can be written (see `remember`).
        self.note_phase(service, Phase::Healthy).await;
        self.emit(progress, service, to, "healthy", format!("release {to} took its listeners and is ready after {health_ms} ms"));

        // Both releases accept on the same sockets now; from here a restart finishes the
        // release (stops the old one) instead of undoing it.
        self.record_switched(service, from, to).await;
        self.emit(progress, service, to, "switched", format!("release {to} accepts on the service's listeners"));

        let mut drain_ms = None;
        let old = match from {
            Some(f) => self.snapshot().await.services.get(service).and_then(|s| s.release(f)).cloned(),
            None => None,
        };
        if let Some(old) = old {
            self.note_phase(service, Phase::Draining).await;
            let old_pid = match self.engine.inspect(old.container_id.clone(), old.manifest.network.clone()).await {
                Ok(Some(i)) => i.pid,
                _ => None,
            };
            self.emit(
                progress,
                service,
                old.number,
                "stop",
                format!("stopping release {} ({}, up to {:?}): it stops accepting, finishes its requests", old.number, old.manifest.stop_signal, old.manifest.stop_timeout),
            );
            let started = Instant::now();
            if let Err(e) = self.engine.stop(old.container_id.clone(), old.manifest.stop_timeout).await {
                tracing::warn!(service, error = %e, "stopping the old release failed");
            }
            drain_ms = Some(ms(started.elapsed()));
            if let Some(pid) = old_pid {
                brokers.forget(service, i32::try_from(pid).unwrap_or(i32::MAX));
            }
            self.note_phase(service, Phase::Stopped).await;
        }
        self.finish_release(&release, Timings { health_ms: Some(health_ms), switch_us: None, drain_ms }).await;
        self.observe(|m| {
            m.health_wait(service, Duration::from_millis(health_ms));
            if let Some(d) = drain_ms {
                m.drained(service, Duration::from_millis(d));
            }
            m.release(service, kind, "switched");
        }); // metrics hook
        self.warn_if_unsaved(progress, service, to);
        self.emit(progress, service, to, "done", format!("release {to} of {service} is live"));
        Ok(Outcome { service: service.to_string(), from, to, outcome: "switched".into(), health_ms: Some(health_ms), switch_us: None, drain_ms, ..Default::default() })
    }

    /// Until the release's process tree took the listeners and is ready (see the module
    /// docs), the container exits, or the health deadline passes.
    async fn handoff_wait_ready(
        &self,
        brokers: &dyn ServiceBrokers,
        service: &str,
        release: u32,
        manifest: &Manifest,
        info: &ContainerInfo,
        progress: &ProgressTx,
    ) -> Result<(), String> {
        let Some(pid) = info.pid.filter(|_| info.running) else {
            return Err(format!("its container exited with code {}", info.exit_code.unwrap_or(-1)));
        };
        let pid = i32::try_from(pid).map_err(|_| format!("pid {pid} is out of range"))?;
        brokers.allow(service, pid).map_err(|e| format!("cannot let it take the listeners: {e}"))?;
        let health = &manifest.health;
        let started = Instant::now();
        let deadline = crate::manifest::instant_after(started, health.deadline);
        let mut next_inspect = started;
        let mut docker_health: Option<String> = None;
        let mut last_reported = String::new();
        loop {
            let now_ = Instant::now();
            if now_ >= next_inspect {
                let current = self.still_running(info, manifest).await?;
                docker_health = current.health;
                next_inspect = crate::manifest::instant_after(now_, health.interval);
            }
            let r = brokers.readiness(service, pid);
            let verdict = if !r.fetched {
                Err("it has not taken its listeners from the broker".to_string())
            } else {
                match health.kind {
                    HealthKind::None => Ok(()),
                    HealthKind::Docker => match docker_health.as_deref() {
                        Some("healthy") => Ok(()),
                        Some(s) => Err(format!("it took its listeners; Docker reports it {s}")),
                        None => return Err("health type `docker` but the image has no HEALTHCHECK".into()),
                    },
                    HealthKind::Http | HealthKind::Tcp if r.notified => Ok(()),
                    HealthKind::Http | HealthKind::Tcp => Err(
                        "it took its listeners but has not sent READY=1 to $NOTIFY_SOCKET (servers that cannot: health.type none)"
                            .to_string(),
                    ),
                }
            };
            let last = match verdict {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let now_ = Instant::now();
            if now_ >= deadline {
                return Err(format!("not ready within {}: {last}", crate::manifest::format_duration(health.deadline)));
            }
            // Progress when the reason changes, not every poll.
            if last != last_reported {
                let _ = progress.send(Progress {
                    service: service.to_string(),
                    release,
                    step: "health",
                    message: format!("waiting until ready: {last}"),
                    elapsed_ms: Some(ms(now_ - started)),
                    limit_ms: Some(ms(health.deadline)),
                    connections: None,
                });
                last_reported = last;
            }
            tokio::time::sleep(READY_POLL.min(deadline - now_)).await;
        }
    }

    /// After a restart, before the NAT services: serve every handoff service's listeners
    /// again. They are taken back from the running active release (pidfd_getfd), so the
    /// very sockets, with their queued connections, live on; bound anew only when no
    /// release runs. Then an interrupted operation is undone or finished (`recover`).
    /// A service that cannot be restored is reported in the notes; the others go on.
    pub(super) async fn handoff_reconcile(&self) -> Result<Vec<String>, ReleaseError> {
        let mut notes = Vec::new();
        let state = self.snapshot().await;
        for (name, svc) in state.services.iter().filter(|(_, s)| Mode::of(&s.manifest) == Mode::Handoff) {
            if let Err(e) = self.handoff_restore(name, svc, &mut notes).await {
                tracing::error!(service = %name, error = %e, "handoff service not restored");
                notes.push(format!("{name}: handoff mode NOT restored, its releases cannot fetch listeners: {e}"));
            }
        }
        Ok(notes)
    }

    async fn handoff_restore(&self, name: &str, svc: &ServiceState, notes: &mut Vec<String>) -> Result<(), ReleaseError> {
        let brokers = self.brokers(name)?;
        let spec = self.broker_spec(&svc.manifest).await?;
        let running = match svc.active_release() {
            Some(r) => self.engine.inspect(r.container_id.clone(), String::new()).await?.filter(|i| i.running),
            None => None,
        };
        let holder = running.as_ref().and_then(|i| i.pid).and_then(|p| i32::try_from(p).ok());
        let mut restart_active = false;
        let opened = match brokers.open(name, &spec, holder) {
            Ok(o) => o,
            Err(adopt_error) if holder.is_some() => {
                // The release runs but does not hold the sockets (e.g. handoff-exec is in
                // a restart loop because the daemon was away). If binding anew works,
                // nobody holds them: restart the release so it fetches the new ones.
                let o = brokers.open(name, &spec, None).map_err(|_| adopt_error)?;
                restart_active = true;
                o
            }
            Err(e) => return Err(e.into()),
        };
        notes.push(match opened {
            Opened::Adopted { pid } => format!("{name}: listeners taken back from release process {pid}"),
            Opened::Bound => format!("{name}: listeners bound anew (no running release held them)"),
            Opened::AlreadyOpen => format!("{name}: listeners already served"),
        });
        if let (Some(pid), false) = (holder, restart_active) {
            brokers.allow(name, pid)?;
        }
        if let Some(op) = &svc.operation {
            // An unfinished deploy is undone by removing its container, which kills it.
            // A handoff release shares the listeners and may have accepted connections:
            // its stop signal and stop timeout come first, so they are answered.
            if op.phase < Phase::Switched && op.kind == OperationKind::Deploy {
                if let Some(to) = svc.release(op.to) {
                    if let Err(e) = self.engine.stop(ServiceState::container_ref(to), to.manifest.stop_timeout).await {
                        tracing::warn!(service = %name, error = %e, "stopping the unfinished release before it is undone");
                    }
                }
            }
            notes.push(self.recover(name, svc, op).await?);
        }
        let Some(rel) = self.snapshot().await.services.get(name).and_then(|s| s.active_release().cloned()) else {
            return Ok(());
        };
        let info = self.engine.inspect(rel.container_id.clone(), String::new()).await?;
        match info {
            None => notes.push(format!("{name}: the container of release {} is gone", rel.number)),
            Some(i) if i.running && !restart_active => {
                if let Some(pid) = i.pid.and_then(|p| i32::try_from(p).ok()) {
                    brokers.allow(name, pid)?;
                }
            }
            Some(i) => {
                if i.running {
                    self.engine.stop(rel.container_id.clone(), rel.manifest.stop_timeout).await?;
                }
                self.engine.start(rel.container_id.clone()).await?;
                let pid = self.engine.inspect(rel.container_id.clone(), String::new()).await?.and_then(|i| i.pid);
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    brokers.allow(name, pid)?;
                }
                notes.push(format!("{name}: started release {}'s container again", rel.number));
            }
        }
        Ok(())
    }

    /// `remove`: stop serving the service's listeners (the daemon's copies close).
    pub(super) fn handoff_close(&self, service: &str) {
        if let Some(b) = &self.handoff {
            b.close(service);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
