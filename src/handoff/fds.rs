//! SCM_RIGHTS transport: SOCK_SEQPACKET unix sockets, one frame per record, fds
//! attached with one `SCM_RIGHTS` control message.
//!
//! Owns every raw `sendmsg`/`recvmsg` of the handoff code. Receives always use
//! `MSG_CMSG_CLOEXEC` (a received fd must never leak into a process this one starts) and
//! take ownership of every fd the kernel installed, also when the frame is then rejected,
//! so a malformed or hostile peer cannot make this process leak descriptors.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::protocol::{self, Message, MAX_FDS, MAX_FRAME};
use super::HandoffError;

/// How long either side of a handover waits for the other's next frame.
pub const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a handoff socket lives: `@name` is an abstract unix name (scoped to the network
/// namespace it was bound in), anything else a filesystem path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketName {
    Abstract(String),
    Path(std::path::PathBuf),
}

impl SocketName {
    pub fn parse(s: &str) -> SocketName {
        match s.strip_prefix('@') {
            Some(name) => SocketName::Abstract(name.to_string()),
            None => SocketName::Path(s.into()),
        }
    }

    /// The broker socket of a service: `@cutover/NAME`.
    pub fn broker(service: &str) -> SocketName {
        SocketName::Abstract(format!("cutover/{service}"))
    }

    fn addr(&self) -> Result<UnixAddr, HandoffError> {
        match self {
            SocketName::Abstract(n) => UnixAddr::new_abstract(n.as_bytes()),
            SocketName::Path(p) => UnixAddr::new(p),
        }
        .map_err(|e| HandoffError::io("make a unix address for", self.to_string(), e.into()))
    }
}

impl std::fmt::Display for SocketName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketName::Abstract(n) => write!(f, "@{n}"),
            SocketName::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The credentials of a connected peer (SO_PEERCRED), in this process's pid namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_credentials(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let c = socket::getsockopt(&fd, socket::sockopt::PeerCredentials)?;
    Ok(PeerCred { pid: c.pid(), uid: c.uid(), gid: c.gid() })
}

/// A listening SOCK_SEQPACKET socket (non-blocking, close-on-exec).
pub fn listen(name: &SocketName) -> Result<OwnedFd, HandoffError> {
    let fd = new_socket(SockFlag::SOCK_NONBLOCK).map_err(|e| HandoffError::io("create a socket for", name.to_string(), e))?;
    if let SocketName::Path(p) = name {
        // A socket file left by a previous run that is gone; a live one answers connect.
        if p.exists() && connect(name).is_err() {
            let _ = std::fs::remove_file(p);
        }
    }
    socket::bind(fd.as_raw_fd(), &name.addr()?)
        .map_err(|e| HandoffError::io("bind", name.to_string(), e.into()))?;
    socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| HandoffError::io("listen on", name.to_string(), e.into()))?;
    Ok(fd)
}

/// A connected, blocking SOCK_SEQPACKET socket.
pub fn connect(name: &SocketName) -> Result<OwnedFd, HandoffError> {
    let fd = new_socket(SockFlag::empty()).map_err(|e| HandoffError::io("create a socket for", name.to_string(), e))?;
    socket::connect(fd.as_raw_fd(), &name.addr()?).map_err(|e| HandoffError::io("connect to", name.to_string(), e.into()))?;
    Ok(fd)
}

/// A connected pair of blocking SOCK_SEQPACKET sockets.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?)
}

fn new_socket(extra: SockFlag) -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC | extra, None)?)
}

/// Accepts one connection from a non-blocking listener; the connection is non-blocking.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets a receive and send timeout on a blocking socket.
pub fn set_timeouts(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &tv)?;
    socket::setsockopt(&fd, socket::sockopt::SendTimeout, &tv)?;
    Ok(())
}

/// Sends one record with `fds` attached (at most 253).
pub fn send_raw(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message; the kernel takes at most {MAX_FDS}", fds.len()),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if raw.is_empty() { 0 } else { (unsafe { libc::CMSG_SPACE(payload as u32) }) as usize };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` zeroed, aligned bytes, enough for one
        // header with `payload` bytes of data, so the first header is valid and its data
        // area holds `raw.len()` ints.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), payload);
        }
    }
    // SAFETY: msg points to live buffers (iov, control) for the duration of the call.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "the kernel took part of a record"));
    }
    Ok(())
}

/// One received record.
#[derive(Debug)]
pub struct Received {
    /// Bytes received (0: the peer closed the connection).
    pub len: usize,
    /// Every fd the kernel installed, now owned (closed on drop).
    pub fds: Vec<OwnedFd>,
    /// The record was longer than the buffer (MSG_TRUNC).
    pub truncated: bool,
    /// Control data was cut off, so some fds were lost (MSG_CTRUNC).
    pub fds_truncated: bool,
    /// SCM_CREDENTIALS, when the socket has SO_PASSCRED.
    pub creds: Option<PeerCred>,
}

