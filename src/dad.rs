//! IPv6 duplicate address detection (DAD) around a release: is the path to its IPv6
//! address usable yet?
//!
//! The kernel neither answers neighbor solicitations for, nor accepts packets to, an
//! address still `tentative`, and sends no solicitation from an interface whose
//! link-local addresses are all tentative. Two places matter for a release behind a
//! Docker bridge:
//! - the release's own address in its container (Docker 20.10 adds it `nodad`, other
//!   engines and runtimes need not);
//! - the host's addresses on the bridge towards it: the gateway of the release's prefix
//!   and the bridge's link-local addresses. Docker adds those with DAD, and the kernel
//!   runs it when the bridge first gets a carrier, i.e. when the first container joins a
//!   new network. Until it is done (about 1-2 s) IPv6 datagrams forwarded to the release
//!   are lost and TCP SYNs stall for a retransmission, while IPv4 already works.
//!
//! This module reads address flags with one `RTM_GETADDR` dump (IFA_F_TENTATIVE,
//! IFA_F_DADFAILED) in the calling thread's network namespace, or in a process's one
//! through [`crate::netns`], and decides from them ([`readiness`], pure). It only reads:
//! it never adds, removes or changes an address.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv6Addr};

use futures_util::future::BoxFuture;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use crate::netns::{self, NetnsError};

/// Whether IPv6 traffic reaches a release yet: the seam the state machine's tests replace.
pub trait Ipv6Paths: Send + Sync + 'static {
    /// Whether IPv6 traffic reaches `addr`, the IPv6 address of the release whose process
    /// is `pid`: no address on the path (its own, the host's on its bridge) is still in
    /// duplicate address detection.
    fn readiness(&self, pid: u32, addr: Ipv6Addr) -> BoxFuture<'_, Result<Ipv6Readiness, DadError>>;
}

/// The real check: address flags read over netlink on a blocking thread.
pub struct NetlinkAddresses;

impl Ipv6Paths for NetlinkAddresses {
    fn readiness(&self, pid: u32, addr: Ipv6Addr) -> BoxFuture<'_, Result<Ipv6Readiness, DadError>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || release_readiness(pid, addr)).await.map_err(DadError::Task)?
        })
    }
}

