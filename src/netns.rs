//! Running a closure inside another network namespace (a container's, or a named one
//! under /run/netns).
//!
//! `setns(2)` changes the namespace of the calling *thread* only, so every call here
//! spawns a dedicated OS thread, enters the namespace there, runs the closure and lets the
//! thread die with it. A thread from a pool (above all a tokio worker) must never enter
//! another namespace: every later task scheduled on it would silently run there.
//!
//! The calls block until the closure returns; from async code wrap them in
//! `tokio::task::spawn_blocking`. This module owns only namespace entry, nothing about
//! what runs inside.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;

use nix::sched::{setns, CloneFlags};

/// Failures to run a closure in a network namespace; each names the namespace path.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("enter network namespace {path} (setns CLONE_NEWNET): {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("start a thread to enter network namespace {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the work run in network namespace {path} panicked")]
    Panicked { path: PathBuf },
}

impl NetnsError {
    /// True when the namespace could not be opened because it no longer exists (the
    /// process exited, or the named namespace was deleted). Callers that wait for a
    /// release to drain treat that as "nothing left".
    pub fn namespace_gone(&self) -> bool {
        match self {
            NetnsError::Open { source, .. } => {
                // ESRCH: /proc/PID exists for a moment while a process is being reaped.
                source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH)
            }
            _ => false,
        }
    }
}

/// The network namespace path of a process.
pub fn netns_path_of_pid(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Runs `f` on a fresh OS thread inside the network namespace of process `pid` and
/// returns its value. Blocks the caller until `f` returns.
pub fn in_netns_of_pid<T, F>(pid: u32, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    in_netns_path(netns_path_of_pid(pid), f)
}

/// Runs `f` on a fresh OS thread inside the network namespace at `path` (for example
/// `/proc/PID/ns/net` or `/run/netns/NAME`) and returns its value.
pub fn in_netns_path<T, F>(path: impl AsRef<Path>, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = path.as_ref().to_path_buf();
    // Opened here rather than on the new thread: a missing namespace is the common
    // failure, and it needs no thread to report.
    let ns = File::open(&path).map_err(|source| NetnsError::Open { path: path.clone(), source })?;
    let thread_path = path.clone();
    let handle = thread::Builder::new()
        .name("cutover-netns".into())
        .spawn(move || -> Result<T, NetnsError> {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter { path: thread_path, source })?;
            drop(ns);
            Ok(f())
        })
        .map_err(|source| NetnsError::Spawn { path: path.clone(), source })?;
    handle.join().map_err(|_| NetnsError::Panicked { path })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn netns_inode(path: &str) -> u64 {
        std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
    }

    #[test]
    fn runs_in_own_namespace_and_returns_value() {
        // Entering our own namespace needs CAP_SYS_ADMIN; skip quietly without it.
        let pid = std::process::id();
        let here = netns_inode("/proc/thread-self/ns/net");
        match in_netns_of_pid(pid, || netns_inode("/proc/thread-self/ns/net")) {
            Ok(there) => assert_eq!(here, there),
            Err(NetnsError::Enter { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn missing_process_is_gone_and_names_the_path() {
        // PIDs are capped well below u32::MAX (pid_max <= 2^22).
        let err = in_netns_of_pid(u32::MAX, || ()).err();
        let err = err.as_ref().map(|e| (e.namespace_gone(), e.to_string()));
        let Some((gone, msg)) = err else { panic!("no error for a missing process") };
        assert!(gone);
        assert!(msg.contains(&format!("/proc/{}/ns/net", u32::MAX)), "{msg}");
    }

    #[test]
    fn panic_in_closure_is_reported() {
        let pid = std::process::id();
        match in_netns_of_pid(pid, || panic!("boom")) {
            Err(NetnsError::Panicked { .. }) | Err(NetnsError::Enter { .. }) => {}
            other => panic!("unexpected: {:?}", other.map(|_: ()| ())),
        }
    }
}
