//! `cutover demo`: a zero-downtime release shown end to end on this Docker host, with
//! nothing to download and nothing left behind.
//!
//! It builds two demo releases locally, starts a private daemon (its own socket, state
//! directory, nftables table and container label, so it never touches an operator's
//! daemon or services), registers service `demo`, drives a load of new and long-lived
//! connections at the host port, deploys release 2, rolls back to release 1, and prints
//! per step what the clients saw. The teardown (service removed through the daemon, so
//! rules and containers go the supported way; daemon stopped; images removed) runs on
//! success, on error and on Ctrl-C/SIGTERM.

pub mod loadgen;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::api::{ManifestText, Request};
use crate::cli::DemoArgs;
use crate::exit::{Exit, Failure};
use crate::deploy::Outcome;
use crate::docker::image::{build_demo_image, DemoImage};
use crate::docker::{DockerEngine, Engine};
use loadgen::{get_once, FailureKind, Load, LoadSpec};
use crate::manifest::Manifest;
use crate::nat::{Firewall, NftFirewall};

const MARK: u32 = 0x2000_0000;
const SERVICE: &str = "demo";
const RELEASES: [&str; 2] = ["v1", "v2"];
/// Long-lived connections hold the old release until it is stopped, so the drain ends
/// at this timeout; short keeps the demo short.
const DRAIN_TIMEOUT: &str = "3s";
/// A single request may take this long before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the teardown waits for an operation that a Ctrl-C interrupted on the client
/// side but that the daemon runs to its end (health deadline + drain + stop).
const BUSY_WAIT: Duration = Duration::from_secs(60);

/// The names of what the demo makes, all derived from `--lab-name` (default
/// `cutover-demo`): its nftables table and container label stay apart from the production
/// daemon's (`cutover`), so the demo can run on a host that already uses cutover, and
/// tests can run a demo of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Names {
    /// `cutover_demo`
    table: String,
    /// `cutover-demo`
    instance: String,
    /// `cutover-demo:v1`, `cutover-demo:v2`
    images: [String; 2],
    /// `cutover-demo`: a bridge network of its own, so that what the daemon does to a
    /// bridge (`route_localnet`, set and later restored) never touches the bridges of
    /// other services on this host, nor theirs the demo's.
    network: String,
}

impl Names {
    fn new(lab: &str) -> Result<Names, Failure> {
        let ok = !lab.is_empty()
            && lab.len() <= 40
            && lab.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && lab.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(Failure::new(Exit::Invalid, format!("--lab-name `{lab}`: use up to 40 of a-z, 0-9 and '-', starting with a letter")));
        }
        Ok(Names {
            table: lab.replace('-', "_"),
            instance: lab.to_string(),
            images: RELEASES.map(|r| format!("{lab}:{r}")),
            network: lab.to_string(),
        })
    }
}

