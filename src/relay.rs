//! The `::1` relay: IPv6 clients on the host's loopback address, the one client path the
//! kernel cannot NAT to a release.
//!
//! Why a relay at all: a packet from `::1` is never routed off the host (IPv6 has no
//! `route_localnet`; a loopback source on any other device is dropped), so a DNAT of
//! `[::1]:PORT` to a container address can never arrive. Docker itself serves `::1` only
//! through its userland proxy. So for each NAT-mode host port that `::1` belongs to (no
//! `host_ip`, or `::` or `::1`), the daemon listens on `[::1]:PORT` and relays to the
//! release that is active when a connection or flow begins, and keeps it there, as
//! conntrack keeps a NAT binding:
//! - TCP: each accepted connection is copied to and from its release for its whole life.
//! - UDP: each client address and port is a flow with its own socket to its release; the
//!   release's answers go back from `[::1]:PORT`. A flow ends when it was quiet for
//!   [`FLOW_EXPIRY`] ([`FLOW_EXPIRY_SHORT`] if it lasted under [`FLOW_STREAM`], as
//!   conntrack's UDP timeouts go), when the relay is full and it is the longest quiet
//!   flow (quiet for [`EVICT_IDLE`] at least), when the drain finds it quiet for the
//!   service's `udp_idle`
//!   ([`Relay::drain_udp`]: its next datagram starts a flow to the active release, as the
//!   kernel path's quiet conntrack entries are deleted), or when its release is done
//!   ([`Relay::forget_udp`]).
//!
//! A switch ([`Relay::route`], right after the nftables transaction) changes only where
//! new connections and flows go; the drain of the old release counts the relayed
//! connections still open to it ([`Relay::open_to`]) and its busy flows.
//!
//! Limits: at most [`MAX_RELAYED`] connections and flows at once (more connections are
//! reset, more flows' datagrams dropped); [`CONNECT_TIMEOUT`] to reach the release; while
//! the daemon is down, `::1` connections are refused, `::1` datagrams answered with ICMP
//! port unreachable, and what it relayed ends (every other client path is the kernel's and
//! does not notice). Errors are logged at most once a second (connections, flows) or once
//! per port (listening), never one line per connection.
//!
//! Owns its listeners and its relayed connections; must not touch rules or releases (the
//! caller computes the routes from the same desired state the rules come from: [`routes`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use crate::limits::{Caps, Limiter, LogThrottle};
use crate::manifest::Protocol;
use crate::plan::Target;

/// Relayed connections and UDP flows open at once, all ports together. Each one costs the
/// daemon one or two fds and a task; the systemd unit's fd limit (65536) leaves room for
/// this many and the rest.
pub const MAX_RELAYED: usize = 1024;
/// A relayed UDP flow with no datagram either way for this long ends (the kernel's default
/// for a UDP stream, `nf_conntrack_udp_timeout_stream`, is 120 s).
pub const FLOW_EXPIRY: Duration = Duration::from_secs(120);
/// A flow that lasted less than [`FLOW_STREAM`] (a query and its answer) ends after this
/// long without a datagram (the kernel's `nf_conntrack_udp_timeout` is 30 s).
pub const FLOW_EXPIRY_SHORT: Duration = Duration::from_secs(30);
/// A flow active for longer than this is a stream (conntrack's 2 s).
pub const FLOW_STREAM: Duration = Duration::from_secs(2);
/// When the relay is full, a new flow takes the place of the longest quiet flow if that
/// one was quiet for this long at least (as conntrack drops an old entry when its table
/// is full); otherwise the new flow's datagram is dropped.
pub const EVICT_IDLE: Duration = Duration::from_secs(1);
/// How often the UDP listeners look for expired flows (at most).
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);
/// The largest datagram relayed (IPv6's payload limit without jumbograms).
const MAX_DATAGRAM: usize = 65_535;
/// How long a relayed connection may take to reach its release before the client's
/// connection is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of fds, most likely) before the next one, so a
/// listener in trouble does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Where new connections to one host port go: release `release` of `service`, at `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    pub release: u32,
    /// The release's container address and container port: IPv6 when the release has an
    /// IPv6 address (as for any other IPv6 client), else IPv4.
    pub to: SocketAddr,
}

