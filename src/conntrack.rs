//! The kernel's connection tracking table over netlink (NETLINK_NETFILTER, ctnetlink):
//! one dump of every entry, and deleting entries by their original tuple.
//!
//! Replaces a `conntrack -L`/`-D` process per port per poll: draining 98 UDP ports
//! spawned 98 processes every poll on the async runtime (a 2 s drain took 11 s). One
//! dump is a few syscalls and serves every port of a poll.
//!
//! Owns the ctnetlink wire format (encoding requests, parsing entries) and nothing
//! else: which flows belong to which release is the caller's business (`host`). Runs in
//! the calling thread's network namespace; blocking, each call bounded by a socket
//! timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// How long one netlink answer may take before the call fails.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// A receive buffer: the kernel's dump messages are at most 32 KiB each.
const RECV_BUFFER: usize = 64 * 1024;

// netlink (linux/netlink.h)
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

// nfnetlink (linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h)
const NFGENMSG_LEN: usize = 4;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// IPS_ASSURED (linux/netfilter/nf_conntrack_common.h): seen both ways for a while.
const IPS_ASSURED: u32 = 1 << 2;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a netfilter netlink socket: {0}; is cutover root, and the nf_conntrack_netlink module loadable?")]
    Socket(#[source] std::io::Error),
    #[error("cannot send the conntrack {what} request: {source}")]
    Send {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no complete answer to the conntrack {what} request: {source}")]
    Recv {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel refused the conntrack {what} request: {source}")]
    Kernel {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed conntrack message: {0}")]
    Malformed(String),
}

/// One direction of a connection: addresses, protocol and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPPROTO_TCP (6), IPPROTO_UDP (17), ...
    pub proto: u8,
    /// 0 for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
}

/// One conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// As the client sent it (to the host port, before DNAT).
    pub orig: Tuple,
    /// As the answer travels (from the release's address).
    pub reply: Tuple,
    /// Seconds before the entry expires unless a packet refreshes it.
    pub timeout_secs: u32,
    pub assured: bool,
}

/// Every entry of the connection tracking table (IPv4 and IPv6), in one dump.
pub fn dump() -> Result<Vec<Entry>, ConntrackError> {
    let sock = open()?;
    let request = request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, libc::AF_UNSPEC as u8, &[]);
    sock.send(&request, 0).map_err(|source| ConntrackError::Send { what: "dump", source })?;
    let mut entries = Vec::new();
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        let n = sock.recv(&mut buf, 0).map_err(|source| ConntrackError::Recv { what: "dump", source })?;
        if n > buf.len() {
            return Err(ConntrackError::Malformed(format!("a {n}-byte message did not fit in {} bytes", buf.len())));
        }
        match parse_messages(&buf, &mut entries)? {
            Batch::More => continue,
            Batch::Done => return Ok(entries),
            Batch::Error(errno) => {
                return Err(ConntrackError::Kernel { what: "dump", source: std::io::Error::from_raw_os_error(errno) })
            }
        }
    }
}

/// Deletes the entry whose original tuple is `orig`. Ok(false): it was gone already.
pub fn delete(orig: &Tuple) -> Result<bool, ConntrackError> {
    let sock = open()?;
    let family = if orig.src.is_ipv6() { AF_INET6 } else { AF_INET };
    let request = request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, 1, family, &encode_tuple(CTA_TUPLE_ORIG, orig));
    sock.send(&request, 0).map_err(|source| ConntrackError::Send { what: "delete", source })?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    let mut ignored = Vec::new();
    loop {
        buf.clear();
        sock.recv(&mut buf, 0).map_err(|source| ConntrackError::Recv { what: "delete", source })?;
        match parse_messages(&buf, &mut ignored)? {
            Batch::More => continue,
            Batch::Done | Batch::Error(0) => return Ok(true),
            Batch::Error(libc::ENOENT) => return Ok(false),
            Batch::Error(errno) => {
                return Err(ConntrackError::Kernel { what: "delete", source: std::io::Error::from_raw_os_error(errno) })
            }
        }
    }
}

fn open() -> Result<Socket, ConntrackError> {
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Socket)?;
    sock.bind(&SocketAddr::new(0, 0)).map_err(ConntrackError::Socket)?;
    sock.connect(&SocketAddr::new(0, 0)).map_err(ConntrackError::Socket)?;
    nix::sys::socket::setsockopt(&sock.as_fd(), nix::sys::socket::sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::from(libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    }))
    .map_err(|e| ConntrackError::Socket(e.into()))?;
    Ok(sock)
}

