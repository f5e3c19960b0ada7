//! The daemon's brokers, one per handoff-mode service: the service's listeners held in
//! its namespace and served on `@cutover/SERVICE`, plus the readiness socket
//! `@cutover/SERVICE/notify` its releases report `READY=1` on, and the static
//! handoff-exec helper written to the state directory for containers to mount.
//!
//! Behind the [`ServiceBrokers`] trait so the release state machine (`deploy`) is tested
//! with a fake. This module does not start or stop containers and does not decide when
//! a release is ready: it answers who took the listeners and who reported ready.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::adopt::{self, AdoptError};
use super::broker::{Broker, BrokerError, Namespace, Policy, Trust};
use super::listeners::ListenSpec;
use super::notify::NotifyServer;
use super::procs;
use super::HandoffError;

/// Where handoff-exec is mounted inside a release container.
pub const HELPER_IN_CONTAINER: &str = "/.cutover/handoff-exec";
/// Who reported `READY=1`: pid -> start time (so a recycled pid is not mistaken for it).
/// Only processes of a started release's tree get in (checked from the datagram's
/// kernel credentials at receipt), and entries of processes that are gone or no longer
/// trusted are dropped, so its size is bounded by the releases' own processes: no flood
/// from other local users can push a real sender out.
type ReadySenders = Arc<Mutex<HashMap<i32, u64>>>;

/// The abstract readiness socket of a service: `cutover/NAME/notify` (service names have
/// no `/`, so it never collides with a broker socket).
pub fn notify_socket_name(service: &str) -> String {
    format!("cutover/{service}/notify")
}

#[derive(Debug, thiserror::Error)]
pub enum BrokersError {
    #[error("handoff service `{service}`: {source}")]
    Broker {
        service: String,
        #[source]
        source: BrokerError,
    },
    #[error("handoff service `{service}`: the readiness socket: {source}")]
    Notify {
        service: String,
        #[source]
        source: HandoffError,
    },
    #[error("handoff service `{service}` has no broker (it is not being served)")]
    NotOpen { service: String },
    #[error("cannot write the handoff helper {}: {source}", path.display())]
    Helper {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handoff service `{service}`: cannot take the listeners back from process {pid}: {source}")]
    Adopt {
        service: String,
        pid: i32,
        #[source]
        source: AdoptError,
    },
}

/// What a service's broker serves, and to whom besides the releases' processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSpec {
    pub namespace: Namespace,
    pub listeners: Vec<ListenSpec>,
    pub allow_uids: Vec<u32>,
}

/// How [`ServiceBrokers::open`] got the listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Already served (same spec): nothing changed.
    AlreadyOpen,
    /// Bound anew.
    Bound,
    /// Duplicated from the running release `pid` (after a daemon restart).
    Adopted { pid: i32 },
}

/// How far a release (the process tree of its container's main process) has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// It received the listeners from the broker.
    pub fetched: bool,
    /// It sent `READY=1` on the service's notify socket.
    pub notified: bool,
}

/// The brokers as the release state machine sees them.
pub trait ServiceBrokers: Send + Sync + 'static {
    /// Serve `service`'s listeners (no-op if already served). `adopt_from`: a running
    /// release that holds the listeners; they are taken from it instead of bound, so the
    /// very sockets (and their queued connections) live on.
    fn open(&self, service: &str, spec: &BrokerSpec, adopt_from: Option<i32>) -> Result<Opened, BrokersError>;
    fn is_open(&self, service: &str) -> bool;
    /// Trust `pid` (a release's main process, just started) and its descendants.
    fn allow(&self, service: &str, pid: i32) -> Result<(), BrokersError>;
    /// Stop trusting `pid` (its release was stopped).
    fn forget(&self, service: &str, pid: i32);
    fn readiness(&self, service: &str, pid: i32) -> Readiness;
    /// Stop serving and close the daemon's copies of the listeners.
    fn close(&self, service: &str);
    /// The handoff-exec helper on the host, (re)written if missing or different.
    fn helper(&self) -> Result<PathBuf, BrokersError>;
}

struct Served {
    spec: BrokerSpec,
    broker: Broker,
    ready: ReadySenders,
    notify_task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.notify_task.abort();
    }
}

/// The real brokers of a daemon.
pub struct DaemonBrokers {
    helper_path: PathBuf,
    helper_bytes: &'static [u8],
    served: Mutex<HashMap<String, Served>>,
}

