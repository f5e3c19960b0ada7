//! A `cutover daemon` of one test: its own socket, state directory, nftables table, mark
//! and instance label; its log in a file (printed when the test fails). Dropping it kills
//! the daemon and removes everything carrying the test's tag (containers, the table,
//! DOCKER-USER rules, networks, images): see `cleanup::remove_tagged`.

use std::fs::OpenOptions;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cmd::{run_bounded, wait_for};
use super::ids::Ids;

/// The binary under test.
pub const CUTOVER: &str = env!("CARGO_BIN_EXE_cutover");

/// How long the daemon may take to accept connections on its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one CLI command may take before the test fails (deploys wait for health).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(300);

/// What a CLI command returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliOutput {
    /// Exit code; -1 if it was killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug)]
pub struct Daemon {
    program: Vec<String>,
    args: Vec<String>,
    tag: String,
    table: String,
    dir: tempfile::TempDir,
    socket: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `cutover daemon --socket <tmp>/cutover.sock --state-dir <tmp>/state --table
    /// <ids.table> --mark <ids.mark> --instance <ids.tag>` and waits until its socket
    /// accepts connections.
    #[track_caller]
    pub fn start(ids: &Ids) -> Daemon {
        Daemon::start_program(ids, &[CUTOVER], &[])
    }

    /// `start` with extra daemon flags.
    #[track_caller]
    pub fn start_with(ids: &Ids, extra: &[&str]) -> Daemon {
        Daemon::start_program(ids, &[CUTOVER], extra)
    }

    /// `start` of another program taking the same arguments (`<program...> daemon
    /// --socket ...`): for the kit's own tests, with a stand-in daemon.
    #[track_caller]
    pub fn start_program(ids: &Ids, program: &[&str], extra: &[&str]) -> Daemon {
        Daemon::start_prepared(ids, program, extra, |_| {})
    }

