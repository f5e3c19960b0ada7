//! Sending nftables messages over netlink and reading every acknowledgement.
//!
//! A [`Transaction`] is one nftnl batch: the kernel applies all of its messages or none.
//! Each message asks for an ACK; after sending, every sequence number of the batch is
//! accounted for, and the first error is reported with a description of the message
//! that caused it. A fresh socket per transaction means a late answer of an earlier
//! operation can never be mistaken for one of this operation.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::io;
use std::os::fd::RawFd;

use nftnl::nftnl_sys as sys;
use nftnl::{Batch, MsgType, NlMsg, ProtoFamily};

// Not in the libc crate (linux/netlink.h).
const NETLINK_CAP_ACK: c_int = 10;
const NETLINK_EXT_ACK: c_int = 11;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSG_HDRLEN: usize = 16;

/// How long to wait for the kernel's answer. The kernel processes a batch while sending
/// it, so the answers are normally already queued; this only bounds a broken kernel.
const RECV_TIMEOUT_SECS: libc::time_t = 5;

/// The kernel rejected one message of a batch (and therefore the whole batch).
/// It is the inner error of [`NatError::Batch`](super::NatError::Batch)'s `io::Error`;
/// get it back with `source.get_ref().and_then(|e| e.downcast_ref::<MessageRejected>())`.
#[derive(Debug)]
pub struct MessageRejected {
    /// What the message did, e.g. `delete element tcp . 8080 from map dnat4`.
    pub message: String,
    /// The errno the kernel answered (positive), e.g. `libc::ENOENT`.
    pub errno: i32,
    /// The kernel's extended ack text, when it gave one.
    pub detail: Option<String>,
    /// How many other messages of the batch failed too.
    pub others_failed: usize,
}

impl fmt::Display for MessageRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.message, io::Error::from_raw_os_error(self.errno))?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        if self.others_failed > 0 {
            write!(f, "; {} more message(s) of the batch failed", self.others_failed)?;
        }
        f.write_str("; nothing was changed")
    }
}

impl std::error::Error for MessageRejected {}

impl MessageRejected {
    fn into_io(self) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(self.errno).kind(), self)
    }
}

/// One batch of nftables messages, each with a description for error messages.
pub struct Transaction {
    batch: Batch,
    labels: Vec<String>,
}

impl Transaction {
    pub fn new() -> Self {
        Transaction { batch: Batch::new(), labels: Vec::new() }
    }

    /// Append `msg`; `label` says what it does, for the error if the kernel refuses it.
    pub fn add<T: NlMsg>(&mut self, msg: &T, msg_type: MsgType, label: impl Into<String>) {
        self.batch.add(msg, msg_type);
        self.labels.push(label.into());
    }