impl DaemonBrokers {
    /// Brokers whose helper lives at `<state_dir>/bin/handoff-exec`.
    pub fn new(state_dir: &Path) -> DaemonBrokers {
        DaemonBrokers {
            helper_path: state_dir.join("bin").join("handoff-exec"),
            helper_bytes: crate::embedded::HANDOFF_EXEC,
            served: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, service: &str, f: impl FnOnce(&Served) -> T) -> Option<T> {
        let served = self.served.lock().ok()?;
        served.get(service).map(f)
    }
}

impl ServiceBrokers for DaemonBrokers {
    fn open(&self, service: &str, spec: &BrokerSpec, adopt_from: Option<i32>) -> Result<Opened, BrokersError> {
        if self.with(service, |s| s.spec == *spec) == Some(true) {
            return Ok(Opened::AlreadyOpen);
        }
        // A different spec: the old broker goes first (its port may be the new one's).
        self.close(service);
        let mut policy = Policy::new();
        for uid in &spec.allow_uids {
            policy = policy.allow_uid(*uid);
        }
        let berr = |source| BrokersError::Broker { service: service.to_string(), source };
        let (broker, opened) = match adopt_from {
            Some(pid) => {
                let listeners = adopt::take_listeners(pid, &spec.listeners)
                    .map_err(|source| BrokersError::Adopt { service: service.to_string(), pid, source })?;
                (Broker::serve_in_namespace(&spec.namespace, service, listeners, policy).map_err(berr)?, Opened::Adopted { pid })
            }
            None => (Broker::bind_in_namespace(&spec.namespace, service, &spec.listeners, policy).map_err(berr)?, Opened::Bound),
        };
        let notify = NotifyServer::bind_abstract_in(&spec.namespace, &notify_socket_name(service))
            .map_err(|source| BrokersError::Notify { service: service.to_string(), source })?;
        let ready = ReadySenders::default();
        let notify_task = tokio::spawn(record_ready(service.to_string(), notify, broker.trust(), ready.clone()));
        if let Ok(mut served) = self.served.lock() {
            served.insert(service.to_string(), Served { spec: spec.clone(), broker, ready, notify_task });
        }
        Ok(opened)
    }

    fn is_open(&self, service: &str) -> bool {
        self.with(service, |_| ()).is_some()
    }

    fn allow(&self, service: &str, pid: i32) -> Result<(), BrokersError> {
        self.with(service, |s| s.broker.allow_pid(pid))
            .ok_or_else(|| BrokersError::NotOpen { service: service.to_string() })?
            .map_err(|source| BrokersError::Broker { service: service.to_string(), source })
    }

    fn forget(&self, service: &str, pid: i32) {
        self.with(service, |s| s.broker.forget_pid(pid));
    }

    fn readiness(&self, service: &str, pid: i32) -> Readiness {
        self.with(service, |s| Readiness {
            fetched: s.broker.handed_to_tree_of(pid),
            notified: s.ready.lock().map(|r| r.iter().any(|(&p, &start)| same_tree(p, start, pid))).unwrap_or(false),
        })
        .unwrap_or_default()
    }

    fn close(&self, service: &str) {
        let removed = self.served.lock().ok().and_then(|mut s| s.remove(service));
        if removed.is_some() {
            tracing::info!(service, "broker closed; the daemon's copies of the listeners are closed");
        }
    }

