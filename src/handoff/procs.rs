//! Processes of a generation: starting a server with its listeners as fds 3.. (the
//! socket-activation convention), its process group, reaping, and the process tree
//! (`/proc/PID/stat`) used to decide whether a peer belongs to a generation.
//!
//! Owns every fork/exec of the handoff code. It does not decide *when* to start or stop a
//! generation (that is `supervisor`).

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;

#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("no command to run")]
    Empty,
    #[error("`{0}` was not found in PATH; give its full path")]
    NotFound(String),
    #[error("`{0}` contains a NUL byte")]
    Nul(String),
    #[error("cannot {op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot execute {path}: {source}")]
    Exec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// The process was not a child of this one (adopted after a restart): its status
    /// went to its new parent.
    Unknown,
}

impl Exit {
    fn from_wait_status(status: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "signal {s} ({name})")
            }
            Exit::Unknown => f.write_str("an unknown status (it was adopted, not started by this supervisor)"),
        }
    }
}

/// What to start.
pub struct Spawn<'a> {
    pub argv: &'a [String],
    /// Variables added to (or replacing those of) this process's environment.
    pub env: Vec<(OsString, OsString)>,
    /// Variables removed from this process's environment.
    pub remove_env: &'a [&'a str],
    /// Passed as fds 3, 4, ...; LISTEN_PID is set to the child's pid when non-empty.
    pub fds: &'a [BorrowedFd<'a>],
    /// Becomes the child's stdout and stderr; `None`: it inherits this process's.
    pub output: Option<BorrowedFd<'a>>,
}

/// Reaps children (and orphans, when this process is a child subreaper) and tells
/// whoever waits for a pid how it ended.
#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, watch::Sender<Option<Exit>>>>>,
}

