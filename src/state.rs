//! The daemon's persistent state: services, their releases and history, and the step an
//! unfinished release operation had reached.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory) under an
//! exclusive lock on the state directory, so a crash leaves either the old or the new
//! file, and two daemons can never share one state directory. Pure data apart from
//! [`StateStore`]; decisions about releases live in `deploy`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

pub const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// Bumped when the file's shape changes incompatibly.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, #[source] source: std::io::Error },
    #[error("another cutover daemon holds {} (stop it, or give this one another --state-dir)", path.display())]
    Locked { path: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Lock { path: PathBuf, #[source] source: nix::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error(
        "{} is corrupt ({source}); restore it from a backup, or move it away: the daemon then starts from the \
         releases it finds running (their containers carry their manifests) and changes no rule before that",
        path.display()
    )]
    Corrupt { path: PathBuf, #[source] source: serde_json::Error },
    #[error("{} has state version {found}, this cutover understands {STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, #[source] source: std::io::Error },
    #[error("cannot make {} private to root (mode {mode:o}): {source}; it holds the services' environment (secrets)", path.display())]
    Protect { path: PathBuf, mode: u32, #[source] source: std::io::Error },
    #[error("{} is not a directory; point --state-dir at a directory", path.display())]
    NotADirectory { path: PathBuf },
}

/// The state directory's mode: it holds the manifests' `env` (passwords, tokens).
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file in it.
pub const FILE_MODE: u32 = 0o600;

/// Create `dir` (and missing parents) as 0700 whatever the umask, and tighten an existing
/// one whose group or others may read, write or enter it (logged: someone loosened it,
/// or an old cutover made it 0755).
pub fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| StateError::CreateDir { path: dir.to_path_buf(), source })?;
    let meta = fs::metadata(dir).map_err(|source| StateError::CreateDir { path: dir.to_path_buf(), source })?;
    if !meta.is_dir() {
        return Err(StateError::NotADirectory { path: dir.to_path_buf() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|source| StateError::Protect { path: dir.to_path_buf(), mode: DIR_MODE, source })?;
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), was = format!("{mode:o}"), "the state directory was readable by others; made it 0700");
        }
    }
    Ok(())
}

/// Make an existing file 0600 (logged when it was looser); a missing file is fine.
fn tighten_file(path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    // symlink_metadata: a planted symlink is not followed (and its target not changed).
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(StateError::Read { path: path.to_path_buf(), source }),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_file() && mode & 0o177 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE))
            .map_err(|source| StateError::Protect { path: path.to_path_buf(), mode: FILE_MODE, source })?;
        tracing::warn!(file = %path.display(), was = format!("{mode:o}"), "a state file was readable by others; made it 0600");
    }
    Ok(())
}

/// Create `path` for writing: exclusively (a file or symlink already there is an error,
/// never followed or truncated), mode 0600 whatever the umask.
fn create_exclusive(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // A umask can only remove bits; set them exactly anyway (e.g. umask 0277).
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceState>,
    /// route_localnet values cutover changed, by interface, to restore when the last
    /// service is removed.
    #[serde(default)]
    pub route_localnet_before: BTreeMap<String, bool>,
    /// Containers of removed services that are still to be deleted (a failed or
    /// interrupted `remove`): deleted again after a restart and after the engine came
    /// back, and never adopted as a service's releases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_containers: Vec<String>,
}

impl State {
    /// [`ServiceState::forget_gone_releases`] of every service: done at each write.
    pub fn forget_gone_releases(&mut self) {
        for svc in self.services.values_mut() {
            svc.forget_gone_releases();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Container created, not yet serving.
    Starting,
    /// The host ports point at it.
    Active,
    /// Replaced, still finishing the connections it had.
    Draining,
    /// Stopped and kept for rollback.
    Stopped,
    /// Never became healthy, or was undone; its container is gone.
    Failed,
    /// Pruned beyond `keep`; its container is gone.
    Removed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub number: u32,
    pub image: String,
    pub container: String,
    pub container_id: String,
    pub status: ReleaseStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<u64>,
    /// The manifest the release was created from (env, command and ports of that time).
    pub manifest: Manifest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    Deploy,
    Rollback,
}

/// Steps of a release operation, in order. Recorded before each step's effect is
/// relied on, so a restarted daemon knows whether to undo or to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Healthy,
    /// About to point the host ports at the new release: recorded before the transaction,
    /// so a restart finds out whether it happened (the release runs: finish) or not (undo).
    Switching,
    Switched,
    Draining,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub kind: OperationKind,
    pub from: Option<u32>,
    pub to: u32,
    pub phase: Phase,
    pub started_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: u64,
    pub kind: OperationKind,
    pub from: Option<u32>,
    pub to: u32,
    /// `switched`, `refused`, `failed`, `undone`, `finished_after_restart`
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub manifest: Manifest,
    #[serde(default)]
    pub releases: Vec<Release>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<u32>,
    pub next_release: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// The active release died on its own and is not serving: why (until it serves again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
}

impl HistoryEntry {
    /// An entry without timings (refusals, undone and finished operations), dated now.
    pub fn untimed(kind: OperationKind, from: Option<u32>, to: u32, outcome: &str, message: impl Into<String>) -> Self {
        HistoryEntry {
            at: now(),
            kind,
            from,
            to,
            outcome: outcome.to_string(),
            message: message.into(),
            health_ms: None,
            switch_us: None,
            drain_ms: None,
        }
    }
}

/// The most history entries kept per service.
pub const HISTORY_LIMIT: usize = 200;
/// Releases whose container is gone (failed, undone or pruned) that a service keeps on
/// record, newest first, for `history`; the operations themselves stay in the history.
pub const GONE_KEPT: usize = 5;

impl ServiceState {
    pub fn new(manifest: Manifest) -> Self {
        ServiceState { manifest, releases: Vec::new(), active: None, next_release: 1, operation: None, history: Vec::new(), down: None }
    }