/// The manifest of the demo service.
fn manifest_text(names: &Names, port: u16) -> String {
    format!(
        "# Written by `cutover demo`.\n\
name: {SERVICE}\n\
image: {}\n\
ports:\n  - host: {port}\n    container: 80\n\
health:\n  type: http\n  path: /healthz\n  interval: 200ms\n  timeout: 1s\n  deadline: 20s\n\
drain_timeout: {DRAIN_TIMEOUT}\n\
stop_timeout: 5s\n\
keep: 2\n\
network: {}\n",
        names.images[0], names.network
    )
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
struct StepReport {
    step: String,
    requests: u64,
    failed: u64,
    failures: BTreeMap<FailureKind, u64>,
    switch_us: Option<u64>,
    drain_ms: Option<u64>,
    /// Answers per release during the step.
    answered: BTreeMap<String, u64>,
    /// The release a new connection reaches once the step is over.
    now_answering: Option<String>,
    reconnects: u64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    port: u16,
    workers: usize,
    connections: usize,
    steps: Vec<StepReport>,
    requests: u64,
    failed: u64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
    /// Keep-alive connections reopened after the server closed them (not failures).
    reconnects: u64,
    /// The first few failed requests.
    examples: Vec<String>,
}

fn micros(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Progress for people; off with `--json` only for the table itself.
fn say(message: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "demo: {message}");
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.port == 0 {
        return Err(Failure::new(Exit::Invalid, "--port 0 is not a port; use 1-65535").into());
    }
    if args.workers + args.connections == 0 {
        return Err(Failure::new(Exit::Invalid, "--workers and --connections are both 0: there would be no load").into());
    }
    let mut lab = Lab::create(&args)?;
    let result = tokio::select! {
        r = scenario(&mut lab, &args) => r,
        signal = interrupted() => {
            say(&format!("{signal}: stopping and cleaning up (a release in progress is finished first)"));
            Err(Failure::new(Exit::Refused, format!("interrupted by {signal}")).into())
        }
    };
    let problems = lab.teardown().await;
    if !args.json && !lab.steps.is_empty() {
        print_table(&lab.steps);
    }
    let report = result?;
    if !args.json {
        print_summary(&report);
    }
    if !problems.is_empty() {
        return Err(Failure::new(Exit::Refused, format!("the demo ran, but cleaning up failed: {}", problems.join("; "))).into());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if report.failed > 0 {
        let kinds: BTreeMap<FailureKind, u64> = report.steps.iter().flat_map(|s| s.failures.clone()).fold(
            BTreeMap::new(),
            |mut acc, (k, v)| {
                *acc.entry(k).or_default() += v;
                acc
            },
        );
        let kinds: Vec<String> = kinds.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        return Err(Failure::new(
            Exit::Refused,
            format!("{} of {} requests failed ({})", report.failed, report.requests, kinds.join(", ")),
        )
        .into());
    }
    Ok(())
}

/// The first of SIGINT (Ctrl-C) and SIGTERM; never, if neither can be watched.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "Ctrl-C",
            _ = term.recv() => "SIGTERM",
        },
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot watch for Ctrl-C; the demo cleans up only when it ends by itself");
            std::future::pending().await
        }
    }
}

async fn scenario(lab: &mut Lab, args: &DemoArgs) -> anyhow::Result<Report> {
    let (table, instance) = (lab.names.table.clone(), lab.names.instance.clone());
    let images = lab.names.images.clone();
    let firewall = NftFirewall::new();
    if firewall.table_exists(&table).map_err(|e| Failure::new(Exit::Refused, format!("cannot read nftables: {e}")))? {
        return Err(Failure::new(
            Exit::Refused,
            format!(
                "nftables table inet {table} exists: another `cutover demo` runs, or one was killed before it could clean \
                 up. If none runs: docker rm -f $(docker ps -aq --filter label=cutover.instance={instance}); \
                 nft delete table inet {table}"
            ),
        )
        .into());
    }
    say(&format!("building the demo images {} and {} (no registry needed)", images[0], images[1]));
    lab.build_images().await?;
    say(&format!("creating the Docker network {}", lab.names.network));
    lab.create_network().await?;
    say("starting a private cutover daemon");
    lab.start_daemon().await?;

    say(&format!("registering service `{SERVICE}` on port {} with release 1 ({})", args.port, images[0]));
    let manifest = manifest_text(&lab.names, args.port);
    Manifest::parse(Path::new("demo.yaml"), &manifest).map_err(|e| Failure::new(Exit::Refused, format!("the demo manifest: {e}")))?;
    lab.applied = true;
    lab.call(&Request::Apply { manifests: vec![ManifestText { file: "demo.yaml".into(), text: manifest }], pull: None }).await?;

    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let first = get_once(target, "/", REQUEST_TIMEOUT)
        .await
        .map_err(|e| Failure::new(Exit::Refused, format!("release 1 is live but 127.0.0.1:{} does not answer: {e}", args.port)))?;
    say(&format!("127.0.0.1:{} answers `{}`", args.port, first.release));

    say(&format!(
        "load: {} clients opening a new connection per request, {} keep-alive connections",
        args.workers, args.connections
    ));
    let load = Load::start(&LoadSpec {
        target,
        path: "/".into(),
        fresh_workers: args.workers,
        keepalive_connections: args.connections,
        timeout: REQUEST_TIMEOUT,
    });
    let baseline = step(&load, target, args.settle, "steady on v1", async { Ok(None) }).await?;
    lab.steps.push(baseline);

    let deploy = step(&load, target, args.settle, "deploy v2", async {
        let data = lab.call(&Request::Deploy { service: SERVICE.into(), image: images[1].clone(), pull: None }).await?;
        Ok(Some(serde_json::from_value::<Outcome>(data).context("the daemon's deploy outcome")?))
    })
    .await?;
    lab.steps.push(deploy);

    let rollback = step(&load, target, args.settle, "rollback to v1", async {
        let data = lab.call(&Request::Rollback { service: SERVICE.into(), to: None, pull: None }).await?;
        Ok(Some(serde_json::from_value::<Outcome>(data).context("the daemon's rollback outcome")?))
    })
    .await?;
    lab.steps.push(rollback);

    let total = load.stop().await;
    let report = Report {
        port: args.port,
        workers: args.workers,
        connections: args.connections,
        requests: total.requests,
        failed: total.failed(),
        p50_us: micros(total.latency.quantile(0.5)),
        p99_us: micros(total.latency.quantile(0.99)),
        max_us: micros(total.latency.max()),
        reconnects: total.reconnects,
        examples: total.examples.iter().map(ToString::to_string).collect(),
        steps: lab.steps.clone(),
    };
    Ok(report)
}

