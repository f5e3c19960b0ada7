//! Taking a service's listening sockets back from a process that holds them, with
//! `pidfd_open` + `pidfd_getfd` (Linux 5.6+, needs ptrace rights over the process: root
//! has them).
//!
//! Used when the daemon restarts: its own copies of the listeners died with it, but the
//! running release still holds the very same kernel sockets. Duplicating them back (not
//! binding anew) keeps every queued connection and lets a later release fetch the same
//! sockets. The sockets are found by what they are, not by fd number: a server may have
//! moved fds 3.. elsewhere, so every socket fd of the process is looked at and a
//! listening TCP socket bound to exactly a listener's address is taken.
//!
//! This module only reads the other process's fd table; it never changes it.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::sys::socket::{self, sockopt};

use super::listeners::{ListenSpec, Listener};

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("cannot open a pidfd for process {pid}: {source}")]
    Pidfd {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the fds of process {pid}: {source}")]
    FdTable {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} holds no listening socket on {addr} (listener `{name}`)")]
    Missing { pid: i32, name: String, addr: std::net::SocketAddr },
}

fn pidfd_getfd(pidfd: &OwnedFd, target: i32) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes a pidfd, an fd number in the target process and flags
    // (must be 0); it returns a new fd in this process (close-on-exec set) or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just installed in this process; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Duplicates, from process `pid`, one listening TCP socket for each of `specs` (bound
/// to exactly its address). All or nothing: a listener the process does not hold is an
/// error, and every fd taken so far is closed.
pub fn take_listeners(pid: i32, specs: &[ListenSpec]) -> Result<Vec<Listener>, AdoptError> {
    let pidfd = crate::pidfd::open(pid).map_err(|source| AdoptError::Pidfd { pid, source })?;
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| AdoptError::FdTable { pid, source })?;
    // Several fds may refer to one socket (dup); the inode tells them apart.
    let mut seen_inodes = BTreeSet::new();
    let mut candidates: Vec<(std::net::SocketAddr, OwnedFd)> = Vec::new();
    let mut numbers: Vec<i32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    numbers.sort_unstable();
    for n in numbers {
        let Ok(link) = std::fs::read_link(format!("{dir}/{n}")) else { continue };
        let link = link.to_string_lossy().into_owned();
        let Some(inode) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) else { continue };
        if !seen_inodes.insert(inode.to_string()) {
            continue;
        }
        // The fd may have been closed since the listing: skip it.
        let Ok(fd) = pidfd_getfd(&pidfd, n) else { continue };
        if !socket::getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false) {
            continue;
        }
        if socket::getsockopt(&fd.as_fd(), sockopt::SockType).ok() != Some(socket::SockType::Stream) {
            continue;
        }
        let probe = Listener { name: String::new(), fd };
        let Ok(addr) = probe.local_addr() else { continue };
        candidates.push((addr, probe.fd));
    }
    let mut out = Vec::new();
    for spec in specs {
        let Some(i) = candidates.iter().position(|(a, _)| *a == spec.addr) else {
            return Err(AdoptError::Missing { pid, name: spec.name.clone(), addr: spec.addr });
        };
        let (_, fd) = candidates.swap_remove(i);
        out.push(Listener { name: spec.name.clone(), fd });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn takes_a_listener_back_from_a_process_by_its_address() {
        // This process is its own "release": pidfd_getfd on ourselves needs no privilege.
        let spec = ListenSpec::parse("web=tcp://127.0.0.1:0", "x").unwrap();
        let held = Listener::bind(&spec).unwrap();
        let addr = held.local_addr().unwrap();
        let me = std::process::id() as i32;
        let specs = [ListenSpec { name: "web".into(), addr }];
        let taken = take_listeners(me, &specs).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].name, "web");
        assert_eq!(taken[0].local_addr().unwrap(), addr);
        // The same kernel socket: a connection queued on it is accepted through the copy.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let copy = taken.into_iter().next().unwrap().into_tcp();
        copy.accept().unwrap();
        let missing = [ListenSpec { name: "other".into(), addr: "127.0.0.1:1".parse().unwrap() }];
        assert!(matches!(take_listeners(me, &missing), Err(AdoptError::Missing { .. })));
    }
}