/// Receives one record into `buf`.
pub fn recv_raw(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: CMSG_SPACE only computes sizes.
    let space = unsafe {
        libc::CMSG_SPACE((MAX_FDS * mem::size_of::<libc::c_int>()) as u32)
            + libc::CMSG_SPACE(mem::size_of::<libc::ucred>() as u32)
    } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points to live, writable buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    let mut creds = None;
    // Walk the control data even when MSG_CTRUNC is set: the fds that fit were installed
    // in this process and must be owned here or they leak.
    // SAFETY: msg was filled in by recvmsg; CMSG_FIRSTHDR/NXTHDR stay inside
    // msg_controllen and return null at the end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: c is non-null and points to a header inside the control buffer.
        let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len as usize) };
        // SAFETY: CMSG_LEN only computes a size.
        let data_len = len.saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
        // SAFETY: the data area of a header of cmsg_len bytes holds data_len bytes.
        let data = unsafe { libc::CMSG_DATA(c) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for i in 0..data_len / mem::size_of::<libc::c_int>() {
                // SAFETY: i is within the data area; the kernel wrote ints there, possibly
                // unaligned relative to u8 data, hence read_unaligned.
                let raw = unsafe { ptr::read_unaligned(data.cast::<libc::c_int>().add(i)) };
                // SAFETY: SCM_RIGHTS installed this descriptor in this process just now
                // and nothing else refers to it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        } else if level == libc::SOL_SOCKET && kind == libc::SCM_CREDENTIALS && data_len >= mem::size_of::<libc::ucred>() {
            // SAFETY: the data area holds one ucred (checked size).
            let u = unsafe { ptr::read_unaligned(data.cast::<libc::ucred>()) };
            creds = Some(PeerCred { pid: u.pid, uid: u.uid, gid: u.gid });
        }
        // SAFETY: see CMSG_FIRSTHDR above.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(Received {
        len: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        creds,
    })
}

/// Encodes and sends a message; `fds` must match what the message announces.
pub fn send_message(fd: BorrowedFd<'_>, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
    debug_assert_eq!(msg.fd_count(), fds.len());
    let frame = protocol::encode(msg)?;
    send_raw(fd, &frame, fds).map_err(|source| HandoffError::Send { kind: msg.kind(), source })
}

/// Receives and checks one frame (blocking socket, or a ready non-blocking one).
pub fn recv_message(fd: BorrowedFd<'_>) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
    let mut buf = vec![0u8; MAX_FRAME];
    let r = recv_raw(fd, &mut buf).map_err(|source| HandoffError::Recv { source })?;
    check_received(&buf, r)
}

/// Turns a received record into a message and its fds, or the error that names what is
/// wrong with it (the fds are dropped, i.e. closed, on every error).
pub fn check_received(buf: &[u8], r: Received) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
    if r.len == 0 {
        return Err(HandoffError::Closed);
    }
    if r.truncated {
        return Err(protocol::FrameError::TooLarge.into());
    }
    if r.fds_truncated {
        return Err(HandoffError::FdsTruncated { received: r.fds.len() });
    }
    let msg = protocol::decode(&buf[..r.len])?;
    if r.fds.len() != msg.fd_count() {
        return Err(HandoffError::FdCount { kind: msg.kind(), announced: msg.fd_count(), received: r.fds.len() });
    }
    Ok((msg, r.fds))
}

/// A non-blocking SOCK_SEQPACKET socket registered with tokio.
pub struct AsyncSeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncSeqPacket {
    /// `fd` must be non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open for as long as
        // it is registered and is closed only after deregistration.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(AsyncSeqPacket { fd })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// Deregisters from tokio and returns a blocking socket with send/receive timeouts.
    pub fn into_blocking(self) -> io::Result<OwnedFd> {
        let fd = self.fd.into_inner();
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        set_timeouts(fd.as_fd(), STEP_TIMEOUT)?;
        Ok(fd)
    }

    pub async fn accept(&self) -> io::Result<OwnedFd> {
        self.fd.async_io(Interest::READABLE, |fd| accept(fd.as_fd())).await
    }

    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.fd.async_io(Interest::READABLE, |fd| recv_raw(fd.as_fd(), buf)).await
    }

    pub async fn recv_message(&self) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
        let mut buf = vec![0u8; MAX_FRAME];
        let r = self.recv(&mut buf).await.map_err(|source| HandoffError::Recv { source })?;
        check_received(&buf, r)
    }

    pub async fn send_message(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
        let frame = protocol::encode(msg)?;
        self.fd
            .async_io(Interest::WRITABLE, |fd| send_raw(fd.as_fd(), &frame, fds))
            .await
            .map_err(|source| HandoffError::Send { kind: msg.kind(), source })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fds_and_frames_cross_a_pair() {
        let (a, b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        let msg = Message::Listeners { names: vec!["http".into()] };
        send_message(a.as_fd(), &msg, &[x.as_fd()]).unwrap();
        let (got, fds) = recv_message(b.as_fd()).unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        // MSG_CMSG_CLOEXEC: the received fd is close-on-exec.
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn more_than_253_fds_is_refused_before_the_kernel() {
        let (a, _b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        let fds: Vec<_> = (0..254).map(|_| x.as_fd()).collect();
        let err = send_raw(a.as_fd(), b"x", &fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(send_raw(a.as_fd(), b"x", &fds[..253]).is_ok());
    }

    #[test]
    fn fds_that_do_not_match_the_header_are_closed_and_named() {
        let (a, b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        // A Takeover frame announces no fds; two arrive.
        let frame = protocol::encode(&Message::Takeover).unwrap();
        send_raw(a.as_fd(), &frame, &[x.as_fd(), x.as_fd()]).unwrap();
        let err = recv_message(b.as_fd()).unwrap_err();
        assert!(matches!(err, HandoffError::FdCount { received: 2, .. }), "{err}");
    }
}