    pub fn release(&self, number: u32) -> Option<&Release> {
        self.releases.iter().find(|r| r.number == number)
    }

    pub fn release_mut(&mut self, number: u32) -> Option<&mut Release> {
        self.releases.iter_mut().find(|r| r.number == number)
    }

    pub fn active_release(&self) -> Option<&Release> {
        self.active.and_then(|n| self.release(n))
    }

    /// The container to address: its id once known, else its name (a crash can come
    /// between creating a container and recording its id).
    pub fn container_ref(release: &Release) -> String {
        if release.container_id.is_empty() {
            release.container.clone()
        } else {
            release.container_id.clone()
        }
    }

    /// Where `rollback` goes: the kept release that served before the active one (as
    /// `cd -` does), else the newest kept release older than the active one.
    pub fn previous_kept(&self) -> Option<&Release> {
        let active = self.active.unwrap_or(u32::MAX);
        let before = self
            .history
            .iter()
            .rev()
            .find(|h| h.to == active && matches!(h.outcome.as_str(), "switched" | "finished_after_restart"))
            .and_then(|h| h.from)
            .and_then(|n| self.release(n))
            .filter(|r| r.status == ReleaseStatus::Stopped);
        if before.is_some() {
            return before;
        }
        self.releases
            .iter()
            .filter(|r| r.status == ReleaseStatus::Stopped && r.number < active)
            .max_by_key(|r| r.number)
    }

    pub fn record(&mut self, entry: HistoryEntry) {
        self.history.push(entry);
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
    }

    /// Forget all but the newest [`GONE_KEPT`] releases whose container is gone, so a
    /// hundred failed deploys do not grow the state (each record holds a manifest).
    pub fn forget_gone_releases(&mut self) {
        let gone = |r: &Release| matches!(r.status, ReleaseStatus::Failed | ReleaseStatus::Removed);
        let mut numbers: Vec<u32> = self.releases.iter().filter(|r| gone(r)).map(|r| r.number).collect();
        if numbers.len() <= GONE_KEPT {
            return;
        }
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        let forget: std::collections::BTreeSet<u32> = numbers.into_iter().skip(GONE_KEPT).collect();
        self.releases.retain(|r| !forget.contains(&r.number));
    }

