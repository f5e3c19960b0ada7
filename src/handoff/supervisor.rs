//! `cutover run`: keeps a service's listening sockets and runs generations of an
//! unmodified socket-activation server on them.
//!
//! Lifecycle of a reload (phases are logged with `phase=`):
//! `starting` the new generation with the same fds (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES,
//! its own NOTIFY_SOCKET) -> `waiting_ready` for READY=1 (or --ready-delay) ->
//! `switched`: stop signal to the old generation -> `draining` up to the drain timeout ->
//! `killed` its process group if it is still there. A new generation that exits or misses
//! the ready timeout is `refused`: its whole process group is killed and the old one keeps
//! serving; nothing about the old generation changes before the new one is ready.
//!
//! The listening sockets never close while the supervisor lives, so connections that
//! arrive while no generation accepts wait in the kernel's accept queue instead of being
//! refused. This module does not parse arguments (`commands::run`) and does not talk to
//! the daemon.

use std::future::Future;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::listeners::{ListenSpec, Listener};
use super::notify::{notify_service_manager, NotifyServer};
use super::procs::{self, Exit, Reaper, Spawn, SpawnError};
use super::HandoffError;

/// Longest unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub name: String,
    pub listen: Vec<ListenSpec>,
    pub command: Vec<String>,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub stop_signal: Signal,
    pub ready_delay: Option<Duration>,
    pub run_dir: PathBuf,
}

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("`{0}` is not a service name for cutover run: use 1-64 letters, digits, `.`, `-`, `_`")]
    InvalidName(String),
    #[error("cannot bind the listeners: {0}")]
    Listener(#[source] HandoffError),
    #[error("cannot prepare the run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the socket path {0} is longer than 107 bytes; choose a shorter --run-dir")]
    PathTooLong(PathBuf),
    #[error("a supervisor for this name already runs (it answers on {0}); use `cutover reload` or another --name")]
    AlreadyRunning(PathBuf),
    #[error("cannot {op} the control socket {path}: {source}")]
    Control {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch child processes: {0}")]
    Reaper(#[source] SpawnError),
    #[error("the first generation did not come up: {0}")]
    FirstGeneration(String),
    #[error("generation {generation} (pid {pid}) exited on its own with {exit} while serving; cutover run stops so that its own supervisor (e.g. systemd Restart=) can start it again")]
    ServerExited { generation: u64, pid: i32, exit: Exit },
    #[error("no supervisor answers on {path} ({source}); is `cutover run --name NAME` running with the same --run-dir?")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor on {path} gave no usable answer: {reason}")]
    BadAnswer { path: PathBuf, reason: String },
}

/// The outcome of a reload, as `cutover reload` receives it (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// The new generation is ready and serving; the previous one was told to stop.
    Switched { generation: u64, pid: i32, previous_generation: u64, previous_pid: i32 },
    /// The new generation failed; it is gone and the previous one still serves.
    Refused { reason: String, serving_generation: u64, serving_pid: i32 },
}

/// Where the control socket of `name` lives.
pub fn control_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.sock"))
}

pub fn valid_name(name: &str) -> bool {
    super::listeners::valid_listener_name(name)
}

/// Asks the supervisor of `name` for a reload and waits for the outcome.
pub async fn request_reload(run_dir: &Path, name: &str) -> Result<ReloadOutcome, SupervisorError> {
    let path = control_path(run_dir, name);
    let mut stream = UnixStream::connect(&path).await.map_err(|source| SupervisorError::NotRunning { path: path.clone(), source })?;
    stream
        .write_all(b"reload\n")
        .await
        .map_err(|source| SupervisorError::NotRunning { path: path.clone(), source })?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .map_err(|e| SupervisorError::BadAnswer { path: path.clone(), reason: e.to_string() })?;
    if line.trim().is_empty() {
        return Err(SupervisorError::BadAnswer { path, reason: "it closed the connection without an outcome (did it stop?)".into() });
    }
    serde_json::from_str(line.trim()).map_err(|e| SupervisorError::BadAnswer { path, reason: e.to_string() })
}

