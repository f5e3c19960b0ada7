//! The listener broker: holds a service's named listeners inside a network namespace and
//! hands them, with SCM_RIGHTS, to processes that ask on `@cutover/SERVICE` in that
//! namespace, after checking who asks.
//!
//! Who may receive fds ([`Policy`]): a process the daemon or supervisor started for the
//! service ([`Broker::allow_pid`]) and its descendants (parent chain in /proc), or a uid
//! allowed explicitly. The peer is identified by SO_PEERCRED (taken by the kernel at
//! connect time, translated into this process's pid namespace); an allowed pid is
//! remembered with its start time so a recycled pid is not trusted. Everyone else gets an
//! `Error(NotPermitted)` frame and no fd, and the refusal is logged.
//!
//! A bad peer (malformed, truncated, oversized frames, a wrong version, fds it should
//! not send) gets an `Error` frame naming the problem; every fd it sent is closed; the
//! broker keeps serving others. This module does not decide when a generation starts or
//! stops; the daemon or supervisor does, and tells the broker whom to trust.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use super::fds::{self, AsyncSeqPacket, PeerCred, SocketName};
use super::listeners::{ListenSpec, Listener};
use super::procs;
use super::protocol::{ErrorCode, Message};
use super::HandoffError;
use crate::limits::{Caps, Limiter, LogThrottle, Permit};

/// How long a connected peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for a peer the policy does not trust at connect time: all it can get is a
/// refusal, so it gets little time to ask for it.
const UNTRUSTED_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections of trusted peers (the releases' processes, allowed uids) open at once.
/// They have their own budget, so that no flood of strangers can keep a release from
/// its listeners.
pub const TRUSTED_CAPS: Caps = Caps { total: 64, per_peer: 64 };
/// Connections of other peers open at once, in all and per uid (SO_PEERCRED). A
/// release process that connects before it was allowed and finds these full is closed
/// at once; handoff-exec retries, and by then it is trusted.
pub const UNTRUSTED_CAPS: Caps = Caps { total: 16, per_peer: 4 };
/// Frames one connection may send before the broker hangs up.
const MAX_REQUESTS_PER_CONNECTION: usize = 16;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("`{0}` is not a service name for a broker socket")]
    InvalidName(String),
    #[error("cannot enter the network namespace {path}: {source}; does it exist, and does cutover run as root?")]
    Namespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("broker for {service}: {source}")]
    Socket {
        service: String,
        #[source]
        source: HandoffError,
    },
    #[error("the broker needs a tokio runtime")]
    NoRuntime,
    #[error("process {0} does not exist; it cannot be allowed")]
    NoSuchProcess(i32),
}

/// The network namespace the listeners and the broker socket are created in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    /// The namespace of the calling process.
    Current,
    /// A namespace file: `/proc/PID/ns/net`, `/run/netns/NAME`, ...
    Path(PathBuf),
}

impl Namespace {
    /// The host's namespace (that of pid 1).
    pub fn host() -> Namespace {
        Namespace::Path("/proc/1/ns/net".into())
    }
    /// The namespace of a process, e.g. a container's init.
    pub fn of_pid(pid: i32) -> Namespace {
        Namespace::Path(format!("/proc/{pid}/ns/net").into())
    }
    /// A namespace made with `ip netns add NAME`.
    pub fn named(name: &str) -> Namespace {
        Namespace::Path(format!("/run/netns/{name}").into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AllowedProcess {
    pid: i32,
    start_time: u64,
}

/// Who may receive the listeners.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    processes: Vec<AllowedProcess>,
    uids: Vec<u32>,
}

/// What the policy says about a peer, with the reason (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed(String),
    Refused(String),
}

impl Policy {
    pub fn new() -> Policy {
        Policy::default()
    }

    /// Also serve every process running as `uid` (the manifest's `allow_uids`).
    pub fn allow_uid(mut self, uid: u32) -> Policy {
        self.uids.push(uid);
        self
    }

    fn allow_process(&mut self, pid: i32) -> Result<(), BrokerError> {
        let stat = procs::stat(pid).ok_or(BrokerError::NoSuchProcess(pid))?;
        self.processes.retain(|p| p.pid != pid);
        self.processes.push(AllowedProcess { pid, start_time: stat.start_time });
        Ok(())
    }

