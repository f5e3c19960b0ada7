//! `cutover run`: keeps a service's listening sockets and runs generations of an
//! unmodified socket-activation server on them.
//!
//! Lifecycle of a reload (phases are logged with `phase=`):
//! `waiting_ready`: the new generation starts with the same fds
//! (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, its own NOTIFY_SOCKET) and must report READY=1
//! (or wait out --ready-delay), then pass the --health probe if there is one ->
//! `watching`: for --watch both generations accept on the same sockets; the new one must
//! not exit, withdraw its readiness or fail its probe -> `switched`: only now does the
//! old generation get its stop signal -> `draining` up to the drain timeout -> `killed`
//! what is left of its process group. A new generation that fails any step before
//! `switched` is `refused`: it gets its stop signal (it may have accepted connections
//! on the shared sockets, which deserve answers), SIGKILL only after the drain timeout,
//! and the old one serves on untouched.
//!
//! The listening sockets never close while the supervisor lives: a serving generation
//! that dies on its own is `restarting` after a growing delay, at most --restart-limit
//! times within --restart-window (then the supervisor gives up with an error), and
//! connections wait in the kernel's accept queue meanwhile instead of being refused. A
//! supervisor that is killed leaves its generations running (they hold the sockets) and
//! a record of the serving one ([`super::record`]); the next supervisor of that name
//! `adopted` it: takes its sockets with pidfd_getfd ([`super::adopt`]) and serves on.
//! A generation's stdout and stderr go to `<run-dir>/<name>.<N>.log` (so they outlive the
//! supervisor), copied to the supervisor's stderr. This module does not parse arguments
//! (`commands::run`) and does not talk to the daemon.

use std::collections::VecDeque;
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

use super::adopt::{self, AdoptError};
use super::listeners::{ListenSpec, Listener};
use super::notify::{notify_service_manager, Notification, NotifyServer};
use super::probe::Probe;
use super::record::{self, record_path, ServingRecord, Starting};
use super::procs::{self, Exit, Reaper, Spawn, SpawnError};
use super::HandoffError;

/// Longest unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Lines of a refused generation's output that `cutover reload` shows.
const OUTPUT_TAIL_LINES: usize = 20;
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the exit of an adopted generation (not a child: no SIGCHLD) is looked for.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub name: String,
    pub listen: Vec<ListenSpec>,
    pub command: Vec<String>,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub stop_signal: Signal,
    pub ready_delay: Option<Duration>,
    /// Optional readiness probe after READY=1, also checked during the watch.
    pub health: Option<Probe>,
    /// How long a ready new generation serves next to the old one before the old one
    /// is stopped; zero: no watch.
    pub watch: Duration,
    /// Restarts of a generation that died on its own allowed within `restart_window`.
    pub restart_limit: u32,
    pub restart_window: Duration,
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
    #[error("{last}; that is {restarts} restarts within {window:?}, the limit (--restart-limit, --restart-window): giving up, the listeners close{output}")]
    RestartLimit { last: String, restarts: usize, window: Duration, output: String },
    #[error("generation {generation} (pid {pid}) of a previous supervisor still serves, but its listeners cannot be adopted: {source}")]
    Adopt {
        generation: u64,
        pid: i32,
        #[source]
        source: AdoptError,
    },
    #[error("no `cutover run --name {name}` in {run_dir}: {path} does not exist (another --run-dir?)")]
    UnknownName { name: String, run_dir: PathBuf, path: PathBuf },
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
    Refused {
        reason: String,
        serving_generation: u64,
        serving_pid: i32,
        /// The last lines the refused generation wrote.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        output: Vec<String>,
    },
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
    let mut stream = UnixStream::connect(&path).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            SupervisorError::UnknownName { name: name.to_string(), run_dir: run_dir.to_path_buf(), path: path.clone() }
        } else {
            SupervisorError::NotRunning { path: path.clone(), source }
        }
    })?;
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

/// A generation: one started (or adopted) instance of the server and its process group.
struct Generation {
    number: u64,
    pid: i32,
    start_time: u64,
    exit: watch::Receiver<Option<Exit>>,
    notify: NotifyServer,
    /// The generation's stdout and stderr (a file, so that it outlives this supervisor).
    log: PathBuf,
}

