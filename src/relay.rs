//! The `::1` relay: IPv6 clients on the host's loopback address, the one client path the
//! kernel cannot NAT to a release.
//!
//! Why a relay at all: a packet from `::1` is never routed off the host (IPv6 has no
//! `route_localnet`; a loopback source on any other device is dropped), so a DNAT of
//! `[::1]:PORT` to a container address can never arrive. Docker itself serves `::1` only
//! through its userland proxy. So for each NAT-mode TCP host port that `::1` belongs to
//! (no `host_ip`, or `::` or `::1`), the daemon listens on `[::1]:PORT` and copies each
//! accepted connection to and from the release that is active *at accept time*. A
//! connection keeps its release for its whole life, as conntrack keeps a NAT binding: a
//! switch ([`Relay::route`], right after the nftables transaction) changes only where new
//! connections go, and the drain of the old release counts the relayed connections still
//! open to it ([`Relay::open_to`]).
//!
//! Limits: TCP only (UDP over `::1` is not relayed); at most [`MAX_RELAYED`] connections
//! at once (more are closed at once); [`CONNECT_TIMEOUT`] to reach the release; while the
//! daemon is down, `::1` connections are refused and the ones it relayed are closed (every
//! other client path is the kernel's and does not notice). Errors are logged at most once
//! a second (connections) or once per port (listening), never one line per connection.
//!
//! Owns its listeners and its relayed connections; must not touch rules or releases (the
//! caller computes the routes from the same desired state the rules come from: [`routes`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::limits::{Caps, Limiter, LogThrottle};
use crate::manifest::Protocol;
use crate::plan::Target;

/// Relayed connections open at once, all ports together. Each one costs the daemon two
/// fds and a task; the systemd unit's fd limit (65536) leaves room for this many and the rest.
pub const MAX_RELAYED: usize = 1024;
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

/// The relay's whole table: host port -> route.
pub type Routes = BTreeMap<u16, Route>;

/// Does a port bound on `host_ip` (None: every address) take clients on `::1`?
pub fn takes_loopback6(host_ip: Option<IpAddr>) -> bool {
    match host_ip {
        None => true,
        Some(IpAddr::V6(a)) => a.is_unspecified() || a.is_loopback(),
        Some(IpAddr::V4(_)) => false,
    }
}

/// The routes for the data plane's `targets` (what the rules point at): every TCP host
/// port `::1` belongs to. Pure.
pub fn routes(targets: &[Target]) -> Routes {
    targets
        .iter()
        .filter(|t| t.protocol == Protocol::Tcp && takes_loopback6(t.host_ip))
        .map(|t| {
            let to = match t.addr6 {
                Some(a) => SocketAddr::from((a, t.port)),
                None => SocketAddr::from((t.addr, t.port)),
            };
            (t.host_port, Route { service: t.service.clone(), release: t.release, to })
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
}

impl RelayError {
    /// What the operator can do about a failed listen.
    pub fn hint(&self) -> &'static str {
        match self {
            RelayError::Listen { source, .. } => match source.raw_os_error() {
                Some(libc::EADDRINUSE) => {
                    "another process listens on this port of ::1 (see `ss -lntp`); ::1 clients reach it, not the release; every other client path is served"
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
    /// Relayed connections open (or being opened) to release `release` of `service`.
    fn open_to(&self, service: &str, release: u32) -> usize;
    /// The host ports it listens on now (its own sockets, no conflict for these ports).
    fn listening(&self) -> BTreeSet<u16>;
}

/// The real relay: tokio listeners on `[::1]:PORT`, one task per relayed connection.
pub struct LoopbackRelay {
    shared: Arc<Shared>,
    listeners: Mutex<BTreeMap<u16, tokio::task::JoinHandle<()>>>,
    /// Ports whose listen failed and was logged; logged again only after a success.
    failed: Mutex<BTreeSet<u16>>,
}

struct Shared {
    routes: RwLock<Routes>,
    limiter: Limiter<()>,
    open: Mutex<BTreeMap<(String, u32), usize>>,
    connect_timeout: Duration,
    log: LogThrottle,
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
                connect_timeout,
                log: LogThrottle::new(),
            }),
            listeners: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeSet::new()),
        }
    }
}

impl Relay for LoopbackRelay {
    fn route(&self, routes: Routes) {
        let ports: BTreeSet<u16> = routes.keys().copied().collect();
        // Routes first: a listener that is already up serves new connections per the new
        // table from here on.
        *self.shared.routes.write().unwrap_or_else(PoisonError::into_inner) = routes;
        let mut listeners = self.listeners.lock().unwrap_or_else(PoisonError::into_inner);
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        listeners.retain(|port, task| {
            let keep = ports.contains(port) && !task.is_finished();
            if !keep {
                // Dropping the accept loop closes the listener; relayed connections are
                // tasks of their own and go on.
                task.abort();
                tracing::info!(port, "no longer relaying [::1]:{port}");
            }
            keep
        });
        failed.retain(|port| ports.contains(port));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("the ::1 relay needs the daemon's runtime; ::1 clients are refused");
            return;
        };
        let missing: Vec<u16> = ports.into_iter().filter(|p| !listeners.contains_key(p)).collect();
        for port in missing {
            match listen(port) {
                Ok(listener) => {
                    if failed.remove(&port) {
                        tracing::info!(port, "listening on [::1]:{port} at last; ::1 clients are relayed");
                    } else {
                        tracing::info!(port, "relaying [::1]:{port} to the active release");
                    }
                    listeners.insert(port, runtime.spawn(accept_loop(self.shared.clone(), port, listener)));
                }
                Err(e) => {
                    if failed.insert(port) {
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

    fn listening(&self) -> BTreeSet<u16> {
        self.listeners.lock().unwrap_or_else(PoisonError::into_inner).keys().copied().collect()
    }
}

impl Drop for LoopbackRelay {
    fn drop(&mut self) {
        for task in self.listeners.lock().unwrap_or_else(PoisonError::into_inner).values() {
            task.abort();
        }
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

impl Shared {
    fn route_of(&self, port: u16) -> Option<Route> {
        self.routes.read().unwrap_or_else(PoisonError::into_inner).get(&port).cloned()
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
        let Some(route) = shared.route_of(port) else { continue };
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
    fn routes_are_the_tcp_ports_loopback6_belongs_to_at_the_release_address() {
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
        assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![8080, 9000, 9003, 9004]);
        assert_eq!(r[&8080], Route { service: "web".into(), release: 3, to: "[fd00::2]:80".parse().unwrap() });
        assert_eq!(r[&9000].to, "172.18.0.2:80".parse().unwrap(), "no IPv6 address: the IPv4 one");
        assert_eq!(r[&9003].release, 2);
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

    async fn read_n(s: &mut TcpStream, n: usize) -> String {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn one_route(port: u16, release: u32, to: SocketAddr) -> Routes {
        Routes::from([(port, Route { service: "web".into(), release, to })])
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
        assert_eq!(relay.listening(), BTreeSet::from([port]));
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
        assert!(e.hint().contains("ss -lntp"), "{e}: {}", e.hint());
        drop(taken);
        relay.route(one_route(port, 1, to));
        assert_eq!(relay.listening(), BTreeSet::from([port]), "listening once the port is free");
    }
}