    /// Decides for a peer.
    pub fn decide(&self, peer: &PeerCred) -> Decision {
        if self.uids.contains(&peer.uid) {
            return Decision::Allowed(format!("uid {} is allowed", peer.uid));
        }
        for p in &self.processes {
            // A pid that now belongs to another process (same pid, other start time) is
            // not the process that was started for the service.
            if procs::stat(p.pid).map(|s| s.start_time) != Some(p.start_time) {
                continue;
            }
            if procs::is_same_or_descendant(peer.pid, p.pid) {
                return Decision::Allowed(format!("pid {} is (a descendant of) started process {}", peer.pid, p.pid));
            }
        }
        Decision::Refused(format!(
            "pid {} (uid {}) was not started for this service and its uid is not allowed",
            peer.pid, peer.uid
        ))
    }
}

/// What the broker did, for tests and status.
#[derive(Debug, Default)]
pub struct Stats {
    pub served: AtomicU64,
    pub refused: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Connections fully handled (closed).
    pub connections: AtomicU64,
    /// Connections closed at once because their peer was over a cap.
    pub over_cap: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.served.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
            self.bad_requests.load(Ordering::SeqCst),
            self.connections.load(Ordering::SeqCst),
        )
    }
}

/// How many recent receivers a broker remembers (see [`Broker::handed_to_tree_of`]).
const HANDED_MEMORY: usize = 64;

struct Shared {
    service: String,
    listeners: Vec<Listener>,
    /// Shared with the readiness socket's bookkeeping (see [`Broker::trust`]).
    policy: Arc<Mutex<Policy>>,
    trusted: Limiter<()>,
    untrusted: Limiter<u32>,
    over_cap_log: LogThrottle,
    stats: Stats,
    /// Recent receivers of the listeners (pid with its start time, so a recycled pid is
    /// not mistaken for one): the daemon's readiness gate asks whether the release it
    /// started has taken the listeners yet.
    handed: Mutex<std::collections::VecDeque<AllowedProcess>>,
}

/// A running broker. Dropping it stops serving (the listeners it holds close when the
/// last connection handler is done).
pub struct Broker {
    shared: Arc<Shared>,
    socket: SocketName,
    task: tokio::task::JoinHandle<()>,
}

impl Broker {
    /// Binds `listeners` and the broker socket `@cutover/SERVICE` inside `namespace`,
    /// and serves them. Call inside a tokio runtime.
    pub fn bind_in_namespace(namespace: &Namespace, service: &str, listeners: &[ListenSpec], policy: Policy) -> Result<Broker, BrokerError> {
        if !super::listeners::valid_listener_name(service) {
            return Err(BrokerError::InvalidName(service.to_string()));
        }
        let socket = SocketName::broker(service);
        let (bound, broker_fd) = in_namespace(namespace, {
            let socket = socket.clone();
            let listeners = listeners.to_vec();
            move || -> Result<(Vec<Listener>, OwnedFd), HandoffError> {
                let bound = listeners.iter().map(Listener::bind).collect::<Result<Vec<_>, _>>()?;
                Ok((bound, fds::listen(&socket)?))
            }
        })?
        .map_err(|source| BrokerError::Socket { service: service.to_string(), source })?;
        Broker::serve_fd(service, socket, broker_fd, bound, policy)
    }

    /// Serves listeners that already exist (e.g. taken back from a running release after
    /// a daemon restart) on `@cutover/SERVICE`, created inside `namespace`.
    pub fn serve_in_namespace(namespace: &Namespace, service: &str, listeners: Vec<Listener>, policy: Policy) -> Result<Broker, BrokerError> {
        if !super::listeners::valid_listener_name(service) {
            return Err(BrokerError::InvalidName(service.to_string()));
        }
        let socket = SocketName::broker(service);
        let broker_fd = in_namespace(namespace, {
            let socket = socket.clone();
            move || fds::listen(&socket)
        })?
        .map_err(|source| BrokerError::Socket { service: service.to_string(), source })?;
        Broker::serve_fd(service, socket, broker_fd, listeners, policy)
    }

    /// Serves already bound listeners on `socket` (created in the current namespace).
    pub fn serve(service: &str, socket: SocketName, listeners: Vec<Listener>, policy: Policy) -> Result<Broker, BrokerError> {
        let fd = fds::listen(&socket).map_err(|source| BrokerError::Socket { service: service.to_string(), source })?;
        Broker::serve_fd(service, socket, fd, listeners, policy)
    }

