//! The daemon's control plane: accepts CLI connections on the unix socket, checks who
//! is asking, decodes one request, runs it on the [`Releaser`] and streams progress.
//!
//! An operation, once started, runs to its end even if the client goes away: a deploy
//! half done because a terminal closed would be worse than one nobody watches.

pub mod table_lock;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::api::{self, ErrorCode, ManifestText, ProgressLine, Reply, Request};
use crate::deploy::{ReleaseError, Releaser};
use crate::limits::{Caps, Limiter, LogThrottle};
use crate::manifest::Manifest;
use crate::state::{ReleaseStatus, State};

/// Who may use the control socket besides root.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub allow_gid: Option<u32>,
}

impl Access {
    /// Root, or a member of the allowed group: as primary group or as one of
    /// `groups`, the peer's supplementary groups (see [`peer_groups`]).
    pub fn permits(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0 || self.allow_gid.is_some_and(|g| g == gid || groups.contains(&g))
    }
}

/// The supplementary groups of the peer process `pid`, read from /proc/PID/status, if
/// that process still runs as `uid` (its real uid; otherwise the pid may have been
/// reused and its groups are not the peer's). Empty when they cannot be read.
pub fn peer_groups(pid: i32, uid: u32) -> Vec<u32> {
    if pid <= 0 {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| status_groups(&text, uid))
        .unwrap_or_default()
}

/// The `Groups:` of a /proc/PID/status text, if its real `Uid:` is `uid`.
pub fn status_groups(text: &str, uid: u32) -> Option<Vec<u32>> {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    let real_uid: u32 = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    if real_uid != uid {
        return None;
    }
    field("Groups:")?.split_whitespace().map(|g| g.parse().ok()).collect()
}

/// Control connections open at once, in all and per uid other than root. An operation
/// holds its connection while it runs, so the total leaves room for many; root is
/// bound only by the total.
pub const CAPS: Caps = Caps { total: 64, per_peer: 8 };
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve the control socket until `shutdown` completes.
pub async fn serve(listener: UnixListener, releaser: Arc<Releaser>, access: Access, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let limiter = Limiter::new(CAPS);
    let over_cap_log = LogThrottle::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let uid = stream.peer_cred().map(|c| c.uid()).ok();
                    let permit = match uid {
                        Some(0) => limiter.admit_within_total(),
                        Some(uid) => limiter.admit(uid),
                        // Refused in `handle` (no credentials); counted meanwhile.
                        None => limiter.admit(u32::MAX),
                    };
                    let permit = match permit {
                        Ok(p) => p,
                        Err(over) => {
                            if let Some(held_back) = over_cap_log.allow() {
                                tracing::warn!(?uid, held_back, "control connection closed at once: {over}");
                            }
                            continue;
                        }
                    };
                    let releaser = releaser.clone();
                    let access = access.clone();
                    tokio::spawn(async move {
                        handle(stream, releaser, access).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
}

async fn write_reply(stream: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn handle(stream: UnixStream, releaser: Arc<Releaser>, access: Access) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer credentials of a control connection; refused");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let groups = if access.allow_gid.is_some() { peer_groups(cred.pid().unwrap_or(0), cred.uid()) } else { Vec::new() };
    if !access.permits(cred.uid(), cred.gid(), &groups) {
        tracing::warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "control request refused: not root nor in the allowed group");
        let _ = write_reply(&mut write, &Reply::Error {
            code: ErrorCode::Denied,
            message: format!(
                "uid {} may not control cutover: run as root, or start the daemon with --allow-group for your group",
                cred.uid()
            ),
        })
        .await;
        return;
    }
    let limit = u64::try_from(api::MAX_REQUEST).unwrap_or(u64::MAX) + 1;
    let mut reader = BufReader::new(read.take(limit));
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading a control request failed");
            return;
        }
        Err(_) => {
            tracing::debug!(uid = cred.uid(), "control client sent no request within {REQUEST_TIMEOUT:?}; closed");
            return;
        }
    }
    if line.len() > api::MAX_REQUEST {
        let _ = write_reply(&mut write, &Reply::Error {
            code: ErrorCode::Invalid,
            message: format!("request longer than {} bytes refused", api::MAX_REQUEST),
        })
        .await;
        return;
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        // A connect-and-close (a readiness probe, a port scan): nothing to answer.
        tracing::debug!(uid = cred.uid(), "control connection closed without a request");
        return;
    }
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "malformed control request");
            let _ = write_reply(&mut write, &Reply::Error { code: ErrorCode::Invalid, message: format!("malformed request: {e}") }).await;
            return;
        }
    };
    tracing::debug!(?request, uid = cred.uid(), "control request");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move { execute(&releaser, request, tx).await });
    let mut client_gone = false;
    while let Some(p) = rx.recv().await {
        if !client_gone && write_reply(&mut write, &Reply::Progress(ProgressLine::from(p))).await.is_err() {
            client_gone = true;
        }
    }
    let reply = match task.await {
        Ok(Ok(data)) => Reply::Done { data },
        Ok(Err((code, message))) => Reply::Error { code, message },
        Err(e) => Reply::Error { code: ErrorCode::Refused, message: format!("the operation panicked: {e}") },
    };
    if !client_gone {
        let _ = write_reply(&mut write, &reply).await;
    }
}

