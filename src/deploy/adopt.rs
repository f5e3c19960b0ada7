//! Adoption: a service the state does not know, whose release containers of this
//! instance exist (the state file was lost, moved away after it was found corrupt, or
//! restored from an old backup), is rebuilt from those containers: each carries its
//! service, release number and manifest in labels. Nothing is removed here, and what
//! cannot be accounted for (no manifest label, another mode) is left as it is.

use super::*;
use crate::docker::LABEL_MANIFEST;

/// What adoption found.
#[derive(Debug, Default)]
pub(super) struct Adopted {
    /// One line per adopted service, for the daemon's log.
    pub notes: Vec<String>,
    /// Containers of adopted services that run but do not serve (the new release of an
    /// operation the lost state knew of): stopped once the rules point at the active one.
    pub to_stop: Vec<(String, Duration)>,
    /// Containers of this instance that belong to no known service and cannot be
    /// adopted: left running, and the rules are left as they are while they exist.
    pub unaccounted: Vec<String>,
}

/// One container read back as a release.
struct Found {
    number: u32,
    manifest: Manifest,
    info: ContainerInfo,
}

/// Which release serves an adopted service: the newest running one the engine keeps
/// running (cutover sets that once a release is established, so an operation's new
/// release that was never finished is passed over), else the newest running one.
fn choose_active(found: &[Found]) -> Option<u32> {
    let newest = |kept: bool| found.iter().filter(|f| f.info.running && (f.info.kept_running || !kept)).map(|f| f.number).max();
    newest(true).or_else(|| newest(false))
}

impl Releaser {
    /// Rebuild, from their containers, the services this instance runs that the state
    /// does not know (see the module). Recorded in one write, before any rule changes.
    pub(super) async fn adopt(&self) -> Result<Adopted, ReleaseError> {
        let state = self.snapshot().await;
        let mut adopted = Adopted::default();
        let mut by_service: BTreeMap<String, Vec<Found>> = BTreeMap::new();
        for c in self.engine.list_instance(self.settings.instance.clone()).await? {
            let Some(service) = c.labels.get(LABEL_SERVICE).cloned() else { continue };
            if state.services.contains_key(&service) || state.removed_containers.contains(&c.id) {
                continue;
            }
            let number = c.labels.get(LABEL_RELEASE).and_then(|n| n.parse::<u32>().ok());
            let label = c.labels.get(LABEL_MANIFEST);
            let (Some(number), Some(label)) = (number, label) else {
                adopted.unaccounted.push(format!("{} (no {LABEL_MANIFEST} label: made by an older cutover)", c.name));
                continue;
            };
            let mut m = match Manifest::from_label(label) {
                Ok(m) => m,
                Err(e) => {
                    adopted.unaccounted.push(format!("{} (its {LABEL_MANIFEST} label cannot be read: {e})", c.name));
                    continue;
                }
            };
            if Mode::of(&m) == Mode::Handoff {
                adopted.unaccounted.push(format!("{} (a handoff-mode release; those are not adopted)", c.name));
                continue;
            }
            if m.name != service {
                adopted.unaccounted.push(format!("{} (its manifest names another service)", c.name));
                continue;
            }
            if !m.env.is_empty() {
                m.fill_env(&self.engine.env_values(c.id.clone(), m.env.keys().cloned().collect()).await?);
            }
            // Listed without its network: inspected on the release's own, for its address
            // and restart policy.
            let info = self.engine.inspect(c.id.clone(), m.network.clone()).await?.unwrap_or(c);
            by_service.entry(service).or_default().push(Found { number, manifest: m, info });
        }
        if by_service.is_empty() {
            return Ok(adopted);
        }
        let mut services = Vec::new();
        for (name, mut found) in by_service {
            found.sort_by_key(|f| f.number);
            let active = choose_active(&found);
            let manifest = match active.and_then(|a| found.iter().find(|f| f.number == a)).or(found.last()) {
                Some(f) => f.manifest.clone(),
                None => continue,
            };
            let mut svc = ServiceState::new(manifest);
            svc.active = active;
            svc.next_release = found.iter().map(|f| f.number).max().unwrap_or(0).saturating_add(1);
            for f in &found {
                let serving = Some(f.number) == active;
                if f.info.running && !serving {
                    adopted.to_stop.push((f.info.id.clone(), f.manifest.stop_timeout));
                }
                svc.releases.push(Release {
                    number: f.number,
                    image: f.manifest.image.clone(),
                    container: f.info.name.clone(),
                    container_id: f.info.id.clone(),
                    status: if serving { ReleaseStatus::Active } else { ReleaseStatus::Stopped },
                    addr: f.info.addr,
                    created_at: now(),
                    activated_at: serving.then(now),
                    stopped_at: (!serving).then(now),
                    manifest: f.manifest.clone(),
                });
            }
            let what = match active {
                Some(a) => format!("release {a} serving, {} kept", found.len() - 1),
                None => format!("no release running, {} kept", found.len()),
            };
            svc.record(HistoryEntry::untimed(
                OperationKind::Deploy,
                None,
                active.unwrap_or(0),
                "adopted",
                format!("the state did not know this service; adopted from its containers ({what})"),
            ));
            adopted.notes.push(format!("{name}: adopted from its containers, as the state did not know it ({what})"));
            services.push((name, svc));
        }
        let keep: Vec<(String, String)> = services
            .iter()
            .filter_map(|(name, svc)| svc.active_release().map(|r| (name.clone(), r.container_id.clone())))
            .collect();
        self.commit(move |st| {
            for (name, svc) in services {
                st.services.insert(name, svc);
            }
        })
        .await?;
        for (name, id) in keep {
            if let Err(e) = self.engine.keep_running(id).await {
                tracing::warn!(service = %name, error = %e, "cannot set the adopted release's restart policy");
            }
        }
        Ok(adopted)
    }

