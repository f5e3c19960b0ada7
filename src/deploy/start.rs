//! Starting a new release: record the intent, create and start its container
//! unpublished, then hand it to `cut_over`. Must not switch traffic or touch rules.

use super::*;

impl Releaser {
    /// Start a new release of `service` running `image` and cut over to it.
    pub(super) async fn release_new(
        &self,
        service: &str,
        image: String,
        pull: Option<PullPolicy>,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        let begun = Instant::now();
        let svc = self.snapshot().await.services.get(service).cloned().ok_or_else(|| ReleaseError::NotFound(service.into()))?;
        let number = svc.next_release;
        let from = svc.active;
        // The image first, before anything is recorded or started: a failed pull changes
        // nothing, and the pull's time is not part of the switch.
        let policy = pull.unwrap_or(svc.manifest.pull);
        let report: crate::docker::registry::ProgressFn<'_> =
            Box::new(|line: String| self.emit(progress, service, number, "pull", line));
        self.engine.ensure_image(image.clone(), policy, report).await?;
        // Health type `docker` needs a HEALTHCHECK: refused now, from the image, rather
        // than after a container was created and waited for.
        if svc.manifest.health.kind == HealthKind::Docker && svc.manifest.healthcheck.is_none() {
            if let Some(false) = self.engine.image_has_healthcheck(image.clone()).await? {
                return Err(ReleaseError::Invalid(format!(
                    "image `{image}` has no HEALTHCHECK, which health type `docker` needs: add a `healthcheck:` to the \
                     manifest, or use health type `http` or `tcp`"
                )));
            }
        }
        if Mode::of(&svc.manifest) == Mode::Handoff {
            return self.handoff_release_new(service, image, progress).await; // see handoff_mode
        }
        let mut manifest = svc.manifest.clone();
        manifest.image = image.clone();
        let container = format!("cutover-{service}-{number}");
        let label = manifest
            .to_label()
            .map_err(|e| ReleaseError::Invalid(format!("cannot write the manifest of `{service}` as a container label: {e}")))?;
        let spec = ContainerSpec {
            name: container.clone(),
            image: image.clone(),
            env: manifest.env.clone(),
            command: manifest.command.clone(),
            entrypoint: None,
            network: manifest.network.clone(),
            labels: BTreeMap::from([
                (LABEL_SERVICE.to_string(), service.to_string()),
                (LABEL_RELEASE.to_string(), number.to_string()),
                (LABEL_INSTANCE.to_string(), self.settings.instance.clone()),
                (LABEL_MANIFEST.to_string(), label),
            ]),
            stop_signal: manifest.stop_signal.clone(),
            stop_timeout: manifest.stop_timeout,
            mounts: Vec::new(),
            options: manifest.container_options(),
        };
        // Record the intent first: a crash from here on is undone at restart.
        self.record_new_release(service, number, from, &manifest, &container, &image).await?;
        self.emit(progress, service, number, "start", format!("starting release {number} ({image}) as {container}"));
        let start_began = Instant::now();
        let started = self.engine.run(spec).await;
        let start_ms = ms(start_began.elapsed());
        let info = match started {
            Ok(info) => info,
            Err(e) => {
                self.abandon(service, number, OperationKind::Deploy, from, "failed", &e.to_string()).await;
                return Err(e.into());
            }
        };
        let s = service.to_string();
        let (id, addr) = (info.id.clone(), info.addr);
        if let Err(e) = self
            .commit(move |st| {
                if let Some(r) = st.services.get_mut(&s).and_then(|svc| svc.release_mut(number)) {
                    r.container_id = id;
                    r.addr = addr;
                }
            })
            .await
        {
            return Err(self.undo_unrecorded(service, number, OperationKind::Deploy, from, e).await);
        }
        self.checkpoint(service, Phase::Starting).await;
        let release = Inflight { service, kind: OperationKind::Deploy, from, to: number, manifest: &manifest, info };
        let mut outcome = self.cut_over(release, progress).await?;
        outcome.start_ms = Some(start_ms);
        outcome.total_ms = Some(ms(begun.elapsed()));
        Ok(outcome)
    }

    /// Record a new release as starting, and the deploy operation, before its container
    /// exists: a crash from then on is undone at restart.
    pub(super) async fn record_new_release(
        &self,
        service: &str,
        number: u32,
        from: Option<u32>,
        manifest: &Manifest,
        container: &str,
        image: &str,
    ) -> Result<(), ReleaseError> {
        let s = service.to_string();
        let (m, c, img) = (manifest.clone(), container.to_string(), image.to_string());
        self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.next_release = number + 1;
                svc.releases.push(Release {
                    number,
                    image: img,
                    container: c,
                    container_id: String::new(),
                    status: ReleaseStatus::Starting,
                    addr: None,
                    created_at: now(),
                    activated_at: None,
                    stopped_at: None,
                    manifest: m,
                });
                svc.operation = Some(Operation { kind: OperationKind::Deploy, from, to: number, phase: Phase::Starting, started_at: now() });
            }
        })
        .await
    }
}