impl Generation {
    async fn exited(exit: &mut watch::Receiver<Option<Exit>>) -> Exit {
        let got = exit.wait_for(|e| e.is_some()).await.map(|e| *e);
        match got {
            Ok(e) => e.unwrap_or(Exit::Unknown),
            // The reaper is gone (runtime shutting down): never resolve.
            Err(_) => std::future::pending().await,
        }
    }

    fn label(&self) -> String {
        format!("generation {} (pid {})", self.number, self.pid)
    }

    /// The last lines the generation wrote.
    fn output_tail(&self) -> Vec<String> {
        tail_lines(&self.log, OUTPUT_TAIL_LINES)
    }
}

/// Why a new generation did not take over; it is stopped when this exists.
#[derive(Debug)]
struct Refusal {
    reason: String,
    output: Vec<String>,
}

pub struct Supervisor {
    config: SupervisorConfig,
    listeners: Vec<Listener>,
    reaper: Reaper,
    next_generation: u64,
    /// A generation that served under a supervisor that was killed, to serve on.
    adopted: Option<ServingRecord>,
    /// What the run directory's record says (see [`super::record`]).
    record: Option<ServingRecord>,
}

impl Supervisor {
    /// Takes the listeners, prepares nothing else and starts nothing. If a generation
    /// of a previous supervisor of this name still serves (its serving record in the
    /// run directory names a live process), its listening sockets are adopted with
    /// pidfd_getfd, the very sockets with their queued connections, and it serves on;
    /// otherwise the listeners are bound.
    pub fn new(config: SupervisorConfig) -> Result<Supervisor, SupervisorError> {
        if !valid_name(&config.name) {
            return Err(SupervisorError::InvalidName(config.name.clone()));
        }
        let control = control_path(&config.run_dir, &config.name);
        if control.exists() && std::os::unix::net::UnixStream::connect(&control).is_ok() {
            return Err(SupervisorError::AlreadyRunning(control));
        }
        let record_file = record_path(&config.run_dir, &config.name);
        let alive = match record::load(&record_file) {
            Ok(r) => r.filter(|r| procs::running(r.pid, r.start_time)),
            Err(e) => {
                tracing::warn!("ignoring the serving record: {e}");
                None
            }
        };
        let (listeners, adopted) = match alive {
            Some(r) => {
                let taken = adopt::take_listeners(r.pid, &config.listen).map_err(|source| SupervisorError::Adopt { generation: r.generation, pid: r.pid, source })?;
                tracing::info!(phase = "adopted", generation = r.generation, pid = r.pid, "listeners taken from the generation that still serves");
                (taken, Some(r))
            }
            None => (config.listen.iter().map(Listener::bind).collect::<Result<Vec<_>, _>>().map_err(SupervisorError::Listener)?, None),
        };
        let reaper = Reaper::start().map_err(SupervisorError::Reaper)?;
        // Numbers are never reused (they name files in the run directory).
        let next_generation = adopted.map_or(1, |r| r.generation.max(r.starting.map_or(0, |s| s.generation)) + 1);
        Ok(Supervisor { config, listeners, reaper, next_generation, adopted, record: None })
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Runs until `triggers.shutdown` resolves (then stops the serving generation
    /// gracefully) or the serving generation keeps dying beyond the restart limit (an
    /// error). The listening sockets stay open all along.
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

        let mut drains = JoinSet::new();
        let mut current = match self.adopted.take() {
            Some(record) => {
                if let Some(starting) = record.starting.filter(|s| procs::running(s.pid, s.start_time)) {
                    let log = self.config.run_dir.join(format!("{}.{}.log", self.config.name, starting.generation));
                    drains.spawn(stop_unsupervised(starting, log, self.config.stop_signal, self.config.drain_timeout));
                }
                self.adopt(record)?
            }
            None => match self.start_ready().await {
                Ok(g) => g,
                Err(refusal) => return Err(SupervisorError::FirstGeneration(refusal.with_output())),
            },
        };
        tracing::info!(phase = "serving", generation = current.number, pid = current.pid, "serving");
        self.save_record(&current);
        notify_service_manager(&format!(
            "READY=1\nMAINPID={}\nSTATUS={} serving",
            std::process::id(),
            current.label()
        ));

        let mut restarts: VecDeque<Instant> = VecDeque::new();
        let result = loop {
            let reply = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                Some(reply) = requests.recv() => Some(reply),
                Some(()) = reload_signal.recv() => None,
                exit = Generation::exited(&mut current.exit) => {
                    tracing::error!(
                        phase = "exited",
                        generation = current.number,
                        pid = current.pid,
                        %exit,
                        "the serving generation exited on its own; the listeners stay open and connections wait in their accept queue"
                    );
                    match self.restart(&mut restarts, &current, exit, shutdown.as_mut()).await {
                        Ok(Some(new)) => {
                            let dead = std::mem::replace(&mut current, new);
                            drains.spawn(stop(dead, self.config.stop_signal, self.config.drain_timeout));
                            tracing::info!(phase = "serving", generation = current.number, pid = current.pid, "restarted");
                            self.save_record(&current);
                            notify_service_manager(&format!("STATUS={} serving (restarted)", current.label()));
                            continue;
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => {
                            tracing::error!(phase = "gave_up", "{e}");
                            break Err(e);
                        }
                    }
                }
                Some(_) = drains.join_next(), if !drains.is_empty() => continue,
            };
            let outcome = self.reload(&mut current, &mut drains).await;
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        };
        notify_service_manager("STOPPING=1\nSTATUS=stopping");
        drains.spawn(stop(current, self.config.stop_signal, self.config.drain_timeout));
        while drains.join_next().await.is_some() {}
        record::remove(&record_path(&run_dir, &self.config.name));
        result
    }

    /// After the serving generation died: starts new ones, with a growing delay, until
    /// one is ready (`Some`), shutdown is asked for (`None`), or more than the restart
    /// limit died within the restart window (an error).
    async fn restart<S: Future<Output = ()>>(
        &mut self,
        restarts: &mut VecDeque<Instant>,
        dead: &Generation,
        exit: Exit,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> Result<Option<Generation>, SupervisorError> {
        let (limit, window) = (self.config.restart_limit, self.config.restart_window);
        let mut last = format!("{} exited with {exit}", dead.label());
        let mut output = dead.output_tail();
        loop {
            let now = Instant::now();
            while restarts.front().is_some_and(|t| now.duration_since(*t) > window) {
                restarts.pop_front();
            }
            if restarts.len() >= limit as usize {
                return Err(SupervisorError::RestartLimit { last, restarts: restarts.len(), window, output: output_block(&output) });
            }
            let delay = restart_delay(restarts.len());
            restarts.push_back(now);
            tracing::warn!(phase = "restarting", attempt = restarts.len(), limit, ?delay, "{last}; starting a new generation");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.as_mut() => return Ok(None),
            }
            match self.start_ready().await {
                Ok(g) => return Ok(Some(g)),
                Err(refusal) => {
                    tracing::warn!(phase = "refused", "{}", refusal.reason);
                    last = refusal.reason;
                    output = refusal.output;
                }
            }
        }
    }

    async fn reload(&mut self, current: &mut Generation, drains: &mut JoinSet<()>) -> ReloadOutcome {
        let refused = |refusal: Refusal, current: &Generation| {
            tracing::warn!(phase = "refused", serving = current.number, "{}", refusal.reason);
            ReloadOutcome::Refused {
                reason: format!("{}; {} still serves", refusal.reason, current.label()),
                serving_generation: current.number,
                serving_pid: current.pid,
                output: refusal.output,
            }
        };
        let mut new = match self.start_ready().await {
            Ok(new) => new,
            Err(refusal) => return refused(refusal, current),
        };
        if let Err(reason) = self.watch(&mut new).await {
            let output = new.output_tail();
            stop(new, self.config.stop_signal, self.config.drain_timeout).await;
            self.note_starting(None);
            return refused(Refusal { reason, output }, current);
        }
        let old = std::mem::replace(current, new);
        tracing::info!(
            phase = "switched",
            generation = current.number,
            pid = current.pid,
            previous = old.number,
            "new generation is ready and passed its watch; stopping the previous one"
        );
        self.save_record(current);
        notify_service_manager(&format!("STATUS={} serving", current.label()));
        let outcome = ReloadOutcome::Switched {
            generation: current.number,
            pid: current.pid,
            previous_generation: old.number,
            previous_pid: old.pid,
        };
        drains.spawn(stop(old, self.config.stop_signal, self.config.drain_timeout));
        outcome
    }

    /// Starts the next generation and waits until it is ready (and passes the probe, if
    /// any). On failure it was stopped (stop signal, then the drain timeout) when this
    /// returns.
    async fn start_ready(&mut self) -> Result<Generation, Refusal> {
        let number = self.next_generation;
        self.next_generation += 1;
        let mut generation = self.start(number).map_err(|reason| Refusal { reason, output: Vec::new() })?;
        tracing::info!(phase = "waiting_ready", generation = number, pid = generation.pid, "started");
        self.note_starting(Some(&generation));
        match self.wait_ready(&mut generation).await {
            Ok(()) => Ok(generation),
            Err(reason) => {
                let output = generation.output_tail();
                stop(generation, self.config.stop_signal, self.config.drain_timeout).await;
                self.note_starting(None);
                Err(Refusal { reason, output })
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
        let log = self.config.run_dir.join(format!("{name}.{number}.log"));
        let _ = std::fs::remove_file(&log);
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("generation {number}: cannot create its output file {}: {e}", log.display()))?;
        let fds: Vec<_> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        let env = vec![
            ("LISTEN_FDS".into(), fds.len().to_string().into()),
            ("LISTEN_FDNAMES".into(), names.join(":").into()),
            ("NOTIFY_SOCKET".into(), notify_path.clone().into_os_string()),
            ("CUTOVER_SERVICE".into(), name.into()),
            ("CUTOVER_GENERATION".into(), number.to_string().into()),
        ];
        let spawn = Spawn { argv: &self.config.command, env, remove_env: &["LISTEN_PID"], fds: &fds, output: Some(output.as_fd()) };
        let (pid, exit) = self.reaper.spawn(&spawn).map_err(|e| format!("cannot start generation {number}: {e}"))?;
        drop(output);
        tokio::spawn(forward_output(log.clone(), 0, exit.clone()));
        let start_time = procs::stat(pid).map_or(0, |s| s.start_time);
        Ok(Generation { number, pid, start_time, exit, notify, log })
    }

    /// Serves on with the generation a killed supervisor left running. Its exit is
    /// seen by polling /proc (it is not this process's child), its notify socket is
    /// bound again at the path it knows, its output is followed from here on.
    fn adopt(&self, record: ServingRecord) -> Result<Generation, SupervisorError> {
        let name = &self.config.name;
        let number = record.generation;
        let notify_path = self.config.run_dir.join(format!("{name}.{number}.notify"));
        let notify = NotifyServer::bind(&notify_path).map_err(SupervisorError::Listener)?;
        let log = self.config.run_dir.join(format!("{name}.{number}.log"));
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            while procs::running(record.pid, record.start_time) {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            let _ = tx.send(Some(Exit::Unknown));
        });
        let from = std::fs::metadata(&log).map_or(0, |m| m.len());
        tokio::spawn(forward_output(log.clone(), from, exit.clone()));
        Ok(Generation { number, pid: record.pid, start_time: record.start_time, exit, notify, log })
    }

    /// Records `g` as the serving generation (and nothing as starting).
    fn save_record(&mut self, g: &Generation) {
        self.record = Some(ServingRecord { generation: g.number, pid: g.pid, start_time: g.start_time, starting: None });
        self.write_record();
    }

    /// Records `g` as the generation being started and watched, or none.
    fn note_starting(&mut self, g: Option<&Generation>) {
        let Some(record) = self.record.as_mut() else { return };
        record.starting = g.map(|g| Starting { generation: g.number, pid: g.pid, start_time: g.start_time });
        self.write_record();
    }

    fn write_record(&self) {
        let Some(r) = &self.record else { return };
        if let Err(e) = record::save(&record_path(&self.config.run_dir, &self.config.name), r) {
            tracing::warn!("a supervisor started after this one is killed could not adopt generation {}: {e}", r.generation);
        }
    }

    async fn wait_ready(&self, generation: &mut Generation) -> Result<(), String> {
        let deadline = Instant::now() + self.config.ready_timeout;
        let label = generation.label();
        let Generation { number, pid, exit, notify, .. } = generation;
        let (number, pid) = (*number, *pid);
        let timeout = tokio::time::sleep_until(deadline);
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
                    return Err(format!("{label} did not report READY=1 within the ready timeout of {:?}", self.config.ready_timeout));
                }
                _ = &mut delay => {
                    tracing::info!(generation = number, "ready by --ready-delay");
                    break;
                }
                e = Generation::exited(exit) => {
                    return Err(format!("{label} exited with {e} before it was ready"));
                }
                n = notify.recv() => match n {
                    Ok(n) => {
                        if !from_generation(&n, pid, number) {
                            continue;
                        }
                        if n.is_ready() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(generation = number, "notify socket: {e}"),
                },
            }
        }
        let Some(probe) = self.config.health.clone() else { return Ok(()) };
        tracing::info!(generation = number, %probe, "reported ready; probing");
        loop {
            let attempt = probe.check(PROBE_TIMEOUT);
            let result = tokio::select! {
                r = attempt => r,
                e = Generation::exited(exit) => return Err(format!("{label} exited with {e} before it passed its probe {probe}")),
                _ = &mut timeout => return Err(format!("{label} did not pass its probe {probe} within the ready timeout of {:?}", self.config.ready_timeout)),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + PROBE_INTERVAL >= deadline => {
                    return Err(format!("{label} did not pass its probe {probe} within the ready timeout of {:?}: {e}", self.config.ready_timeout));
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                e = Generation::exited(exit) => return Err(format!("{label} exited with {e} before it passed its probe {probe}")),
            }
        }
    }