    fn serve_fd(service: &str, socket: SocketName, fd: OwnedFd, listeners: Vec<Listener>, policy: Policy) -> Result<Broker, BrokerError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BrokerError::NoRuntime)?;
        let listener = {
            let _enter = runtime.enter();
            AsyncSeqPacket::new(fd).map_err(|e| BrokerError::Socket {
                service: service.to_string(),
                source: HandoffError::io("register", socket.to_string(), e),
            })?
        };
        let shared = Arc::new(Shared {
            service: service.to_string(),
            listeners,
            policy: Arc::new(Mutex::new(policy)),
            trusted: Limiter::new(TRUSTED_CAPS),
            untrusted: Limiter::new(UNTRUSTED_CAPS),
            over_cap_log: LogThrottle::new(),
            stats: Stats::default(),
            handed: Mutex::new(std::collections::VecDeque::new()),
        });
        let task = runtime.spawn(accept_loop(listener, shared.clone()));
        tracing::info!(service, socket = %socket, "broker serving");
        Ok(Broker { shared, socket, task })
    }

    /// Trust `pid` (a process just started for the service) and its descendants.
    pub fn allow_pid(&self, pid: i32) -> Result<(), BrokerError> {
        let mut policy = self.shared.policy.lock().map_err(|_| BrokerError::NoSuchProcess(pid))?;
        policy.allow_process(pid)
    }

    /// Stop trusting `pid` (its generation was stopped).
    pub fn forget_pid(&self, pid: i32) {
        if let Ok(mut p) = self.shared.policy.lock() {
            p.processes.retain(|a| a.pid != pid);
        }
    }

    pub fn socket(&self) -> &SocketName {
        &self.socket
    }

    /// Who the broker trusts, as it changes: for the readiness socket, which must count
    /// only datagrams from the releases' own processes.
    pub fn trust(&self) -> Trust {
        Trust(self.shared.policy.clone())
    }

    /// Whether `root` or one of its descendants has received the listeners (and is still
    /// the same process). A release "has taken its listeners" when this is true for the
    /// pid of its container.
    pub fn handed_to_tree_of(&self, root: i32) -> bool {
        let Ok(handed) = self.shared.handed.lock() else { return false };
        handed.iter().any(|p| {
            procs::stat(p.pid).map(|s| s.start_time) == Some(p.start_time) && procs::is_same_or_descendant(p.pid, root)
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The listeners, by name (e.g. to read their bound addresses).
    pub fn listeners(&self) -> &[Listener] {
        &self.shared.listeners
    }
}

/// A live view of a broker's trusted processes.
#[derive(Clone)]
pub struct Trust(Arc<Mutex<Policy>>);

impl Trust {
    /// Is `pid` a process the broker was told to trust ([`Broker::allow_pid`]), or one
    /// of its descendants (and still the same process, not a recycled pid)?
    pub fn started_tree_contains(&self, pid: i32) -> bool {
        let roots: Vec<i32> = match self.0.lock() {
            Ok(policy) => policy.processes.iter().map(|p| (p.pid, p.start_time)).collect::<Vec<_>>(),
            Err(_) => return false,
        }
        .into_iter()
        .filter(|&(root, start)| procs::stat(root).map(|s| s.start_time) == Some(start))
        .map(|(root, _)| root)
        .collect();
        if roots.is_empty() {
            return false;
        }
        // One walk up from `pid` for all roots: this runs for every datagram a flood sends.
        let mut cur = pid;
        for _ in 0..4096 {
            if roots.contains(&cur) {
                return true;
            }
            if cur <= 1 {
                return false;
            }
            match procs::stat(cur) {
                Some(s) => cur = s.ppid,
                None => return false,
            }
        }
        false
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `f` on a new thread that has entered `namespace`: sockets created there belong
/// to that namespace for good. The thread ends afterwards (setns is per thread, so a
/// thread of a pool must never be moved).
pub(crate) fn in_namespace<T: Send + 'static>(namespace: &Namespace, f: impl FnOnce() -> T + Send + 'static) -> Result<T, BrokerError> {
    let path = match namespace {
        Namespace::Current => return Ok(f()),
        Namespace::Path(p) => p.clone(),
    };
    let file = std::fs::File::open(&path).map_err(|source| BrokerError::Namespace { path: path.clone(), source })?;
    let thread = std::thread::spawn(move || -> Result<T, std::io::Error> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    });
    match thread.join() {
        Ok(r) => r.map_err(|source| BrokerError::Namespace { path, source }),
        Err(_) => Err(BrokerError::Namespace { path, source: std::io::Error::other("the namespace thread panicked") }),
    }
}

/// A connection the caps let in, with how long its peer may take to ask. Its place in
/// the caps is given back when it is dropped.
struct Admitted {
    peer: PeerCred,
    timeout: Duration,
    _slot: Slot,
}

enum Slot {
    Trusted(#[allow(dead_code)] Permit<()>),
    Stranger(#[allow(dead_code)] Permit<u32>),
}

/// Decides, at accept time, whether a connection is served; the caps count it until it
/// closes. Trusted peers and strangers have separate budgets, strangers one per uid.
fn admit(shared: &Shared, fd: &OwnedFd) -> Option<Admitted> {
    let service = shared.service.as_str();
    let peer = match fds::peer_credentials(fd.as_fd()) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(service, "broker: cannot read the peer's credentials: {e}");
            return None;
        }
    };
    let trusted = shared.policy.lock().map(|p| matches!(p.decide(&peer), Decision::Allowed(_))).unwrap_or(false);
    let admitted = if trusted {
        shared.trusted.admit_within_total().map(|p| Admitted { peer, timeout: REQUEST_TIMEOUT, _slot: Slot::Trusted(p) })
    } else {
        shared.untrusted.admit(peer.uid).map(|p| Admitted { peer, timeout: UNTRUSTED_REQUEST_TIMEOUT, _slot: Slot::Stranger(p) })
    };
    match admitted {
        Ok(a) => Some(a),
        Err(over) => {
            shared.stats.over_cap.fetch_add(1, Ordering::SeqCst);
            if let Some(held_back) = shared.over_cap_log.allow() {
                tracing::warn!(
                    service,
                    pid = peer.pid,
                    uid = peer.uid,
                    held_back,
                    "broker: connection closed at once: {over} (a local user flooding the broker?)"
                );
            }
            None
        }
    }
}

async fn accept_loop(listener: AsyncSeqPacket, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok(fd) => {
                // Over a cap: `fd` is closed here, before any task or buffer is spent on it.
                let Some(admitted) = admit(&shared, &fd) else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    handle_connection(fd, admitted.peer, admitted.timeout, &shared).await;
                    shared.stats.connections.fetch_add(1, Ordering::SeqCst);
                    drop(admitted);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; keep serving.
                tracing::warn!(service = shared.service, "broker accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Repeated warnings of the brokers (bad requests, refusals), at most one a second each.
static BAD_REQUEST_LOG: crate::limits::LogThrottle = crate::limits::LogThrottle::new();
static REFUSAL_LOG: crate::limits::LogThrottle = crate::limits::LogThrottle::new();

async fn handle_connection(fd: OwnedFd, peer: PeerCred, timeout: Duration, shared: &Shared) {
    let service = shared.service.as_str();
    let conn = match AsyncSeqPacket::new(fd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(service, "broker: {e}");
            return;
        }
    };
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let received = match tokio::time::timeout(timeout, conn.recv_message()).await {
            Err(_) => {
                tracing::debug!(service, pid = peer.pid, "broker: peer sent nothing in time");
                return;
            }
            Ok(r) => r,
        };
        // Any fds of a bad frame are dropped (closed) inside recv_message's error path.
        let reply = match received {
            Err(HandoffError::Closed) => return,
            Err(e) => {
                shared.stats.bad_requests.fetch_add(1, Ordering::SeqCst);
                // A flood of malformed requests must not flood the log: one line a second,
                // with how many were held back.
                if let Some(held_back) = BAD_REQUEST_LOG.allow() {
                    tracing::warn!(service, pid = peer.pid, uid = peer.uid, held_back, "broker: bad request: {e}");
                }
                let code = match &e {
                    HandoffError::Frame(f) => f.code(),
                    _ => ErrorCode::Malformed,
                };
                send_error(&conn, code, &format!("{e}")).await;
                continue;
            }
            Ok((Message::RequestListeners { names }, _no_fds)) => answer(shared, &peer, &names),
            Ok((other, _fds)) => {
                shared.stats.bad_requests.fetch_add(1, Ordering::SeqCst);
                Answer::Error(ErrorCode::Unexpected, format!("a broker answers RequestListeners only, not {:?}", other.kind()))
            }
        };
        match reply {
            Answer::Listeners(names, fds) => {
                let msg = Message::Listeners { names };
                match conn.send_message(&msg, &fds).await {
                    Ok(()) => {
                        shared.stats.served.fetch_add(1, Ordering::SeqCst);
                        remember_receiver(shared, peer.pid);
                    }
                    Err(e) => tracing::warn!(service, pid = peer.pid, "broker: cannot send listeners: {e}"),
                }
            }
            Answer::Error(code, message) => send_error(&conn, code, &message).await,
        }
    }
}

fn remember_receiver(shared: &Shared, pid: i32) {
    let Some(stat) = procs::stat(pid) else { return };
    if let Ok(mut handed) = shared.handed.lock() {
        handed.retain(|p| p.pid != pid);
        if handed.len() == HANDED_MEMORY {
            handed.pop_front();
        }
        handed.push_back(AllowedProcess { pid, start_time: stat.start_time });
    }
}

enum Answer<'a> {
    Listeners(Vec<String>, Vec<BorrowedFd<'a>>),
    Error(ErrorCode, String),
}

fn answer<'a>(shared: &'a Shared, peer: &PeerCred, names: &[String]) -> Answer<'a> {
    let service = shared.service.as_str();
    let decision = match shared.policy.lock() {
        Ok(p) => p.decide(peer),
        Err(_) => Decision::Refused("the policy is unavailable".into()),
    };
    match decision {
        Decision::Refused(reason) => {
            shared.stats.refused.fetch_add(1, Ordering::SeqCst);
            if let Some(held_back) = REFUSAL_LOG.allow() {
                tracing::warn!(service, pid = peer.pid, uid = peer.uid, held_back, "broker refused listeners: {reason}");
            }
            Answer::Error(ErrorCode::NotPermitted, format!("refused: {reason}"))
        }
        Decision::Allowed(reason) => {
            let by_name: HashMap<&str, &Listener> = shared.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
            let chosen: Vec<&Listener> = if names.is_empty() {
                shared.listeners.iter().collect()
            } else {
                let mut chosen = Vec::new();
                for n in names {
                    match by_name.get(n.as_str()) {
                        Some(l) => chosen.push(*l),
                        None => {
                            let known: Vec<&str> = shared.listeners.iter().map(|l| l.name.as_str()).collect();
                            return Answer::Error(ErrorCode::UnknownListener, format!("no listener `{n}`; this service has {known:?}"));
                        }
                    }
                }
                chosen
            };
            tracing::info!(service, pid = peer.pid, "broker hands over {} listener(s): {reason}", chosen.len());
            Answer::Listeners(chosen.iter().map(|l| l.name.clone()).collect(), chosen.iter().map(|l| l.fd.as_fd()).collect())
        }
    }
}

async fn send_error(conn: &AsyncSeqPacket, code: ErrorCode, message: &str) {
    let _ = conn.send_message(&Message::Error { code, message: message.to_string() }, &[]).await;
}

/// Fetches listeners from a broker (blocking). Empty `names`: all of them.
pub fn fetch_listeners(socket: &SocketName, names: &[&str]) -> Result<Vec<Listener>, HandoffError> {
    let conn = fds::connect(socket)?;
    fds::set_timeouts(conn.as_fd(), REQUEST_TIMEOUT).map_err(|e| HandoffError::io("set timeouts on", socket.to_string(), e))?;
    let request = Message::RequestListeners { names: names.iter().map(|n| n.to_string()).collect() };
    fds::send_message(conn.as_fd(), &request, &[])?;
    match fds::recv_message(conn.as_fd())? {
        (Message::Listeners { names }, fds) => Ok(names.into_iter().zip(fds).map(|(name, fd)| Listener { name, fd }).collect()),
        (Message::Error { code, message }, _) => Err(HandoffError::Refused { code, message }),
        (other, _) => Err(HandoffError::Unexpected { got: other.kind(), expected: "Listeners" }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn policy_allows_the_started_process_its_descendants_and_allowed_uids() {
        let me = std::process::id() as i32;
        let parent = procs::stat(me).unwrap().ppid;
        let mut policy = Policy::new().allow_uid(4242);
        let me_cred = PeerCred { pid: me, uid: 1000, gid: 1000 };
        assert!(matches!(policy.decide(&me_cred), Decision::Refused(_)));
        policy.allow_process(parent).unwrap();
        assert!(matches!(policy.decide(&me_cred), Decision::Allowed(_)));
        let stranger = PeerCred { pid: 1, uid: 4242, gid: 0 };
        assert!(matches!(policy.decide(&stranger), Decision::Allowed(_)));
        let stranger = PeerCred { pid: 1, uid: 4243, gid: 0 };
        assert!(matches!(policy.decide(&stranger), Decision::Refused(_)));
    }

    #[test]
    fn a_recycled_pid_is_not_trusted() {
        let me = std::process::id() as i32;
        let mut policy = Policy::new();
        policy.processes.push(AllowedProcess { pid: me, start_time: 1 });
        assert!(matches!(policy.decide(&PeerCred { pid: me, uid: 0, gid: 0 }), Decision::Refused(_)));
    }
}