/// What one received buffer ended with.
#[derive(Debug, PartialEq, Eq)]
enum Batch {
    /// Entries only: more buffers follow.
    More,
    /// NLMSG_DONE.
    Done,
    /// NLMSG_ERROR with this errno (0: the acknowledgement of a request).
    Error(i32),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses the netlink messages of one received buffer, appending conntrack entries.
fn parse_messages(buf: &[u8], entries: &mut Vec<Entry>) -> Result<Batch, ConntrackError> {
    let bad = |what: &str| ConntrackError::Malformed(what.to_string());
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, at).ok_or_else(|| bad("netlink header"))? as usize;
        let kind = u16_at(buf, at + 4).ok_or_else(|| bad("netlink header"))?;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return Err(ConntrackError::Malformed(format!("netlink message of length {len} at offset {at} of {}", buf.len())));
        }
        let body = &buf[at + NLMSG_HDRLEN..at + len];
        match kind {
            NLMSG_DONE => return Ok(Batch::Done),
            NLMSG_ERROR => {
                let code = u32_at(body, 0).ok_or_else(|| bad("netlink error message"))? as i32;
                return Ok(Batch::Error(-code));
            }
            k if k == (NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW) => {
                let attrs = body.get(NFGENMSG_LEN..).ok_or_else(|| bad("conntrack message without nfgenmsg"))?;
                if let Some(e) = parse_entry(attrs)? {
                    entries.push(e);
                }
            }
            _ => {} // other message types (none expected) are skipped
        }
        at += align4(len);
    }
    Ok(Batch::More)
}

/// The attributes of a buffer as (type without flags, payload).
fn attributes(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, ConntrackError> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let len = usize::from(u16_at(b, 0).unwrap_or(0));
        let kind = u16_at(b, 2).unwrap_or(0) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > b.len() {
            return Err(ConntrackError::Malformed(format!("attribute {kind} of length {len} in {} bytes", b.len())));
        }
        out.push((kind, &b[NLA_HDRLEN..len]));
        b = b.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

fn parse_entry(attrs: &[u8]) -> Result<Option<Entry>, ConntrackError> {
    let (mut orig, mut reply, mut timeout_secs, mut status) = (None, None, 0, 0);
    for (kind, payload) in attributes(attrs)? {
        match kind {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(payload)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(payload)?),
            CTA_TIMEOUT => timeout_secs = be32(payload)?,
            CTA_STATUS => status = be32(payload)?,
            _ => {}
        }
    }
    // Entries without both tuples (none are sent) are not connections to judge.
    Ok(match (orig, reply) {
        (Some(orig), Some(reply)) => Some(Entry { orig, reply, timeout_secs, assured: status & IPS_ASSURED != 0 }),
        _ => None,
    })
}

fn be32(p: &[u8]) -> Result<u32, ConntrackError> {
    p.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| ConntrackError::Malformed(format!("a 32-bit attribute of {} bytes", p.len())))
}