/// What starts a reload besides the control socket (e.g. SIGHUP), and when to stop.
pub struct Triggers<S: Future<Output = ()>> {
    pub reload: mpsc::Receiver<()>,
    pub shutdown: S,
}

struct Generation {
    number: u64,
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    notify: NotifyServer,
}

impl Generation {
    async fn exited(exit: &mut watch::Receiver<Option<Exit>>) -> Exit {
        let got = exit.wait_for(|e| e.is_some()).await.map(|e| *e);
        match got {
            Ok(e) => e.unwrap_or(Exit::Code(-1)),
            // The reaper is gone (runtime shutting down): never resolve.
            Err(_) => std::future::pending().await,
        }
    }
}

pub struct Supervisor {
    config: SupervisorConfig,
    listeners: Vec<Listener>,
    reaper: Reaper,
    next_generation: u64,
}

impl Supervisor {
    /// Binds the listeners and prepares the run directory. Nothing is started yet.
    pub fn new(config: SupervisorConfig) -> Result<Supervisor, SupervisorError> {
        if !valid_name(&config.name) {
            return Err(SupervisorError::InvalidName(config.name.clone()));
        }
        let listeners = config.listen.iter().map(Listener::bind).collect::<Result<Vec<_>, _>>().map_err(SupervisorError::Listener)?;
        let reaper = Reaper::start().map_err(SupervisorError::Reaper)?;
        Ok(Supervisor { config, listeners, reaper, next_generation: 1 })
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Runs until `triggers.shutdown` resolves (then stops the serving generation
    /// gracefully) or the serving generation exits on its own (an error).
    pub async fn run<S: Future<Output = ()>>(mut self, triggers: Triggers<S>) -> Result<(), SupervisorError> {
        let Triggers { reload: mut reload_signal, shutdown } = triggers;
        tokio::pin!(shutdown);
        let run_dir = self.config.run_dir.clone();
        prepare_run_dir(&run_dir)?;
        let control = control_path(&run_dir, &self.config.name);
        let control_listener = bind_control(&control)?;
        let _control_guard = RemoveOnDrop(control.clone());
        let (requests_tx, mut requests) = mpsc::channel::<oneshot::Sender<ReloadOutcome>>(16);
        tokio::spawn(serve_control(control_listener, requests_tx));
        become_subreaper();

        let mut current = match self.start_ready().await {
            Ok(g) => g,
            Err(reason) => return Err(SupervisorError::FirstGeneration(reason)),
        };
        tracing::info!(phase = "serving", generation = current.number, pid = current.pid, "first generation is ready");
        notify_service_manager(&format!(
            "READY=1\nMAINPID={}\nSTATUS=generation {} (pid {}) serving",
            std::process::id(),
            current.number,
            current.pid
        ));

        let mut drains = JoinSet::new();
        let result = loop {
            let reply = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                Some(reply) = requests.recv() => Some(reply),
                Some(()) = reload_signal.recv() => None,
                exit = Generation::exited(&mut current.exit) => {
                    let err = SupervisorError::ServerExited { generation: current.number, pid: current.pid, exit };
                    tracing::error!(phase = "exited", "{err}");
                    kill_group(current.pid).await;
                    break Err(err);
                }
                Some(_) = drains.join_next(), if !drains.is_empty() => continue,
            };
            let outcome = self.reload(&mut current, &mut drains).await;
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        };
        notify_service_manager("STOPPING=1\nSTATUS=stopping");
        if result.is_ok() {
            let drain_timeout = self.config.drain_timeout;
            drains.spawn(drain(current, self.config.stop_signal, drain_timeout));
        }
        while drains.join_next().await.is_some() {}
        result
    }

    async fn reload(&mut self, current: &mut Generation, drains: &mut JoinSet<()>) -> ReloadOutcome {
        match self.start_ready().await {
            Ok(new) => {
                let old = std::mem::replace(current, new);
                tracing::info!(
                    phase = "switched",
                    generation = current.number,
                    pid = current.pid,
                    previous = old.number,
                    "new generation is ready; stopping the previous one"
                );
                notify_service_manager(&format!("STATUS=generation {} (pid {}) serving", current.number, current.pid));
                let outcome = ReloadOutcome::Switched {
                    generation: current.number,
                    pid: current.pid,
                    previous_generation: old.number,
                    previous_pid: old.pid,
                };
                drains.spawn(drain(old, self.config.stop_signal, self.config.drain_timeout));
                outcome
            }
            Err(reason) => {
                tracing::warn!(phase = "refused", serving = current.number, "{reason}");
                ReloadOutcome::Refused {
                    reason: format!("{reason}; generation {} (pid {}) still serves", current.number, current.pid),
                    serving_generation: current.number,
                    serving_pid: current.pid,
                }
            }
        }
    }

    /// Starts the next generation and waits until it is ready. On failure its process
    /// group is gone when this returns.
    async fn start_ready(&mut self) -> Result<Generation, String> {
        let number = self.next_generation;
        self.next_generation += 1;
        let mut generation = self.start(number)?;
        tracing::info!(phase = "waiting_ready", generation = number, pid = generation.pid, "started");
        match self.wait_ready(&mut generation).await {
            Ok(()) => Ok(generation),
            Err(reason) => {
                kill_group(generation.pid).await;
                Err(reason)
            }
        }
    }

    fn start(&self, number: u64) -> Result<Generation, String> {
        let name = &self.config.name;
        let notify_path = self.config.run_dir.join(format!("{name}.{number}.notify"));
        if notify_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SupervisorError::PathTooLong(notify_path).to_string());
        }
        let notify = NotifyServer::bind(&notify_path).map_err(|e| format!("generation {number}: {e}"))?;
        let fds: Vec<_> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        let env = vec![
            ("LISTEN_FDS".into(), fds.len().to_string().into()),
            ("LISTEN_FDNAMES".into(), names.join(":").into()),
            ("NOTIFY_SOCKET".into(), notify_path.clone().into_os_string()),
            ("CUTOVER_SERVICE".into(), name.into()),
            ("CUTOVER_GENERATION".into(), number.to_string().into()),
        ];
        let spawn = Spawn { argv: &self.config.command, env, remove_env: &["LISTEN_PID"], fds: &fds };
        let (pid, exit) = self.reaper.spawn(&spawn).map_err(|e| format!("cannot start generation {number}: {e}"))?;
        Ok(Generation { number, pid, exit, notify })
    }

    async fn wait_ready(&self, generation: &mut Generation) -> Result<(), String> {
        let Generation { number, pid, exit, notify } = generation;
        let (number, pid) = (*number, *pid);
        let timeout = tokio::time::sleep(self.config.ready_timeout);
        tokio::pin!(timeout);
        let delay = async {
            match self.config.ready_delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(delay);
        loop {
            tokio::select! {
                _ = &mut timeout => {
                    return Err(format!(
                        "generation {number} (pid {pid}) did not report READY=1 within the ready timeout of {:?}; it was killed",
                        self.config.ready_timeout
                    ));
                }
                _ = &mut delay => {
                    tracing::info!(generation = number, "ready by --ready-delay");
                    return Ok(());
                }
                e = Generation::exited(exit) => {
                    return Err(format!("generation {number} (pid {pid}) exited with {e} before it was ready"));
                }
                n = notify.recv() => match n {
                    Ok(n) => {
                        let sender = n.sender.map(|c| c.pid);
                        if !sender.is_some_and(|s| procs::is_same_or_descendant(s, pid)) {
                            tracing::warn!(generation = number, ?sender, "ignored a notification from a process outside the generation");
                            continue;
                        }
                        if let Some(status) = n.get("STATUS") {
                            tracing::info!(generation = number, status, "status");
                        }
                        if n.is_ready() {
                            return Ok(());
                        }
                    }
                    Err(e) => tracing::warn!(generation = number, "notify socket: {e}"),
                },
            }
        }
    }
}