    /// The watch: the new generation serves next to the old one for `--watch`; it must
    /// not exit, withdraw its readiness (`STOPPING=1`, `READY=0`) or fail its probe.
    async fn watch(&self, generation: &mut Generation) -> Result<(), String> {
        let watch_for = self.config.watch;
        if watch_for.is_zero() {
            return Ok(());
        }
        let label = generation.label();
        tracing::info!(phase = "watching", generation = generation.number, ?watch_for, "ready; the previous generation serves on during the watch");
        let Generation { number, pid, exit, notify, .. } = generation;
        let (number, pid) = (*number, *pid);
        let end = tokio::time::sleep(watch_for);
        tokio::pin!(end);
        let mut probe_tick = tokio::time::interval(PROBE_INTERVAL);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut end => return Ok(()),
                e = Generation::exited(exit) => {
                    return Err(format!("{label} exited with {e} during the watch of {watch_for:?} after it reported ready"));
                }
                n = notify.recv() => match n {
                    Ok(n) if from_generation(&n, pid, number) && withdraws_readiness(&n) => {
                        return Err(format!("{label} withdrew its readiness during the watch of {watch_for:?}"));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(generation = number, "notify socket: {e}"),
                },
                _ = probe_tick.tick(), if self.config.health.is_some() => {
                    if let Some(probe) = &self.config.health {
                        if let Err(e) = probe.check(PROBE_TIMEOUT).await {
                            return Err(format!("{label} failed its probe during the watch of {watch_for:?}: {e}"));
                        }
                    }
                }
            }
        }
    }
}