impl Reaper {
    /// Starts the reaping task. Call inside a tokio runtime, before spawning.
    pub fn start() -> Result<Reaper, SpawnError> {
        let reaper = Reaper::default();
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .map_err(|source| SpawnError::Os { op: "watch SIGCHLD", source })?;
        let r = reaper.clone();
        tokio::spawn(async move {
            // SIGCHLDs coalesce; the tick is a backstop, each wake-up reaps all it can.
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                r.reap_all();
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid with WNOHANG writes the status into a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let exit = Exit::from_wait_status(status);
            let waiter = self.waiters.lock().ok().and_then(|mut w| w.remove(&pid));
            match waiter {
                Some(tx) => {
                    let _ = tx.send(Some(exit));
                }
                None => tracing::debug!(pid, %exit, "reaped a process that was not started directly (orphan)"),
            }
        }
    }

    /// Starts a process in its own process group (pgid = pid) and returns its pid and a
    /// receiver that yields its exit.
    pub fn spawn(&self, spec: &Spawn<'_>) -> Result<(i32, watch::Receiver<Option<Exit>>), SpawnError> {
        let mut prepared = Prepared::new(spec)?;
        // Hold the lock across fork so the reaper cannot reap the child before its waiter
        // is registered.
        let mut waiters = self.waiters.lock().map_err(|_| SpawnError::Os {
            op: "lock the reaper",
            source: std::io::Error::other("poisoned"),
        })?;
        let (pid, exec_pipe) = prepared.fork_exec()?;
        let (tx, rx) = watch::channel(None);
        waiters.insert(pid, tx);
        drop(waiters);
        prepared.wait_exec(exec_pipe)?;
        Ok((pid, rx))
    }
}

/// Everything the child needs, allocated before fork (the child may only make
/// async-signal-safe calls: no allocation).
struct Prepared {
    path: CString,
    display_path: PathBuf,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    /// "LISTEN_PID=" followed by room for the pid and a NUL, filled in by the child.
    listen_pid: Vec<u8>,
    envp_ptrs: Vec<*const libc::c_char>,
    fds: Vec<libc::c_int>,
    output: Option<libc::c_int>,
    /// Room for the child to note where it moved each fd.
    scratch: Vec<libc::c_int>,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl Prepared {
    fn new(spec: &Spawn<'_>) -> Result<Prepared, SpawnError> {
        let program = spec.argv.first().ok_or(SpawnError::Empty)?;
        let display_path = resolve(program)?;
        let path = cstring(display_path.as_os_str())?;
        let argv: Vec<CString> = spec.argv.iter().map(|a| cstring(OsStr::new(a))).collect::<Result<_, _>>()?;
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.to_string_lossy();
                !spec.remove_env.contains(&k.as_ref()) && !spec.env.iter().any(|(e, _)| e.to_string_lossy() == k)
            })
            .collect();
        vars.extend(spec.env.iter().cloned());
        let mut envp = Vec::with_capacity(vars.len());
        for (k, v) in vars {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            envp.push(cstring(&kv)?);
        }
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + 24, 0);
        let argv_ptrs = argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        if !spec.fds.is_empty() {
            envp_ptrs.push(listen_pid.as_ptr().cast());
        }
        envp_ptrs.push(std::ptr::null());
        let fds: Vec<libc::c_int> = spec.fds.iter().map(|f| f.as_raw_fd()).collect();
        let scratch = vec![0; fds.len()];
        let output = spec.output.map(|f| f.as_raw_fd());
        Ok(Prepared { path, display_path, _argv: argv, argv_ptrs, _envp: envp, listen_pid, envp_ptrs, fds, output, scratch })
    }

    fn fork_exec(&mut self) -> Result<(i32, OwnedFd), SpawnError> {
        let mut pipe = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(SpawnError::Os { op: "create a pipe", source: std::io::Error::last_os_error() });
        }
        // SAFETY: pipe2 succeeded; these fds are new and owned here only.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        let listen_pid = self.listen_pid.as_mut_ptr();
        let scratch = self.scratch.as_mut_ptr();
        // SAFETY: fork in a multi-threaded process: the child runs only async-signal-safe
        // calls (see `child`) on memory allocated before fork, then execs or exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(SpawnError::Os { op: "fork", source: std::io::Error::last_os_error() });
        }
        if pid == 0 {
            // SAFETY: in the child, right after fork; `child` never returns.
            unsafe { self.child(listen_pid, scratch, write_end.as_raw_fd()) }
        }
        drop(write_end);
        // Also from the parent, so the group exists before anyone signals it.
        // SAFETY: plain syscall; failure (the child already exec'd) is harmless.
        unsafe { libc::setpgid(pid, pid) };
        Ok((pid, read_end))
    }

    /// Waits until the child has exec'd (the CLOEXEC pipe closes) or reports why not.
    fn wait_exec(&self, read_end: OwnedFd) -> Result<(), SpawnError> {
        let mut errno = [0u8; 4];
        let mut file = std::fs::File::from(read_end);
        let n = loop {
            match std::io::Read::read(&mut file, &mut errno) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(SpawnError::Os { op: "learn whether the server started", source }),
            }
        };
        if n == 0 {
            return Ok(());
        }
        Err(SpawnError::Exec {
            path: self.display_path.clone(),
            source: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
        })
    }

    /// The child side of fork. Only async-signal-safe calls, no allocation, no locks.
    ///
    /// # Safety
    /// Must be called only in the child right after fork.
    unsafe fn child(&self, listen_pid: *mut u8, scratch: *mut libc::c_int, err_fd: libc::c_int) -> ! {
        // SAFETY: (whole body) every call is an async-signal-safe syscall wrapper; every
        // pointer refers to this process's copy of buffers allocated before fork for this
        // use, which no other thread can touch (the child has one thread).
        unsafe {
            libc::setpgid(0, 0);
            // Before the listeners move: the output fd may sit in the range 3.. they take.
            if let Some(out) = self.output {
                if libc::dup2(out, 1) < 0 || libc::dup2(out, 2) < 0 {
                    fail(err_fd);
                }
            }
            let n = self.fds.len() as libc::c_int;
            // Move every fd above the target range first, so that placing fd i at 3+i
            // never overwrites a source that is still to be placed.
            for (i, &fd) in self.fds.iter().enumerate() {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3 + n);
                if high < 0 {
                    fail(err_fd);
                }
                *scratch.add(i) = high;
            }
            for i in 0..self.fds.len() {
                // dup2 clears close-on-exec on the target: these are the fds the server gets.
                if libc::dup2(*scratch.add(i), 3 + i as libc::c_int) < 0 {
                    fail(err_fd);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // The Rust runtime ignores SIGPIPE; servers expect the default.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if !self.fds.is_empty() {
                write_decimal(listen_pid.add(LISTEN_PID_PREFIX.len()), libc::getpid());
            }
            libc::execve(self.path.as_ptr(), self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr());
            fail(err_fd)
        }
    }
}