fn parse_tuple(payload: &[u8]) -> Result<Tuple, ConntrackError> {
    let (mut src, mut dst, mut proto, mut src_port, mut dst_port) = (None, None, None, 0, 0);
    for (kind, p) in attributes(payload)? {
        match kind {
            CTA_TUPLE_IP => {
                for (k, a) in attributes(p)? {
                    let addr = match (k, a.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => {
                            let mut o = [0u8; 16];
                            o.copy_from_slice(a);
                            IpAddr::V6(Ipv6Addr::from(o))
                        }
                        _ => continue,
                    };
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(addr),
                        _ => dst = Some(addr),
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, a) in attributes(p)? {
                    let port = || a.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                    match k {
                        CTA_PROTO_NUM => proto = a.first().copied(),
                        CTA_PROTO_SRC_PORT => src_port = port().unwrap_or(0),
                        CTA_PROTO_DST_PORT => dst_port = port().unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match (src, dst, proto) {
        (Some(src), Some(dst), Some(proto)) => Ok(Tuple { src, dst, proto, src_port, dst_port }),
        _ => Err(ConntrackError::Malformed("a tuple without addresses or protocol".into())),
    }
}

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = NLA_HDRLEN + payload.len();
    let mut out = Vec::with_capacity(align4(len));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align4(len), 0);
    out
}

/// `kind` (CTA_TUPLE_ORIG or CTA_TUPLE_REPLY) holding `t`, as the kernel sends it too.
fn encode_tuple(kind: u16, t: &Tuple) -> Vec<u8> {
    let ip = |k_v4: u16, k_v6: u16, a: &IpAddr| match a {
        IpAddr::V4(v4) => attr(k_v4, &v4.octets()),
        IpAddr::V6(v6) => attr(k_v6, &v6.octets()),
    };
    let ips = [ip(CTA_IP_V4_SRC, CTA_IP_V6_SRC, &t.src), ip(CTA_IP_V4_DST, CTA_IP_V6_DST, &t.dst)].concat();
    let mut proto = attr(CTA_PROTO_NUM, &[t.proto]);
    if t.proto == libc::IPPROTO_TCP as u8 || t.proto == libc::IPPROTO_UDP as u8 {
        proto.extend(attr(CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes()));
        proto.extend(attr(CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes()));
    }
    let inner = [attr(CTA_TUPLE_IP | NLA_F_NESTED, &ips), attr(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto)].concat();
    attr(kind | NLA_F_NESTED, &inner)
}

/// A ctnetlink request: netlink header, nfgenmsg (family, version 0, res_id 0), attributes.
fn request(msg: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | msg).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0, 0, 0]);
    out.extend_from_slice(attrs);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto: 17, src_port: sport, dst_port: dport }
    }

    /// An entry message as the kernel sends it in a dump.
    fn entry_message(e: &Entry) -> Vec<u8> {
        let family = if e.orig.src.is_ipv6() { AF_INET6 } else { AF_INET };
        let mut attrs = encode_tuple(CTA_TUPLE_ORIG, &e.orig);
        attrs.extend(encode_tuple(CTA_TUPLE_REPLY, &e.reply));
        attrs.extend(attr(CTA_STATUS, &(if e.assured { IPS_ASSURED | 0x8 } else { 0x8 }).to_be_bytes()));
        attrs.extend(attr(CTA_TIMEOUT, &e.timeout_secs.to_be_bytes()));
        attrs.extend(attr(8 /* CTA_MARK */, &0u32.to_be_bytes()));
        request(IPCTNL_MSG_CT_NEW, 0x2, 1, family, &attrs)
    }

    fn done() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&0u32.to_ne_bytes());
        m
    }

    #[test]
    fn a_dump_of_v4_and_v6_entries_is_parsed() {
        let v4 = Entry {
            orig: udp("10.0.0.2", 4000, "10.0.0.1", 53),
            reply: udp("172.17.0.2", 53, "10.0.0.2", 4000),
            timeout_secs: 117,
            assured: true,
        };
        let v6 = Entry { orig: udp("fd00::2", 4001, "fd00::1", 53), reply: udp("fd01::3", 53, "fd00::2", 4001), timeout_secs: 29, assured: false };
        let mut buf = entry_message(&v4);
        buf.extend(entry_message(&v6));
        let mut got = Vec::new();
        assert_eq!(parse_messages(&buf, &mut got).unwrap(), Batch::More);
        assert_eq!(got, vec![v4, v6]);
        buf.extend(done());
        got.clear();
        assert_eq!(parse_messages(&buf, &mut got).unwrap(), Batch::Done);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn errors_and_acks_are_told_apart() {
        let error = |errno: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&(-errno).to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        assert_eq!(parse_messages(&error(libc::ENOENT), &mut Vec::new()).unwrap(), Batch::Error(libc::ENOENT));
        assert_eq!(parse_messages(&error(0), &mut Vec::new()).unwrap(), Batch::Error(0));
    }

    #[test]
    fn truncated_or_lying_lengths_are_malformed_not_a_panic() {
        let e = Entry { orig: udp("10.0.0.2", 1, "10.0.0.1", 2), reply: udp("10.0.0.3", 2, "10.0.0.2", 1), timeout_secs: 1, assured: false };
        let buf = entry_message(&e);
        for cut in 1..buf.len() {
            let _ = parse_messages(&buf[..cut], &mut Vec::new());
        }
        let mut lying = buf.clone();
        lying[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(matches!(parse_messages(&lying, &mut Vec::new()), Err(ConntrackError::Malformed(_))));
        let mut bad_attr = buf;
        // The first attribute (the original tuple) claims more than the message holds.
        bad_attr[NLMSG_HDRLEN + NFGENMSG_LEN..NLMSG_HDRLEN + NFGENMSG_LEN + 2].copy_from_slice(&4000u16.to_ne_bytes());
        assert!(matches!(parse_messages(&bad_attr, &mut Vec::new()), Err(ConntrackError::Malformed(_))));
    }

    #[test]
    fn a_delete_request_carries_the_original_tuple() {
        let t = udp("10.0.0.2", 4000, "10.0.0.1", 53);
        let req = request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, 7, AF_INET, &encode_tuple(CTA_TUPLE_ORIG, &t));
        assert_eq!(u32_at(&req, 0).unwrap() as usize, req.len());
        assert_eq!(u16_at(&req, 4).unwrap(), 0x102);
        let attrs = attributes(&req[NLMSG_HDRLEN + NFGENMSG_LEN..]).unwrap();
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].0, CTA_TUPLE_ORIG);
        assert_eq!(parse_tuple(attrs[0].1).unwrap(), t);
    }

    #[test]
    fn the_kernel_table_can_be_dumped() {
        // Needs root (CAP_NET_ADMIN); the CI runs the unit tests as root.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: not root");
            return;
        }
        dump().unwrap();
        assert!(!delete(&udp("192.0.2.1", 9, "192.0.2.2", 9)).unwrap(), "no such entry: nothing deleted");
    }
}
