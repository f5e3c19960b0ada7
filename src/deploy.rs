//! The release state machine: deploy, rollback, apply, remove and the restart-time
//! reconcile, over the [`Engine`], [`Firewall`] and [`Checks`] traits.
//!
//! Owns the order of the steps and what is recorded before each (see `state::Phase`):
//! start the new release unpublished, gate on health (and on its IPv6 path being usable,
//! see `dad`), switch the host ports in one transaction, drain and stop the old release,
//! prune, record. Any failure before the switch undoes the new release and leaves the old
//! one and every rule untouched. Does not know how rules or containers are made: that is
//! `nat` and `docker`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{mpsc, Mutex};

use crate::dad::Ipv6Readiness;
use crate::docker::{ContainerInfo, ContainerSpec, DockerError, Engine, LABEL_INSTANCE, LABEL_RELEASE, LABEL_SERVICE};
use crate::manifest::{HealthKind, HealthSpec, Manifest, PortSpec, Protocol, PullPolicy};
use crate::nat::{Firewall, NatError};
use crate::plan::{self, Bridge, Desired, Ruleset, Target, Traffic};
use crate::state::{
    now, HistoryEntry, Operation, OperationKind, Phase, Release, ReleaseStatus, ServiceState, State, StateError,
    StateStore,
};

/// Why a release operation did not happen. The old release still serves in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("service `{0}` is busy with another operation; wait for it to finish and try again")]
    Busy(String),
    #[error("no service `{0}` is registered (see `cutover status`)")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("release {release} of `{service}` is refused: {reason}{}", logs_suffix(.logs))]
    Unhealthy { service: String, release: u32, reason: String, logs: String },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Nat(#[from] NatError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Handoff(#[from] crate::handoff::brokers::BrokersError),
}

fn logs_suffix(logs: &str) -> String {
    if logs.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of its log ---\n{}", logs.trim_end())
    }
}

impl ReleaseError {
    /// The API error code (mapped to exit codes by the client).
    pub fn code(&self) -> &'static str {
        match self {
            ReleaseError::Busy(_) => "busy",
            ReleaseError::NotFound(_) | ReleaseError::Invalid(_) => "invalid",
            _ => "refused",
        }
    }
}

/// Health probing and connection counting, as the state machine needs them.
pub trait Checks: Send + Sync + 'static {
    /// One health probe of `container` (http/tcp kinds).
    fn probe(&self, health: HealthSpec, addr: std::net::SocketAddr) -> BoxFuture<'_, Result<(), String>>;
    /// Open TCP connections on `ports` (local side) inside the network namespace of
    /// `pid`; the release's own outgoing connections (a database pool) do not count.
    fn open_connections(&self, pid: u32, ports: Vec<u16>) -> BoxFuture<'_, Result<usize, String>>;
    /// Ports host processes listen on (TCP) or have bound (UDP), each with the address it
    /// is bound to (`None`: every address).
    fn host_ports(&self) -> Result<BTreeSet<(Protocol, u16, Option<std::net::IpAddr>)>, String>;
    /// Delete the conntrack entries of `protocol` flows to host `port` that were NAT'd
    /// to `addr` (either family), so their next packets are NAT'd afresh.
    fn forget_flows(&self, protocol: Protocol, port: u16, addr: IpAddr) -> Result<(), String>;
    /// UDP flows to host `port` answered by `addr` (either family) that carried a packet
    /// within `idle`: they keep an old release draining. Defaults to none for fakes
    /// without UDP.
    fn busy_udp_flows(&self, _port: u16, _addr: IpAddr, _idle: Duration) -> Result<usize, String> {
        Ok(0)
    }
    /// Whether IPv6 traffic reaches `addr`, the IPv6 address of the release whose process
    /// is `pid`: no address on the path (its own, the host's on its bridge) is still in
    /// duplicate address detection. Defaults to usable for fakes without IPv6.
    fn ipv6_readiness(&self, _pid: u32, _addr: std::net::Ipv6Addr) -> BoxFuture<'_, Result<Ipv6Readiness, String>> {
        Box::pin(async { Ok(Ipv6Readiness::Usable) })
    }
}

/// How often the IPv6 path of an otherwise healthy release is read again: duplicate
/// address detection ends at a moment the health interval knows nothing about.
const IPV6_POLL: Duration = Duration::from_millis(50);

/// What the state machine reports while it works (sent to the CLI as progress).
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub service: String,
    pub release: u32,
    pub step: &'static str,
    pub message: String,
    /// (done, total) for bars: health wait in ms of the deadline, drain connections left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

/// The outcome as the CLI reads it back.
pub type OutcomeView = Outcome;

pub type ProgressTx = mpsc::UnboundedSender<Progress>;

/// What a completed operation reports.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Outcome {
    pub service: String,
    pub from: Option<u32>,
    pub to: u32,
    pub outcome: String,
    pub health_ms: Option<u64>,
    pub switch_us: Option<u64>,
    pub drain_ms: Option<u64>,
    /// Creating and starting (deploy) or restarting (rollback) the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    /// The whole operation, as the daemon saw it. `total - start - health` is cutover's
    /// own cost of a release (plus the drain, when connections were open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// `remove --volumes`: the volumes deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_removed: Option<Vec<String>>,
}

/// Settings of the daemon that shape every release.
#[derive(Debug, Clone)]
pub struct Settings {
    pub table: String,
    pub mark: u32,
    pub instance: String,
    /// Poll interval of the drain watcher.
    pub drain_poll: Duration,
    /// Test hook: stop at this step of every release (as if the daemon hung there), so
    /// a test can kill the daemon at a known step.
    pub pause_at: Option<Phase>,
}

/// The data plane as last applied: lets a switch be a map-element change.
#[derive(Debug, Default)]
struct Dataplane {
    applied: Option<Ruleset>,
    bridges: BTreeMap<String, Option<Bridge>>,
    /// IPv6 address per container, with the IPv4 address it was read alongside: state
    /// records only IPv4, and a changed IPv4 address (engine restart) means re-read.
    addr6: BTreeMap<String, (std::net::Ipv4Addr, Option<std::net::Ipv6Addr>)>,
    /// Per service, what the counting rules had counted when a whole-table sync started
    /// them at zero again: added to the kernel's counts, so exported counters only grow.
    carried: BTreeMap<String, Traffic>,
}

/// The release engine of one daemon.
pub struct Releaser {
    engine: Arc<dyn Engine>,
    firewall: Arc<dyn Firewall>,
    checks: Arc<dyn Checks>,
    settings: Settings,
    store: StateStore,
    state: Mutex<State>,
    dataplane: Mutex<Dataplane>,
    /// Held from reading the state to recording a switch, so a refresh can never
    /// program a state that a concurrent switch has already moved past.
    switching: Mutex<()>,
    busy: StdMutex<HashSet<String>>,
    /// Brokers of handoff-mode services (see `handoff_mode`); None: such services are refused.
    handoff: Option<Arc<dyn crate::handoff::brokers::ServiceBrokers>>,
    /// metrics hook: where outcomes and timings are recorded (`--metrics`); None: nowhere.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Marks a service busy for the lifetime of the guard.
pub struct BusyGuard<'a> {
    busy: &'a StdMutex<HashSet<String>>,
    service: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(&self.service);
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Releaser {
    pub fn new(
        engine: Arc<dyn Engine>,
        firewall: Arc<dyn Firewall>,
        checks: Arc<dyn Checks>,
        settings: Settings,
        store: StateStore,
    ) -> Result<Releaser, ReleaseError> {
        let state = store.load()?;
        Ok(Releaser {
            engine,
            firewall,
            checks,
            settings,
            store,
            state: Mutex::new(state),
            dataplane: Mutex::new(Dataplane::default()),
            switching: Mutex::new(()),
            busy: StdMutex::new(HashSet::new()),
            handoff: None,
            metrics: None, // metrics hook
        })
    }

    /// metrics hook: record outcomes and timings into `metrics` (`daemon --metrics`).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Releaser {
        self.metrics = Some(metrics);
        self
    }

