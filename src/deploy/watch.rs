//! Watching the engine and the active releases: `watch_engine` follows the engine's
//! events (refresh when it or a container of ours comes back) and notices an active
//! release that is lost while no operation is in flight (`active_lost`), which it
//! handles as the manifest's `on_failure` says.

use super::*;

impl Releaser {
    /// Follow the engine: refresh on our containers' lifecycle events and whenever the
    /// event stream comes back after the engine went away. Runs until the daemon stops.
    pub async fn watch_engine(&self) {
        let mut was_down = false;
        loop {
            let mut events = self.engine.events(self.settings.instance.clone());
            if was_down {
                tracing::info!("the Docker engine is back; re-asserting releases and rules");
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "refresh after the engine came back");
                }
            }
            while let Some(event) = futures_util::StreamExt::next(&mut events).await {
                match event {
                    Ok((_, action)) if matches!(action.as_str(), "start" | "restart" | "unpause") => {
                        if let Err(e) = self.refresh().await {
                            tracing::warn!(error = %e, "refresh after a container event");
                        }
                    }
                    Ok((id, action)) if matches!(action.as_str(), "die" | "oom" | "kill" | "destroy") => {
                        self.active_lost(&id, &action).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the Docker engine's event stream");
                        break;
                    }
                }
            }
            was_down = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A container event that may mean an active release is gone: when it is the active
    /// release of a NAT service with no operation in flight (an operation watches its own
    /// releases) and it is really not running, log it, show it in `status`, and do what
    /// the manifest's `on_failure` says.
    pub(super) async fn active_lost(&self, id: &str, action: &str) {
        let state = self.snapshot().await;
        let found = state.services.iter().find_map(|(name, svc)| {
            let rel = svc.active_release()?;
            (Mode::of(&svc.manifest) == Mode::Nat && svc.operation.is_none() && rel.container_id == id)
                .then(|| (name.clone(), svc.manifest.on_failure, rel.clone()))
        });
        let Some((service, policy, rel)) = found else { return };
        // `kill` with a signal the release survives, or a late event of a restarted one.
        if let Ok(Some(info)) = self.engine.inspect(rel.container_id.clone(), rel.manifest.network.clone()).await {
            if info.running {
                return;
            }
        }
        let reason = format!("release {} {} ({action})", rel.number, if action == "destroy" { "was removed" } else { "died" });
        tracing::warn!(service = %service, release = rel.number, event = action, ?policy, "the active release is down");
        let (s, r) = (service.clone(), reason.clone());
        if let Err(e) = self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.down = Some(r);
            }
        })
        .await
        {
            tracing::warn!(service = %service, error = %e, "cannot record that the active release is down");
        }
        let recovered = match policy {
            OnFailure::None => return,
            OnFailure::Restart if action != "destroy" => match self.engine.start(rel.container_id.clone()).await {
                Ok(()) => self.refresh().await.map(|()| format!("restarted release {}", rel.number)),
                Err(e) => Err(e.into()),
            },
            OnFailure::Restart | OnFailure::Rollback => {
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                self.rollback(&service, None, &tx).await.map(|o| format!("rolled back to release {}", o.to))
            }
        };
        match recovered {
            Ok(what) => {
                tracing::info!(service = %service, "{reason}: {what}");
                let s = service.clone();
                let _ = self
                    .commit(move |st| {
                        if let Some(svc) = st.services.get_mut(&s) {
                            svc.down = None;
                        }
                    })
                    .await;
            }
            Err(e) => tracing::warn!(service = %service, error = %e, "{reason}; on_failure could not bring the service back"),
        }
    }
}