/// The relay's whole table: (protocol, host port) -> route.
pub type Routes = BTreeMap<(Protocol, u16), Route>;

/// Does a port bound on `host_ip` (None: every address) take clients on `::1`?
pub fn takes_loopback6(host_ip: Option<IpAddr>) -> bool {
    match host_ip {
        None => true,
        Some(IpAddr::V6(a)) => a.is_unspecified() || a.is_loopback(),
        Some(IpAddr::V4(_)) => false,
    }
}

/// The routes for the data plane's `targets` (what the rules point at): every TCP and UDP
/// host port `::1` belongs to. Pure.
pub fn routes(targets: &[Target]) -> Routes {
    targets
        .iter()
        .filter(|t| takes_loopback6(t.host_ip))
        .map(|t| {
            let to = match t.addr6 {
                Some(a) => SocketAddr::from((a, t.port)),
                None => SocketAddr::from((t.addr, t.port)),
            };
            ((t.protocol, t.host_port), Route { service: t.service.clone(), release: t.release, to })
        })
        .collect()
}

/// Why the relay could not do something; logged, never a failed release.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot listen on [::1]:{port} for IPv6 clients on the host's loopback: {source}")]
    Listen {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("the relay on [::1]:{port} cannot accept a connection: {source}")]
    Accept {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("the relay on [::1]:{port} cannot reach release {release} of `{service}` at {to}: {source}")]
    Connect {
        port: u16,
        service: String,
        release: u32,
        to: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the relay on [::1]:{port} cannot reach release {release} of `{service}` at {to}: no answer within {timeout:?}")]
    ConnectTimeout { port: u16, service: String, release: u32, to: SocketAddr, timeout: Duration },
    #[error("the relay on [::1]:{port} refused a connection: {open} relayed connections are open (the most at once)")]
    OverCap { port: u16, open: usize },
    #[error("cannot listen on [::1]:{port}/udp for IPv6 clients on the host's loopback: {source}")]
    ListenUdp {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("the relay on [::1]:{port}/udp cannot receive: {source}")]
    Receive {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("the relay on [::1]:{port}/udp cannot open a flow to release {release} of `{service}` at {to}: {source}")]
    Flow {
        port: u16,
        service: String,
        release: u32,
        to: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the relay on [::1]:{port}/udp dropped a datagram of a new flow: {open} relayed connections and flows are open (the most at once)")]
    FlowOverCap { port: u16, open: usize },
}

impl RelayError {
    /// What the operator can do about a failed listen.
    pub fn hint(&self) -> &'static str {
        match self {
            RelayError::Listen { source, .. } | RelayError::ListenUdp { source, .. } => match source.raw_os_error() {
                Some(libc::EADDRINUSE) => {
                    "another process listens on this port of ::1 (see `ss -lntup`); ::1 clients reach it, not the release; every other client path is served"
                }
                Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT) => {
                    "IPv6 is off on lo (`sysctl net.ipv6.conf.lo.disable_ipv6=0` and `ip link set lo up` turn it on); clients use 127.0.0.1 or a host address meanwhile"
                }
                _ => "::1 clients of this port are refused; every other client path is served",
            },
            _ => "",
        }
    }
}

/// The relay as the release code sees it: the seam its tests replace.
pub trait Relay: Send + Sync + 'static {
    /// From now on, new `::1` connections to each port of `routes` go to its route; ports
    /// not in `routes` stop listening. Connections already open keep their release. Never
    /// fails: a port it cannot listen on is logged (once) and tried again at the next call.
    fn route(&self, routes: Routes);
    /// Relayed TCP connections open (or being opened) to release `release` of `service`.
    fn open_to(&self, service: &str, release: u32) -> usize;
    /// The drain of release `release` of `service`: its relayed UDP flows quiet for `idle`
    /// end (their next datagram starts a flow to the active release); returns how many are
    /// still busy.
    fn drain_udp(&self, service: &str, release: u32, idle: Duration) -> usize;
    /// End every relayed UDP flow to release `release` of `service` (it is stopped, or it
    /// failed and traffic went back).
    fn forget_udp(&self, service: &str, release: u32);
    /// The host ports it listens on now (its own sockets, no conflict for these ports).
    fn listening(&self) -> BTreeSet<(Protocol, u16)>;
}