    /// Number of messages (without the batch begin/end markers).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Send the batch and wait for every acknowledgement. `Err` means the kernel applied
    /// nothing of it (or, for a socket error, that we could not find out).
    pub fn commit(self, socket: &Socket) -> io::Result<()> {
        let finalized = self.batch.finalize();
        let seqs = finalized.sequence_numbers();
        // With kernels >= 6.10 nftnl also asks an ACK for the batch begin/end markers and
        // gives them sequence numbers around ours.
        let extra = (seqs.len().saturating_sub(self.labels.len())) / 2;
        let label_of = |seq: u32| -> String {
            let index = (seq - seqs.start) as usize;
            if index < extra {
                "begin the batch".to_string()
            } else {
                self.labels.get(index - extra).cloned().unwrap_or_else(|| "end the batch".to_string())
            }
        };
        // A batch spans several nftnl pages; sending them as separate datagrams would
        // split the transaction, so send one datagram holding all of it.
        let bytes: Vec<u8> = finalized.iter().flatten().copied().collect();

        socket.ensure_sndbuf(bytes.len())?;
        socket.ensure_rcvbuf(seqs.len())?;
        socket.send(&bytes)?;

        let mut pending: BTreeMap<u32, ()> = seqs.clone().map(|s| (s, ())).collect();
        let mut failures: Vec<(u32, i32, Option<String>)> = Vec::new();
        let mut buf = RecvBuf::new();
        while !pending.is_empty() {
            // Once an error came, the rest of the answers (if any) are already queued.
            let n = match socket.recv(&mut buf, !failures.is_empty()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !failures.is_empty() => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let missing: Vec<String> = pending.keys().map(|s| label_of(*s)).collect();
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nftables did not acknowledge: {}", missing.join(", ")),
                    ));
                }
                Err(e) => return Err(e),
            };
            for msg in parse_messages(&buf.bytes()[..n]) {
                let msg = msg?;
                if pending.remove(&msg.seq).is_none() {
                    continue; // not ours (or a reply object before the ack)
                }
                if let Some(errno) = msg.error {
                    failures.push((msg.seq, errno, msg.ext_msg));
                }
            }
        }
        failures.sort_by_key(|f| f.0);
        let others_failed = failures.len().saturating_sub(1);
        match failures.into_iter().next() {
            None => Ok(()),
            Some((seq, errno, detail)) => {
                Err(MessageRejected { message: label_of(seq), errno, detail, others_failed }.into_io())
            }
        }
    }
}

impl Default for Transaction {
    fn default() -> Self {
        Self::new()
    }
}