/// Reports errno to the parent through the CLOEXEC pipe and exits.
///
/// # Safety
/// Child side of fork only.
unsafe fn fail(err_fd: libc::c_int) -> ! {
    // SAFETY: errno location and write/_exit are async-signal-safe.
    unsafe {
        let errno = (*libc::__errno_location()).to_ne_bytes();
        libc::write(err_fd, errno.as_ptr().cast(), errno.len());
        libc::_exit(127)
    }
}

/// Writes `v` in decimal followed by NUL at `out` (room for 24 bytes is reserved).
///
/// # Safety
/// `out` must be valid for 12 bytes of writes.
unsafe fn write_decimal(out: *mut u8, v: libc::pid_t) {
    let mut digits = [0u8; 12];
    let mut n = v.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: the caller reserved room; len <= 10.
        unsafe { *out.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *out.add(len) = 0 };
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul(s.to_string_lossy().into_owned()))
}

/// Finds `program` like execvp would, before fork (execvp itself is not
/// async-signal-safe).
fn resolve(program: &str) -> Result<PathBuf, SpawnError> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(SpawnError::NotFound(program.to_string()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Sends `sig` to every process of the group `pgid`. Ok(false): the group is empty.
pub fn signal_group(pgid: i32, sig: nix::sys::signal::Signal) -> std::io::Result<bool> {
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends `sig` to one process. Ok(false): it is gone.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) -> std::io::Result<bool> {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether any process is left in the group `pgid` (zombies count until reaped).
pub fn group_alive(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

/// Fields of `/proc/PID/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `Z` (zombie) ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// Clock ticks after boot; with the pid, identifies a process across pid reuse.
    pub start_time: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`; the command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(Stat { state: f.first()?.chars().next()?, ppid: f.get(1)?.parse().ok()?, pgrp: f.get(2)?.parse().ok()?, start_time: f.get(19)?.parse().ok()? })
}

/// Whether `pid` is `ancestor` or one of its descendants, following parent pids.
pub fn is_same_or_descendant(pid: i32, ancestor: i32) -> bool {
    let mut cur = pid;
    // A bound on the walk: parent chains are short; a cycle cannot exist but a racing
    // exit could make a read fail, which ends the walk as "not a descendant".
    for _ in 0..4096 {
        if cur == ancestor {
            return true;
        }
        if cur <= 1 {
            return false;
        }
        match stat(cur) {
            Some(s) => cur = s.ppid,
            None => return false,
        }
    }
    false
}

/// Whether process `pid`, started at `start_time` (see [`Stat`]), still runs (a zombie
/// does not: it waits for a parent that may not be this process).
pub fn running(pid: i32, start_time: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_time == start_time && s.state != 'Z')
}

/// Members of the group `pgid` that are not zombies (scans /proc). For groups whose
/// processes are not this process's children, whose zombies it cannot reap.
pub fn group_running(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|s| s.pgrp == pgid && s.state != 'Z'))
        .collect()
}

/// Every process whose process group is `pgid` (scans /proc).
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|s| s.pgrp == pgid))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_names_with_spaces_and_parens() {
        let line = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_stat(line), Some(Stat { state: 'S', ppid: 1, pgrp: 1234, start_time: 98765 }));
    }

    #[test]
    fn this_process_descends_from_its_parent_and_init() {
        let me = std::process::id() as i32;
        let parent = stat(me).unwrap().ppid;
        assert!(is_same_or_descendant(me, me));
        assert!(is_same_or_descendant(me, parent));
        assert!(!is_same_or_descendant(parent, me));
    }

    #[test]
    fn decimal_fits_and_terminates() {
        let mut buf = [0xffu8; 24];
        // SAFETY: the buffer has 24 bytes.
        unsafe { write_decimal(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..8], b"4194304\0");
    }
}