/// Asks a generation to stop, waits up to the drain timeout for its whole process group,
/// then kills what is left.
async fn drain(mut generation: Generation, stop: Signal, timeout: Duration) {
    let (number, pid) = (generation.number, generation.pid);
    let deadline = Instant::now() + timeout;
    tracing::info!(phase = "draining", generation = number, pid, signal = stop.as_str(), "stopping");
    if let Err(e) = procs::signal(pid, stop) {
        tracing::warn!(generation = number, "cannot signal pid {pid}: {e}");
    }
    let exited = tokio::time::timeout_at(deadline, Generation::exited(&mut generation.exit)).await;
    while procs::group_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if procs::group_alive(pid) {
        tracing::warn!(phase = "killed", generation = number, "still running after the drain timeout of {timeout:?}; killing its process group");
        kill_group(pid).await;
    } else {
        tracing::info!(phase = "drained", generation = number, exit = ?exited.ok(), "gone");
    }
}

/// SIGKILLs the process group `pgid` and waits (up to 10 s) until it is empty.
async fn kill_group(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match procs::signal_group(pgid, Signal::SIGKILL) {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!("cannot kill process group {pgid}: {e}");
                return;
            }
        }
        if Instant::now() >= deadline {
            tracing::warn!("process group {pgid} is still there 10 s after SIGKILL: {:?}", procs::group_members(pgid));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn prepare_run_dir(dir: &Path) -> Result<(), SupervisorError> {
    std::fs::create_dir_all(dir).map_err(|source| SupervisorError::RunDir { path: dir.to_path_buf(), source })
}

fn bind_control(path: &Path) -> Result<UnixListener, SupervisorError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(SupervisorError::PathTooLong(path.to_path_buf()));
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SupervisorError::AlreadyRunning(path.to_path_buf()));
        }
        // Left by a supervisor that is gone.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| SupervisorError::Control { op: "bind", path: path.to_path_buf(), source })?;
    // Whoever may reload may replace the running server: owner only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| SupervisorError::Control { op: "restrict the mode of", path: path.to_path_buf(), source })?;
    Ok(listener)
}

