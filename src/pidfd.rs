//! `pidfd_open(2)`, wrapped once: a file descriptor that refers to a process (Linux 5.3+),
//! readable when the process exits and usable with `pidfd_getfd`.
//!
//! Owns only the system call and the ownership of the descriptor it returns; what a pidfd
//! is used for (watching an exit in `host`, taking listeners back in `handoff::adopt`) is
//! the callers' business.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A pidfd of process `pid`, close-on-exec (pidfds always are).
pub fn open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed to the kernel.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = RawFd::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `raw` was just returned by pidfd_open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}