/// Does table `name` of the inet family exist? Asks the kernel with NFT_MSG_GETTABLE.
pub fn table_exists(socket: &Socket, name: &CStr) -> io::Result<bool> {
    let mut buf = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    let seq = 1;
    // SAFETY: allocation; NULL is checked right after.
    let table = unsafe { sys::nftnl_table_alloc() };
    if table.is_null() {
        return Err(io::Error::from(io::ErrorKind::OutOfMemory));
    }
    // SAFETY: `table` is live and ours, `buf` has room for the largest nftables message,
    // the header returned points into `buf`, and the table is freed exactly once after
    // its payload was copied into `buf`.
    let len = unsafe {
        sys::nftnl_table_set_u32(table, sys::NFTNL_TABLE_FAMILY as u16, ProtoFamily::Inet as u32);
        sys::nftnl_table_set_str(table, sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
        let nlh = sys::nftnl_nlmsg_build_hdr(
            buf.as_mut_ptr().cast::<c_char>(),
            libc::NFT_MSG_GETTABLE as u16,
            ProtoFamily::Inet as u16,
            libc::NLM_F_ACK as u16,
            seq,
        );
        sys::nftnl_table_nlmsg_build_payload(nlh, table);
        sys::nftnl_table_free(table);
        (*nlh).nlmsg_len as usize
    };
    socket.send(&buf[..len])?;
    let mut rbuf = RecvBuf::new();
    loop {
        let n = socket.recv(&mut rbuf, false)?;
        for msg in parse_messages(&rbuf.bytes()[..n]) {
            let msg = msg?;
            if msg.seq != seq || !msg.is_ack {
                continue; // the table object itself precedes the ack
            }
            return match msg.error {
                None => Ok(true),
                Some(libc::ENOENT) => Ok(false),
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            };
        }
    }
}

/// A netfilter netlink socket (closed on drop).
pub struct Socket(mnl::Socket);

// SAFETY: the socket is an fd plus libmnl's small struct around it, with no thread-local
// state; moving it to another thread is sound. It is not `Sync`: callers that share it
// (the firewall's kept-open commit socket) do so behind a mutex, one transaction at a time.
unsafe impl Send for Socket {}

impl Socket {
    pub fn open() -> io::Result<Self> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
        let s = Socket(socket);
        // Errors echo only the header of the failed message, not the whole message: a
        // failed batch of thousands of elements must not overflow our receive buffer.
        s.setsockopt(libc::SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        // Best effort: older kernels lack extended acks; they only add detail to errors.
        let _ = s.setsockopt(libc::SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let timeout = libc::timeval { tv_sec: RECV_TIMEOUT_SECS, tv_usec: 0 };
        s.setsockopt_raw(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        Ok(s)
    }

    fn fd(&self) -> RawFd {
        // SAFETY: the mnl socket is live for as long as `self`.
        unsafe { mnl::mnl_sys::mnl_socket_get_fd(self.0.as_raw_socket()) }
    }

    fn setsockopt(&self, level: c_int, name: c_int, value: c_int) -> io::Result<()> {
        self.setsockopt_raw(level, name, &value)
    }

    fn setsockopt_raw<T>(&self, level: c_int, name: c_int, value: &T) -> io::Result<()> {
        // SAFETY: `value` points to a live, initialized `T` of the given size; the fd is
        // owned by `self`.
        let rc = unsafe {
            libc::setsockopt(
                self.fd(),
                level,
                name,
                (value as *const T).cast::<c_void>(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Netlink refuses a datagram larger than the send buffer; grow it for big batches
    /// (SO_SNDBUFFORCE: we are root, and `wmem_max` is often smaller than a sync of
    /// thousands of elements).
    fn ensure_sndbuf(&self, len: usize) -> io::Result<()> {
        const DEFAULT_ENOUGH: usize = 128 * 1024;
        if len <= DEFAULT_ENOUGH {
            return Ok(());
        }
        let size = c_int::try_from(len.saturating_mul(2)).unwrap_or(c_int::MAX);
        self.setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size)
    }

    /// The kernel queues the acknowledgement of every message of a batch before we read
    /// the first, so a batch of thousands of messages (a sync with a counting rule per
    /// service port) overflows the default receive buffer (ENOBUFS) and its answers are
    /// lost. Grow it to about 1 KiB per message, as `nft` does (SO_RCVBUFFORCE: we are root).
    fn ensure_rcvbuf(&self, messages: usize) -> io::Result<()> {
        const DEFAULT_ENOUGH: usize = 128;
        const PER_ACK: usize = 1024;
        if messages <= DEFAULT_ENOUGH {
            return Ok(());
        }
        let size = c_int::try_from(messages.saturating_mul(PER_ACK)).unwrap_or(c_int::MAX);
        self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = self.0.send(bytes)?;
        if sent != bytes.len() {
            return Err(io::Error::other(format!("netlink sent {sent} of {} bytes", bytes.len())));
        }
        Ok(())
    }

    /// Receive one datagram; with `nowait`, `WouldBlock` when nothing is queued.
    fn recv(&self, buf: &mut RecvBuf, nowait: bool) -> io::Result<usize> {
        let flags = if nowait { libc::MSG_DONTWAIT } else { 0 };
        let bytes = buf.bytes_mut();
        loop {
            // SAFETY: `bytes` is a writable buffer of the given length that outlives the
            // call; the fd is owned by `self`.
            let n = unsafe { libc::recv(self.fd(), bytes.as_mut_ptr().cast::<c_void>(), bytes.len(), flags) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// A receive buffer big enough for any nftables message.
struct RecvBuf(Vec<u8>);

impl RecvBuf {
    fn new() -> Self {
        RecvBuf(vec![0; nftnl::nft_nlmsg_maxsize() as usize])
    }
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// What we need of one received netlink message.
#[derive(Debug, PartialEq, Eq)]
struct Received {
    seq: u32,
    /// NLMSG_ERROR (an ACK when `error` is None).
    is_ack: bool,
    /// Positive errno of a failed ACK.
    error: Option<i32>,
    /// NLMSGERR_ATTR_MSG of an extended ACK.
    ext_msg: Option<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed netlink message from nftables")
}

/// One netlink message of a datagram: type, flags, sequence number, and the whole
/// message (header included).
struct Frame<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    msg: &'a [u8],
}

/// Split a datagram into netlink messages. Reads fields by value, so the buffer needs no
/// particular alignment.
fn frames(mut b: &[u8]) -> impl Iterator<Item = io::Result<Frame<'_>>> + '_ {
    std::iter::from_fn(move || {
        if b.len() < NLMSG_HDRLEN {
            return None;
        }
        let (Some(len), Some(ty), Some(flags), Some(seq)) = (u32_at(b, 0), u16_at(b, 4), u16_at(b, 6), u32_at(b, 8))
        else {
            return Some(Err(malformed()));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            b = &[];
            return Some(Err(malformed()));
        }
        let msg = &b[..len];
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
        Some(Ok(Frame { ty, flags, seq, msg }))
    })
}

/// The positive errno of an NLMSG_ERROR message (0: an ACK).
fn errno_of(msg: &[u8]) -> io::Result<i32> {
    u32_at(msg, NLMSG_HDRLEN).map(|code| -(code as i32)).ok_or_else(malformed)
}

/// What [`Transaction::commit`] needs of each message of a datagram.
fn parse_messages(b: &[u8]) -> impl Iterator<Item = io::Result<Received>> + '_ {
    frames(b).map(|frame| {
        let Frame { ty, flags, seq, msg } = frame?;
        if ty != libc::NLMSG_ERROR as u16 {
            return Ok(Received { seq, is_ack: false, error: None, ext_msg: None });
        }
        let errno = errno_of(msg)?;
        let ext_msg = if flags & NLM_F_ACK_TLVS != 0 { ext_ack_message(msg, flags) } else { None };
        Ok(Received { seq, is_ack: true, error: (errno != 0).then_some(errno), ext_msg })
    })
}

/// The counter of one rule, as a rule dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    pub chain: String,
    /// The rule's comment (nftnl userdata), if it has one.
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

// Not in the libc crate (linux/netfilter/nf_tables.h, nfnetlink.h, netlink.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFGENMSG_LEN: usize = 4;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// `NFTNL_UDATA_RULE_COMMENT`: the type of the comment TLV in a rule's userdata.
const UDATA_RULE_COMMENT: u8 = 0;
/// The kernel's ruleset changed while it answered a dump: ask again.
const NLM_F_DUMP_INTR: u16 = 0x10;
const DUMP_ATTEMPTS: usize = 5;

/// The netlink attributes of `b`: (type without the nested/byte-order flags, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(b, 0)? as usize;
        let ty = u16_at(b, 2)? & 0x3fff;
        let value = b.get(4..len)?;
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
        Some((ty, value))
    })
}

fn attr_str(value: &[u8]) -> String {
    String::from_utf8_lossy(value.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

fn be64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

/// The comment TLV of a rule's userdata (`type u8, len u8, value`).
fn udata_comment(mut b: &[u8]) -> Option<String> {
    while let [ty, len, rest @ ..] = b {
        let value = rest.get(..usize::from(*len))?;
        if *ty == UDATA_RULE_COMMENT {
            return Some(attr_str(value));
        }
        b = &rest[usize::from(*len)..];
    }
    None
}

/// A NEWRULE message of a dump, if it belongs to `table` and has a counter expression.
fn rule_counter(msg: &[u8], table: &str) -> Option<RuleCounter> {
    let (mut in_table, mut chain, mut comment, mut counter) = (false, None, None, None);
    for (ty, value) in attrs(msg.get(NLMSG_HDRLEN + NFGENMSG_LEN..)?) {
        match ty {
            NFTA_RULE_TABLE => in_table = attr_str(value) == table,
            NFTA_RULE_CHAIN => chain = Some(attr_str(value)),
            NFTA_RULE_USERDATA => comment = udata_comment(value),
            NFTA_RULE_EXPRESSIONS => {
                for (_, expr) in attrs(value).filter(|(t, _)| *t == NFTA_LIST_ELEM) {
                    let name = attrs(expr).find(|(t, _)| *t == NFTA_EXPR_NAME).map(|(_, v)| attr_str(v));
                    let Some(data) = attrs(expr).find(|(t, _)| *t == NFTA_EXPR_DATA).map(|(_, v)| v) else { continue };
                    if name.as_deref() == Some("counter") {
                        let field = |want| attrs(data).find(|(t, _)| *t == want).and_then(|(_, v)| be64(v));
                        counter = Some((field(NFTA_COUNTER_PACKETS)?, field(NFTA_COUNTER_BYTES)?));
                    }
                }
            }
            _ => {}
        }
    }
    let (packets, bytes) = counter?;
    in_table.then(|| RuleCounter { chain: chain.unwrap_or_default(), comment, packets, bytes })
}

/// The GETRULE dump request for the rules of inet table `table`.
fn rule_dump_request(table: &CStr, seq: u32) -> Vec<u8> {
    let name = table.to_bytes_with_nul();
    let attr_len = 4 + name.len();
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + ((attr_len + 3) & !3);
    let mut b = Vec::with_capacity(len);
    b.extend((len as u32).to_ne_bytes());
    b.extend(((NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_GETRULE as u16).to_ne_bytes());
    b.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    b.extend(seq.to_ne_bytes());
    b.extend(0u32.to_ne_bytes());
    // nfgenmsg: family, version, resource id (big endian)
    b.extend([ProtoFamily::Inet as u8, libc::NFNETLINK_V0 as u8, 0, 0]);
    b.extend((attr_len as u16).to_ne_bytes());
    b.extend(NFTA_RULE_TABLE.to_ne_bytes());
    b.extend(name);
    b.resize(len, 0);
    b
}

/// The counters of every rule of inet table `table` that has one (none when the table
/// does not exist), read with one NFT_MSG_GETRULE dump.
pub fn rule_counters(socket: &Socket, table: &CStr) -> io::Result<Vec<RuleCounter>> {
    let name = table.to_string_lossy();
    let mut buf = RecvBuf::new();
    for seq in 1..=DUMP_ATTEMPTS as u32 {
        socket.send(&rule_dump_request(table, seq))?;
        let mut out = Vec::new();
        let mut interrupted = false;
        'dump: loop {
            let n = socket.recv(&mut buf, false)?;
            for frame in frames(&buf.bytes()[..n]) {
                let frame = frame?;
                if frame.seq != seq {
                    continue;
                }
                interrupted |= frame.flags & NLM_F_DUMP_INTR != 0;
                match frame.ty {
                    t if t == libc::NLMSG_DONE as u16 => break 'dump,
                    t if t == libc::NLMSG_ERROR as u16 => match errno_of(frame.msg)? {
                        0 => break 'dump,
                        libc::ENOENT => return Ok(Vec::new()),
                        errno => return Err(io::Error::from_raw_os_error(errno)),
                    },
                    _ => out.extend(rule_counter(frame.msg, &name)),
                }
            }
        }
        if !interrupted {
            return Ok(out);
        }
    }
    Err(io::Error::new(io::ErrorKind::Interrupted, format!("the ruleset kept changing during {DUMP_ATTEMPTS} rule dumps")))
}

/// The NLMSGERR_ATTR_MSG text of an extended ACK.
fn ext_ack_message(msg: &[u8], flags: u16) -> Option<String> {
    // nlmsgerr = error (4) + the original message; with NLM_F_CAPPED (our
    // NETLINK_CAP_ACK) only its header is echoed. The TLVs follow.
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        (u32_at(msg, NLMSG_HDRLEN + 4)? as usize + 3) & !3
    };
    let mut at = NLMSG_HDRLEN + 4 + echoed;
    while at + 4 <= msg.len() {
        let len = u16_at(msg, at)? as usize;
        let ty = u16_at(msg, at + 2)? & 0x3fff;
        if len < 4 {
            return None;
        }
        if ty == NLMSGERR_ATTR_MSG {
            let text = msg.get(at + 4..at + len)?;
            let text = text.split(|c| *c == 0).next()?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        at += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        v.extend(ty.to_ne_bytes());
        v.extend(flags.to_ne_bytes());
        v.extend(seq.to_ne_bytes());
        v.extend(0u32.to_ne_bytes());
        v.extend(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn acks_errors_and_extended_messages_are_parsed() {
        let mut dgram = nlmsg(libc::NLMSG_ERROR as u16, 0, 3, &[&0i32.to_ne_bytes()[..], &[0; 16]].concat());
        let mut err = (-libc::ENOENT).to_ne_bytes().to_vec();
        err.extend([0; 16]);
        err.extend(12u16.to_ne_bytes());
        err.extend(NLMSGERR_ATTR_MSG.to_ne_bytes());
        err.extend(b"missing\0");
        dgram.extend(nlmsg(libc::NLMSG_ERROR as u16, NLM_F_ACK_TLVS | NLM_F_CAPPED, 4, &err));
        dgram.extend(nlmsg(16, 0, 5, b"obj"));
        let got: Vec<Received> = parse_messages(&dgram).collect::<io::Result<_>>().unwrap();
        assert_eq!(
            got,
            vec![
                Received { seq: 3, is_ack: true, error: None, ext_msg: None },
                Received { seq: 4, is_ack: true, error: Some(libc::ENOENT), ext_msg: Some("missing".into()) },
                Received { seq: 5, is_ack: false, error: None, ext_msg: None },
            ]
        );
    }

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(((4 + value.len()) as u16).to_ne_bytes());
        v.extend(ty.to_ne_bytes());
        v.extend(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    const NESTED: u16 = 0x8000;

    #[test]
    fn a_dumped_rule_gives_its_chain_comment_and_counter() {
        let counter = [
            attr(NFTA_EXPR_NAME, b"counter\0"),
            attr(
                NFTA_EXPR_DATA | NESTED,
                &[attr(3, &[0; 4]), attr(NFTA_COUNTER_BYTES, &1234u64.to_be_bytes()), attr(NFTA_COUNTER_PACKETS, &17u64.to_be_bytes())]
                    .concat(),
            ),
        ]
        .concat();
        let cmp = [attr(NFTA_EXPR_NAME, b"cmp\0"), attr(NFTA_EXPR_DATA | NESTED, &attr(1, &[1, 0, 0, 0]))].concat();
        let exprs = [attr(NFTA_LIST_ELEM | NESTED, &cmp), attr(NFTA_LIST_ELEM | NESTED, &counter)].concat();
        let payload = [
            vec![1, 0, 0, 0],
            attr(NFTA_RULE_TABLE, b"cutover\0"),
            attr(NFTA_RULE_CHAIN, b"count_output\0"),
            attr(NFTA_RULE_EXPRESSIONS | NESTED, &exprs),
            attr(NFTA_RULE_USERDATA, &[0, 4, b'w', b'e', b'b', 0]),
        ]
        .concat();
        let msg = nlmsg((NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_NEWRULE as u16, 2, 1, &payload);
        let got = rule_counter(&msg, "cutover").unwrap();
        assert_eq!(got, RuleCounter { chain: "count_output".into(), comment: Some("web".into()), packets: 17, bytes: 1234 });
        assert_eq!(rule_counter(&msg, "other"), None, "rules of another table are not ours");
        let request = rule_dump_request(c"cutover", 7);
        assert_eq!(request.len(), 16 + 4 + 12);
        assert_eq!(&request[20..], &attr(NFTA_RULE_TABLE, b"cutover\0")[..]);
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let mut dgram = nlmsg(libc::NLMSG_ERROR as u16, 0, 3, &[0; 20]);
        dgram.truncate(18);
        dgram[0] = 200;
        assert!(parse_messages(&dgram).any(|m| m.is_err()));
    }

    #[test]
    fn rejection_names_the_message() {
        let e = MessageRejected { message: "delete element tcp . 8080".into(), errno: libc::ENOENT, detail: None, others_failed: 0 }
            .into_io();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("delete element tcp . 8080: No such file or directory"), "{e}");
    }
}