/// The real relay: tokio listeners on `[::1]:PORT`, one task per relayed connection and
/// per UDP flow.
pub struct LoopbackRelay {
    shared: Arc<Shared>,
    listeners: Mutex<BTreeMap<(Protocol, u16), tokio::task::JoinHandle<()>>>,
    /// Ports whose listen failed and was logged; logged again only after a success.
    failed: Mutex<BTreeSet<(Protocol, u16)>>,
}

struct Shared {
    routes: RwLock<Routes>,
    limiter: Limiter<()>,
    open: Mutex<BTreeMap<(String, u32), usize>>,
    /// UDP flows by (host port, client address).
    flows: Mutex<HashMap<(u16, SocketAddr), Flow>>,
    /// The origin of the flows' last-seen times.
    epoch: Instant,
    /// [`EVICT_IDLE`], but in tests.
    evict_idle: Duration,
    connect_timeout: Duration,
    log: LogThrottle,
}

/// One relayed UDP flow: the client's datagrams go out through `upstream` (connected to
/// the release), a task sends the release's answers back to the client.
struct Flow {
    service: String,
    release: u32,
    upstream: Arc<UdpSocket>,
    /// Milliseconds since [`Shared::epoch`] of its first datagram.
    started: u64,
    /// Milliseconds since [`Shared::epoch`] of the last datagram either way.
    last: Arc<AtomicU64>,
    answers: tokio::task::JoinHandle<()>,
    _permit: crate::limits::Permit<()>,
}

impl Flow {
    fn idle(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last.load(Ordering::Relaxed)))
    }

    /// Quiet for longer than a flow of its kind may be.
    fn expired(&self, now_ms: u64) -> bool {
        let lasted = Duration::from_millis(self.last.load(Ordering::Relaxed).saturating_sub(self.started));
        self.idle(now_ms) >= if lasted < FLOW_STREAM { FLOW_EXPIRY_SHORT } else { FLOW_EXPIRY }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.answers.abort();
    }
}

impl Default for LoopbackRelay {
    fn default() -> Self {
        LoopbackRelay::new(MAX_RELAYED, CONNECT_TIMEOUT)
    }
}

impl LoopbackRelay {
    pub fn new(max_connections: usize, connect_timeout: Duration) -> LoopbackRelay {
        LoopbackRelay {
            shared: Arc::new(Shared {
                routes: RwLock::new(Routes::new()),
                // One peer (::1) only: the total is the cap.
                limiter: Limiter::new(Caps { total: max_connections, per_peer: max_connections }),
                open: Mutex::new(BTreeMap::new()),
                flows: Mutex::new(HashMap::new()),
                epoch: Instant::now(),
                evict_idle: EVICT_IDLE,
                connect_timeout,
                log: LogThrottle::new(),
            }),
            listeners: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeSet::new()),
        }
    }
}

#[cfg(test)]
impl LoopbackRelay {
    /// A relay whose full table evicts flows quiet for `idle` (tests pick a time no stall
    /// of the test machine reaches, or one they wait out).
    fn with_evict_idle(mut self, idle: Duration) -> LoopbackRelay {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.evict_idle = idle;
        }
        self
    }
}

