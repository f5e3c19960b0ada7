//! The claim a daemon holds on its nftables table (or its iptables chains, which carry
//! the same name): an exclusive `flock` on `/run/cutover/table-<T>.net<N>.lock`, taken
//! before any rule is touched and held for the daemon's life. `N` is the inode of the
//! daemon's network namespace: tables belong to a namespace, so daemons in two namespaces
//! (two hosts of a lab, an engine in its own namespace) may use the same table name.
//!
//! Why: a daemon programs its whole table from its own state. A second daemon on the
//! same `--table` (another `--state-dir`) would find no services in its state and delete
//! the first one's table and DOCKER-USER rule at start. The state directory's own lock
//! does not help there; this one is keyed by the table name.
//!
//! The lock file names its holder (pid and state directory) so the refusal can say who
//! it is. The kernel drops the lock when the holder exits, however it exits, so a crash
//! never leaves a stale claim. This module touches no rules.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where the table locks live (a tmpfs: nothing survives a reboot, nor needs to).
pub const LOCK_DIR: &str = "/run/cutover";

#[derive(Debug, thiserror::Error)]
pub enum TableLockError {
    #[error("cannot create {}: {source}; cutover keeps its table locks there (are you root?)", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the table lock {}: {source}; remove it if it is not a regular file", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "table `{table}` is already programmed by another cutover daemon ({holder}; lock {}): \
         two daemons on one table would delete each other's rules. Stop that daemon first, \
         or give this one another --table",
        path.display()
    )]
    Held { table: String, path: PathBuf, holder: String },
    #[error("cannot record this daemon in {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held claim on a table; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct TableLock {
    path: PathBuf,
    _file: nix::fcntl::Flock<File>,
}

impl TableLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file of `table` under `dir`, for this process's network namespace.
pub fn lock_path(dir: &Path, table: &str) -> PathBuf {
    lock_path_in(dir, table, current_netns())
}

/// The lock file of `table` under `dir` for the network namespace with inode `netns`.
pub fn lock_path_in(dir: &Path, table: &str, netns: u64) -> PathBuf {
    dir.join(format!("table-{table}.net{netns}.lock"))
}

/// The inode of this process's network namespace (0 if /proc cannot tell, which only
/// makes the lock coarser).
pub fn current_netns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).unwrap_or(0)
}

/// Claims `table` for this process (non-blocking). `state_dir` is written into the lock
/// file so that a refused daemon can name the holder. `table` must already be a valid
/// identifier (no `/`).
pub fn acquire(dir: &Path, table: &str, state_dir: &Path) -> Result<TableLock, TableLockError> {
    std::fs::create_dir_all(dir).map_err(|source| TableLockError::CreateDir { path: dir.to_path_buf(), source })?;
    let path = lock_path(dir, table);
    // Not truncated before the lock is ours: the holder's record must survive our try.
    // O_NOFOLLOW: a symlink planted at the path is refused, never written through.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| TableLockError::Open { path: path.clone(), source })?;
    let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = read_holder(&mut file);
            return Err(TableLockError::Held { table: table.to_string(), path, holder });
        }
        Err((_, source)) => return Err(TableLockError::Lock { path, source }),
    };
    let state_dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let record = format!("pid={}\nstate_dir={}\n", std::process::id(), state_dir.display());
    let written = (|| {
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(record.as_bytes())
    })();
    written.map_err(|source| TableLockError::Write { path: path.clone(), source })?;
    Ok(TableLock { path, _file: file })
}

/// "pid P, state dir D" from a holder's lock file, as far as it can be read.
fn read_holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind();
    // A lock file is two short lines; never read more than a page of whatever is there.
    let _ = file.take(4096).read_to_string(&mut text);
    describe_holder(&text)
}

fn describe_holder(text: &str) -> String {
    let field = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('='))).map(str::trim).filter(|v| !v.is_empty())
    };
    match (field("pid"), field("state_dir")) {
        (Some(pid), Some(dir)) => format!("pid {pid}, state dir {dir}"),
        (Some(pid), None) => format!("pid {pid}"),
        (None, Some(dir)) => format!("state dir {dir}"),
        (None, None) => "a daemon that has not recorded itself yet".to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_a_table_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path(), "t1", Path::new("/var/lib/one")).unwrap();
        // flock locks belong to the open file description: a second open in the same
        // process conflicts just as another process's would.
        let err = acquire(dir.path(), "t1", Path::new("/var/lib/two")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TableLockError::Held { .. }), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        assert!(msg.contains("state dir /var/lib/one"), "{msg}");
        assert!(msg.contains("--table"), "{msg}");
        // Another table is free; the same one is free again once the first lets go.
        let other = acquire(dir.path(), "t2", Path::new("/x")).unwrap();
        drop(first);
        acquire(dir.path(), "t1", Path::new("/var/lib/two")).unwrap();
        drop(other);
    }

    #[test]
    fn the_lock_file_is_private_and_a_planted_symlink_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path(), "t", Path::new("/s")).unwrap();
        assert_eq!(std::fs::metadata(lock.path()).unwrap().permissions().mode() & 0o777, 0o600);
        let target = dir.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, lock_path(dir.path(), "planted")).unwrap();
        assert!(matches!(acquire(dir.path(), "planted", Path::new("/s")), Err(TableLockError::Open { .. })));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn holder_descriptions() {
        assert_eq!(describe_holder("pid=7\nstate_dir=/a\n"), "pid 7, state dir /a");
        assert_eq!(describe_holder(""), "a daemon that has not recorded itself yet");
    }
}