/// Run `op` under the load and count what the clients saw from its start until
/// `settle` after its end.
async fn step(
    load: &Load,
    target: SocketAddr,
    settle: Duration,
    name: &str,
    op: impl std::future::Future<Output = anyhow::Result<Option<Outcome>>>,
) -> anyhow::Result<StepReport> {
    say(&format!("step: {name}"));
    let before = load.snapshot();
    let outcome = op.await?;
    tokio::time::sleep(settle).await;
    let seen = load.snapshot().since(&before);
    let now_answering = get_once(target, "/", REQUEST_TIMEOUT).await.ok().map(|a| a.release);
    Ok(StepReport {
        step: name.to_string(),
        requests: seen.requests,
        failed: seen.failed(),
        failures: seen.failures.clone(),
        switch_us: outcome.as_ref().and_then(|o| o.switch_us),
        drain_ms: outcome.as_ref().and_then(|o| o.drain_ms),
        answered: seen.releases.clone(),
        now_answering,
        reconnects: seen.reconnects,
        p50_us: micros(seen.latency.quantile(0.5)),
        p99_us: micros(seen.latency.quantile(0.99)),
    })
}

/// The per-step table: what the clients saw during each step.
fn print_table(steps: &[StepReport]) {
    println!();
    println!("{:<16} {:>9} {:>7} {:>10} {:>9}  {:<26} NOW", "STEP", "REQUESTS", "FAILED", "SWITCH", "DRAIN", "ANSWERED BY");
    for s in steps {
        let answered: Vec<String> = s.answered.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        println!(
            "{:<16} {:>9} {:>7} {:>10} {:>9}  {:<26} {}",
            s.step,
            s.requests,
            s.failed,
            s.switch_us.map(|u| format!("{u} µs")).unwrap_or_else(|| "-".into()),
            s.drain_ms.map(|m| format!("{m} ms")).unwrap_or_else(|| "-".into()),
            answered.join(", "),
            s.now_answering.as_deref().unwrap_or("(no answer)")
        );
    }
}