impl Relay for LoopbackRelay {
    fn route(&self, routes: Routes) {
        let ports: BTreeSet<(Protocol, u16)> = routes.keys().copied().collect();
        // Routes first: a listener that is already up serves new connections per the new
        // table from here on.
        *self.shared.routes.write().unwrap_or_else(PoisonError::into_inner) = routes;
        let mut listeners = self.listeners.lock().unwrap_or_else(PoisonError::into_inner);
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        listeners.retain(|key, task| {
            let keep = ports.contains(key) && !task.is_finished();
            if !keep {
                // Dropping the accept loop closes the listener; relayed connections are
                // tasks of their own and go on. A UDP port's flows end with it (they
                // answer from its socket).
                task.abort();
                let (protocol, port) = *key;
                if protocol == Protocol::Udp {
                    self.shared.flows.lock().unwrap_or_else(PoisonError::into_inner).retain(|(p, _), _| *p != port);
                }
                tracing::info!(port, "no longer relaying [::1]:{port}/{protocol}");
            }
            keep
        });
        failed.retain(|key| ports.contains(key));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("the ::1 relay needs the daemon's runtime; ::1 clients are refused");
            return;
        };
        let missing: Vec<(Protocol, u16)> = ports.into_iter().filter(|p| !listeners.contains_key(p)).collect();
        for key in missing {
            let (protocol, port) = key;
            let started = match protocol {
                Protocol::Tcp => listen(port).map(|l| runtime.spawn(accept_loop(self.shared.clone(), port, l))),
                Protocol::Udp => listen_udp(port).map(|s| runtime.spawn(udp_loop(self.shared.clone(), port, Arc::new(s)))),
            };
            match started {
                Ok(task) => {
                    if failed.remove(&key) {
                        tracing::info!(port, "listening on [::1]:{port}/{protocol} at last; ::1 clients are relayed");
                    } else {
                        tracing::info!(port, "relaying [::1]:{port}/{protocol} to the active release");
                    }
                    listeners.insert(key, task);
                }
                Err(e) => {
                    if failed.insert(key) {
                        tracing::warn!(port, error = %e, hint = e.hint(), "::1 clients of this port are not served");
                    } else {
                        tracing::debug!(port, error = %e, "still cannot listen on [::1]");
                    }
                }
            }
        }
    }

    fn open_to(&self, service: &str, release: u32) -> usize {
        let open = self.shared.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&(service.to_string(), release)).copied().unwrap_or(0)
    }

    fn drain_udp(&self, service: &str, release: u32, idle: Duration) -> usize {
        let now = self.shared.now_ms();
        let mut busy = 0;
        self.shared.flows.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, f| {
            if f.service != service || f.release != release {
                return true;
            }
            let keep = f.idle(now) < idle;
            busy += usize::from(keep);
            keep
        });
        busy
    }

    fn forget_udp(&self, service: &str, release: u32) {
        // Every flow is quiet for at least no time.
        self.drain_udp(service, release, Duration::ZERO);
    }

    fn listening(&self) -> BTreeSet<(Protocol, u16)> {
        self.listeners.lock().unwrap_or_else(PoisonError::into_inner).keys().copied().collect()
    }
}

impl Drop for LoopbackRelay {
    fn drop(&mut self) {
        for task in self.listeners.lock().unwrap_or_else(PoisonError::into_inner).values() {
            task.abort();
        }
        self.shared.flows.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// A listening socket on `[::1]:port`: IPv6 only, address reuse (a restarted daemon binds
/// while its predecessor's connections sit in TIME_WAIT), nonblocking (tokio's sockets
/// are), close-on-exec.
fn listen(port: u16) -> Result<TcpListener, RelayError> {
    let fail = |source| RelayError::Listen { port, source };
    let socket = TcpSocket::new_v6().map_err(fail)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true).map_err(|e| fail(e.into()))?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0))).map_err(fail)?;
    socket.listen(1024).map_err(fail)
}

/// Milliseconds since `epoch`: the flows' clock.
fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A UDP socket on `[::1]:port` (close-on-exec, nonblocking). No address reuse: a second
/// socket on the port would share its datagrams.
fn listen_udp(port: u16) -> Result<UdpSocket, RelayError> {
    let fail = |source| RelayError::ListenUdp { port, source };
    let socket = std::net::UdpSocket::bind(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0))).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    UdpSocket::from_std(socket).map_err(fail)
}

