//! Drain detection: how many TCP connections an old release still holds.
//!
//! The count comes from sock_diag (the kernel's socket table, what `ss` reads) taken
//! inside the release's network namespace, entered through [`crate::netns`]. Seen from
//! there the count includes every connection the release holds: ones that came through
//! cutover's DNAT, ones that reached the container address directly, and ones still
//! waiting in its accept queue, which host-side conntrack would not attribute correctly.
//!
//! Both AF_INET and AF_INET6 are dumped: a server bound to `[::]` holds its IPv4 clients
//! as `::ffff:a.b.c.d` AF_INET6 sockets. LISTEN sockets are the server, not clients, and
//! TIME_WAIT sockets hold no process resources and vanish on their own, so neither
//! counts; every other state of a live connection does (CLOSE_WAIT, FIN_WAIT*, LAST_ACK,
//! CLOSING mean the application or peer has not finished yet).
//!
//! This module only reads; it never kills connections or touches NAT.

use std::io;
use std::time::Duration;

use futures_util::future::BoxFuture;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, TCP_CLOSE, TCP_LISTEN, TCP_TIME_WAIT,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};
use tokio::time::Instant;

use crate::netns::{self, NetnsError};

/// Counting the connections a release still serves: the seam the state machine's tests
/// replace.
pub trait Connections: Send + Sync + 'static {
    /// Open TCP connections on `ports` (local side) inside the network namespace of
    /// `pid`; the release's own outgoing connections (a database pool) do not count.
    fn open_connections(&self, pid: u32, ports: Vec<u16>) -> BoxFuture<'_, Result<usize, DrainError>>;
}

/// The real count: sock_diag inside the release's namespace, on a blocking thread
/// (entering a namespace is per thread, never on a runtime worker).
pub struct SockDiag;

impl Connections for SockDiag {
    fn open_connections(&self, pid: u32, ports: Vec<u16>) -> BoxFuture<'_, Result<usize, DrainError>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || open_connections_on_ports(pid, &ports)).await.map_err(DrainError::Task)?
        })
    }
}

/// Failures while counting a release's connections.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("count connections of release process {pid}: {source}")]
    Netns {
        pid: u32,
        #[source]
        source: NetnsError,
    },
    #[error("open a sock_diag netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("send the sock_diag {family} dump request: {source}")]
    Send {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("receive the sock_diag {family} dump: {source}")]
    Receive {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the sock_diag {family} dump: {source}")]
    Kernel {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("decode the sock_diag {family} dump: {source}")]
    Decode {
        family: &'static str,
        #[source]
        source: netlink_packet_core::DecodeError,
    },
    #[error("a sock_diag {family} message of {len} bytes did not fit the receive buffer")]
    Truncated { family: &'static str, len: usize },
    #[error("the drain check task did not finish: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl DrainError {
    /// True when the release's process (and so its namespace) no longer exists.
    pub fn process_gone(&self) -> bool {
        matches!(self, DrainError::Netns { source, .. } if source.namespace_gone())
    }
}

/// How waiting for a release to drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// No connection was left (or the process was gone) after this long.
    Drained { after: Duration },
    /// The timeout passed with this many connections still open.
    TimedOut { left: usize },
}

/// Whether a socket in TCP state `state` is a connection the release still holds.
/// TCP_CLOSE is a socket with no peer (bound or failed), not a connection.
pub fn counts_as_open(state: u8) -> bool {
    !matches!(state, TCP_LISTEN | TCP_TIME_WAIT | TCP_CLOSE)
}

/// The state filter sent to the kernel; must agree with [`counts_as_open`].
fn open_states() -> StateFlags {
    StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE
}

/// Counts the open TCP connections (IPv4 and IPv6) in the network namespace of `pid`.
/// Blocks while a helper thread enters the namespace; from async code use
/// [`wait_drained`] or `spawn_blocking`.
pub fn open_connections(pid: u32) -> Result<usize, DrainError> {
    open_connections_on_ports(pid, &[])
}

/// Like [`open_connections`] but only counts connections whose local port is one of
/// `ports` (all when empty): a release's outgoing connections (a database pool) would
/// otherwise keep it from ever draining.
pub fn open_connections_on_ports(pid: u32, ports: &[u16]) -> Result<usize, DrainError> {
    let ports = ports.to_vec();
    netns::in_netns_of_pid(pid, move || count_in_current_netns(&ports))
        .map_err(|source| DrainError::Netns { pid, source })?
}

/// Counts open TCP connections in the calling thread's network namespace.
pub fn count_in_current_netns(ports: &[u16]) -> Result<usize, DrainError> {
    // The netlink socket belongs to the namespace it is created in, so it is created here,
    // on the thread that entered the namespace.
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DrainError::Socket)?;
    socket.bind_auto().map_err(DrainError::Socket)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(DrainError::Socket)?;
    let mut total = 0;
    for (family, name) in [(AF_INET, "IPv4"), (AF_INET6, "IPv6")] {
        total += dump_family(&socket, family, name, ports)?;
    }
    Ok(total)
}