/// Only datagrams from the generation's own process tree count.
fn from_generation(n: &Notification, pid: i32, number: u64) -> bool {
    let sender = n.sender.map(|c| c.pid);
    if !sender.is_some_and(|s| procs::is_same_or_descendant(s, pid)) {
        tracing::warn!(generation = number, ?sender, "ignored a notification from a process outside the generation");
        return false;
    }
    if let Some(status) = n.get("STATUS") {
        tracing::info!(generation = number, status, "status");
    }
    true
}

fn withdraws_readiness(n: &Notification) -> bool {
    n.get("STOPPING") == Some("1") || n.get("READY") == Some("0")
}

/// 100 ms, 200 ms, 400 ms ... at most 5 s, by the number of recent restarts.
fn restart_delay(recent: usize) -> Duration {
    let ms = 100u64.saturating_mul(1 << recent.min(6));
    Duration::from_millis(ms.min(5000))
}

impl Refusal {
    fn with_output(self) -> String {
        format!("{}{}", self.reason, output_block(&self.output))
    }
}

/// "\n  its last output:\n  line ..." or nothing.
fn output_block(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nits last output:");
    for l in lines {
        s.push_str("\n  ");
        s.push_str(l);
    }
    s
}

/// The last `n` lines of a file (at most its last 64 KiB are read).
fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map_or(0, |m| m.len());
    let from = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
}