async fn serve_control(listener: UnixListener, requests: mpsc::Sender<oneshot::Sender<ReloadOutcome>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let answer = if line.trim() == "reload" {
                let (tx, rx) = oneshot::channel();
                if requests.send(tx).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(outcome) => serde_json::to_string(&outcome).unwrap_or_default(),
                    Err(_) => return,
                }
            } else {
                r#"{"outcome":"refused","reason":"unknown request; send `reload`","serving_generation":0,"serving_pid":0}"#.to_string()
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

/// Orphans of a generation (e.g. daemonized helpers) are re-parented to the supervisor,
/// so they are reaped and never outlive their generation as zombies of init.
fn become_subreaper() {
    // SAFETY: prctl with an integer argument has no memory effects.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!("cannot become a child subreaper: {}", std::io::Error::last_os_error());
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_one_json_line() {
        let s = serde_json::to_string(&ReloadOutcome::Switched { generation: 2, pid: 10, previous_generation: 1, previous_pid: 9 }).unwrap();
        assert_eq!(s, r#"{"outcome":"switched","generation":2,"pid":10,"previous_generation":1,"previous_pid":9}"#);
        let r: ReloadOutcome = serde_json::from_str(r#"{"outcome":"refused","reason":"x","serving_generation":1,"serving_pid":9}"#).unwrap();
        assert!(matches!(r, ReloadOutcome::Refused { .. }));
    }
}