/// Failures to read IPv6 address flags.
#[derive(Debug, thiserror::Error)]
pub enum DadError {
    #[error("read the IPv6 addresses of process {pid}'s network namespace: {source}")]
    Netns {
        pid: u32,
        #[source]
        source: NetnsError,
    },
    #[error("open a route netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("send the RTM_GETADDR dump request: {0}")]
    Send(#[source] io::Error),
    #[error("receive the RTM_GETADDR dump: {0}")]
    Receive(#[source] io::Error),
    #[error("the kernel refused the RTM_GETADDR dump: {0}")]
    Kernel(#[source] io::Error),
    #[error("decode the RTM_GETADDR dump: {0}")]
    Decode(#[source] netlink_packet_core::DecodeError),
    #[error("an RTM_GETADDR message of {0} bytes did not fit the receive buffer")]
    Truncated(usize),
    #[error("the IPv6 readiness task did not finish: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// Where an address is in duplicate address detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DadState {
    /// Detection done (or not done at all, `nodad`): the address answers and receives.
    Usable,
    /// Detection still running: the kernel drops what is sent to it.
    Tentative,
    /// Another node on the link has it; the kernel will not use it.
    Failed,
}

/// One IPv6 address of a namespace, with the interface it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Address {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
    pub ifindex: u32,
    pub state: DadState,
}

/// Whether IPv6 traffic can reach a release's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Readiness {
    Usable,
    /// Still in duplicate address detection: what is being waited for.
    Waiting(String),
    /// An address on the path failed duplicate address detection: which, and what to do.
    Failed(String),
}

fn state_of(flags: AddressFlags) -> DadState {
    if flags.contains(AddressFlags::Dadfailed) {
        DadState::Failed
    } else if flags.contains(AddressFlags::Tentative) {
        DadState::Tentative
    } else {
        DadState::Usable
    }
}

/// The address a dumped message describes, if it is an IPv6 one.
fn address_of(msg: &AddressMessage) -> Option<Ipv6Address> {
    let mut addr = None;
    // IFA_FLAGS (32 bits) when the kernel sends it, else the header's 8 bits, which hold
    // both flags that matter here.
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Address(IpAddr::V6(a)) => addr = Some(*a),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    Some(Ipv6Address { addr: addr?, prefix_len: msg.header.prefix_len, ifindex: msg.header.index, state: state_of(flags) })
}

/// Every IPv6 address of the calling thread's network namespace.
pub fn ipv6_addresses_in_current_netns() -> Result<Vec<Ipv6Address>, DadError> {
    // The socket belongs to the namespace it is created in: created here, on the thread
    // that may have entered another one.
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(DadError::Socket)?;
    socket.bind_auto().map_err(DadError::Socket)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(DadError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet6;
    let mut request = NetlinkMessage::new(header, RouteNetlinkMessage::GetAddress(message).into());
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0).map_err(DadError::Send)?;

    let mut found = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        // MSG_TRUNC: recv reports the real size, so a datagram too large is an error
        // instead of silently missing addresses.
        let len = socket.recv(&mut buf, libc::MSG_TRUNC).map_err(DadError::Receive)?;
        if len > buf.len() {
            return Err(DadError::Truncated(len));
        }
        let mut offset = 0;
        while offset < len {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..len]).map_err(DadError::Decode)?;
            let msg_len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => found.extend(address_of(&m)),
                NetlinkPayload::Done(_) => return Ok(found),
                // An error message without a code is an ACK, not a failure.
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(DadError::Kernel(e.to_io())),
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

/// Every IPv6 address in the network namespace of process `pid` (a release's container).
/// Blocks while a helper thread enters the namespace.
pub fn ipv6_addresses_of_pid(pid: u32) -> Result<Vec<Ipv6Address>, DadError> {
    netns::in_netns_of_pid(pid, ipv6_addresses_in_current_netns).map_err(|source| DadError::Netns { pid, source })?
}

/// The name of interface `index` of the caller's namespace, for messages.
pub fn interface_name(index: u32) -> String {
    nix::net::if_::if_indextoname(index)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("interface #{index}"))
}

fn in_prefix(addr: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let len = u32::from(len.min(128));
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    u128::from(addr) & mask == u128::from(net) & mask
}

fn is_link_local(addr: Ipv6Addr) -> bool {
    in_prefix(addr, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10)
}

/// Whether IPv6 traffic forwarded by the host reaches `release` yet, from the addresses
/// of its container and of the host (`ifname` names host interfaces in messages).
///
/// The host side counts only interfaces with an address whose prefix holds `release`
/// (its bridge; none when the host is not on the release's link, as with macvlan): their
/// on-prefix addresses (the gateway) and link-local ones (the source of the host's
/// neighbor solicitations).
pub fn readiness(
    release: Ipv6Addr,
    container: &[Ipv6Address],
    host: &[Ipv6Address],
    ifname: impl Fn(u32) -> String,
) -> Ipv6Readiness {
    let mut waiting = Vec::new();
    match container.iter().find(|a| a.addr == release).map(|a| a.state) {
        None => waiting.push(format!("{release} to appear in the container")),
        Some(DadState::Tentative) => waiting.push(format!("duplicate address detection of {release} in the container")),
        Some(DadState::Failed) => {
            return Ipv6Readiness::Failed(format!(
                "its IPv6 address {release} failed duplicate address detection in the container: another node on its \
                 network already uses it. Find the duplicate (`ip -6 neigh show {release}` on the host shows its MAC \
                 address) and remove it, or give the Docker network another IPv6 subnet, then deploy again"
            ));
        }
        Some(DadState::Usable) => {}
    }
    let on_prefix = |a: &Ipv6Address| a.addr != release && a.prefix_len < 128 && in_prefix(release, a.addr, a.prefix_len);
    let links: BTreeSet<u32> = host.iter().filter(|a| on_prefix(a)).map(|a| a.ifindex).collect();
    for link in links {
        let name = ifname(link);
        let mut link_locals = host.iter().filter(|a| a.ifindex == link && is_link_local(a.addr)).peekable();
        let has_link_local = link_locals.peek().is_some();
        if has_link_local && link_locals.all(|a| a.state == DadState::Failed) {
            return Ipv6Readiness::Failed(format!(
                "every link-local IPv6 address of the host's {name} failed duplicate address detection, so the host \
                 cannot resolve the release's IPv6 address: another node on that link uses them. Remove the duplicate, \
                 then take {name} down and up again (or recreate the Docker network)"
            ));
        }
        let mut tentative = Vec::new();
        for a in host.iter().filter(|a| a.ifindex == link && (on_prefix(a) || is_link_local(a.addr))) {
            match a.state {
                DadState::Usable => {}
                DadState::Tentative => tentative.push(a.addr.to_string()),
                // A failed link-local next to a usable one does not stop the host.
                DadState::Failed if is_link_local(a.addr) => {}
                DadState::Failed => {
                    return Ipv6Readiness::Failed(format!(
                        "the host's IPv6 address {} on {name} (the gateway of the release's network) failed duplicate \
                         address detection: another node on that link uses it, so the release's IPv6 answers cannot be \
                         routed. Remove the duplicate, then `ip -6 addr del {}/{} dev {name}` and add it again (or \
                         recreate the Docker network)",
                        a.addr, a.addr, a.prefix_len
                    ));
                }
            }
        }
        if !tentative.is_empty() {
            waiting.push(format!("duplicate address detection of the host's {} on {name}", tentative.join(", ")));
        }
    }
    if waiting.is_empty() {
        Ipv6Readiness::Usable
    } else {
        Ipv6Readiness::Waiting(waiting.join(", "))
    }
}

/// [`readiness`] of `release` in the container of process `pid`, read from the kernel
/// (the host side in the caller's namespace). Blocks; from async code use `spawn_blocking`.
pub fn release_readiness(pid: u32, release: Ipv6Addr) -> Result<Ipv6Readiness, DadError> {
    let container = ipv6_addresses_of_pid(pid)?;
    let host = ipv6_addresses_in_current_netns()?;
    Ok(readiness(release, &container, &host, interface_name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const RELEASE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2);
    const GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);
    const BRIDGE_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

    fn a(addr: Ipv6Addr, prefix_len: u8, ifindex: u32, state: DadState) -> Ipv6Address {
        Ipv6Address { addr, prefix_len, ifindex, state }
    }

    fn name(i: u32) -> String {
        format!("br{i}")
    }

    fn host(gateway: DadState, link_local: DadState) -> Vec<Ipv6Address> {
        vec![
            a(Ipv6Addr::LOCALHOST, 128, 1, DadState::Usable),
            a(GATEWAY, 64, 7, gateway),
            a(BRIDGE_LL, 64, 7, link_local),
            // Another bridge, mid-detection: not on the release's path.
            a(Ipv6Addr::new(0xfd00, 0, 0, 9, 0, 0, 0, 1), 64, 8, DadState::Tentative),
        ]
    }

    #[test]
    fn usable_when_nothing_on_the_path_is_tentative() {
        let c = [a(RELEASE, 64, 2, DadState::Usable)];
        assert_eq!(readiness(RELEASE, &c, &host(DadState::Usable, DadState::Usable), name), Ipv6Readiness::Usable);
    }

    #[test]
    fn a_new_bridge_in_detection_is_waited_for_and_named() {
        let c = [a(RELEASE, 64, 2, DadState::Usable)];
        let Ipv6Readiness::Waiting(what) = readiness(RELEASE, &c, &host(DadState::Tentative, DadState::Tentative), name) else {
            panic!("not waiting")
        };
        assert_eq!(what, "duplicate address detection of the host's fd00:0:0:1::1, fe80::1 on br7");
        assert!(!what.contains("br8"), "{what}");
    }

    #[test]
    fn the_containers_own_address_is_waited_for() {
        let c = [a(RELEASE, 64, 2, DadState::Tentative)];
        let r = readiness(RELEASE, &c, &host(DadState::Usable, DadState::Usable), name);
        assert_eq!(r, Ipv6Readiness::Waiting(format!("duplicate address detection of {RELEASE} in the container")));
        let r = readiness(RELEASE, &[], &host(DadState::Usable, DadState::Usable), name);
        assert!(matches!(r, Ipv6Readiness::Waiting(w) if w.contains("to appear")));
    }

    #[test]
    fn failed_detection_is_an_error_naming_the_address_and_the_remedy() {
        let c = [a(RELEASE, 64, 2, DadState::Failed)];
        let Ipv6Readiness::Failed(why) = readiness(RELEASE, &c, &host(DadState::Usable, DadState::Usable), name) else {
            panic!("not failed")
        };
        assert!(why.contains(&RELEASE.to_string()) && why.contains("another IPv6 subnet"), "{why}");
        let c = [a(RELEASE, 64, 2, DadState::Usable)];
        let Ipv6Readiness::Failed(why) = readiness(RELEASE, &c, &host(DadState::Failed, DadState::Usable), name) else {
            panic!("not failed")
        };
        assert!(why.contains("fd00:0:0:1::1 on br7") && why.contains("gateway"), "{why}");
        // The only link-local address failed: the host cannot solicit from it.
        assert!(matches!(readiness(RELEASE, &c, &host(DadState::Usable, DadState::Failed), name), Ipv6Readiness::Failed(_)));
    }

    #[test]
    fn a_failed_link_local_next_to_a_usable_one_is_no_obstacle() {
        let c = [a(RELEASE, 64, 2, DadState::Usable)];
        let mut h = host(DadState::Usable, DadState::Failed);
        h.push(a(Ipv6Addr::new(0xfe80, 0, 0, 0, 0x42, 0, 0, 1), 64, 7, DadState::Usable));
        assert_eq!(readiness(RELEASE, &c, &h, name), Ipv6Readiness::Usable);
    }

    #[test]
    fn no_host_address_on_the_link_means_nothing_to_wait_for_on_the_host() {
        let c = [a(RELEASE, 64, 2, DadState::Usable)];
        let h = [a(Ipv6Addr::new(0xfd00, 0, 0, 9, 0, 0, 0, 1), 64, 8, DadState::Tentative)];
        assert_eq!(readiness(RELEASE, &c, &h, name), Ipv6Readiness::Usable);
    }

    #[test]
    fn prefixes() {
        assert!(in_prefix(RELEASE, GATEWAY, 64));
        assert!(!in_prefix(RELEASE, GATEWAY, 128));
        assert!(in_prefix(RELEASE, Ipv6Addr::UNSPECIFIED, 0));
        assert!(is_link_local(BRIDGE_LL) && !is_link_local(GATEWAY));
    }

    #[test]
    fn the_host_dump_has_loopback_when_it_has_ipv6() {
        // Reading needs no privilege; a host without IPv6 simply has no addresses.
        let all = ipv6_addresses_in_current_netns().unwrap();
        if let Some(lo) = all.iter().find(|a| a.addr == Ipv6Addr::LOCALHOST) {
            assert_eq!((lo.prefix_len, lo.state), (128, DadState::Usable));
        }
    }
}