    /// Delete the containers of removed services that a failed or interrupted `remove`
    /// left, and forget those that are gone. Returns what failed (tried again later).
    pub(super) async fn remove_leftovers(&self) -> Vec<String> {
        let ids = self.snapshot().await.removed_containers;
        if ids.is_empty() {
            return Vec::new();
        }
        let (mut gone, mut errors) = (Vec::new(), Vec::new());
        for id in ids {
            match self.engine.remove(id.clone()).await {
                Ok(()) => gone.push(id),
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot remove a removed service's container; trying again later");
                    errors.push(e.to_string());
                }
            }
        }
        self.remember("the removed containers", move |st| st.removed_containers.retain(|id| !gone.contains(id))).await;
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(number: u32, running: bool, kept_running: bool) -> Found {
        let manifest = Manifest::parse(std::path::Path::new("t.yaml"), "name: web\nimage: x:1\nports: [{host: 8080, container: 80}]\n")
            .expect("a valid manifest");
        let info = ContainerInfo { kept_running, ..ContainerInfo::listed(format!("id{number}"), format!("cutover-web-{number}"), running, BTreeMap::new()) };
        Found { number, manifest, info }
    }

    #[test]
    fn the_established_release_is_chosen_over_an_unfinished_newer_one() {
        // Release 3 was being deployed (running, not yet kept running): 2 serves.
        assert_eq!(choose_active(&[found(1, false, true), found(2, true, true), found(3, true, false)]), Some(2));
        // Nothing kept running (e.g. the engine lost the policy): the newest running.
        assert_eq!(choose_active(&[found(1, true, false), found(2, true, false)]), Some(2));
        // Nothing running: none serves; the releases are kept for a rollback.
        assert_eq!(choose_active(&[found(1, false, true), found(2, false, false)]), None);
    }

    #[test]
    fn the_manifest_label_carries_env_names_not_values() {
        let mut m = found(1, true, true).manifest;
        m.env.insert("DB_PASSWORD".into(), "s3cret".into());
        let label = m.to_label().expect("serializes");
        assert!(!label.contains("s3cret"), "{label}");
        assert!(label.contains("DB_PASSWORD"), "{label}");
        let values = crate::manifest::EnvValues(BTreeMap::from([("DB_PASSWORD".to_string(), "s3cret".to_string())]));
        let mut back = Manifest::from_label(&label).expect("reads back");
        back.fill_env(&values);
        assert_eq!(back, m);
    }
}