/// Copies what a generation writes to its output file onto the supervisor's stderr
/// (the journal, under systemd), from offset `from` until the generation is gone.
async fn forward_output(path: PathBuf, from: u64, mut exit: watch::Receiver<Option<Exit>>) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let Ok(mut f) = std::fs::File::open(&path) else { return };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let gone = exit.borrow().is_some();
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = std::io::stderr().lock().write_all(&buf[..n]);
                }
            }
        }
        if gone {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = exit.changed() => {}
        }
    }
}

/// Stops a generation: its stop signal to the main process; once that is gone (or
/// right away if it already is), the stop signal to what is left of its process group;
/// SIGKILL only for what is still there after `timeout`. Never SIGKILL first: a
/// generation shares the listening sockets, so it may hold accepted connections that
/// deserve an answer. Its output file is removed at the end.
async fn stop(mut generation: Generation, signal: Signal, timeout: Duration) {
    let (number, pid) = (generation.number, generation.pid);
    let deadline = Instant::now() + timeout;
    tracing::info!(phase = "draining", generation = number, pid, signal = signal.as_str(), "stopping");
    let main_running = generation.exit.borrow().is_none();
    if main_running {
        if let Err(e) = procs::signal(pid, signal) {
            tracing::warn!(generation = number, "cannot signal pid {pid}: {e}");
        }
    }
    let exited = tokio::time::timeout_at(deadline, Generation::exited(&mut generation.exit)).await.ok();
    if !procs::group_running(pid).is_empty() && Instant::now() < deadline {
        // Helpers the main process left behind (or did not stop itself).
        if let Err(e) = procs::signal_group(pid, signal) {
            tracing::warn!(generation = number, "cannot signal process group {pid}: {e}");
        }
    }
    while !procs::group_running(pid).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if procs::group_running(pid).is_empty() {
        tracing::info!(phase = "drained", generation = number, exit = ?exited, "gone");
    } else {
        tracing::warn!(phase = "killed", generation = number, "still running {timeout:?} after the stop signal; killing its process group");
        kill_group(pid).await;
    }
    let _ = std::fs::remove_file(&generation.log);
}

