//! Named listening sockets: binding them once, and taking them from the systemd
//! socket-activation environment (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};

use super::HandoffError;

/// The first fd of socket activation.
pub const LISTEN_FDS_START: i32 = 3;

/// What to bind: `[NAME=]tcp://ADDR:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: String,
    pub addr: SocketAddr,
}

impl ListenSpec {
    /// Parses `[NAME=]tcp://ADDR:PORT`; without a name the listener is called `default_name`.
    pub fn parse(s: &str, default_name: &str) -> Result<ListenSpec, String> {
        let (name, url) = match s.split_once('=') {
            Some((n, u)) => (n.to_string(), u),
            None => (default_name.to_string(), s),
        };
        if !valid_listener_name(&name) {
            return Err(format!("`{name}` is not a listener name: use 1-64 letters, digits, `.`, `-` and `_`"));
        }
        let addr = crate::manifest::parse_listen(url)
            .ok_or_else(|| format!("`{s}` is not a listener: write tcp://ADDR:PORT, e.g. tcp://0.0.0.0:8080 or http=tcp://[::]:80"))?;
        Ok(ListenSpec { name, addr })
    }
}

/// Names travel in LISTEN_FDNAMES (`:`-separated) and in frames: keep them plain.
pub fn valid_listener_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A named listening socket.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub fd: OwnedFd,
}

impl Listener {
    /// Binds a TCP listener (SO_REUSEADDR, the largest backlog the kernel allows, so that
    /// connections queue rather than fail while no generation accepts).
    pub fn bind(spec: &ListenSpec) -> Result<Listener, HandoffError> {
        let family = if spec.addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let what = format!("{} ({})", spec.name, spec.addr);
        let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| HandoffError::io("create a socket for listener", what.clone(), e.into()))?;
        socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)
            .map_err(|e| HandoffError::io("set SO_REUSEADDR on listener", what.clone(), e.into()))?;
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(spec.addr)).map_err(|e| {
            HandoffError::Listener(
                spec.name.clone(),
                format!("cannot bind {}: {e}; is another process listening there?", spec.addr),
            )
        })?;
        socket::listen(&fd, Backlog::MAXCONN).map_err(|e| HandoffError::io("listen on", what, e.into()))?;
        Ok(Listener { name: spec.name.clone(), fd })
    }

    /// The address the socket is bound to (useful after binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, HandoffError> {
        let a: SockaddrStorage = socket::getsockname(self.fd.as_raw_fd())
            .map_err(|e| HandoffError::io("read the address of listener", self.name.clone(), e.into()))?;
        if let Some(v4) = a.as_sockaddr_in() {
            return Ok(SocketAddr::V4((*v4).into()));
        }
        if let Some(v6) = a.as_sockaddr_in6() {
            return Ok(SocketAddr::V6((*v6).into()));
        }
        Err(HandoffError::Listener(self.name.clone(), "not an IP socket".into()))
    }

    /// Converts into a std TCP listener (e.g. for `tokio::net::TcpListener::from_std`).
    pub fn into_tcp(self) -> std::net::TcpListener {
        std::net::TcpListener::from(self.fd)
    }

    pub fn try_clone(&self) -> Result<Listener, HandoffError> {
        let fd = self.fd.as_fd().try_clone_to_owned().map_err(|e| HandoffError::io("duplicate listener", self.name.clone(), e))?;
        Ok(Listener { name: self.name.clone(), fd })
    }
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes the listeners passed by socket activation, if LISTEN_PID names this process.
/// Returns an empty list when none were passed. Removes the LISTEN_* variables so that
/// children do not take them too, and marks the fds close-on-exec.
///
/// Call it once, early, before other threads read or write the environment.
pub fn from_env() -> Result<Vec<Listener>, HandoffError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid.parse().map_err(|_| HandoffError::Environment(format!("LISTEN_PID=`{pid}` is not a pid")))?;
    if pid != std::process::id() {
        return Ok(Vec::new());
    }
    let count: i32 = count
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| HandoffError::Environment(format!("LISTEN_FDS=`{count}` is not a count of fds")))?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(HandoffError::Environment("the socket-activation fds were already taken".into()));
    }
    let names: Vec<String> = match names {
        Some(n) => n.split(':').map(str::to_string).collect(),
        None => Vec::new(),
    };
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut out = Vec::new();
    for i in 0..count {
        let raw = LISTEN_FDS_START + i;
        // SAFETY: by the socket-activation convention (LISTEN_PID is this process) fds
        // 3..3+LISTEN_FDS were passed to this process for it to own; the TAKEN flag makes
        // sure they are wrapped only once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(|e| HandoffError::Environment(format!("fd {raw} from LISTEN_FDS is not open: {e}")))?;
        let name = names.get(i as usize).cloned().unwrap_or_else(|| format!("fd{raw}"));
        out.push(Listener { name, fd });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse_with_and_without_names() {
        let s = ListenSpec::parse("tcp://127.0.0.1:8080", "listen0").unwrap();
        assert_eq!((s.name.as_str(), s.addr.port()), ("listen0", 8080));
        let s = ListenSpec::parse("http=tcp://[::1]:80", "x").unwrap();
        assert_eq!(s.name, "http");
        assert!(ListenSpec::parse("udp://1.2.3.4:5", "x").is_err());
        let bad = ListenSpec::parse("a:b=tcp://1.2.3.4:5", "x").unwrap_err();
        assert!(bad.contains("`.`"), "the error names every allowed character: {bad}");
        assert_eq!(ListenSpec::parse("v1.http=tcp://1.2.3.4:5", "x").unwrap().name, "v1.http");
    }

    #[test]
    fn bind_port_zero_reports_the_port() {
        let l = Listener::bind(&ListenSpec::parse("tcp://127.0.0.1:0", "t").unwrap()).unwrap();
        assert_ne!(l.local_addr().unwrap().port(), 0);
    }
}