    /// Stopped releases beyond `keep`: the ones to prune. The most recently stopped are
    /// kept (they are what `rollback` goes to), not the highest numbers; `just_stopped`
    /// (the release an operation has just replaced) comes first whatever the clock says,
    /// as stop times are in whole seconds and two stops can share one.
    pub fn beyond_keep(&self, just_stopped: Option<u32>) -> Vec<u32> {
        let mut stopped: Vec<&Release> = self.releases.iter().filter(|r| r.status == ReleaseStatus::Stopped).collect();
        stopped.sort_unstable_by_key(|r| std::cmp::Reverse((Some(r.number) == just_stopped, r.stopped_at, r.number)));
        stopped.into_iter().skip(self.manifest.keep as usize).map(|r| r.number).collect()
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The state file and the lock that makes this daemon its only writer.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl StateStore {
    /// Create the directory if needed and take its lock (non-blocking).
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        use std::os::unix::fs::OpenOptionsExt;
        create_private_dir(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|source| StateError::Write { path: lock_path.clone(), source })?;
        let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(StateError::Locked { path: dir.to_path_buf() }),
            Err((_, source)) => return Err(StateError::Lock { path: lock_path, source }),
        };
        // Files an older cutover (or a umask of 022) left readable by everyone.
        tighten_file(&lock_path)?;
        tighten_file(&dir.join(STATE_FILE))?;
        Ok(StateStore { dir: dir.to_path_buf(), _lock: lock })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state, or an empty one if none was ever saved.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State { version: STATE_VERSION, ..State::default() })
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let mut state: State = serde_json::from_str(&text).map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version { path, found: state.version });
        }
        // Manifests stored before durations were bounded never passed the check that a
        // new manifest passes; a value that would overflow the clock is capped here.
        for svc in state.services.values_mut() {
            let stored = svc.releases.iter_mut().map(|r| &mut r.manifest);
            for note in std::iter::once(&mut svc.manifest).chain(stored).flat_map(Manifest::clamp_to_bounds) {
                tracing::warn!(file = %path.display(), "{note}");
            }
        }
        Ok(state)
    }

    /// Replace the state file atomically.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let werr = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StateError::Write { path: p, source }
        };
        let body = serde_json::to_vec_pretty(state).map_err(|e| StateError::Write { path: path.clone(), source: e.into() })?;
        // What is at the temp path is a crashed save's leftover or something planted in
        // the directory: unlink it (a symlink is removed, not followed), then create the
        // file exclusively, so the secrets go only into a new private file.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StateError::Write { path: tmp, source }),
        }
        let written = (|| {
            let mut f = create_exclusive(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StateError::Write { path: tmp, source });
        }
        fs::rename(&tmp, &path).map_err(werr(&path))?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(werr(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest::parse(Path::new("t.yaml"), "name: web\nimage: x:1\nports: [{host: 8080, container: 80}]\nkeep: 1\n").unwrap()
    }

    fn release(n: u32, status: ReleaseStatus) -> Release {
        Release {
            number: n,
            image: "x".into(),
            container: format!("c{n}"),
            container_id: format!("id{n}"),
            status,
            addr: None,
            created_at: 0,
            activated_at: None,
            stopped_at: None,
            manifest: manifest(),
        }
    }

    #[test]
    fn save_and_load_round_trip_and_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert!(matches!(StateStore::open(dir.path()), Err(StateError::Locked { .. })));
        let mut state = store.load().unwrap();
        assert!(state.services.is_empty());
        state.services.insert("web".into(), ServiceState::new(manifest()));
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    /// Runs `f` with the process umask set to `mask`, restoring it after. The umask is
    /// process-wide: only tests that create files with explicit modes run under it.
    fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(mask));
        let r = f();
        umask(old);
        r
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_state_is_private_whatever_the_umask() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let (store, state) = with_umask(0o022, || {
            let store = StateStore::open(&dir).unwrap();
            let mut state = store.load().unwrap();
            state.services.insert("web".into(), ServiceState::new(manifest()));
            store.save(&state).unwrap();
            (store, state)
        });
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&store.path()), 0o600);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        assert_eq!(store.load().unwrap(), state);
    }

    #[test]
    fn a_loose_state_dir_and_file_are_tightened_at_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.path().join(STATE_FILE), "{\"version\": 1}").unwrap();
        fs::set_permissions(dir.path().join(STATE_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let _store = StateStore::open(dir.path()).unwrap();
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&dir.path().join(STATE_FILE)), 0o600);
    }

    #[test]
    fn a_symlink_planted_at_the_temp_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        fs::write(&victim, "untouched").unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let tmp = dir.path().join(format!("{STATE_FILE}.tmp"));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        // A symlink to a path that does not exist yet: File::create would make it.
        let absent = elsewhere.path().join("absent");
        let mut state = store.load().unwrap();
        state.services.insert("web".into(), ServiceState::new(manifest()));
        store.save(&state).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        std::os::unix::fs::symlink(&absent, &tmp).unwrap();
        store.save(&state).unwrap();
        assert!(!absent.exists(), "the secrets were written through a planted symlink");
        assert_eq!(store.load().unwrap(), state);
        assert_eq!(mode(&store.path()), 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn corrupt_state_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        fs::write(store.path(), "{ not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn rollback_target_and_pruning() {
        let mut s = ServiceState::new(manifest());
        s.releases = vec![
            release(1, ReleaseStatus::Stopped),
            release(2, ReleaseStatus::Stopped),
            release(3, ReleaseStatus::Active),
        ];
        s.active = Some(3);
        assert_eq!(s.previous_kept().map(|r| r.number), Some(2));
        assert_eq!(s.beyond_keep(None), vec![1]);
        // Stopped within the same second: the one just replaced is kept.
        s.manifest.keep = 1;
        s.releases[0].stopped_at = Some(7);
        s.releases[1].stopped_at = Some(7);
        assert_eq!(s.beyond_keep(Some(1)), vec![2]);
        assert_eq!(s.beyond_keep(Some(2)), vec![1]);
    }

    #[test]
    fn failed_and_removed_releases_are_forgotten_beyond_a_few() {
        let mut s = ServiceState::new(manifest());
        s.releases = vec![release(1, ReleaseStatus::Stopped), release(2, ReleaseStatus::Active)];
        for n in 10..110 {
            s.releases.push(release(n, ReleaseStatus::Failed));
        }
        let live: Vec<u32> = s.releases.iter().filter(|r| r.number < 10).map(|r| r.number).collect();
        s.forget_gone_releases();
        let gone: Vec<u32> = s.releases.iter().filter(|r| r.status == ReleaseStatus::Failed).map(|r| r.number).collect();
        assert_eq!(gone, (105..110).collect::<Vec<_>>(), "the newest few failures stay on record");
        assert!(live.iter().all(|n| s.releases.iter().any(|r| r.number == *n)), "other releases stay");
    }
}