/// Stops a generation a killed supervisor was starting or watching (found in its
/// record): not a child, so it is followed through /proc. Stop signal first, as [`stop`].
async fn stop_unsupervised(g: Starting, log: PathBuf, signal: Signal, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let (gone, exit) = watch::channel(None);
    let from = std::fs::metadata(&log).map_or(0, |m| m.len());
    tokio::spawn(forward_output(log.clone(), from, exit));
    tracing::warn!(phase = "draining", generation = g.generation, pid = g.pid, "the killed supervisor was starting this generation; stopping it");
    if let Err(e) = procs::signal(g.pid, signal) {
        tracing::warn!(generation = g.generation, "cannot signal pid {}: {e}", g.pid);
    }
    while procs::running(g.pid, g.start_time) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !procs::group_running(g.pid).is_empty() && Instant::now() < deadline {
        if let Err(e) = procs::signal_group(g.pid, signal) {
            tracing::warn!(generation = g.generation, "cannot signal process group {}: {e}", g.pid);
        }
    }
    while !procs::group_running(g.pid).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if procs::group_running(g.pid).is_empty() {
        tracing::info!(phase = "drained", generation = g.generation, "gone");
    } else {
        tracing::warn!(phase = "killed", generation = g.generation, "still running {timeout:?} after the stop signal; killing its process group");
        kill_group(g.pid).await;
    }
    let _ = gone.send(Some(Exit::Unknown));
    let _ = std::fs::remove_file(&log);
}

/// SIGKILLs the process group `pgid` and waits (up to 10 s) until nothing but zombies
/// is left of it.
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
        let left = procs::group_running(pgid);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!("process group {pgid} is still there 10 s after SIGKILL: {left:?}");
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
        let refused = ReloadOutcome::Refused { reason: "x".into(), serving_generation: 1, serving_pid: 9, output: vec!["boom".into()] };
        let back: ReloadOutcome = serde_json::from_str(&serde_json::to_string(&refused).unwrap()).unwrap();
        assert_eq!(back, refused);
    }

    #[test]
    fn restarts_back_off_from_100_ms_to_5_s() {
        let delays: Vec<u128> = (0..9).map(|n| restart_delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn stopping_or_ready_0_withdraws_readiness() {
        assert!(withdraws_readiness(&Notification::parse(None, b"STOPPING=1")));
        assert!(withdraws_readiness(&Notification::parse(None, b"READY=0")));
        assert!(!withdraws_readiness(&Notification::parse(None, b"READY=1\nSTATUS=ok")));
    }

    #[test]
    fn the_output_tail_is_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = tail_lines(&path, 3);
        assert_eq!(tail, ["line 28", "line 29", "line 30"]);
        assert!(tail_lines(&dir.path().join("missing"), 3).is_empty());
        assert_eq!(output_block(&tail[..1]), "\nits last output:\n  line 28");
    }
}