    /// `start_with`, after `prepare` was given the state directory's path (not yet
    /// created), e.g. to mount a small file system there.
    #[track_caller]
    pub fn start_prepared(ids: &Ids, program: &[&str], extra: &[&str], prepare: impl FnOnce(&Path)) -> Daemon {
        super::docker::require_root();
        ids.mark_docker_used();
        let dir = tempfile::Builder::new()
            .prefix(&format!("cutover-{}-", ids.tag))
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir for the daemon: {e}"));
        let socket = dir.path().join("cutover.sock");
        let state_dir = dir.path().join("state");
        let log = dir.path().join("daemon.log");
        let mut args: Vec<String> = vec!["daemon".into(), "--socket".into(), socket.display().to_string()];
        args.extend(["--state-dir".into(), state_dir.display().to_string()]);
        args.extend(["--table".into(), ids.table.clone(), "--mark".into(), ids.mark_arg()]);
        args.extend(["--instance".into(), ids.tag.clone()]);
        // The whole suite runs against another backend with CUTOVER_TEST_BACKEND=iptables
        // (a second nextest invocation), unless the test picks one itself.
        if !extra.contains(&"--backend") {
            if let Some(backend) = super::test_backend() {
                args.extend(["--backend".to_string(), backend]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        prepare(&state_dir);
        let mut d = Daemon {
            program: program.iter().map(|s| s.to_string()).collect(),
            args,
            tag: ids.tag.clone(),
            table: ids.table.clone(),
            dir,
            socket,
            state_dir,
            log,
            child: None,
        };
        d.spawn();
        d
    }

    #[track_caller]
    fn spawn(&mut self) {
        let (program, first) = self.program.split_first().unwrap_or_else(|| panic!("no daemon program"));
        let mut c = Command::new(program);
        c.args(first).args(&self.args);
        self.child = Some(spawn_until_listening(c, &self.log, &self.socket));
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A scratch directory that lives as long as the daemon (for manifests...).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the daemon logged so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the daemon process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs `cutover <args>` against this daemon (CUTOVER_SOCKET set); 5 minutes at most.
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        cli_on(&self.socket, args)
    }

    /// `cli` that must exit 0; otherwise panics with its output and the daemon's log.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> CliOutput {
        self.cli_expect(args, 0)
    }

    /// `cli` that must exit `code`; otherwise panics with its output and the daemon's log.
    #[track_caller]
    pub fn cli_expect(&self, args: &[&str], code: i32) -> CliOutput {
        expect_exit(self.cli(args), args, code, &self.log())
    }

    /// SIGKILL, as a crash would; the kernel rules stay.
    #[track_caller]
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Already exited is fine.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts the daemon without the given arguments (e.g. a test hook flag and its
    /// value), as an operator restarting it with another configuration would.
    #[track_caller]
    pub fn restart_without(&mut self, drop_args: &[&str]) {
        self.args.retain(|a| !drop_args.contains(&a.as_str()));
        self.restart();
    }

    /// Restarts the daemon with extra arguments (e.g. a test hook).
    #[track_caller]
    pub fn restart_with(&mut self, add: &[&str]) {
        self.args.extend(add.iter().map(|a| a.to_string()));
        self.restart();
    }

    /// Starts the daemon again with the same arguments (kills it first if it still runs).
    #[track_caller]
    pub fn restart(&mut self) {
        self.kill9();
        // A killed daemon leaves its socket file; a real restart finds it there too.
        use std::io::Write;
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "----- restarted by the test -----");
        }
        self.spawn();
    }
}

/// Runs `cutover <args>` against the daemon listening on `socket`; 5 minutes at most.
#[track_caller]
pub fn cli_on(socket: &Path, args: &[&str]) -> CliOutput {
    let mut c = Command::new(CUTOVER);
    c.args(args).env("CUTOVER_SOCKET", socket).env_remove("CUTOVER_LOG");
    let o = run_bounded(&mut c, CLI_TIMEOUT);
    CliOutput { code: o.code.unwrap_or(-1), stdout: o.stdout, stderr: o.stderr }
}

/// Starts a daemon command line `c` with its output appended to `log` (CUTOVER_LOG as the
/// test's environment says, `info,cutover=debug` by default) and waits until `socket`
/// accepts connections; panics with the log if the daemon exits before that.
#[track_caller]
pub fn spawn_until_listening(mut c: Command, log: &Path, socket: &Path) -> Child {
    let open = || {
        OpenOptions::new().create(true).append(true).open(log).unwrap_or_else(|e| panic!("open {}: {e}", log.display()))
    };
    let (out, err) = (open(), open());
    c.env("CUTOVER_LOG", std::env::var("CUTOVER_LOG").unwrap_or_else(|_| "info,cutover=debug".into()))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let described = super::cmd::describe(&c);
    let mut child = Some(c.spawn().unwrap_or_else(|e| panic!("cannot start `{described}`: {e}")));
    wait_for(&format!("`{described}` to accept connections on {}", socket.display()), START_TIMEOUT, || {
        if let Some(c) = child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                child = None;
                panic!(
                    "`{described}` exited ({status}) before its socket accepted connections; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
        UnixStream::connect(socket).map(drop).map_err(|e| e.to_string())
    });
    child.unwrap_or_else(|| panic!("`{described}` exited"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let was_started = self.child.is_some();
        self.kill9();
        // When `start` itself failed, its panic message already holds the log.
        if std::thread::panicking() && was_started {
            eprintln!("----- log of daemon {} -----\n{}\n----- end of log -----", self.tag, tail(&self.log(), 200));
        }
        super::cleanup::remove_tagged(&self.tag, &self.table).report(&format!("daemon {}", self.tag));
    }
}

/// The last `n` lines of `s`.
/// `o`, the output of `cutover ARGS`, if it exited `code`; otherwise a panic with its
/// output and the tail of the daemon's log `log`.
#[track_caller]
pub fn expect_exit(o: CliOutput, args: &[&str], code: i32, log: &str) -> CliOutput {
    assert!(
        o.code == code,
        "`cutover {}` exited {} (expected {code})\nstdout:\n{}\nstderr:\n{}\ndaemon log (tail):\n{}",
        args.join(" "),
        o.code,
        o.stdout,
        o.stderr,
        tail(log, 60)
    );
    o
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