/// A UDP socket of the daemon's connected to `to`: only `to`'s answers arrive on it.
fn connect_udp(to: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(to)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

impl Shared {
    fn route_of(&self, key: (Protocol, u16)) -> Option<Route> {
        self.routes.read().unwrap_or_else(PoisonError::into_inner).get(&key).cloned()
    }

    fn now_ms(&self) -> u64 {
        ms_since(self.epoch)
    }

    /// The upstream socket of `client`'s flow on `port`, a new flow to `route` if it has
    /// none. `listener` is the port's socket, which the flow's answers leave from.
    fn flow(&self, port: u16, client: SocketAddr, route: &Route, listener: &Arc<UdpSocket>) -> Result<Arc<UdpSocket>, RelayError> {
        let now = self.now_ms();
        let mut flows = self.flows.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = flows.get(&(port, client)) {
            f.last.store(now, Ordering::Relaxed);
            return Ok(f.upstream.clone());
        }
        let permit = match self.limiter.admit_within_total() {
            Ok(p) => p,
            Err(_) => {
                // Full: the longest quiet flow gives its place, if it is quiet enough.
                let oldest = flows.iter().map(|(k, f)| (*k, f.idle(now))).max_by_key(|(_, idle)| *idle);
                if let Some((key, _)) = oldest.filter(|(_, idle)| *idle >= self.evict_idle) {
                    flows.remove(&key);
                }
                self.limiter.admit_within_total().map_err(|_| RelayError::FlowOverCap { port, open: self.limiter.open(&()).0 })?
            }
        };
        let upstream = connect_udp(route.to).map(Arc::new).map_err(|source| RelayError::Flow {
            port,
            service: route.service.clone(),
            release: route.release,
            to: route.to,
            source,
        })?;
        let last = Arc::new(AtomicU64::new(now));
        let answers = tokio::spawn(answer_loop(listener.clone(), upstream.clone(), client, last.clone(), self.epoch));
        flows.insert(
            (port, client),
            Flow { service: route.service.clone(), release: route.release, upstream: upstream.clone(), started: now, last, answers, _permit: permit },
        );
        Ok(upstream)
    }

    /// End the flows of `port` quiet for longer than their kind may be ([`Flow::expired`]).
    fn expire_flows(&self, port: u16) {
        let now = self.now_ms();
        self.flows.lock().unwrap_or_else(PoisonError::into_inner).retain(|(p, _), f| *p != port || !f.expired(now));
    }

    /// Log `e` unless a line was logged within the last second (then it is counted).
    fn warn(&self, e: &RelayError) {
        if let Some(held_back) = self.log.allow() {
            tracing::warn!(error = %e, held_back, "::1 relay");
        }
    }
}

/// One relayed connection counted against its release until dropped.
struct Held {
    shared: Arc<Shared>,
    key: (String, u32),
}

impl Held {
    fn new(shared: Arc<Shared>, route: &Route) -> Held {
        let key = (route.service.clone(), route.release);
        *shared.open.lock().unwrap_or_else(PoisonError::into_inner).entry(key.clone()).or_insert(0) += 1;
        Held { shared, key }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, port: u16, listener: TcpListener) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(source) => {
                shared.warn(&RelayError::Accept { port, source });
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // The release is chosen now, once: the connection keeps it to its end.
        let Some(route) = shared.route_of((Protocol::Tcp, port)) else { continue };
        let permit = match shared.limiter.admit_within_total() {
            Ok(p) => p,
            Err(_) => {
                let open = shared.limiter.open(&()).0;
                shared.warn(&RelayError::OverCap { port, open });
                refuse(client);
                continue;
            }
        };
        // Counted from the accept on, before the connect, so the drain never sees a gap.
        let held = Held::new(shared.clone(), &route);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _held = held;
            if let Err(e) = relay(client, port, &route, shared.connect_timeout).await {
                shared.warn(&e);
            }
        });
    }
}