type Answer = Result<serde_json::Value, (ErrorCode, String)>;

fn fail(e: ReleaseError) -> (ErrorCode, String) {
    (ErrorCode::from(&e), e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Answer {
    serde_json::to_value(v).map_err(|e| (ErrorCode::Refused, format!("cannot encode the answer: {e}")))
}

async fn execute(releaser: &Releaser, request: Request, tx: crate::deploy::ProgressTx) -> Answer {
    match request {
        Request::Ping {} => Ok(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") })),
        Request::Apply { manifests, pull } => apply(releaser, manifests, pull, &tx).await,
        Request::Deploy { service, image, pull } => json(&releaser.deploy_with(&service, &image, pull, &tx).await.map_err(fail)?),
        Request::Rollback { service, to, pull } => json(&releaser.rollback_with(&service, to, pull, &tx).await.map_err(fail)?),
        Request::Remove { service, volumes } => json(&releaser.remove_with(&service, volumes).await.map_err(fail)?),
        Request::Status { service } => {
            let state = releaser.snapshot().await;
            if let Some(s) = &service {
                if !state.services.contains_key(s) {
                    return Err(fail(ReleaseError::NotFound(s.clone())));
                }
            }
            json(&status(&state, service.as_deref()))
        }
        Request::History { service } => {
            let state = releaser.snapshot().await;
            json(&history(&state, &service).ok_or_else(|| fail(ReleaseError::NotFound(service.clone())))?)
        }
    }
}

/// Validate every manifest first, so one bad file changes nothing; then apply in order.
async fn apply(
    releaser: &Releaser,
    manifests: Vec<ManifestText>,
    pull: Option<crate::manifest::PullPolicy>,
    tx: &crate::deploy::ProgressTx,
) -> Answer {
    let mut parsed = Vec::new();
    for m in &manifests {
        let file = std::path::Path::new(&m.file);
        let mut manifest = Manifest::parse(file, &m.text).map_err(|e| (ErrorCode::Invalid, e.to_string()))?;
        manifest.resolve(file, &m.text).map_err(|e| (ErrorCode::Invalid, e.to_string()))?;
        parsed.push(manifest);
    }
    let mut names = std::collections::BTreeSet::new();
    for m in &parsed {
        if !names.insert(m.name.clone()) {
            return Err((ErrorCode::Invalid, format!("service `{}` is named by two manifests", m.name)));
        }
    }
    check_host_facts(&manifests, &parsed)?;
    let mut outcomes = Vec::new();
    for m in parsed {
        let name = m.name.clone();
        match releaser.apply_with(m, pull, tx).await {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                let done: Vec<String> = outcomes.iter().map(|o| o.service.clone()).collect();
                let mut message = format!("{name}: {e}");
                if !done.is_empty() {
                    message.push_str(&format!(" (already applied: {})", done.join(", ")));
                }
                return Err((ErrorCode::from(&e), message));
            }
        }
    }
    json(&outcomes)
}

/// The checks of a manifest that need this host's facts, before anything changes:
/// every `host_ip` must be a local address (the DNAT matches only those).
fn check_host_facts(texts: &[ManifestText], parsed: &[Manifest]) -> Result<(), (ErrorCode, String)> {
    if parsed.iter().all(|m| m.ports.iter().all(|p| p.host_ip.is_none())) {
        return Ok(());
    }
    let local = crate::host::local_addresses().map_err(|e| (ErrorCode::Refused, e.to_string()))?;
    for (text, m) in texts.iter().zip(parsed) {
        if let Some(why) = crate::host::host_ip_problem(m, &local) {
            return Err((ErrorCode::Invalid, format!("{}: {why}", text.file)));
        }
    }
    Ok(())
}

pub fn status(state: &State, only: Option<&str>) -> Vec<api::ServiceStatus> {
    state
        .services
        .iter()
        .filter(|(name, _)| only.is_none_or(|o| o == name.as_str()))
        .map(|(name, svc)| {
            let active = svc.active_release();
            let mut kept: Vec<u32> =
                svc.releases.iter().filter(|r| r.status == ReleaseStatus::Stopped).map(|r| r.number).collect();
            kept.sort_unstable_by(|a, b| b.cmp(a));
            api::ServiceStatus {
                name: name.clone(),
                mode: crate::deploy::Mode::of(&svc.manifest).name().into(),
                active: svc.active,
                image: active.map(|r| r.image.clone()),
                container: active.map(|r| r.container.clone()),
                addr: active.and_then(|r| r.addr).map(|a| a.to_string()),
                ports: svc
                    .manifest
                    .ports
                    .iter()
                    .map(|p| format!("{}/{} -> {}", p.host, p.protocol, p.container))
                    .collect(),
                kept,
                operation: svc.operation.as_ref().map(|o| format!("{:?} {}: {:?}", o.kind, o.to, o.phase).to_lowercase()),
                down: svc.down.clone(),
            }
        })
        .collect()
}

pub fn history(state: &State, service: &str) -> Option<api::HistoryView> {
    let svc = state.services.get(service)?;
    Some(api::HistoryView {
        service: service.to_string(),
        active: svc.active,
        releases: svc
            .releases
            .iter()
            .map(|r| api::ReleaseView {
                number: r.number,
                image: r.image.clone(),
                container: r.container.clone(),
                status: r.status,
                created_at: r.created_at,
                activated_at: r.activated_at,
                stopped_at: r.stopped_at,
            })
            .collect(),
        events: svc.history.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcutover\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 4242 \nNgid:\t0\n";

    #[test]
    fn supplementary_groups_are_read_for_the_peers_uid_only() {
        assert_eq!(status_groups(STATUS, 1000), Some(vec![4, 24, 4242]));
        assert_eq!(status_groups(STATUS, 1001), None, "another uid: a reused pid");
        assert_eq!(status_groups(&STATUS.replace("4 24 4242 ", ""), 1000), Some(vec![]));
    }

    #[test]
    fn the_allowed_group_counts_as_primary_or_supplementary() {
        let access = Access { allow_gid: Some(4242) };
        assert!(access.permits(0, 0, &[]));
        assert!(access.permits(1000, 4242, &[]));
        assert!(access.permits(1000, 1000, &[4, 4242]));
        assert!(!access.permits(1000, 1000, &[4, 24]));
        assert!(!Access::default().permits(1000, 4242, &[4242]));
    }

    #[test]
    fn this_process_groups_are_readable() {
        let me = std::process::id() as i32;
        let uid = nix::unistd::getuid().as_raw();
        let groups: Vec<u32> = nix::unistd::getgroups().unwrap().into_iter().map(|g| g.as_raw()).collect();
        assert_eq!(peer_groups(me, uid), groups);
    }
}