    /// metrics hook: a no-op when the daemon serves no metrics.
    fn observe(&self, record: impl FnOnce(&crate::metrics::Metrics)) {
        if let Some(m) = &self.metrics {
            record(m);
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A copy of the current state.
    pub async fn snapshot(&self) -> State {
        self.state.lock().await.clone()
    }

    /// Refuse a second operation on `service` while one runs.
    pub fn claim(&self, service: &str) -> Result<BusyGuard<'_>, ReleaseError> {
        let mut busy = self.busy.lock().map_err(|_| ReleaseError::Busy(service.to_string()))?;
        if !busy.insert(service.to_string()) {
            return Err(ReleaseError::Busy(service.to_string()));
        }
        Ok(BusyGuard { busy: &self.busy, service: service.to_string() })
    }

    /// Change the state and persist it before anything relies on the change.
    async fn commit<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, ReleaseError> {
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        let out = f(&mut next);
        self.store.save(&next)?;
        *state = next;
        Ok(out)
    }

    async fn bridge_of(&self, network: &str) -> Result<Option<Bridge>, ReleaseError> {
        {
            let dp = self.dataplane.lock().await;
            if let Some(b) = dp.bridges.get(network) {
                return Ok(b.clone());
            }
        }
        let b = self.engine.bridge(network.to_string()).await?;
        self.dataplane.lock().await.bridges.insert(network.to_string(), b.clone());
        Ok(b)
    }

    /// The IPv6 address of `release`'s container (cached per container and IPv4 address).
    async fn addr6_of(&self, release: &Release, addr: std::net::Ipv4Addr) -> Result<Option<std::net::Ipv6Addr>, ReleaseError> {
        if release.container_id.is_empty() {
            return Ok(None);
        }
        if let Some((v4, v6)) = self.dataplane.lock().await.addr6.get(&release.container_id) {
            if *v4 == addr {
                return Ok(*v6);
            }
        }
        let info = self.engine.inspect(release.container_id.clone(), release.manifest.network.clone()).await?;
        let v6 = info.and_then(|i| i.addr6);
        self.dataplane.lock().await.addr6.insert(release.container_id.clone(), (addr, v6));
        Ok(v6)
    }

    /// The addresses `release`'s flows were NAT'd to: its IPv4 address and, on a
    /// dual-stack network, its IPv6 address (conntrack keys each family apart).
    async fn flow_addrs(&self, release: &Release) -> Result<Vec<IpAddr>, ReleaseError> {
        let Some(addr) = release.addr else { return Ok(Vec::new()) };
        let addr6 = self.addr6_of(release, addr).await?;
        Ok(std::iter::once(IpAddr::V4(addr)).chain(addr6.map(IpAddr::V6)).collect())
    }

    /// Desired data plane for `state`, with `service` pointed at `release` if given.
    async fn desired(&self, state: &State, overriding: Option<(&str, u32)>) -> Result<Desired, ReleaseError> {
        let mut targets = Vec::new();
        let mut bridges = Vec::new();
        for (name, svc) in &state.services {
            if svc.manifest.handoff.is_some() {
                continue;
            }
            let active = match overriding {
                Some((s, r)) if s == name => Some(r),
                _ => svc.active,
            };
            let Some(release) = active.and_then(|n| svc.release(n)) else { continue };
            let Some(addr) = release.addr else { continue };
            if let Some(b) = self.bridge_of(&release.manifest.network).await? {
                bridges.push(b);
            }
            let addr6 = self.addr6_of(release, addr).await?;
            targets.extend(targets_of(name, release.number, &svc.manifest, addr, addr6));
        }
        Ok(Desired { table: self.settings.table.clone(), mark: self.settings.mark, targets, bridges })
    }

    /// Make the kernel match `desired`: a map-element transaction when only elements
    /// change, a whole-table transaction otherwise. Returns the time the kernel took.
    async fn program(&self, desired: &Desired) -> Result<Duration, ReleaseError> {
        let next = plan::ruleset(desired);
        let mut dp = self.dataplane.lock().await;
        let structural_change = match &dp.applied {
            Some(cur) => cur.chains != next.chains || cur.table != next.table,
            None => true,
        };
        // A table someone deleted is rebuilt whole. The check is a netlink round trip of
        // its own, so it stays out of the reported switch time, which is the transaction.
        let exists = self.firewall.table_exists(&next.table)?;
        let rebuild = structural_change || !exists;
        // A sync starts the counting rules at zero: read what they hold first (outside the
        // timed part), to carry it. Packets counted between this read and the commit are lost.
        let counted = if rebuild && exists { self.counts_before_sync(&next.table) } else { BTreeMap::new() };
        let started = Instant::now();
        if rebuild {
            self.firewall.sync(&next)?;
            for (service, traffic) in counted {
                *dp.carried.entry(service).or_default() += traffic;
            }
            let services = next.counted_services();
            dp.carried.retain(|service, _| services.contains(service.as_str()));
        } else if let Some(cur) = &dp.applied {
            let ops = plan::element_ops(&cur.elements, &next.elements);
            if !ops.is_empty() {
                self.firewall.apply_ops(&next.table, &next.map, &ops)?;
            }
        }
        let took = started.elapsed();
        dp.applied = Some(next);
        Ok(took)
    }

    /// The kernel's counts per service, or none (with a warning) when they cannot be read:
    /// losing them must not stop a sync.
    fn counts_before_sync(&self, table: &str) -> BTreeMap<String, Traffic> {
        self.firewall.counters(table).unwrap_or_else(|e| {
            tracing::warn!(table, error = %e, "cannot read the traffic counters before rewriting the table; what they counted is lost");
            BTreeMap::new()
        })
    }

    /// Packets and bytes of each NAT-mode service's forwarded connections, both directions:
    /// the kernel's counts plus what earlier whole-table syncs carried. Never decreases
    /// while the daemon runs and the service exists (a restart carries what the kernel
    /// still holds, at the first sync).
    pub async fn traffic(&self) -> Result<BTreeMap<String, Traffic>, ReleaseError> {
        let dp = self.dataplane.lock().await;
        let Some(applied) = &dp.applied else { return Ok(BTreeMap::new()) };
        let services = applied.counted_services();
        let mut out: BTreeMap<String, Traffic> = services.iter().map(|s| (s.to_string(), Traffic::default())).collect();
        for (service, traffic) in self.firewall.counters(&applied.table)? {
            if let Some(total) = out.get_mut(&service) {
                *total += traffic;
            }
        }
        for (service, traffic) in &dp.carried {
            if let Some(total) = out.get_mut(service) {
                *total += *traffic;
            }
        }
        Ok(out)
    }

    /// After a restart: rebuild the rules from state (one atomic transaction, so
    /// traffic never notices), finish or undo an interrupted operation, and re-assert
    /// the host settings.
    pub async fn reconcile(&self) -> Result<Vec<String>, ReleaseError> {
        // Handoff-mode services are restored (brokers, interrupted operations) there.
        let mut notes = self.handoff_reconcile().await?;
        let state = self.snapshot().await;
        for (name, svc) in &state.services {
            if svc.manifest.handoff.is_some() {
                continue; // handoff mode: done by handoff_reconcile
            }
            // Re-read addresses: they change when the engine restarts containers.
            for number in svc.active.into_iter().chain(svc.operation.as_ref().map(|o| o.to)) {
                let Some(rel) = svc.release(number) else { continue };
                match self.engine.inspect(ServiceState::container_ref(rel), rel.manifest.network.clone()).await? {
                    Some(mut info) => {
                        if !info.running && Some(number) == svc.active {
                            self.engine.start(rel.container_id.clone()).await?;
                            notes.push(format!("{name}: started release {number}'s container again"));
                            // A start hands out the address anew.
                            info = match self.engine.inspect(ServiceState::container_ref(rel), rel.manifest.network.clone()).await? {
                                Some(i) => i,
                                None => continue,
                            };
                        }
                        let addr = info.addr;
                        if addr.is_some() && addr != rel.addr {
                            let n = name.clone();
                            self.commit(move |s| {
                                if let Some(r) = s.services.get_mut(&n).and_then(|svc| svc.release_mut(number)) {
                                    r.addr = addr;
                                }
                            })
                            .await?;
                        }
                    }
                    None => notes.push(format!("{name}: the container of release {number} is gone")),
                }
            }
        }
        // Interrupted operations.
        let state = self.snapshot().await;
        for (name, svc) in &state.services {
            let Some(op) = svc.operation.clone() else { continue };
            if svc.manifest.handoff.is_some() {
                continue; // handoff mode: done by handoff_reconcile
            }
            let note = self.recover(name, svc, &op).await?;
            notes.push(note);
        }
        let state = self.snapshot().await;
        self.dataplane.lock().await.applied = None;
        let desired = self.desired(&state, None).await?;
        if state.services.values().any(|s| s.manifest.handoff.is_none()) {
            self.program(&desired).await?;
        } else {
            // Nothing to forward: leave no empty table behind.
            self.firewall.delete_table(&self.settings.table)?;
        }
        self.assert_host(&state, &desired).await?;
        Ok(notes)
    }

    /// After the engine came back (or a container of ours restarted): re-read the
    /// addresses of the active releases, stop kept releases the engine restarted, and
    /// re-assert the rules and host settings. Safe while an operation runs: it programs
    /// what the recorded state says.
    pub async fn refresh(&self) -> Result<(), ReleaseError> {
        let state = self.snapshot().await;
        let mut addrs = Vec::new();
        for (name, svc) in &state.services {
            for rel in &svc.releases {
                let network = rel.manifest.network.clone();
                if matches!(rel.status, ReleaseStatus::Failed | ReleaseStatus::Removed) {
                    // Removing it may have failed while the engine was away.
                    if !rel.container_id.is_empty() {
                        self.engine.remove(rel.container_id.clone()).await?;
                    }
                    continue;
                }
                let Some(info) = self.engine.inspect(ServiceState::container_ref(rel), network).await? else { continue };
                let serving = Some(rel.number) == svc.active || svc.operation.as_ref().is_some_and(|o| o.to == rel.number || o.from == Some(rel.number));
                if rel.status == ReleaseStatus::Stopped && info.running && !serving {
                    tracing::warn!(service = %name, release = rel.number, "a kept release was started by the engine; stopping it");
                    self.engine.stop(rel.container_id.clone(), rel.manifest.stop_timeout).await?;
                }
                if info.addr.is_some() && info.addr != rel.addr {
                    addrs.push((name.clone(), rel.number, info.addr));
                }
            }
        }
        if !addrs.is_empty() {
            tracing::info!(changed = addrs.len(), "release addresses changed; updating the rules");
            self.commit(move |s| {
                for (name, number, addr) in addrs {
                    if let Some(r) = s.services.get_mut(&name).and_then(|svc| svc.release_mut(number)) {
                        r.addr = addr;
                    }
                }
            })
            .await?;
        }
        let _switching = self.switching.lock().await;
        let state = self.snapshot().await;
        let desired = self.desired(&state, None).await?;
        self.program(&desired).await?;
        self.assert_host(&state, &desired).await
    }

    /// Follow the engine: refresh on our containers' lifecycle events and whenever the
    /// event stream comes back after the engine went away. Runs until the daemon stops.
    pub async fn watch_engine(&self) {
        let mut was_down = false;
        loop {
            let mut events = self.engine.events(self.settings.instance.clone());
            if was_down {
                tracing::info!("the Docker engine is back; re-asserting releases and rules");
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "refresh after the engine came back");
                }
            }
            while let Some(event) = futures_util::StreamExt::next(&mut events).await {
                match event {
                    Ok((_, action)) if matches!(action.as_str(), "start" | "restart" | "unpause") => {
                        if let Err(e) = self.refresh().await {
                            tracing::warn!(error = %e, "refresh after a container event");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the Docker engine's event stream");
                        break;
                    }
                }
            }
            was_down = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Finish (after the switch) or undo (before it) an interrupted operation.
    async fn recover(&self, name: &str, svc: &ServiceState, op: &Operation) -> Result<String, ReleaseError> {
        let to = svc.release(op.to).cloned();
        let from = op.from.and_then(|n| svc.release(n)).cloned();
        if op.phase < Phase::Switched {
            // Undo: the old release keeps serving.
            if let Some(to) = &to {
                match op.kind {
                    OperationKind::Deploy => self.engine.remove(ServiceState::container_ref(to)).await?,
                    OperationKind::Rollback => self.engine.stop(ServiceState::container_ref(to), to.manifest.stop_timeout).await?,
                }
            }
            let name2 = name.to_string();
            let op2 = op.clone();
            self.commit(move |s| {
                if let Some(svc) = s.services.get_mut(&name2) {
                    if let Some(r) = svc.release_mut(op2.to) {
                        r.status = match op2.kind {
                            OperationKind::Deploy => ReleaseStatus::Failed,
                            OperationKind::Rollback => ReleaseStatus::Stopped,
                        };
                    }
                    svc.operation = None;
                    svc.record(HistoryEntry::untimed(op2.kind, op2.from, op2.to, "undone", "the daemon stopped before the switch; undone at restart"));
                }
            })
            .await?;
            self.observe(|m| m.release(name, op.kind, "undone")); // metrics hook
            Ok(format!("{name}: undid the interrupted {:?} to release {} (it had not been switched)", op.kind, op.to))
        } else {
            if let Some(from) = &from {
                self.engine.stop(from.container_id.clone(), from.manifest.stop_timeout).await?;
            }
            if let Some(to) = &to {
                self.engine.keep_running(to.container_id.clone()).await?;
            }
            let name2 = name.to_string();
            let op2 = op.clone();
            self.commit(move |s| {
                if let Some(svc) = s.services.get_mut(&name2) {
                    svc.active = Some(op2.to);
                    if let Some(r) = svc.release_mut(op2.to) {
                        r.status = ReleaseStatus::Active;
                    }
                    if let Some(r) = op2.from.and_then(|f| svc.release_mut(f)) {
                        r.status = ReleaseStatus::Stopped;
                        r.stopped_at = Some(now());
                    }
                    svc.operation = None;
                    svc.record(HistoryEntry::untimed(op2.kind, op2.from, op2.to, "finished_after_restart", "the daemon stopped after the switch; finished at restart"));
                }
            })
            .await?;
            self.observe(|m| m.release(name, op.kind, "finished_after_restart")); // metrics hook
            Ok(format!("{name}: finished the interrupted {:?} to release {}", op.kind, op.to))
        }
    }

    /// route_localnet on the bridges in use, and the DOCKER-USER accept while any
    /// service exists.
    async fn assert_host(&self, state: &State, desired: &Desired) -> Result<(), ReleaseError> {
        let any_nat = state.services.values().any(|s| s.manifest.handoff.is_none());
        if any_nat {
            self.firewall.ensure_forward_accept(&self.settings.table, self.settings.mark)?;
        } else {
            self.firewall.remove_forward_accept(&self.settings.table, self.settings.mark)?;
        }
        let mut changed = BTreeMap::new();
        for b in &desired.bridges {
            if state.route_localnet_before.contains_key(&b.ifname) {
                continue;
            }
            let before = crate::host::set_route_localnet(&b.ifname, true)
                .map_err(|e| ReleaseError::Refused(format!("cannot enable route_localnet on {}: {e}", b.ifname)))?;
            changed.insert(b.ifname.clone(), before);
        }
        if !changed.is_empty() {
            self.commit(move |s| s.route_localnet_before.extend(changed)).await?;
        }
        Ok(())
    }

    /// Refuse host ports other services, other containers or host processes use.
    async fn check_ports(&self, manifest: &Manifest) -> Result<(), ReleaseError> {
        let state = self.snapshot().await;
        // A port is taken when the protocol and number match and the host addresses overlap
        // (`host_ip` unset means every address).
        let clash = |p: &PortSpec, protocol: Protocol, port: u16, addr: Option<std::net::IpAddr>| {
            p.protocol == protocol && p.host == port && crate::manifest::host_addresses_overlap(p.host_ip, addr)
        };
        let at = |p: &PortSpec| p.host_ip.map(|ip| format!(" on {ip}")).unwrap_or_default();
        for p in &manifest.ports {
            for (other, svc) in &state.services {
                if other != &manifest.name && svc.manifest.ports.iter().any(|q| clash(p, q.protocol, q.host, q.host_ip)) {
                    return Err(ReleaseError::Conflict(format!(
                        "host port {}/{}{} is already used by service `{other}`",
                        p.host,
                        p.protocol,
                        at(p)
                    )));
                }
            }
        }
        let published = self.engine.published().await?;
        for p in &manifest.ports {
            if let Some(c) = published.iter().find(|x| clash(p, x.protocol, x.port, x.host_ip)) {
                return Err(ReleaseError::Conflict(format!(
                    "host port {}/{}{} is published by container `{}`; pick another port or unpublish it",
                    p.host,
                    p.protocol,
                    at(p),
                    c.container
                )));
            }
        }
        let listening = self.checks.host_ports().map_err(ReleaseError::Refused)?;
        for p in &manifest.ports {
            if listening.iter().any(|(protocol, port, addr)| clash(p, *protocol, *port, *addr)) {
                return Err(ReleaseError::Conflict(format!(
                    "host port {}/{}{} is in use by a process on this host (see `ss -lntup`); pick another port",
                    p.host,
                    p.protocol,
                    at(p)
                )));
            }
        }
        Ok(())
    }

    /// `apply`: register or update a service; deploy when what the container runs changed.
    pub async fn apply(&self, manifest: Manifest, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        self.apply_with(manifest, None, progress).await
    }

    /// [`Releaser::apply`], with the manifest's pull policy overridden for this release.
    pub async fn apply_with(&self, manifest: Manifest, pull: Option<PullPolicy>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(&manifest.name)?;
        // Handoff mode: refuse mode switches, serve the listeners (see handoff_mode).
        self.handoff_prepare(&manifest).await?;
        self.check_ports(&manifest).await?;
        let name = manifest.name.clone();
        let existing = self.snapshot().await.services.get(&name).cloned();
        match existing {
            None => {
                let m = manifest.clone();
                self.commit(move |s| {
                    s.services.insert(m.name.clone(), ServiceState::new(m));
                })
                .await?;
                let result = self.release_new(&name, manifest.image.clone(), pull, progress).await;
                if result.is_err() {
                    // A service whose first release failed was never there.
                    let n = name.clone();
                    self.commit(move |s| {
                        s.services.remove(&n);
                    })
                    .await?;
                }
                result
            }
            Some(svc) => {
                let active = svc.active_release().cloned();
                let needs_release = match &active {
                    None => true,
                    Some(r) => container_differs(&r.manifest, &manifest),
                };
                let m = manifest.clone();
                let n = name.clone();
                let old_manifest = svc.manifest.clone();
                self.commit(move |s| {
                    if let Some(svc) = s.services.get_mut(&n) {
                        svc.manifest = m;
                    }
                })
                .await?;
                if needs_release {
                    let result = self.release_new(&name, manifest.image.clone(), pull, progress).await;
                    if result.is_err() {
                        let n = name.clone();
                        self.commit(move |s| {
                            if let Some(svc) = s.services.get_mut(&n) {
                                svc.manifest = old_manifest;
                            }
                        })
                        .await?;
                    }
                    result
                } else {
                    let state = self.snapshot().await;
                    let desired = self.desired(&state, None).await?;
                    let took = self.program(&desired).await?;
                    let to = active.map(|r| r.number).unwrap_or(0);
                    Ok(Outcome {
                        service: name,
                        from: Some(to),
                        to,
                        outcome: "updated".into(),
                        health_ms: None,
                        switch_us: Some(u64::try_from(took.as_micros()).unwrap_or(u64::MAX)),
                        drain_ms: None,
                        ..Default::default()
                    })
                }
            }
        }
    }

    /// `deploy NAME --image REF`.
    pub async fn deploy(&self, service: &str, image: &str, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        self.deploy_with(service, image, None, progress).await
    }

    /// [`Releaser::deploy`], with the manifest's pull policy overridden for this release.
    pub async fn deploy_with(
        &self,
        service: &str,
        image: &str,
        pull: Option<PullPolicy>,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(service)?;
        if !self.snapshot().await.services.contains_key(service) {
            return Err(ReleaseError::NotFound(service.to_string()));
        }
        // Checked before anything is recorded: a typo spends no release number.
        crate::docker::registry::check_reference(image).map_err(ReleaseError::Invalid)?;
        let name = service.to_string();
        let img = image.to_string();
        let old = self
            .commit(move |s| {
                s.services.get_mut(&name).map(|svc| std::mem::replace(&mut svc.manifest.image, img))
            })
            .await?;
        let result = self.release_new(service, image.to_string(), pull, progress).await;
        if result.is_err() {
            let name = service.to_string();
            self.commit(move |s| {
                if let (Some(svc), Some(old)) = (s.services.get_mut(&name), old) {
                    svc.manifest.image = old;
                }
            })
            .await?;
        }
        result
    }

    /// Start a new release of `service` running `image` and cut over to it.
    async fn release_new(
        &self,
        service: &str,
        image: String,
        pull: Option<PullPolicy>,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        let begun = Instant::now();
        let svc = self.snapshot().await.services.get(service).cloned().ok_or_else(|| ReleaseError::NotFound(service.into()))?;
        let number = svc.next_release;
        let from = svc.active;
        // The image first, before anything is recorded or started: a failed pull changes
        // nothing, and the pull's time is not part of the switch.
        let policy = pull.unwrap_or(svc.manifest.pull);
        let report: crate::docker::registry::ProgressFn<'_> =
            Box::new(|line: String| self.emit(progress, service, number, "pull", line));
        self.engine.ensure_image(image.clone(), policy, report).await?;
        if svc.manifest.handoff.is_some() {
            return self.handoff_release_new(service, image, progress).await; // see handoff_mode
        }
        let mut manifest = svc.manifest.clone();
        manifest.image = image.clone();
        let container = format!("cutover-{service}-{number}");
        let spec = ContainerSpec {
            name: container.clone(),
            image: image.clone(),
            env: manifest.env.clone(),
            command: manifest.command.clone(),
            entrypoint: None,
            network: manifest.network.clone(),
            labels: BTreeMap::from([
                (LABEL_SERVICE.to_string(), service.to_string()),
                (LABEL_RELEASE.to_string(), number.to_string()),
                (LABEL_INSTANCE.to_string(), self.settings.instance.clone()),
            ]),
            stop_signal: manifest.stop_signal.clone(),
            stop_timeout: manifest.stop_timeout,
            mounts: Vec::new(),
            options: manifest.container_options(),
        };
        // Record the intent first: a crash from here on is undone at restart.
        self.record_new_release(service, number, from, &manifest, &container, &image).await?;
        self.emit(progress, service, number, "start", format!("starting release {number} ({image}) as {container}"));
        let start_began = Instant::now();
        let started = self.engine.run(spec).await;
        let start_ms = ms(start_began.elapsed());
        let info = match started {
            Ok(info) => info,
            Err(e) => {
                self.abandon(service, number, OperationKind::Deploy, from, "failed", &e.to_string()).await?;
                return Err(e.into());
            }
        };
        let s = service.to_string();
        let (id, addr) = (info.id.clone(), info.addr);
        self.commit(move |st| {
            if let Some(r) = st.services.get_mut(&s).and_then(|svc| svc.release_mut(number)) {
                r.container_id = id;
                r.addr = addr;
            }
        })
        .await?;
        self.checkpoint(service, Phase::Starting).await;
        let mut outcome = self.cut_over(service, OperationKind::Deploy, from, number, &manifest, info, progress).await?;
        outcome.start_ms = Some(start_ms);
        outcome.total_ms = Some(ms(begun.elapsed()));
        Ok(outcome)
    }

    /// Record a new release as starting, and the deploy operation, before its container
    /// exists: a crash from then on is undone at restart.
    async fn record_new_release(
        &self,
        service: &str,
        number: u32,
        from: Option<u32>,
        manifest: &Manifest,
        container: &str,
        image: &str,
    ) -> Result<(), ReleaseError> {
        let s = service.to_string();
        let (m, c, img) = (manifest.clone(), container.to_string(), image.to_string());
        self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.next_release = number + 1;
                svc.releases.push(Release {
                    number,
                    image: img,
                    container: c,
                    container_id: String::new(),
                    status: ReleaseStatus::Starting,
                    addr: None,
                    created_at: now(),
                    activated_at: None,
                    stopped_at: None,
                    manifest: m,
                });
                svc.operation = Some(Operation { kind: OperationKind::Deploy, from, to: number, phase: Phase::Starting, started_at: now() });
            }
        })
        .await
    }

    /// `rollback NAME [--to N]`.
    pub async fn rollback(&self, service: &str, to: Option<u32>, progress: &ProgressTx) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(service)?;
        let svc = self.snapshot().await.services.get(service).cloned().ok_or_else(|| ReleaseError::NotFound(service.into()))?;
        let target = match to {
            Some(n) => svc.release(n).cloned().ok_or_else(|| {
                ReleaseError::Invalid(format!("`{service}` has no release {n} (see `cutover history {service}`)"))
            })?,
            None => svc.previous_kept().cloned().ok_or_else(|| {
                ReleaseError::Refused(format!("`{service}` has no earlier release kept to roll back to"))
            })?,
        };
        if Some(target.number) == svc.active {
            return Err(ReleaseError::Refused(format!("release {} of `{service}` is already active", target.number)));
        }
        if target.status != ReleaseStatus::Stopped {
            return Err(ReleaseError::Refused(format!(
                "release {} of `{service}` is {:?}, not kept; only stopped, kept releases can be rolled back to",
                target.number, target.status
            )));
        }
        let from = svc.active;
        let number = target.number;
        let s = service.to_string();
        self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.operation = Some(Operation { kind: OperationKind::Rollback, from, to: number, phase: Phase::Starting, started_at: now() });
                if let Some(r) = svc.release_mut(number) {
                    r.status = ReleaseStatus::Starting;
                }
            }
        })
        .await?;
        self.emit(progress, service, number, "start", format!("starting kept release {number} ({})", target.container));
        let start_began = Instant::now();
        let started = async {
            self.engine.start(target.container_id.clone()).await?;
            self.engine
                .inspect(target.container_id.clone(), target.manifest.network.clone())
                .await?
                .ok_or_else(|| ReleaseError::Refused(format!("the container of release {number} is gone")))
        }
        .await;
        let start_ms = ms(start_began.elapsed());
        let info = match started {
            Ok(i) => i,
            Err(e) => {
                self.abandon(service, number, OperationKind::Rollback, from, "failed", &e.to_string()).await?;
                return Err(e);
            }
        };
        let s = service.to_string();
        let addr = info.addr;
        self.commit(move |st| {
            if let Some(r) = st.services.get_mut(&s).and_then(|svc| svc.release_mut(number)) {
                r.addr = addr;
            }
        })
        .await?;
        self.checkpoint(service, Phase::Starting).await;
        let manifest = target.manifest.clone();
        let mut outcome = self.cut_over(service, OperationKind::Rollback, from, number, &manifest, info, progress).await?;
        outcome.start_ms = Some(start_ms);
        outcome.total_ms = Some(ms(start_began.elapsed()));
        Ok(outcome)
    }

    /// Health gate, switch, drain, stop, prune, record.
    #[allow(clippy::too_many_arguments)]
    async fn cut_over(
        &self,
        service: &str,
        kind: OperationKind,
        from: Option<u32>,
        to: u32,
        manifest: &Manifest,
        info: ContainerInfo,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        if manifest.handoff.is_some() {
            return self.handoff_cut_over(service, kind, from, to, manifest, info, progress).await; // see handoff_mode
        }
        let health_started = Instant::now();
        if let Err(reason) = self.wait_healthy(service, to, manifest, &info, progress).await {
            let logs = self.engine.logs_tail(info.id.clone(), 20).await.unwrap_or_default();
            self.abandon(service, to, kind, from, "refused", &reason).await?;
            return Err(ReleaseError::Unhealthy { service: service.into(), release: to, reason, logs });
        }
        let health_ms = ms(health_started.elapsed());
        self.observe(|m| m.health_wait(service, Duration::from_millis(health_ms))); // metrics hook
        self.set_phase(service, Phase::Healthy).await?;
        self.emit(progress, service, to, "healthy", format!("release {to} is healthy after {health_ms} ms"));

        // The switch: one transaction, recorded before anyone else programs.
        let switch_guard = self.switching.lock().await;
        let state = self.snapshot().await;
        let desired = self.desired(&state, Some((service, to))).await?;
        let switched = match self.program(&desired).await {
            Ok(t) => t,
            Err(e) => {
                self.abandon(service, to, kind, from, "failed", &e.to_string()).await?;
                return Err(e);
            }
        };
        if let Err(e) = self.assert_host(&self.snapshot().await, &desired).await {
            tracing::warn!(service, error = %e, "host settings");
        }
        let switch_us = u64::try_from(switched.as_micros()).unwrap_or(u64::MAX);
        self.record_switched(service, from, to).await?;
        drop(switch_guard);
        self.observe(|m| m.switched(service, switched)); // metrics hook
        self.emit(progress, service, to, "switched", format!("host ports now point at release {to} (switch took {switch_us} µs)"));
        self.checkpoint(service, Phase::Switched).await;

        // Drain and stop the old release.
        let mut drain_ms = None;
        if let Some(old) = from.and_then(|f| state.services.get(service).and_then(|svc| svc.release(f)).cloned()) {
            self.set_phase(service, Phase::Draining).await?;
            let started = Instant::now();
            if let Err(reason) = self.drain_and_watch(service, to, &old, manifest, &info, progress).await {
                return self.switch_back(service, kind, &old, to, &info, &reason, progress).await;
            }
            drain_ms = Some(ms(started.elapsed()));
            self.observe(|m| m.drained(service, started.elapsed())); // metrics hook
            if manifest.ports.iter().any(|p| p.protocol == Protocol::Udp) {
                let addrs = self.flow_addrs(&old).await.unwrap_or_else(|e| {
                    // An IPv6 flow left bound to the old release loses its datagrams until
                    // its entry goes (expiry, or the engine's cleanup once it stopped).
                    tracing::warn!(service, error = %e, "cannot read the old release's IPv6 address; deleting its IPv4 UDP flows only");
                    old.addr.map(IpAddr::V4).into_iter().collect()
                });
                for p in manifest.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
                    for addr in &addrs {
                        if let Err(e) = self.checks.forget_flows(Protocol::Udp, p.host, *addr) {
                            tracing::warn!(service, error = %e, "could not delete old UDP flows");
                        }
                    }
                }
            }
            self.emit(progress, service, old.number, "stop", format!("stopping release {} ({})", old.number, old.manifest.stop_signal));
            if let Err(e) = self.engine.stop(old.container_id.clone(), old.manifest.stop_timeout).await {
                tracing::warn!(service, error = %e, "stopping the old release failed");
            }
            self.set_phase(service, Phase::Stopped).await?;
        }

        self.finish_release(service, kind, from, to, &info.id, Some(health_ms), Some(switch_us), drain_ms).await?;
        self.observe(|m| m.release(service, kind, "switched")); // metrics hook
        self.emit(progress, service, to, "done", format!("release {to} of {service} is live"));
        Ok(Outcome {
            service: service.to_string(),
            from,
            to,
            outcome: "switched".into(),
            health_ms: Some(health_ms),
            switch_us: Some(switch_us),
            drain_ms,
            ..Default::default()
        })
    }

    /// The switch is in effect (both modes): `to` serves, `from` drains. Recorded before
    /// anything relies on it, so a restart from here on finishes the release instead of
    /// undoing it.
    async fn record_switched(&self, service: &str, from: Option<u32>, to: u32) -> Result<(), ReleaseError> {
        let s = service.to_string();
        self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.active = Some(to);
                if let Some(r) = svc.release_mut(to) {
                    r.status = ReleaseStatus::Active;
                    r.activated_at = Some(now());
                }
                if let Some(r) = from.and_then(|f| svc.release_mut(f)) {
                    r.status = ReleaseStatus::Draining;
                }
                if let Some(op) = svc.operation.as_mut() {
                    op.phase = Phase::Switched;
                }
            }
        })
        .await
    }

    /// The old release has stopped (both modes): let the engine restart the new one from
    /// now on, keep the old one for rollback, prune beyond `keep`, close the operation
    /// and record it in the history.
    #[allow(clippy::too_many_arguments)]
    async fn finish_release(
        &self,
        service: &str,
        kind: OperationKind,
        from: Option<u32>,
        to: u32,
        container_id: &str,
        health_ms: Option<u64>,
        switch_us: Option<u64>,
        drain_ms: Option<u64>,
    ) -> Result<(), ReleaseError> {
        // Established: from now on the engine restarts it after a crash or a reboot.
        if let Err(e) = self.engine.keep_running(container_id.to_string()).await {
            tracing::warn!(service, error = %e, "cannot set the new release's restart policy");
        }
        let s = service.to_string();
        let pruned = self
            .commit(move |st| {
                let Some(svc) = st.services.get_mut(&s) else { return Vec::new() };
                if let Some(r) = from.and_then(|f| svc.release_mut(f)) {
                    r.status = ReleaseStatus::Stopped;
                    r.stopped_at = Some(now());
                }
                let mut ids = Vec::new();
                for n in svc.beyond_keep(from) {
                    if let Some(r) = svc.release_mut(n) {
                        r.status = ReleaseStatus::Removed;
                        ids.push(r.container_id.clone());
                    }
                }
                svc.operation = None;
                svc.record(HistoryEntry {
                    at: now(),
                    kind,
                    from,
                    to,
                    outcome: "switched".into(),
                    message: String::new(),
                    health_ms,
                    switch_us,
                    drain_ms,
                });
                ids
            })
            .await?;
        for id in pruned {
            if let Err(e) = self.engine.remove(id).await {
                tracing::warn!(service, error = %e, "pruning an old release failed");
            }
        }
        Ok(())
    }

    async fn wait_healthy(
        &self,
        service: &str,
        release: u32,
        manifest: &Manifest,
        info: &ContainerInfo,
        progress: &ProgressTx,
    ) -> Result<(), String> {
        let health = &manifest.health;
        let started = Instant::now();
        let deadline = started + health.deadline;
        let mut healthy = false;
        loop {
            let current = self
                .engine
                .inspect(info.id.clone(), manifest.network.clone())
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "its container disappeared".to_string())?;
            if !current.running {
                return Err(format!("its container exited with code {}", current.exit_code.unwrap_or(-1)));
            }
            if current.restarts > info.restarts {
                return Err(format!("its container crashed (exit code {}) and was restarted", current.exit_code.unwrap_or(-1)));
            }
            let verdict = match health.kind {
                HealthKind::None => Ok(()),
                HealthKind::Docker => match current.health.as_deref() {
                    Some("healthy") => Ok(()),
                    Some(s) => Err(format!("Docker reports it {s}")),
                    None => return Err("health type `docker` but the image has no HEALTHCHECK".into()),
                },
                // Passed once: only the IPv6 path is left to wait for, polled faster than
                // the health endpoint should be.
                _ if healthy => Ok(()),
                HealthKind::Http | HealthKind::Tcp => {
                    let addr = current.addr.ok_or_else(|| "it has no IPv4 address on its network".to_string())?;
                    let port = manifest.health_port().ok_or_else(|| "no port to check; set health.port".to_string())?;
                    self.checks.probe(health.clone(), (addr, port).into()).await
                }
            };
            // Healthy over IPv4 is not enough for IPv6 clients: the switch would send them
            // to an address the kernel still drops packets for.
            let (last, waiting, pause) = match verdict {
                Err(e) => (e, "health", health.interval),
                Ok(()) => {
                    healthy = true;
                    match self.ipv6_unready(&current).await? {
                        None => return Ok(()),
                        Some(what) => (what, "IPv6", health.interval.min(IPV6_POLL)),
                    }
                }
            };
            let now_ = Instant::now();
            if now_ >= deadline {
                return Err(format!("not healthy within {}: {last}", crate::manifest::format_duration(health.deadline)));
            }
            let _ = progress.send(Progress {
                service: service.to_string(),
                release,
                step: "health",
                message: format!("waiting for {waiting}: {last}"),
                elapsed_ms: Some(ms(now_ - started)),
                limit_ms: Some(ms(health.deadline)),
                connections: None,
            });
            tokio::time::sleep(pause.min(deadline - now_)).await;
        }
    }

    /// What keeps IPv6 traffic from a release with an IPv6 address (`Ok(None)`: nothing,
    /// or it has no IPv6 address). Err when it never will (an address failed duplicate
    /// address detection).
    async fn ipv6_unready(&self, current: &ContainerInfo) -> Result<Option<String>, String> {
        let Some(addr6) = current.addr6 else { return Ok(None) };
        let Some(pid) = current.pid else { return Ok(Some(format!("the container's process (to read the state of {addr6})"))) };
        match self.checks.ipv6_readiness(pid, addr6).await {
            Ok(Ipv6Readiness::Usable) => Ok(None),
            Ok(Ipv6Readiness::Waiting(what)) => Ok(Some(what)),
            Ok(Ipv6Readiness::Failed(why)) => Err(why),
            // Unreadable flags are no reason to refuse a release that answers: its process
            // may just have restarted. Keep waiting, within the deadline, naming the error.
            Err(e) => Ok(Some(format!("reading the state of {addr6}: {e}"))),
        }
    }

    /// Wait until the old release holds no connection (or its drain timeout passes),
    /// keeping it running at least `watch` long; meanwhile watch the new release. Err
    /// with the reason if the new release exits or fails its health check while the old
    /// one can still take the traffic back.
    async fn drain_and_watch(
        &self,
        service: &str,
        to: u32,
        old: &Release,
        manifest: &Manifest,
        new: &ContainerInfo,
        progress: &ProgressTx,
    ) -> Result<(), String> {
        let timeout = old.manifest.drain_timeout;
        let watch = manifest.watch;
        let started = Instant::now();
        let pid = match self.engine.inspect(old.container_id.clone(), old.manifest.network.clone()).await {
            Ok(Some(info)) => info.pid,
            _ => None,
        };
        let ports: Vec<u16> =
            old.manifest.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.container).collect();
        // UDP never closes: the old release still serves a UDP flow until it has been idle
        // for `udp_idle`; then (or at the drain timeout) the caller deletes its entries.
        let udp_ports: Vec<u16> =
            old.manifest.ports.iter().filter(|p| p.protocol == Protocol::Udp).map(|p| p.host).collect();
        // Both families: an IPv6 flow holds the old release as long as an IPv4 one.
        // `None`: its flows cannot be found, so only the drain timeout ends the drain.
        let udp_addrs = if udp_ports.is_empty() {
            Some(Vec::new())
        } else {
            self.flow_addrs(old).await.inspect_err(|e| {
                tracing::warn!(service, error = %e, "cannot read the old release's addresses; waiting out the drain timeout");
            }).ok()
        };
        let mut next_probe = Instant::now();
        // The engine's events tell of a crash within milliseconds; polling alone would
        // leave clients on a dead release for up to a poll interval.
        let mut events = self.engine.events(self.settings.instance.clone());
        let mut exit = new.pid.and_then(|pid| crate::host::watch_exit(pid).ok());
        loop {
            // The new release first: a failure here is worth more than a drain count.
            if let Some(reason) = self.new_release_failed(manifest, new, &mut next_probe).await {
                return Err(reason);
            }
            let tcp_open = match pid {
                // No TCP port: an empty list would count every connection of the release.
                _ if ports.is_empty() => 0,
                None => 0,
                Some(pid) => match self.checks.open_connections(pid, ports.clone()).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(service, error = %e, "cannot count the old release's connections; waiting out the drain timeout");
                        usize::MAX
                    }
                },
            };
            let mut udp_busy = if udp_addrs.is_some() { 0 } else { usize::MAX };
            for (port, addr) in udp_ports.iter().flat_map(|p| udp_addrs.iter().flatten().map(move |a| (*p, *a))) {
                let busy = self.checks.busy_udp_flows(port, addr, old.manifest.udp_idle).unwrap_or_else(|e| {
                    tracing::warn!(service, error = %e, "cannot read the old release's UDP flows; waiting out the drain timeout");
                    usize::MAX
                });
                udp_busy = udp_busy.saturating_add(busy);
            }
            let open = tcp_open.saturating_add(udp_busy);
            self.observe(|m| m.draining(service, old.number, (open != usize::MAX).then_some(open))); // metrics hook
            let elapsed = started.elapsed();
            let _ = progress.send(Progress {
                service: service.to_string(),
                release: to,
                step: "drain",
                message: if open == usize::MAX {
                    format!("draining release {}", old.number)
                } else {
                    format!("draining release {}: {open} connections left", old.number)
                },
                elapsed_ms: Some(ms(elapsed)),
                limit_ms: Some(ms(timeout)),
                connections: (open != usize::MAX).then_some(open),
            });
            if (open == 0 && elapsed >= watch) || elapsed >= timeout.max(watch) {
                return Ok(());
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.drain_poll) => {}
                () = async {
                    match exit.as_mut() {
                        Some(w) => w.exited().await,
                        None => std::future::pending().await,
                    }
                } => {
                    return Err("its main process exited".to_string());
                }
                event = futures_util::StreamExt::next(&mut events) => {
                    if let Some(Ok((id, action))) = event {
                        if id == new.id && matches!(action.as_str(), "die" | "oom" | "kill") {
                            next_probe = Instant::now();
                        }
                    } else {
                        // The stream ended (engine restarting): fall back to polling.
                        events = Box::pin(futures_util::stream::pending());
                    }
                }
            }
        }
    }

    /// Has the just-switched-to release died or become unhealthy?
    async fn new_release_failed(&self, manifest: &Manifest, new: &ContainerInfo, next_probe: &mut Instant) -> Option<String> {
        let current = match self.engine.inspect(new.id.clone(), manifest.network.clone()).await {
            Ok(Some(c)) => c,
            Ok(None) => return Some("its container disappeared".into()),
            // The engine may be restarting: not a verdict on the release.
            Err(_) => return None,
        };
        if !current.running {
            return Some(format!("its container exited with code {}", current.exit_code.unwrap_or(-1)));
        }
        if current.restarts > new.restarts {
            return Some(format!("its container crashed (exit code {}) and was restarted", current.exit_code.unwrap_or(-1)));
        }
        if Instant::now() < *next_probe {
            return None;
        }
        *next_probe = Instant::now() + manifest.health.interval;
        let health = &manifest.health;
        match health.kind {
            HealthKind::None => None,
            HealthKind::Docker => (current.health.as_deref() == Some("unhealthy")).then(|| "Docker reports it unhealthy".to_string()),
            HealthKind::Http | HealthKind::Tcp => {
                let (Some(addr), Some(port)) = (current.addr, manifest.health_port()) else { return None };
                self.checks.probe(health.clone(), (addr, port).into()).await.err()
            }
        }
    }

    /// The new release failed while the old one was still running: point the host
    /// ports back at the old release, remove the new one, and report it.
    #[allow(clippy::too_many_arguments)]
    async fn switch_back(
        &self,
        service: &str,
        kind: OperationKind,
        old: &Release,
        to: u32,
        new: &ContainerInfo,
        reason: &str,
        progress: &ProgressTx,
    ) -> Result<Outcome, ReleaseError> {
        tracing::error!(service, release = to, reason, "the new release failed after the switch; switching back");
        self.observe(|m| m.release(service, kind, "reverted")); // metrics hook
        let switch_guard = self.switching.lock().await;
        let state = self.snapshot().await;
        let desired = self.desired(&state, Some((service, old.number))).await?;
        self.program(&desired).await?;
        // Connections NAT'd to the dead release whose handshake has not completed would
        // keep retrying it: forget them, so their retransmitted SYNs reach the old one.
        let addrs = new.addr.map(IpAddr::V4).into_iter().chain(new.addr6.map(IpAddr::V6));
        for addr in addrs {
            for p in &old.manifest.ports {
                if let Err(e) = self.checks.forget_flows(p.protocol, p.host, addr) {
                    tracing::warn!(service, error = %e, "could not delete the failed release's flows");
                }
            }
        }
        self.emit(progress, service, old.number, "reverted", format!(
            "release {to} failed after the switch ({reason}); traffic is back on release {}", old.number
        ));
        let logs = self.engine.logs_tail(new.id.clone(), 20).await.unwrap_or_default();
        let s = service.to_string();
        let (from, reason_s) = (old.number, reason.to_string());
        self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                svc.active = Some(from);
                if let Some(r) = svc.release_mut(from) {
                    r.status = ReleaseStatus::Active;
                }
                if let Some(r) = svc.release_mut(to) {
                    r.status = match kind {
                        OperationKind::Deploy => ReleaseStatus::Failed,
                        OperationKind::Rollback => ReleaseStatus::Stopped,
                    };
                }
                if kind == OperationKind::Deploy {
                    svc.manifest.image = svc.release(from).map(|r| r.image.clone()).unwrap_or_default();
                }
                svc.operation = None;
                svc.record(HistoryEntry::untimed(kind, Some(from), to, "reverted", format!("failed after the switch: {reason_s}; switched back automatically")));
            }
        })
        .await?;
        drop(switch_guard);
        let undo = match kind {
            OperationKind::Deploy => self.engine.remove(new.id.clone()).await,
            OperationKind::Rollback => self.engine.stop(new.id.clone(), Duration::from_secs(1)).await,
        };
        if let Err(e) = undo {
            tracing::warn!(service, error = %e, "removing the failed release");
        }
        Err(ReleaseError::Unhealthy {
            service: service.to_string(),
            release: to,
            reason: format!("{reason} after the switch; traffic is back on release {}", old.number),
            logs,
        })
    }

    async fn set_phase(&self, service: &str, phase: Phase) -> Result<(), ReleaseError> {
        let s = service.to_string();
        self.commit(move |st| {
            if let Some(op) = st.services.get_mut(&s).and_then(|svc| svc.operation.as_mut()) {
                op.phase = phase;
            }
        })
        .await?;
        self.checkpoint(service, phase).await;
        Ok(())
    }

    /// The test hook of [`Settings::pause_at`].
    async fn checkpoint(&self, service: &str, phase: Phase) {
        if self.settings.pause_at == Some(phase) {
            tracing::warn!(service, ?phase, "paused at this step (--pause-at test hook)");
            std::future::pending::<()>().await;
        }
    }

    /// Undo a release that never got switched to: remove (deploy) or stop (rollback) its
    /// container, record why. Rules were not touched.
    async fn abandon(
        &self,
        service: &str,
        to: u32,
        kind: OperationKind,
        from: Option<u32>,
        outcome: &str,
        reason: &str,
    ) -> Result<(), ReleaseError> {
        self.observe(|m| m.release(service, kind, outcome)); // metrics hook: refused / failed
        let svc = self.snapshot().await.services.get(service).cloned();
        if let Some(rel) = svc.as_ref().and_then(|s| s.release(to)) {
            let id = ServiceState::container_ref(rel);
            let undone = match kind {
                OperationKind::Deploy => self.engine.remove(id).await,
                OperationKind::Rollback => self.engine.stop(id, rel.manifest.stop_timeout).await,
            };
            if let Err(e) = undone {
                tracing::warn!(service, error = %e, "undoing the refused release");
            }
        }
        let s = service.to_string();
        let (outcome, reason) = (outcome.to_string(), reason.to_string());
        self.commit(move |st| {
            if let Some(svc) = st.services.get_mut(&s) {
                if let Some(r) = svc.release_mut(to) {
                    r.status = match kind {
                        OperationKind::Deploy => ReleaseStatus::Failed,
                        OperationKind::Rollback => ReleaseStatus::Stopped,
                    };
                }
                svc.operation = None;
                svc.record(HistoryEntry::untimed(kind, from, to, &outcome, reason));
            }
        })
        .await
    }

    /// `remove NAME`: its host ports stop being forwarded, its containers are removed.
    /// [`Releaser::remove`], and with `volumes` the named volumes cutover created for the
    /// service too (as `docker compose down -v`); volumes it did not create are kept.
    pub async fn remove_with(&self, service: &str, volumes: bool) -> Result<Outcome, ReleaseError> {
        let mut outcome = self.remove(service).await?;
        if volumes {
            let removed = self.engine.remove_volumes(service.to_string(), self.settings.instance.clone()).await?;
            outcome.volumes_removed = Some(removed);
        }
        Ok(outcome)
    }

    pub async fn remove(&self, service: &str) -> Result<Outcome, ReleaseError> {
        let _busy = self.claim(service)?;
        let svc = self.snapshot().await.services.get(service).cloned().ok_or_else(|| ReleaseError::NotFound(service.into()))?;
        let switching = self.switching.lock().await;
        let mut state = self.snapshot().await;
        state.services.remove(service);
        let desired = self.desired(&state, None).await?;
        self.program(&desired).await?;
        let s = service.to_string();
        let restore = self
            .commit(move |st| {
                st.services.remove(&s);
                if st.services.is_empty() {
                    std::mem::take(&mut st.route_localnet_before)
                } else {
                    BTreeMap::new()
                }
            })
            .await?;
        drop(switching);
        let mut errors = Vec::new();
        for r in &svc.releases {
            if matches!(r.status, ReleaseStatus::Failed | ReleaseStatus::Removed) || r.container_id.is_empty() {
                continue;
            }
            if let Err(e) = self.engine.remove(r.container_id.clone()).await {
                errors.push(e.to_string());
            }
        }
        self.handoff_close(service); // handoff mode: the daemon's listeners close
        let state = self.snapshot().await;
        if state.services.is_empty() {
            if let Err(e) = self.firewall.remove_forward_accept(&self.settings.table, self.settings.mark) {
                errors.push(e.to_string());
            }
            if let Err(e) = self.firewall.delete_table(&self.settings.table) {
                errors.push(e.to_string());
            }
            let mut dp = self.dataplane.lock().await;
            dp.applied = None;
            dp.carried.clear();
            drop(dp);
            for (ifname, before) in restore {
                if let Err(e) = crate::host::set_route_localnet(&ifname, before) {
                    errors.push(e.to_string());
                }
            }
        }
        if !errors.is_empty() {
            return Err(ReleaseError::Refused(format!(
                "`{service}` is no longer served, but cleaning up failed: {}",
                errors.join("; ")
            )));
        }
        Ok(Outcome {
            service: service.to_string(),
            from: svc.active,
            to: 0,
            outcome: "removed".into(),
            health_ms: None,
            switch_us: None,
            drain_ms: None,
            ..Default::default()
        })
    }

    fn emit(&self, progress: &ProgressTx, service: &str, release: u32, step: &'static str, message: String) {
        tracing::info!(service, release, step, "{message}");
        let _ = progress.send(Progress {
            service: service.to_string(),
            release,
            step,
            message,
            elapsed_ms: None,
            limit_ms: None,
            connections: None,
        });
    }
}

/// The host-port targets of one release (`addr6`: its IPv6 address, if any).
pub fn targets_of(
    service: &str,
    release: u32,
    manifest: &Manifest,
    addr: std::net::Ipv4Addr,
    addr6: Option<std::net::Ipv6Addr>,
) -> Vec<Target> {
    manifest
        .ports
        .iter()
        .map(|p| Target {
            service: service.to_string(),
            release,
            protocol: p.protocol,
            host_port: p.host,
            addr,
            port: p.container,
            addr6,
            host_ip: p.host_ip,
        })
        .collect()
}

/// Does `new` need a new container, compared with what `old` runs?
pub fn container_differs(old: &Manifest, new: &Manifest) -> bool {
    let ports = |m: &Manifest| m.ports.iter().map(|p| (p.protocol, p.container)).collect::<Vec<_>>();
    old.image != new.image
        || old.env != new.env
        || old.container_options() != new.container_options()
        || old.command != new.command
        || old.network != new.network
        || old.stop_signal != new.stop_signal
        || ports(old) != ports(new)
}

mod handoff_mode;

#[cfg(test)]
mod tests;