/// A UDP port's datagrams from `::1` clients: each goes out on its flow's socket.
async fn udp_loop(shared: Arc<Shared>, port: u16, listener: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // `recv_from` is cancel-safe: a tick loses no datagram.
        let received = tokio::select! {
            received = listener.recv_from(&mut buf) => received,
            // Each port's loop sweeps its own flows, not every port's.
            _ = sweep.tick() => {
                shared.expire_flows(port);
                continue;
            }
        };
        let (n, client) = match received {
            Ok(got) => got,
            Err(source) => {
                shared.warn(&RelayError::Receive { port, source });
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(route) = shared.route_of((Protocol::Udp, port)) else { continue };
        match shared.flow(port, client, &route, &listener) {
            // A datagram the release's host refuses (ICMP) is lost, as through the NAT.
            Ok(upstream) => {
                if let Err(e) = upstream.send(&buf[..n]).await {
                    tracing::debug!(port, error = %e, "relayed datagram not sent");
                }
            }
            Err(e) => shared.warn(&e),
        }
    }
}

/// The release's answers on one flow, back to the client from the port's socket.
async fn answer_loop(listener: Arc<UdpSocket>, upstream: Arc<UdpSocket>, client: SocketAddr, last: Arc<AtomicU64>, epoch: Instant) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match upstream.recv(&mut buf).await {
            Ok(n) => {
                last.store(ms_since(epoch), Ordering::Relaxed);
                if let Err(e) = listener.send_to(&buf[..n], client).await {
                    tracing::debug!(%client, error = %e, "relayed answer not sent");
                }
            }
            // An ICMP error for an earlier datagram (nothing listens at the release): the
            // flow goes on, as a NAT'd one would.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::debug!(%client, error = %e, "relayed flow cannot receive");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Close `client` with a reset: it was not served, and must not take that for an empty
/// answer.
fn refuse(client: TcpStream) {
    let _ = client.set_zero_linger();
}

/// Connect to the release and copy both ways until both have ended; when one side ends
/// (FIN), the other side's write half is shut down, so half-closed protocols work.
async fn relay(mut client: TcpStream, port: u16, route: &Route, timeout: Duration) -> Result<(), RelayError> {
    let connect = tokio::time::timeout(timeout, TcpStream::connect(route.to)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            refuse(client);
            return Err(RelayError::Connect { port, service: route.service.clone(), release: route.release, to: route.to, source });
        }
        Err(_) => {
            refuse(client);
            return Err(RelayError::ConnectTimeout {
                port,
                service: route.service.clone(),
                release: route.release,
                to: route.to,
                timeout,
            });
        }
    };
    // What the client writes goes out at once, as it would over a NAT'd connection.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        // A reset by either side ends a connection as it would end one through the NAT.
        tracing::debug!(port, error = %e, "relayed connection ended");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn target(service: &str, release: u32, protocol: Protocol, host_port: u16, host_ip: Option<IpAddr>, v6: bool) -> Target {
        Target {
            service: service.into(),
            release,
            protocol,
            host_port,
            addr: Ipv4Addr::new(172, 18, 0, 2),
            port: 80,
            addr6: v6.then(|| "fd00::2".parse().unwrap()),
            host_ip,
        }
    }

    #[test]
    fn routes_are_the_ports_loopback6_belongs_to_at_the_release_address() {
        let targets = vec![
            target("web", 3, Protocol::Tcp, 8080, None, true),
            target("web", 3, Protocol::Udp, 8053, None, true),
            target("api", 1, Protocol::Tcp, 9000, None, false),
            target("v4", 1, Protocol::Tcp, 9001, Some("127.0.0.1".parse().unwrap()), true),
            target("any4", 1, Protocol::Tcp, 9002, Some("0.0.0.0".parse().unwrap()), true),
            target("lo6", 2, Protocol::Tcp, 9003, Some("::1".parse().unwrap()), false),
            target("any6", 2, Protocol::Tcp, 9004, Some("::".parse().unwrap()), true),
            target("host6", 2, Protocol::Tcp, 9005, Some("2001:db8::1".parse().unwrap()), true),
        ];
        let r = routes(&targets);
        let tcp = |port| (Protocol::Tcp, port);
        assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![tcp(8080), tcp(9000), tcp(9003), tcp(9004), (Protocol::Udp, 8053)]);
        assert_eq!(r[&tcp(8080)], Route { service: "web".into(), release: 3, to: "[fd00::2]:80".parse().unwrap() });
        assert_eq!(r[&(Protocol::Udp, 8053)].to, "[fd00::2]:80".parse().unwrap());
        assert_eq!(r[&tcp(9000)].to, "172.18.0.2:80".parse().unwrap(), "no IPv6 address: the IPv4 one");
        assert_eq!(r[&tcp(9003)].release, 2);
    }

    /// A server on 127.0.0.1 that answers each connection with `name`, then echoes what
    /// it reads until EOF, then writes "bye" and closes (a half-closing protocol).
    async fn release_server(name: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    s.write_all(name.as_bytes()).await.unwrap();
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                        }
                    }
                    let _ = s.write_all(b"bye").await;
                });
            }
        });
        addr
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port()
    }

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("[::1]:0").unwrap().local_addr().unwrap().port()
    }

    async fn read_n(s: &mut TcpStream, n: usize) -> String {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn one_route(port: u16, release: u32, to: SocketAddr) -> Routes {
        Routes::from([((Protocol::Tcp, port), Route { service: "web".into(), release, to })])
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}");
    }

    #[tokio::test]
    async fn connections_keep_their_release_half_close_and_are_counted_per_release() {
        let (v1, v2) = (release_server("v1").await, release_server("v2").await);
        let port = free_port();
        let relay = LoopbackRelay::default();
        relay.route(one_route(port, 1, v1));
        assert_eq!(relay.listening(), BTreeSet::from([(Protocol::Tcp, port)]));
        let mut old = TcpStream::connect(("::1", port)).await.unwrap();
        assert_eq!(read_n(&mut old, 2).await, "v1");
        wait_until("the connection counts for release 1", || relay.open_to("web", 1) == 1).await;

        relay.route(one_route(port, 2, v2));
        let mut new = TcpStream::connect(("::1", port)).await.unwrap();
        assert_eq!(read_n(&mut new, 2).await, "v2", "new connections go to the new release");
        old.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(&mut old, 4).await, "ping", "the open connection stays on release 1");
        assert_eq!(relay.open_to("web", 1), 1);
        wait_until("the new connection counts for release 2", || relay.open_to("web", 2) == 1).await;

        // Half-close: our FIN reaches the release, whose last words still come back.
        old.shutdown().await.unwrap();
        let mut rest = String::new();
        tokio::time::timeout(Duration::from_secs(5), old.read_to_string(&mut rest)).await.unwrap().unwrap();
        assert_eq!(rest, "bye");
        wait_until("release 1 has nothing open", || relay.open_to("web", 1) == 0).await;
        assert_eq!(relay.open_to("web", 2), 1);

        relay.route(Routes::new());
        assert!(relay.listening().is_empty());
        wait_until("the port no longer listens", || std::net::TcpStream::connect(("::1", port)).is_err()).await;
        new.write_all(b"still").await.unwrap();
        assert_eq!(read_n(&mut new, 5).await, "still", "removing the port keeps open connections");
    }

    #[tokio::test]
    async fn over_the_cap_and_unreachable_releases_are_reset_and_not_counted() {
        let v1 = release_server("v1").await;
        let port = free_port();
        let relay = LoopbackRelay::new(1, Duration::from_secs(2));
        relay.route(one_route(port, 1, v1));
        let mut first = TcpStream::connect(("::1", port)).await.unwrap();
        assert_eq!(read_n(&mut first, 2).await, "v1");
        let mut second = TcpStream::connect(("::1", port)).await.unwrap();
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await.unwrap();
        assert!(r.is_err(), "over the cap: reset, not an empty answer ({r:?})");
        assert_eq!(relay.open_to("web", 1), 1);
        drop(first);
        wait_until("the place comes back", || relay.open_to("web", 1) == 0).await;

        // Nothing listens at the release's address: reset, nothing counted afterwards.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        relay.route(one_route(port, 2, gone));
        let mut c = TcpStream::connect(("::1", port)).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap();
        assert!(r.is_err(), "unreachable release: reset ({r:?})");
        wait_until("nothing counted", || relay.open_to("web", 2) == 0).await;
    }

    #[tokio::test]
    async fn a_port_taken_by_another_process_is_retried_at_the_next_route() {
        let taken = std::net::TcpListener::bind("[::1]:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let relay = LoopbackRelay::default();
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        relay.route(one_route(port, 1, to));
        assert!(relay.listening().is_empty(), "the port is taken");
        let e = listen(port).err().unwrap();
        assert!(e.hint().contains("ss -lntup"), "{e}: {}", e.hint());
        drop(taken);
        relay.route(one_route(port, 1, to));
        assert_eq!(relay.listening(), BTreeSet::from([(Protocol::Tcp, port)]), "listening once the port is free");
    }

    /// A UDP server on 127.0.0.1 answering each datagram with `name` and the datagram.
    async fn udp_release(name: &'static str) -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else { return };
                let answer = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = s.send_to(answer.as_bytes(), peer).await;
            }
        });
        addr
    }

    fn udp_route(port: u16, release: u32, to: SocketAddr) -> Routes {
        Routes::from([((Protocol::Udp, port), Route { service: "dns".into(), release, to })])
    }

    async fn ask(client: &UdpSocket, what: &str) -> String {
        client.send(what.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    }

    async fn udp_client(port: u16) -> UdpSocket {
        let c = UdpSocket::bind("[::1]:0").await.unwrap();
        c.connect(("::1", port)).await.unwrap();
        c
    }

    #[tokio::test]
    async fn udp_flows_keep_their_release_until_quiet_and_end_with_it() {
        let (v1, v2) = (udp_release("v1").await, udp_release("v2").await);
        let port = free_udp_port();
        let relay = LoopbackRelay::default();
        relay.route(udp_route(port, 1, v1));
        assert_eq!(relay.listening(), BTreeSet::from([(Protocol::Udp, port)]));
        let (busy, quiet) = (udp_client(port).await, udp_client(port).await);
        assert_eq!(ask(&busy, "a").await, "v1 a");
        assert_eq!(ask(&quiet, "b").await, "v1 b");

        relay.route(udp_route(port, 2, v2));
        let fresh = udp_client(port).await;
        assert_eq!(ask(&fresh, "c").await, "v2 c", "a new flow goes to the new release");
        assert_eq!(ask(&busy, "d").await, "v1 d", "an open flow stays on its release");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(ask(&busy, "e").await, "v1 e");
        // The drain: `quiet` sent nothing for 1.5 s, `busy` just did.
        assert_eq!(relay.drain_udp("dns", 1, Duration::from_secs(1)), 1, "one busy flow holds release 1");
        assert_eq!(ask(&quiet, "f").await, "v2 f", "the quiet flow ended: its next datagram reaches the new release");
        assert_eq!(ask(&busy, "g").await, "v1 g");
        assert_eq!(relay.drain_udp("dns", 2, Duration::from_secs(60)), 2, "release 2's flows are its own");

        relay.forget_udp("dns", 1);
        assert_eq!(ask(&busy, "h").await, "v2 h", "release 1 is done: its flows go to the active release");
        assert_eq!(relay.drain_udp("dns", 1, Duration::from_secs(1)), 0);

        relay.route(Routes::new());
        assert!(relay.listening().is_empty());
        wait_until("the port is free again", || std::net::UdpSocket::bind(("::1", port)).is_ok()).await;
    }

    #[tokio::test]
    async fn udp_flows_over_the_cap_are_dropped_and_counted_with_connections() {
        let v1 = udp_release("v1").await;
        let port = free_udp_port();
        // No flow is ever quiet enough to give its place here.
        let relay = LoopbackRelay::new(1, Duration::from_secs(2)).with_evict_idle(Duration::from_secs(3600));
        relay.route(udp_route(port, 1, v1));
        let first = udp_client(port).await;
        assert_eq!(ask(&first, "a").await, "v1 a");
        let second = udp_client(port).await;
        second.send(b"b").await.unwrap();
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_millis(500), second.recv(&mut buf)).await;
        assert!(r.is_err(), "over the cap: no flow, no answer ({r:?})");
        relay.forget_udp("dns", 1);
        assert_eq!(ask(&second, "c").await, "v1 c", "the place came back");
    }

    #[tokio::test]
    async fn a_full_relay_gives_the_longest_quiet_flow_s_place_to_a_new_one() {
        let v1 = udp_release("v1").await;
        let port = free_udp_port();
        let relay = LoopbackRelay::new(2, Duration::from_secs(2)).with_evict_idle(Duration::from_millis(300));
        relay.route(udp_route(port, 1, v1));
        let (a, b, c) = (udp_client(port).await, udp_client(port).await, udp_client(port).await);
        assert_eq!(ask(&a, "a").await, "v1 a");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(ask(&b, "b").await, "v1 b");
        assert_eq!(ask(&c, "c").await, "v1 c", "full: `a`, the longest quiet, gave its place");
        assert_eq!(relay.drain_udp("dns", 1, Duration::from_secs(3600)), 2, "two flows");
        let flows = relay.shared.flows.lock().unwrap();
        let clients: BTreeSet<SocketAddr> = flows.keys().map(|(_, client)| *client).collect();
        let want: BTreeSet<SocketAddr> = [b.local_addr().unwrap(), c.local_addr().unwrap()].into();
        assert_eq!(clients, want, "`b` and `c` are the flows");
    }
}
