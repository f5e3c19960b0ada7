//! Running the real tools the tests drive (ip, nft, iptables, docker, curl, wrk) with
//! failures that say which command failed and what it printed.

use std::fmt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Debian's docker client: it speaks the API of Debian's engine (1.41). The one in
/// /usr/local/bin is a newer client and must not be used.
pub const DOCKER: &str = "/usr/bin/docker";

/// What a finished command returned, with its text decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit code; `None` when the process was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn from_output(out: Output) -> Outcome {
        Outcome {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A command line as one readable string, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            s.push_str(&format!(" '{}'", a.replace('\'', r"'\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// A command that could not be started or did not succeed.
#[derive(Debug, Clone)]
pub struct CmdError {
    pub command: String,
    /// `None` when it could not be started (`spawn` error in `stderr`) or was killed.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(c) => write!(f, "`{}` exited with {c}", self.command)?,
            None => write!(f, "`{}` did not run to completion", self.command)?,
        }
        let err = self.stderr.trim();
        if !err.is_empty() {
            write!(f, "; stderr: {err}")?;
        }
        let out = self.stdout.trim();
        if !out.is_empty() && out.len() < 2000 {
            write!(f, "; stdout: {out}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CmdError {}

/// Runs `cmd` to completion (stdin closed) and returns what it printed, whatever its exit code.
pub fn output(cmd: &mut Command) -> Result<Outcome, CmdError> {
    cmd.stdin(Stdio::null());
    match cmd.output() {
        Ok(out) => Ok(Outcome::from_output(out)),
        Err(e) => Err(CmdError {
            command: describe(cmd),
            code: None,
            stdout: String::new(),
            stderr: format!("cannot start it: {e}"),
        }),
    }
}

/// Runs `cmd`; Ok(stdout) only if it exited 0.
pub fn try_run(cmd: &mut Command) -> Result<String, CmdError> {
    let out = output(cmd)?;
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(CmdError { command: describe(cmd), code: out.code, stdout: out.stdout, stderr: out.stderr })
    }
}

/// Runs `cmd` and panics with the command line and its stderr unless it exited 0.
#[track_caller]
pub fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// `Command::new(program).args(args)`, for one-liners.
pub fn cmd<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Calls `probe` until it returns `Some`, or panics after `timeout` with `what` and the
/// last reason `probe` gave. Polls quickly at first, then every 100 ms.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match probe() {
            Ok(v) => return v,
            Err(why) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}: {why}");
                }
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Collects the failures of cleanup steps so that one failing step does not stop the
/// others; reported once at the end.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    pub fn note(&mut self, what: &str, r: Result<impl Sized, impl fmt::Display>) {
        if let Err(e) = r {
            self.0.push(format!("{what}: {e}"));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Prints what went wrong (never panics: this runs in `Drop`, possibly while unwinding).
    pub fn report(&self, context: &str) {
        if !self.0.is_empty() {
            eprintln!("cleanup of {context} left problems:\n  - {}", self.0.join("\n  - "));
        }
    }
}

/// Runs `cmd` with stdout and stderr captured; kills it after `timeout` and panics with
/// what it printed so far (a hung CLI must fail the test, not hang it).
#[track_caller]
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Outcome {
    use std::io::Read;
    let described = describe(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{described}`: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => break None,
            Err(e) => panic!("waiting for `{described}`: {e}"),
        }
    };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(s) => Outcome { code: s.code(), stdout, stderr },
        None => panic!("`{described}` did not finish within {timeout:?}; stdout: {stdout}; stderr: {stderr}"),
    }
}