fn print_summary(r: &Report) {
    let ms = |us: Option<u64>| us.map(|u| format!("{:.1} ms", u as f64 / 1000.0)).unwrap_or_else(|| "-".into());
    println!();
    println!(
        "total: {} requests, {} failed; latency p50 {}, p99 {}, max {}",
        r.requests,
        r.failed,
        ms(r.p50_us),
        ms(r.p99_us),
        ms(r.max_us)
    );
    for e in &r.examples {
        println!("  failed: {e}");
    }
    println!("switch: one nftables transaction points the host port at the new release; new connections reach it at once.");
    if r.connections > 0 {
        println!(
            "drain:  established connections stay on the old release. The {} long-lived ones held it until drain_timeout \
             ({DRAIN_TIMEOUT});\n        then it was stopped, closed them gracefully, and they reconnected to the new \
             release ({} reconnects, none a failure).",
            r.connections, r.reconnects
        );
    }
}

/// Everything the demo made, so that [`Lab::teardown`] can undo it.
struct Lab {
    names: Names,
    dir: PathBuf,
    socket: PathBuf,
    docker_endpoint: String,
    keep_images: bool,
    engine: Option<DockerEngine>,
    /// Tags built (or being built): removed at the end unless `--keep`.
    images: Vec<String>,
    daemon: Option<tokio::process::Child>,
    /// The service may exist in the daemon (set before `apply` is sent).
    applied: bool,
    /// A daemon was started, so the demo's table and containers may exist.
    daemon_started: bool,
    /// The demo's network was created (or found): removed at the end.
    network_created: bool,
    /// The steps done so far: printed even when a later one fails or is interrupted.
    steps: Vec<StepReport>,
}