    fn helper(&self) -> Result<PathBuf, BrokersError> {
        write_helper(&self.helper_path, self.helper_bytes)?;
        Ok(self.helper_path.clone())
    }
}

/// Is `pid` (with start time `start`, so not a recycled pid) `root` or below it?
fn same_tree(pid: i32, start: u64, root: i32) -> bool {
    procs::stat(pid).map(|s| s.start_time) == Some(start) && procs::is_same_or_descendant(pid, root)
}

async fn record_ready(service: String, notify: NotifyServer, trust: Trust, ready: ReadySenders) {
    let ignored_log = crate::limits::LogThrottle::new();
    loop {
        let n = match notify.recv().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(service, "notify socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if !n.is_ready() {
            continue;
        }
        // Anyone in the namespace can send here. Only the sender's kernel-checked pid
        // (SCM_CREDENTIALS) counts, and only if it belongs to a release's process tree;
        // the deploy gate then asks whether it belongs to the release it waits for.
        let Some(pid) = n.sender.map(|c| c.pid) else { continue };
        if !trust.started_tree_contains(pid) {
            if let Some(held_back) = ignored_log.allow() {
                let uid = n.sender.map(|c| c.uid);
                tracing::debug!(service, pid, ?uid, held_back, "READY=1 from a process no release started: ignored");
            }
            continue;
        }
        let Some(stat) = procs::stat(pid) else { continue };
        tracing::debug!(service, pid, "READY=1");
        if let Ok(mut r) = ready.lock() {
            // Forget senders that exited or whose release was stopped (forgotten).
            r.retain(|&p, &mut start| p == pid || (procs::stat(p).map(|s| s.start_time) == Some(start) && trust.started_tree_contains(p)));
            r.insert(pid, stat.start_time);
        }
    }
}

/// Writes `bytes` to `path` (mode 0755) unless it already holds exactly them. Through a
/// temp file and a rename: running containers have the old file bind-mounted, and a
/// rename leaves their inode alone instead of changing a binary under them.
pub fn write_helper(path: &Path, bytes: &[u8]) -> Result<(), BrokersError> {
    let herr = |source| BrokersError::Helper { path: path.to_path_buf(), source };
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o777 == 0o755 && std::fs::read(path).is_ok_and(|b| b == bytes) {
            return Ok(());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(herr)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // A leftover (or planted) file or symlink at the temp path is unlinked, and the
        // new file created exclusively: nothing is ever written through a symlink.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(herr)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_helper_is_written_once_and_rewritten_when_it_differs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin/handoff-exec");
        write_helper(&path, b"one").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o755);
        let inode = std::fs::metadata(&path).unwrap().ino();
        write_helper(&path, b"one").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "unchanged content is left alone");
        write_helper(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode, "replaced by rename, not rewritten in place");
    }

    #[tokio::test]
    async fn ready_from_a_process_no_release_started_is_dropped_at_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let brokers = DaemonBrokers::new(dir.path());
        let service = format!("unit-ready-{}", std::process::id());
        let spec = BrokerSpec {
            namespace: Namespace::Current,
            listeners: vec![ListenSpec::parse("http=tcp://127.0.0.1:0", "x").unwrap()],
            allow_uids: vec![],
        };
        brokers.open(&service, &spec, None).unwrap();
        let me = std::process::id() as i32;
        let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(notify_socket_name(&service).as_bytes()).unwrap();
        let notified = || async {
            for _ in 0..50 {
                if brokers.readiness(&service, me).notified {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            false
        };
        // Not (yet) a release's process: its READY=1 is not recorded, not even for later.
        sock.send_to_addr(b"READY=1", &addr).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        brokers.allow(&service, me).unwrap();
        assert!(!notified().await, "a READY=1 from an untrusted sender was kept");
        sock.send_to_addr(b"READY=1", &addr).unwrap();
        assert!(notified().await, "the trusted sender's READY=1 counts");
        // Stopped (forgotten): its entry goes with the next datagram's bookkeeping.
        brokers.forget(&service, me);
        assert!(!brokers.with(&service, |s| s.broker.trust().started_tree_contains(me)).unwrap());
        brokers.close(&service);
    }

    #[tokio::test]
    async fn a_broker_reports_who_fetched_and_who_reported_ready() {
        let dir = tempfile::tempdir().unwrap();
        let brokers = DaemonBrokers::new(dir.path());
        let service = format!("unit-{}", std::process::id());
        let spec = BrokerSpec {
            namespace: Namespace::Current,
            listeners: vec![ListenSpec::parse("http=tcp://127.0.0.1:0", "x").unwrap()],
            allow_uids: vec![],
        };
        assert_eq!(brokers.open(&service, &spec, None).unwrap(), Opened::Bound);
        assert_eq!(brokers.open(&service, &spec, None).unwrap(), Opened::AlreadyOpen);
        let me = std::process::id() as i32;
        assert_eq!(brokers.readiness(&service, me), Readiness::default());
        brokers.allow(&service, me).unwrap();
        let socket = super::super::SocketName::broker(&service);
        let got = tokio::task::spawn_blocking(move || super::super::broker::fetch_listeners(&socket, &[])).await.unwrap().unwrap();
        assert_eq!(got.len(), 1);
        let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(notify_socket_name(&service).as_bytes()).unwrap();
        sock.send_to_addr(b"READY=1", &addr).unwrap();
        let mut r = Readiness::default();
        for _ in 0..100 {
            r = brokers.readiness(&service, me);
            if r.notified {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(r, Readiness { fetched: true, notified: true });
        // Another process tree (a child of ours: we are not below it) did neither.
        let mut other = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert_eq!(brokers.readiness(&service, other.id() as i32), Readiness::default());
        other.kill().unwrap();
        other.wait().unwrap();
        brokers.close(&service);
        assert!(!brokers.is_open(&service));
    }
}