fn dump_family(socket: &Socket, family: u8, name: &'static str, ports: &[u16]) -> Result<usize, DrainError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: open_states(),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0).map_err(|source| DrainError::Send { family: name, source })?;

    // The kernel fills dump datagrams up to about 32 KiB; MSG_TRUNC makes recv report the
    // real size so a larger one is an error instead of silently lost connections.
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut count = 0;
    loop {
        buf.clear();
        let len = socket
            .recv(&mut buf, libc::MSG_TRUNC)
            .map_err(|source| DrainError::Receive { family: name, source })?;
        if len > buf.len() {
            return Err(DrainError::Truncated { family: name, len });
        }
        let mut offset = 0;
        while offset < len {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..len])
                .map_err(|source| DrainError::Decode { family: name, source })?;
            let msg_len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                    let port_ok = ports.is_empty() || ports.contains(&resp.header.socket_id.source_port);
                    if counts_as_open(resp.header.state) && port_ok {
                        count += 1;
                    }
                }
                NetlinkPayload::Done(_) => return Ok(count),
                // An error message without a code is an ACK, not a failure.
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(DrainError::Kernel { family: name, source: e.to_io() });
                }
                _ => {}
            }
            if msg_len == 0 {
                break;
            }
            // Netlink messages are 4-byte aligned inside a datagram.
            offset += (msg_len + 3) & !3;
        }
    }
}

/// Polls the open connection count of release process `pid` every `poll` until it is
/// zero (or the process is gone) or `timeout` passes. `progress` sees each count with the
/// time waited so far.
pub async fn wait_drained(
    pid: u32,
    timeout: Duration,
    poll: Duration,
    progress: impl FnMut(usize, Duration),
) -> Result<DrainOutcome, DrainError> {
    let count = move || async move {
        match tokio::task::spawn_blocking(move || open_connections(pid)).await {
            Ok(Ok(n)) => Ok(Some(n)),
            Ok(Err(e)) if e.process_gone() => Ok(None),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(DrainError::Task(e)),
        }
    };
    wait_until_drained(count, timeout, poll, progress).await
}

/// The polling loop of [`wait_drained`], over any counter: `Ok(None)` means the process
/// is gone.
async fn wait_until_drained<C, Fut>(
    mut count: C,
    timeout: Duration,
    poll: Duration,
    mut progress: impl FnMut(usize, Duration),
) -> Result<DrainOutcome, DrainError>
where
    C: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<usize>, DrainError>>,
{
    let start = Instant::now();
    loop {
        let measured = count().await?;
        let waited = start.elapsed();
        let Some(open) = measured else {
            return Ok(DrainOutcome::Drained { after: waited });
        };
        progress(open, waited);
        if open == 0 {
            return Ok(DrainOutcome::Drained { after: waited });
        }
        if waited >= timeout {
            return Ok(DrainOutcome::TimedOut { left: open });
        }
        tokio::time::sleep(poll.min(timeout - waited)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use netlink_packet_sock_diag::constants::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    #[test]
    fn state_filter_matches_counted_states() {
        for state in 1..=TCP_CLOSING {
            let in_filter = open_states().bits() & (1 << state) != 0;
            assert_eq!(in_filter, counts_as_open(state), "state {state}");
        }
        for state in [TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK, TCP_SYN_RECV] {
            assert!(counts_as_open(state));
        }
        assert!(!counts_as_open(TCP_TIME_WAIT));
        assert!(!counts_as_open(TCP_LISTEN));
    }

    fn scripted(counts: Vec<Option<usize>>) -> impl FnMut() -> std::future::Ready<Result<Option<usize>, DrainError>> {
        let q = RefCell::new(VecDeque::from(counts));
        move || std::future::ready(Ok(q.borrow_mut().pop_front().unwrap_or(Some(0))))
    }

    #[tokio::test]
    async fn drains_when_count_reaches_zero() {
        let mut seen = Vec::new();
        let out = wait_until_drained(
            scripted(vec![Some(3), Some(1), Some(0)]),
            Duration::from_secs(5),
            Duration::from_millis(1),
            |n, _| seen.push(n),
        )
        .await
        .unwrap();
        assert!(matches!(out, DrainOutcome::Drained { .. }));
        assert_eq!(seen, vec![3, 1, 0]);
    }

    #[tokio::test]
    async fn gone_process_is_drained() {
        let out = wait_until_drained(scripted(vec![Some(2), None]), Duration::from_secs(5), Duration::from_millis(1), |_, _| {})
            .await
            .unwrap();
        assert!(matches!(out, DrainOutcome::Drained { .. }));
    }

    #[tokio::test]
    async fn times_out_with_what_is_left() {
        let out = wait_until_drained(
            || std::future::ready(Ok(Some(4))),
            Duration::from_millis(30),
            Duration::from_millis(5),
            |_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(out, DrainOutcome::TimedOut { left: 4 });
    }

    #[test]
    fn counts_a_held_loopback_connection() {
        // In our own namespace: a held loopback connection is two sockets (client and
        // server side), both ESTABLISHED; filter on the listener's port to see only the
        // server side.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(count_in_current_netns(&[port]).unwrap(), 0);
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(count_in_current_netns(&[port]).unwrap(), 1);
        drop(client);
        // Server side is now CLOSE_WAIT: the application still holds it, so it counts.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count_in_current_netns(&[port]).unwrap(), 1);
        drop(server);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count_in_current_netns(&[port]).unwrap(), 0);
    }
}