impl Lab {
    fn create(args: &DemoArgs) -> anyhow::Result<Lab> {
        let names = Names::new(&args.lab_name)?;
        let dir = std::env::temp_dir().join(format!("cutover-demo-{}", std::process::id()));
        // Private (0700): it holds the daemon's control socket.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the demo's directory {}", dir.display()))?;
        Ok(Lab {
            names,
            socket: dir.join("cutover.sock"),
            dir,
            docker_endpoint: args.docker.clone(),
            keep_images: args.keep,
            engine: None,
            images: Vec::new(),
            daemon: None,
            applied: false,
            daemon_started: false,
            network_created: false,
            steps: Vec::new(),
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    async fn engine(&mut self) -> anyhow::Result<&DockerEngine> {
        if self.engine.is_none() {
            let engine = DockerEngine::connect(&self.docker_endpoint).await.map_err(|e| {
                Failure::new(Exit::Refused, format!("{e}; is the Docker engine running? (sudo bash .ci/provision starts it)"))
            })?;
            self.engine = Some(engine);
        }
        self.engine.as_ref().ok_or_else(|| anyhow::anyhow!("no Docker engine"))
    }

    async fn build_images(&mut self) -> anyhow::Result<()> {
        for (tag, release) in self.names.images.clone().into_iter().zip(RELEASES) {
            self.images.push(tag.clone());
            let spec = DemoImage { tag, release: release.into(), env: BTreeMap::new(), healthcheck: false };
            let engine = self.engine().await?;
            build_demo_image(engine.client(), &spec).await?;
        }
        Ok(())
    }

    /// Reuses a network of that name (left by a demo that was killed).
    async fn create_network(&mut self) -> anyhow::Result<()> {
        let name = self.names.network.clone();
        self.network_created = true;
        let engine = self.engine().await?;
        let labels = std::collections::HashMap::from([(crate::docker::LABEL_INSTANCE.to_string(), name.clone())]);
        engine.ensure_network(&name, labels).await?;
        Ok(())
    }

    async fn start_daemon(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find the cutover executable to start the daemon")?;
        let log = std::fs::File::create(self.log_path())
            .with_context(|| format!("cannot create {}", self.log_path().display()))?;
        let log_err = log.try_clone().context("cannot share the daemon's log file")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(["--log", "info", "daemon", "--state-dir"])
            .arg(self.dir.join("state"))
            .args(["--table", &self.names.table, "--instance", &self.names.instance])
            .args(["--mark", &format!("{MARK:#x}"), "--docker", &self.docker_endpoint])
            // Not ours to pass on: under systemd the child would report readiness as if
            // it were the unit's main process.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: Ctrl-C at the terminal goes to the demo only, which
            // then removes the service through the daemon before stopping it.
            .process_group(0)
            // Last resort if the demo unwinds without its teardown.
            .kill_on_drop(true);
        let child = cmd.spawn().context("cannot start the demo's daemon")?;
        self.daemon = Some(child);
        self.daemon_started = true;
        let started = Instant::now();
        loop {
            if let Some(child) = self.daemon.as_mut() {
                if let Some(status) = child.try_wait().context("cannot watch the demo's daemon")? {
                    self.daemon = None;
                    return Err(Failure::new(
                        Exit::Refused,
                        format!("the demo's daemon exited ({status}):\n{}", tail(&self.log_path(), 20)),
                    )
                    .into());
                }
            }
            if crate::client::call(&self.socket, &Request::Ping {}).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > DAEMON_START_TIMEOUT {
                return Err(Failure::new(
                    Exit::Refused,
                    format!("the demo's daemon did not answer within {DAEMON_START_TIMEOUT:?}:\n{}", tail(&self.log_path(), 20)),
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call(&self, request: &Request) -> anyhow::Result<serde_json::Value> {
        Ok(crate::client::call(&self.socket, request).await?)
    }

    /// Undo everything, collecting every problem instead of stopping at the first.
    async fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut removed = !self.applied;
        if self.applied && self.daemon.is_some() {
            say(&format!("removing service `{SERVICE}` (its rules and containers)"));
            match self.remove_service().await {
                Ok(()) => removed = true,
                Err(e) => problems.push(format!("removing the service through the daemon: {e}")),
            }
        }
        if let Some(mut child) = self.daemon.take() {
            say("stopping the demo's daemon");
            if let Err(e) = stop_child(&mut child).await {
                problems.push(e);
            }
        }
        // The table, the label and the DOCKER-USER comment are the demo's own, so after
        // its daemon is gone anything of them that is left can go: after a failed
        // removal, but also an empty table that a refused first release leaves.
        if self.daemon_started {
            let (found, failed) = self.remove_leftovers().await;
            if !found.is_empty() {
                say(&format!("removed what the daemon left behind: {}", found.join(", ")));
                if removed {
                    tracing::debug!("the service was removed, yet these were left: {}", found.join(", "));
                }
            }
            problems.extend(failed);
            // Its claim on the demo's table: the daemon leaves the lock file on purpose
            // (unlinking a lock file races), the demo knows nobody else holds it now.
            let lock = crate::daemon::table_lock::lock_path(Path::new(crate::daemon::table_lock::LOCK_DIR), &self.names.table);
            if let Err(e) = std::fs::remove_file(&lock) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("removing {}: {e}", lock.display()));
                }
            }
        }
        if self.network_created {
            let name = self.names.network.clone();
            match self.engine().await {
                Ok(engine) => {
                    if let Err(e) = engine.remove_network(&name).await {
                        problems.push(format!("removing the Docker network {name}: {e}"));
                    }
                }
                Err(e) => problems.push(format!("removing the Docker network {name}: {e}")),
            }
        }
        if !self.keep_images && !self.images.is_empty() {
            say(&format!("removing the images {}", self.images.join(", ")));
            let images = std::mem::take(&mut self.images);
            match self.engine().await {
                Ok(engine) => {
                    for tag in images {
                        if let Err(e) = engine.remove_image(&tag).await {
                            problems.push(format!("removing image {tag}: {e}"));
                        }
                    }
                }
                Err(e) => problems.push(format!("removing the images: {e}")),
            }
        } else if self.keep_images && !self.images.is_empty() {
            say(&format!("kept the images {}", self.images.join(", ")));
        }
        if problems.is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                problems.push(format!("removing {}: {e}", self.dir.display()));
            }
        } else {
            say(&format!("the daemon's log is kept in {}", self.log_path().display()));
        }
        problems
    }

    /// Remove the service; an operation that the interrupted client started runs to its
    /// end in the daemon first, so wait for it.
    async fn remove_service(&self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            match crate::client::call(&self.socket, &Request::Remove { service: SERVICE.into(), volumes: false }).await {
                Ok(_) => return Ok(()),
                // Not registered: the apply never got as far.
                Err(f) if f.exit == Exit::Invalid => return Ok(()),
                Err(f) => {
                    let status = crate::client::call(&self.socket, &Request::Status { service: Some(SERVICE.into()) }).await;
                    let busy = status.ok().and_then(|v| v.get(0).map(|s| !s["operation"].is_null())).unwrap_or(false);
                    if !busy || started.elapsed() > BUSY_WAIT {
                        return Err(f.message);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Containers labelled with the demo's instance, its table and its DOCKER-USER rule,
    /// removed directly; returns what was found and what could not be removed.
    /// `route_localnet` values are the daemon's to restore (it records what they were).
    async fn remove_leftovers(&mut self) -> (Vec<String>, Vec<String>) {
        let (mut found, mut problems) = (Vec::new(), Vec::new());
        let instance = self.names.instance.clone();
        match self.engine().await {
            Ok(engine) => match engine.list_instance(instance).await {
                Ok(list) => {
                    for c in list {
                        found.push(format!("container {}", c.name));
                        if let Err(e) = engine.remove(c.id.clone()).await {
                            problems.push(e.to_string());
                        }
                    }
                }
                Err(e) => problems.push(e.to_string()),
            },
            Err(e) => problems.push(e.to_string()),
        }
        let firewall = NftFirewall::new();
        let table = &self.names.table;
        if let Err(e) = firewall.remove_forward_accept(table, MARK) {
            problems.push(e.to_string());
        }
        match firewall.table_exists(table) {
            Ok(false) => {}
            Ok(true) => {
                found.push(format!("nftables table inet {table}"));
                if let Err(e) = firewall.delete_table(table) {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        (found, problems)
    }
}

/// SIGTERM (the daemon leaves the kernel rules in place and exits), SIGKILL if it hangs.
async fn stop_child(child: &mut tokio::process::Child) -> Result<(), String> {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM) {
            return Err(format!("cannot signal the demo's daemon (pid {pid}): {e}"));
        }
    }
    match tokio::time::timeout(DAEMON_STOP_TIMEOUT, child.wait()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("waiting for the demo's daemon: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("the demo's daemon did not stop within {DAEMON_STOP_TIMEOUT:?}; killed"))
        }
    }
}

/// The last `lines` lines of a log file, for an error message.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_demo_manifest_is_valid_and_drains_quickly() {
        let names = Names::new("cutover-demo").unwrap();
        assert_eq!(names.table, "cutover_demo");
        assert_eq!(names.images, ["cutover-demo:v1".to_string(), "cutover-demo:v2".to_string()]);
        let m = Manifest::parse(Path::new("demo.yaml"), &manifest_text(&names, 18080)).unwrap();
        assert_eq!(m.name, SERVICE);
        assert_eq!(m.ports[0].host, 18080);
        assert_eq!(m.drain_timeout, Duration::from_secs(3));
        assert_eq!(m.health.kind, crate::manifest::HealthKind::Http);
        assert_eq!(m.image, "cutover-demo:v1");
        assert_eq!(m.network, "cutover-demo");
    }

    #[test]
    fn lab_names_are_checked() {
        assert!(Names::new("demo-test-12").is_ok());
        for bad in ["", "Demo", "-x", "a b", "a_b", &"a".repeat(41)] {
            assert!(Names::new(bad).is_err(), "{bad:?}");
        }
    }
}
