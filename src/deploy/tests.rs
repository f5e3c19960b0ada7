//! The release state machine over fakes: what a user would see (which release serves,
//! what the rules point at, what is left) for each path through a release.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::*;
use crate::dad::DadError;

use crate::drain::DrainError;
use crate::health::HealthError;
use crate::host::{ExitWatch, HostError};
use crate::manifest::HealthSpec;
use crate::plan::{Element, ElementKey, ElementOp, Traffic};

use super::fakes::FakeEngine;

#[derive(Default)]
struct FakeFirewall {
    table: Mutex<Option<BTreeMap<ElementKey, Element>>>,
    /// What the counting rules hold: a sync starts them at zero, as the kernel does.
    counts: Mutex<BTreeMap<String, Traffic>>,
    batches: Mutex<Vec<String>>,
    accept: AtomicBool,
    fail: AtomicBool,
}

impl FakeFirewall {
    fn target(&self, port: u16) -> Option<Ipv4Addr> {
        let t = self.table.lock().unwrap();
        t.as_ref()?.get(&ElementKey::v4(Protocol::Tcp, port)).and_then(|e| match e.addr {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        })
    }
    fn batches(&self) -> Vec<String> {
        self.batches.lock().unwrap().clone()
    }
}

impl Firewall for FakeFirewall {
    fn sync(&self, ruleset: &Ruleset) -> Result<(), NatError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(NatError::Socket(std::io::Error::other("injected")));
        }
        *self.table.lock().unwrap() = Some(ruleset.elements.iter().map(|e| (e.key, e.clone())).collect());
        *self.counts.lock().unwrap() =
            ruleset.counted_services().into_iter().map(|s| (s.to_string(), Traffic::default())).collect();
        self.batches.lock().unwrap().push("sync".into());
        Ok(())
    }
    fn apply_ops(&self, _table: &str, _map: &str, ops: &[ElementOp]) -> Result<(), NatError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(NatError::Socket(std::io::Error::other("injected")));
        }
        let mut t = self.table.lock().unwrap();
        let map = t.get_or_insert_with(BTreeMap::new);
        for op in ops {
            match op {
                ElementOp::Delete(k) => {
                    map.remove(k);
                }
                ElementOp::Add(e) => {
                    map.insert(e.key, e.clone());
                }
            }
        }
        self.batches.lock().unwrap().push(format!("ops:{}", ops.len()));
        Ok(())
    }
    fn delete_table(&self, _table: &str) -> Result<(), NatError> {
        *self.table.lock().unwrap() = None;
        self.counts.lock().unwrap().clear();
        Ok(())
    }
    fn counters(&self, _table: &str) -> Result<BTreeMap<String, Traffic>, NatError> {
        Ok(self.counts.lock().unwrap().clone())
    }
    fn table_exists(&self, _table: &str) -> Result<bool, NatError> {
        Ok(self.table.lock().unwrap().is_some())
    }
    fn ensure_forward_accept(&self, _table: &str, _mark: u32) -> Result<(), NatError> {
        self.accept.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn remove_forward_accept(&self, _table: &str, _mark: u32) -> Result<(), NatError> {
        self.accept.store(false, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Default)]
struct FakeChecks {
    engine: Arc<FakeEngine>,
    probes: std::sync::atomic::AtomicUsize,
    /// The next this many probes time out, whatever they probe (a release too slow to
    /// answer under load).
    slow: std::sync::atomic::AtomicUsize,
    /// Every IPv6 UDP flow keeps carrying datagrams (never idle).
    busy_v6: AtomicBool,
    /// Flows deleted from conntrack, in order.
    forgotten: Mutex<Vec<(Protocol, u16, IpAddr)>>,
    /// What the IPv6 readiness check answers, in turn (the last one from then on);
    /// usable when empty.
    ipv6: Mutex<Vec<Ipv6Readiness>>,
    /// Where host port 8080 pointed at each IPv6 readiness check.
    ipv6_checked_while: Mutex<Vec<Option<Ipv4Addr>>>,
    firewall: Arc<FakeFirewall>,
    /// What the `::1` relay was told, each call.
    relay_routes: Mutex<Vec<crate::relay::Routes>>,
    /// Relayed connections open per (service, release).
    relayed: Mutex<BTreeMap<(String, u32), usize>>,
    /// Relayed busy UDP flows per (service, release).
    relayed_udp: Mutex<BTreeMap<(String, u32), usize>>,
    /// The releases whose relayed UDP flows were ended.
    forgotten_udp: Mutex<Vec<(String, u32)>>,
}

impl crate::relay::Relay for FakeChecks {
    fn route(&self, routes: crate::relay::Routes) {
        self.relay_routes.lock().unwrap().push(routes);
    }
    fn open_to(&self, service: &str, release: u32) -> usize {
        self.relayed.lock().unwrap().get(&(service.to_string(), release)).copied().unwrap_or(0)
    }
    fn drain_udp(&self, service: &str, release: u32, _idle: std::time::Duration) -> usize {
        self.relayed_udp.lock().unwrap().get(&(service.to_string(), release)).copied().unwrap_or(0)
    }
    fn forget_udp(&self, service: &str, release: u32) {
        self.forgotten_udp.lock().unwrap().push((service.to_string(), release));
    }
    fn listening(&self) -> BTreeSet<(Protocol, u16)> {
        self.relay_routes.lock().unwrap().last().map(|r| r.keys().copied().collect()).unwrap_or_default()
    }
}

fn refused(addr: SocketAddr) -> HealthError {
    HealthError::Connect { addr, source: std::io::ErrorKind::ConnectionRefused.into() }
}

impl crate::health::Probe for FakeChecks {
    fn probe(&self, health: HealthSpec, addr: SocketAddr) -> BoxFuture<'_, Result<(), HealthError>> {
        Box::pin(async move {
            let SocketAddr::V4(v4) = addr else { return Err(refused(addr)) };
            if self.slow.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(HealthError::Timeout { addr, path: health.path, timeout: health.timeout });
            }
            match self.engine.image_at(*v4.ip()) {
                Some(img) if img.contains("broken") => Err(HealthError::Status { addr, path: health.path, status: 503 }),
                // Healthy for the gate, failing right after the switch.
                Some(img) if img.contains("dies-later") && self.probes.fetch_add(1, Ordering::SeqCst) > 0 => {
                    Err(refused(addr))
                }
                Some(_) => Ok(()),
                None => Err(refused(addr)),
            }
        })
    }
}

impl crate::drain::Connections for FakeChecks {
    fn open_connections(&self, _pid: u32, _ports: Vec<u16>) -> BoxFuture<'_, Result<usize, DrainError>> {
        Box::pin(async { Ok(0) })
    }
}

impl crate::host::HostNet for FakeChecks {
    fn host_ports(&self) -> Result<BTreeSet<(Protocol, u16, Option<std::net::IpAddr>)>, HostError> {
        Ok(BTreeSet::from([(Protocol::Tcp, 22, None), (Protocol::Tcp, 53, Some([127, 0, 0, 53].into()))]))
    }
    fn forget_flows(&self, protocol: Protocol, port: u16, addr: IpAddr) -> Result<(), HostError> {
        self.forgotten.lock().unwrap().push((protocol, port, addr));
        Ok(())
    }
    fn drain_udp_flows(&self, _port: u16, addr: IpAddr, _idle: Duration) -> Result<crate::host::UdpDrain, HostError> {
        Ok(crate::host::UdpDrain { busy: usize::from(addr.is_ipv6() && self.busy_v6.load(Ordering::SeqCst)), deleted: Ok(0) })
    }
    fn claim_route_localnet(&self, _ifname: &str, _table: &str, _recorded: Option<bool>) -> Result<bool, HostError> {
        Ok(false)
    }
    fn release_route_localnet(&self, _ifname: &str, _table: &str) -> Result<(), HostError> {
        Ok(())
    }
    fn watch_exit(&self, pid: u32) -> Result<ExitWatch, HostError> {
        // No process: the drain watch relies on the engine's view, as the fake engine is.
        Err(HostError::Pidfd { pid, source: std::io::ErrorKind::Unsupported.into() })
    }
}

impl crate::dad::Ipv6Paths for FakeChecks {
    fn readiness(&self, _pid: u32, _addr: Ipv6Addr) -> BoxFuture<'_, Result<Ipv6Readiness, DadError>> {
        Box::pin(async move {
            self.ipv6_checked_while.lock().unwrap().push(self.firewall.target(8080));
            let mut answers = self.ipv6.lock().unwrap();
            Ok(match answers.len() {
                0 => Ipv6Readiness::Usable,
                1 => answers[0].clone(),
                _ => answers.remove(0),
            })
        })
    }
}

struct World {
    engine: Arc<FakeEngine>,
    firewall: Arc<FakeFirewall>,
    checks: Arc<FakeChecks>,
    releaser: Releaser,
    tx: ProgressTx,
    _dir: tempfile::TempDir,
}

fn world_in(dir: tempfile::TempDir, engine: Arc<FakeEngine>, firewall: Arc<FakeFirewall>) -> World {
    let checks = Arc::new(FakeChecks { engine: engine.clone(), firewall: firewall.clone(), ..Default::default() });
    let store = StateStore::open(dir.path()).unwrap();
    let settings = Settings { table: "t".into(), mark: 1, instance: "i".into(), drain_poll: Duration::from_millis(5), pause_at: None, pause_for: None };
    let effects = Effects { probe: checks.clone(), connections: checks.clone(), host: checks.clone(), ipv6: checks.clone(), relay: checks.clone() };
    let releaser = Releaser::new(engine.clone(), firewall.clone(), effects, settings, store).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    World { engine, firewall, checks, releaser, tx, _dir: dir }
}

fn world() -> World {
    world_in(tempfile::tempdir().unwrap(), Arc::default(), Arc::default())
}

fn manifest(image: &str, keep: u32) -> Manifest {
    let text = format!(
        "name: web\nimage: {image}\nports: [{{host: 8080, container: 80}}]\nkeep: {keep}\n\
         health: {{type: http, path: /healthz, interval: 10ms, deadline: 200ms}}\ndrain_timeout: 50ms\nwatch: 20ms\n"
    );
    Manifest::parse(Path::new("web.yaml"), &text).unwrap()
}

async fn active(w: &World) -> Option<u32> {
    w.releaser.snapshot().await.services.get("web").and_then(|s| s.active)
}

#[tokio::test]
async fn first_apply_serves_release_1_in_one_transaction() {
    let w = world();
    let o = w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    assert_eq!((o.from, o.to, o.outcome.as_str()), (None, 1, "switched"));
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:1"));
    assert_eq!(w.firewall.batches(), vec!["sync"]);
    assert!(w.firewall.accept.load(Ordering::SeqCst));
}

#[tokio::test]
async fn deploy_switches_with_one_element_change_and_keeps_the_old_release_stopped() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let o = w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    assert_eq!((o.from, o.to), (Some(1), 2));
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:2"));
    assert_eq!(w.firewall.batches(), vec!["sync", "ops:2"]);
    assert_eq!(w.engine.running(), vec!["cutover-web-2"]);
    assert_eq!(w.engine.names(), vec!["cutover-web-1", "cutover-web-2"]);
    let state = w.releaser.snapshot().await;
    let svc = &state.services["web"];
    assert_eq!(svc.release(1).unwrap().status, ReleaseStatus::Stopped);
    assert_eq!(svc.manifest.image, "web:2");
    assert!(svc.operation.is_none());
    assert_eq!(svc.history.last().unwrap().outcome, "switched");
}

#[tokio::test]
async fn traffic_counts_survive_switches_and_whole_table_syncs() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let count = |packets: u64| {
        let mut c = w.firewall.counts.lock().unwrap();
        *c.get_mut("web").unwrap() += Traffic { packets, bytes: 100 * packets };
    };
    count(10);
    assert_eq!(w.releaser.traffic().await.unwrap()["web"], Traffic { packets: 10, bytes: 1000 });
    // A switch changes map elements only: the kernel's counts stay.
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    count(5);
    assert_eq!(w.releaser.traffic().await.unwrap()["web"].packets, 15);
    // Another service changes the counting rules: a whole-table sync starts the kernel's
    // counts at zero, and what they held is carried.
    let api = Manifest::parse(
        Path::new("api.yaml"),
        "name: api\nimage: api:1\nports: [{host: 9090, container: 80}]\n\
         health: {type: http, path: /healthz, interval: 10ms, deadline: 200ms}\ndrain_timeout: 50ms\nwatch: 20ms\n",
    )
    .unwrap();
    w.releaser.apply(api, &w.tx).await.unwrap();
    assert_eq!(w.firewall.batches(), vec!["sync", "ops:2", "sync"]);
    assert_eq!(w.firewall.counts.lock().unwrap()["web"].packets, 0);
    count(1);
    let t = w.releaser.traffic().await.unwrap();
    assert_eq!(t["web"], Traffic { packets: 16, bytes: 1600 });
    assert_eq!(t["api"], Traffic::default());
    // A removed service's counts go with it.
    w.releaser.remove("api").await.unwrap();
    let t = w.releaser.traffic().await.unwrap();
    assert_eq!(t.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(t["web"].packets, 16);
}

#[tokio::test]
async fn an_unhealthy_release_is_refused_and_changes_nothing() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let before = w.firewall.target(8080);
    let err = w.releaser.deploy("web", "web:broken", &w.tx).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReleaseError::Unhealthy { release: 2, .. }), "{msg}");
    assert!(msg.contains("503") && msg.contains("health check failing"), "{msg}");
    assert_eq!(w.firewall.target(8080), before);
    assert_eq!(w.firewall.batches(), vec!["sync"]);
    assert_eq!(w.engine.names(), vec!["cutover-web-1"]);
    let state = w.releaser.snapshot().await;
    let svc = &state.services["web"];
    assert_eq!(svc.active, Some(1));
    assert_eq!(svc.manifest.image, "web:1");
    assert_eq!(svc.release(2).unwrap().status, ReleaseStatus::Failed);
    assert_eq!(svc.history.last().unwrap().outcome, "refused");
}

#[tokio::test]
async fn a_release_that_exits_is_refused_at_once() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let err = w.releaser.deploy("web", "web:crash", &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("exited with code 3"), "{err}");
    assert_eq!(active(&w).await, Some(1));
}

#[tokio::test]
async fn a_failed_first_release_leaves_no_service() {
    let w = world();
    assert!(w.releaser.apply(manifest("web:broken", 3), &w.tx).await.is_err());
    assert!(w.releaser.snapshot().await.services.is_empty());
    assert!(w.engine.names().is_empty());
    assert_eq!(w.firewall.target(8080), None);
}

#[tokio::test]
async fn rollback_restarts_the_kept_release_and_follows_its_new_address() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    let o = w.releaser.rollback("web", None, &w.tx).await.unwrap();
    assert_eq!((o.from, o.to), (Some(2), 1));
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:1"));
    assert_eq!(w.engine.running(), vec!["cutover-web-1"]);
    // And forward again to the kept release 2.
    w.releaser.rollback("web", Some(2), &w.tx).await.unwrap();
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:2"));
}

#[tokio::test]
async fn rollback_without_a_kept_release_is_refused() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let err = w.releaser.rollback("web", None, &w.tx).await.unwrap_err();
    assert_eq!(crate::api::ErrorCode::from(&err), crate::api::ErrorCode::Refused);
    assert!(matches!(w.releaser.rollback("web", Some(7), &w.tx).await, Err(ReleaseError::Invalid(_))));
}

#[tokio::test]
async fn releases_beyond_keep_are_removed() {
    let w = world();
    w.releaser.apply(manifest("web:1", 1), &w.tx).await.unwrap();
    for i in 2..=4 {
        w.releaser.deploy("web", &format!("web:{i}"), &w.tx).await.unwrap();
    }
    assert_eq!(w.engine.names(), vec!["cutover-web-3", "cutover-web-4"]);
    let state = w.releaser.snapshot().await;
    let statuses: Vec<_> = state.services["web"].releases.iter().map(|r| r.status).collect();
    use ReleaseStatus::*;
    assert_eq!(statuses, vec![Removed, Removed, Stopped, Active]);
}

#[tokio::test]
async fn a_second_operation_on_a_service_is_busy() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let _held = w.releaser.claim("web").unwrap();
    let err = w.releaser.deploy("web", "web:2", &w.tx).await.unwrap_err();
    assert!(matches!(err, ReleaseError::Busy(_)));
    assert!(err.to_string().contains("busy"));
    // Another service is not blocked.
    assert!(w.releaser.claim("api").is_ok());
}

#[tokio::test]
async fn a_failed_switch_undoes_the_new_release() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    w.firewall.fail.store(true, Ordering::SeqCst);
    assert!(w.releaser.deploy("web", "web:2", &w.tx).await.is_err());
    assert_eq!(w.engine.names(), vec!["cutover-web-1"]);
    assert_eq!(active(&w).await, Some(1));
}

#[tokio::test]
async fn port_conflicts_are_refused() {
    let w = world();
    let mut m = manifest("web:1", 3);
    m.ports[0].host = 9999;
    let err = w.releaser.apply(m.clone(), &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("published by container `someone-else`"), "{err}");
    m.ports[0].host = 22;
    let err = w.releaser.apply(m.clone(), &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("in use by a process"), "{err}");
    // Bound to one address, a process or a published port takes the port there only.
    m.ports[0].host = 53;
    let err = w.releaser.apply(m.clone(), &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("in use by a process"), "{err}");
    m.ports[0].host = 9998;
    let err = w.releaser.apply(m.clone(), &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("published by container `on-one-address`"), "{err}");
    // A process listening on every address takes the port on each of them.
    m.ports[0].host = 22;
    m.ports[0].host_ip = Some([10, 0, 0, 8].into());
    let err = w.releaser.apply(m.clone(), &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("host port 22/tcp on 10.0.0.8 is in use by a process"), "{err}");
    assert!(w.releaser.snapshot().await.services.is_empty());
}

#[tokio::test]
async fn a_port_is_shared_on_different_host_addresses_only() {
    let w = world();
    let mut web = manifest("web:1", 3);
    web.ports[0].host = 8443;
    web.ports[0].host_ip = Some([10, 0, 0, 1].into());
    w.releaser.apply(web.clone(), &w.tx).await.unwrap();
    // A process bound to 127.0.0.53:53 and a container published on 10.0.0.9:9998 do not
    // hold those ports on other addresses.
    let mut other = manifest("web:1", 3);
    other.name = "other".into();
    other.ports[0].host = 8443;
    other.ports[0].host_ip = Some([10, 0, 0, 2].into());
    w.releaser.apply(other.clone(), &w.tx).await.unwrap();
    let mut third = other.clone();
    third.name = "third".into();
    third.ports[0].host_ip = Some([10, 0, 0, 1].into());
    let err = w.releaser.apply(third.clone(), &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("host port 8443/tcp on 10.0.0.1 is already used by service `web`"), "{err}");
    third.ports[0].host_ip = None;
    let err = w.releaser.apply(third.clone(), &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("already used by service"), "every address overlaps both: {err}");
    third.ports[0].host = 53;
    third.ports[0].host_ip = Some([10, 0, 0, 3].into());
    w.releaser.apply(third.clone(), &w.tx).await.unwrap();
    let mut fourth = third.clone();
    fourth.name = "fourth".into();
    fourth.ports[0].host = 9998;
    w.releaser.apply(fourth, &w.tx).await.unwrap();
    assert_eq!(w.releaser.snapshot().await.services.len(), 4);
}

#[tokio::test]
async fn remove_takes_rules_containers_and_the_forward_accept() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    w.releaser.remove("web").await.unwrap();
    assert!(w.engine.names().is_empty());
    assert!(!w.firewall.table_exists("t").unwrap());
    assert!(!w.firewall.accept.load(Ordering::SeqCst));
}

/// A state directory as a daemon leaves it when killed during the deploy from release 1
/// to 2 at `phase`, over `engine` and `firewall` (v1 still running, as mid-release).
async fn killed_during_deploy_at(phase: Phase, engine: &Arc<FakeEngine>, firewall: &Arc<FakeFirewall>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(tempfile::tempdir().unwrap(), engine.clone(), firewall.clone());
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    let mut state = w.releaser.snapshot().await;
    let svc = state.services.get_mut("web").unwrap();
    svc.operation = Some(Operation { kind: OperationKind::Deploy, from: Some(1), to: 2, phase, started_at: 0 });
    svc.active = Some(if phase >= Phase::Switched { 2 } else { 1 });
    svc.release_mut(1).unwrap().status = if phase >= Phase::Switched { ReleaseStatus::Draining } else { ReleaseStatus::Active };
    svc.release_mut(2).unwrap().status = if phase >= Phase::Switched { ReleaseStatus::Active } else { ReleaseStatus::Starting };
    StateStore::open(dir.path()).unwrap().save(&state).unwrap();
    engine.containers.lock().unwrap().get_mut("id-cutover-web-1").unwrap().info.running = true;
    dir
}

/// A daemon killed at each step, restarted: exactly one release serves and the
/// history says which.
#[tokio::test]
async fn restart_undoes_before_the_switch_and_finishes_after_it() {
    // `switching`: the transaction may have run; the new release runs, so it is finished.
    for (phase, expect_active) in
        [(Phase::Starting, 1), (Phase::Healthy, 1), (Phase::Switching, 2), (Phase::Switched, 2), (Phase::Draining, 2)]
    {
        let engine: Arc<FakeEngine> = Arc::default();
        let firewall: Arc<FakeFirewall> = Arc::default();
        let dir = killed_during_deploy_at(phase, &engine, &firewall).await;
        // The table was lost too (as after a reboot).
        firewall.delete_table("t").unwrap();
        let w = world_in(dir, engine.clone(), firewall.clone());
        let notes = w.releaser.reconcile().await.unwrap();
        assert_eq!(notes.len(), 1, "{phase:?}: {notes:?}");
        assert_eq!(active(&w).await, Some(expect_active), "{phase:?}");
        let serving = w.engine.image_at(w.firewall.target(8080).unwrap());
        assert_eq!(serving.as_deref(), Some(format!("web:{expect_active}").as_str()), "{phase:?}");
        assert_eq!(w.engine.running().len(), 1, "{phase:?}: exactly one release runs");
        let state = w.releaser.snapshot().await;
        assert!(state.services["web"].operation.is_none());
        let last = state.services["web"].history.last().unwrap();
        assert_eq!(last.outcome, if expect_active == 2 { "finished_after_restart" } else { "undone" });
    }
}

/// Killed while switching, and the new release did not survive: undone, the rules point
/// at the old release, and the new one's container is gone.
#[tokio::test]
async fn restart_while_switching_undoes_a_release_that_no_longer_runs() {
    let engine: Arc<FakeEngine> = Arc::default();
    let firewall: Arc<FakeFirewall> = Arc::default();
    let dir = killed_during_deploy_at(Phase::Switching, &engine, &firewall).await;
    engine.containers.lock().unwrap().get_mut("id-cutover-web-2").unwrap().info.running = false;
    let w = world_in(dir, engine.clone(), firewall.clone());
    w.releaser.reconcile().await.unwrap();
    assert_eq!(active(&w).await, Some(1));
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:1"));
    assert_eq!(w.engine.names(), vec!["cutover-web-1"]);
    let state = w.releaser.snapshot().await;
    assert_eq!(state.services["web"].history.last().unwrap().outcome, "undone");
}

/// A daemon started with an empty state (the file was lost or moved away) while a
/// service's releases run: the service is adopted from its containers, the rules point
/// at the release that served, and nothing is removed.
#[tokio::test]
async fn an_empty_state_adopts_the_running_releases_instead_of_wiping_them() {
    let engine: Arc<FakeEngine> = Arc::default();
    let firewall: Arc<FakeFirewall> = Arc::default();
    {
        let w = world_in(tempfile::tempdir().unwrap(), engine.clone(), firewall.clone());
        w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
        w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    }
    let w = world_in(tempfile::tempdir().unwrap(), engine.clone(), firewall.clone());
    let notes = w.releaser.reconcile().await.unwrap();
    assert!(notes.iter().any(|n| n.contains("web: adopted from its containers")), "{notes:?}");
    assert_eq!(active(&w).await, Some(2));
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:2"));
    assert_eq!(w.engine.names(), vec!["cutover-web-1", "cutover-web-2"]);
    let state = w.releaser.snapshot().await;
    let svc = &state.services["web"];
    assert_eq!(svc.next_release, 3);
    assert_eq!(svc.release(1).unwrap().status, ReleaseStatus::Stopped);
    assert_eq!(svc.manifest.image, "web:2");
    // The adopted service releases and rolls back as any other.
    w.releaser.rollback("web", None, &w.tx).await.unwrap();
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:1"));
    // A removed service is not adopted back, even when its container outlived the remove.
    w.releaser.remove("web").await.unwrap();
    let w = world_in(tempfile::tempdir().unwrap(), engine.clone(), firewall.clone());
    w.releaser.reconcile().await.unwrap();
    assert!(w.releaser.snapshot().await.services.is_empty());
}

#[tokio::test]
async fn a_release_failing_right_after_the_switch_is_switched_back() {
    let w = world();
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let err = w.releaser.deploy("web", "web:dies-later", &w.tx).await.unwrap_err().to_string();
    assert!(err.contains("after the switch; traffic is back on release 1"), "{err}");
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:1"));
    assert_eq!(w.firewall.batches(), vec!["sync", "ops:2", "ops:2"]);
    assert_eq!(w.engine.running(), vec!["cutover-web-1"]);
    let state = w.releaser.snapshot().await;
    let svc = &state.services["web"];
    assert_eq!(svc.active, Some(1));
    assert_eq!(svc.manifest.image, "web:1");
    assert_eq!(svc.release(2).unwrap().status, ReleaseStatus::Failed);
    assert_eq!(svc.history.last().unwrap().outcome, "reverted");
}

#[tokio::test]
async fn ipv6_udp_flows_hold_the_drain_and_are_forgotten_before_the_old_release_stops() {
    let engine = Arc::new(FakeEngine { dual_stack: AtomicBool::new(true), ..Default::default() });
    let w = world_in(tempfile::tempdir().unwrap(), engine, Arc::default());
    let text = "name: web\nimage: web:1\nports: [{host: 8080, container: 80}, {host: 5353, container: 53, protocol: udp}]\n\
                health: {type: http, path: /healthz, interval: 10ms, deadline: 200ms}\ndrain_timeout: 200ms\nwatch: 20ms\nudp_idle: 1s\n";
    w.releaser.apply(Manifest::parse(Path::new("web.yaml"), text).unwrap(), &w.tx).await.unwrap();
    let old = w.releaser.snapshot().await.services["web"].release(1).unwrap().clone();
    let old4 = old.addr.unwrap();
    let old6 = w.engine.ip6_of(old4).unwrap();
    w.checks.busy_v6.store(true, Ordering::SeqCst);

    let o = w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    // Only the IPv6 flow is busy, and it alone kept release 1 until the drain timeout.
    assert!(o.drain_ms.unwrap() >= 200, "drained in {:?} ms", o.drain_ms);
    let forgotten = w.checks.forgotten.lock().unwrap().clone();
    assert_eq!(forgotten, vec![(Protocol::Udp, 5353, IpAddr::V4(old4)), (Protocol::Udp, 5353, IpAddr::V6(old6))]);
    assert_eq!(w.engine.running(), vec!["cutover-web-2"]);
}

#[tokio::test]
async fn switching_back_forgets_the_failed_releases_flows_of_both_families() {
    let engine = Arc::new(FakeEngine { dual_stack: AtomicBool::new(true), ..Default::default() });
    let w = world_in(tempfile::tempdir().unwrap(), engine, Arc::default());
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:dies-later", &w.tx).await.unwrap_err();
    let failed = w.releaser.snapshot().await.services["web"].release(2).unwrap().addr.unwrap();
    let forgotten = w.checks.forgotten.lock().unwrap().clone();
    let failed6 = w.engine.ip6_of(failed).unwrap();
    assert_eq!(forgotten, vec![(Protocol::Tcp, 8080, IpAddr::V4(failed)), (Protocol::Tcp, 8080, IpAddr::V6(failed6))]);
}

/// A dual-stack world whose IPv6 readiness check answers `answers` in turn.
fn dual_stack_world(answers: Vec<Ipv6Readiness>) -> World {
    let engine = Arc::new(FakeEngine { dual_stack: AtomicBool::new(true), ..Default::default() });
    let w = world_in(tempfile::tempdir().unwrap(), engine, Arc::default());
    *w.checks.ipv6.lock().unwrap() = answers;
    w
}

/// Progress messages of `step` sent while `f` ran.
async fn progress_of<T>(step: &str, f: impl AsyncFnOnce(&ProgressTx) -> T) -> (T, Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = f(&tx).await;
    drop(tx);
    let mut seen = Vec::new();
    while let Some(p) = rx.recv().await {
        if p.step == step {
            seen.push(p.message);
        }
    }
    (out, seen)
}

#[tokio::test]
async fn the_switch_waits_until_the_new_releases_ipv6_address_is_usable() {
    let w = dual_stack_world(Vec::new());
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let old = w.firewall.target(8080);
    w.checks.ipv6_checked_while.lock().unwrap().clear();
    let tentative = Ipv6Readiness::Waiting("duplicate address detection of the host's fd00::1 on br-1".into());
    *w.checks.ipv6.lock().unwrap() = vec![tentative.clone(), tentative, Ipv6Readiness::Usable];

    let (o, health) = progress_of("health", async |tx| w.releaser.deploy("web", "web:2", tx).await).await;
    assert_eq!(o.unwrap().to, 2);
    assert_eq!(w.engine.image_at(w.firewall.target(8080).unwrap()).as_deref(), Some("web:2"));
    // Every check before the usable one saw the old release still serving.
    assert_eq!(*w.checks.ipv6_checked_while.lock().unwrap(), vec![old, old, old]);
    assert_eq!(health.len(), 2, "{health:?}");
    assert!(health.iter().all(|m| m == "waiting for IPv6: duplicate address detection of the host's fd00::1 on br-1"), "{health:?}");
}

#[tokio::test]
async fn a_release_whose_ipv6_stays_tentative_is_refused_at_the_deadline_and_nothing_switches() {
    let w = dual_stack_world(Vec::new());
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let before = w.firewall.target(8080);
    *w.checks.ipv6.lock().unwrap() = vec![Ipv6Readiness::Waiting("duplicate address detection of fd00::3 in the container".into())];
    let started = std::time::Instant::now();
    let err = w.releaser.deploy("web", "web:2", &w.tx).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReleaseError::Unhealthy { release: 2, .. }), "{msg}");
    assert!(msg.contains("not healthy within 200ms") && msg.contains("duplicate address detection of fd00::3"), "{msg}");
    assert!(started.elapsed() >= Duration::from_millis(200), "gave up at the deadline, not before");
    assert_eq!(w.firewall.target(8080), before);
    assert_eq!(w.firewall.batches(), vec!["sync"]);
    assert_eq!(w.engine.names(), vec!["cutover-web-1"]);
    let state = w.releaser.snapshot().await;
    assert_eq!(state.services["web"].active, Some(1));
    assert_eq!(state.services["web"].release(2).unwrap().status, ReleaseStatus::Failed);
}

#[tokio::test]
async fn a_failed_duplicate_address_detection_refuses_the_release_at_once() {
    let w = dual_stack_world(Vec::new());
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    *w.checks.ipv6.lock().unwrap() = vec![Ipv6Readiness::Failed("its IPv6 address fd00::3 failed duplicate address detection".into())];
    let started = std::time::Instant::now();
    let msg = w.releaser.deploy("web", "web:2", &w.tx).await.unwrap_err().to_string();
    assert!(msg.contains("fd00::3 failed duplicate address detection"), "{msg}");
    assert!(started.elapsed() < Duration::from_millis(200), "no wait for a deadline");
    assert_eq!(active(&w).await, Some(1));
}

#[tokio::test]
async fn a_rollback_waits_for_ipv6_too() {
    let w = dual_stack_world(Vec::new());
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    let tentative = Ipv6Readiness::Waiting("duplicate address detection".into());
    *w.checks.ipv6.lock().unwrap() = vec![tentative, Ipv6Readiness::Usable];
    let (o, health) = progress_of("health", async |tx| w.releaser.rollback("web", None, tx).await).await;
    assert_eq!(o.unwrap().to, 1);
    assert_eq!(health, vec!["waiting for IPv6: duplicate address detection"]);
}

/// The engine started the active release again (a crash, an engine restart): `refresh`
/// re-points the rules, then waits until its IPv6 path is usable again; an address that
/// failed duplicate address detection is reported at once.
#[tokio::test]
async fn after_the_engine_restarted_a_release_refresh_waits_for_its_ipv6_path() {
    let w = dual_stack_world(Vec::new());
    w.releaser.apply(manifest("web:1", 3), &w.tx).await.unwrap();
    let tentative = Ipv6Readiness::Waiting("duplicate address detection of fd00::3 in the container".into());
    *w.checks.ipv6.lock().unwrap() = vec![tentative.clone(), tentative, Ipv6Readiness::Usable];
    w.checks.ipv6_checked_while.lock().unwrap().clear();
    w.releaser.refresh().await.unwrap();
    assert_eq!(w.checks.ipv6_checked_while.lock().unwrap().len(), 3, "checked until usable");
    assert!(w.releaser.snapshot().await.services["web"].down.is_none());

    // A failed address never becomes usable: said at once (an error in the log), not
    // waited for until the deadline.
    *w.checks.ipv6.lock().unwrap() = vec![Ipv6Readiness::Failed("its IPv6 address fd00::3 failed duplicate address detection".into())];
    w.checks.ipv6_checked_while.lock().unwrap().clear();
    w.releaser.refresh().await.unwrap();
    assert_eq!(w.checks.ipv6_checked_while.lock().unwrap().len(), 1);
}

/// Where the `::1` relay sends new connections to port 8080 now: (release, address).
fn relayed_to(w: &World) -> Option<(u32, SocketAddr)> {
    let routes = w.checks.relay_routes.lock().unwrap();
    routes.last()?.get(&(Protocol::Tcp, 8080)).map(|r| (r.release, r.to))
}

#[tokio::test]
async fn loopback6_clients_move_in_the_switch_and_their_connections_hold_the_old_releases_drain() {
    let engine = Arc::new(FakeEngine { dual_stack: AtomicBool::new(true), ..Default::default() });
    let w = Arc::new(world_in(tempfile::tempdir().unwrap(), engine, Arc::default()));
    let text = "name: web\nimage: web:1\nports: [{host: 8080, container: 80}, {host: 5353, container: 53, protocol: udp}]\n\
                health: {type: http, path: /healthz, interval: 10ms, deadline: 200ms}\ndrain_timeout: 5s\nwatch: 20ms\n";
    w.releaser.apply(Manifest::parse(Path::new("web.yaml"), text).unwrap(), &w.tx).await.unwrap();
    let v1 = w.releaser.snapshot().await.services["web"].release(1).unwrap().addr.unwrap();
    let v1_6 = w.engine.ip6_of(v1).unwrap();
    assert_eq!(relayed_to(&w), Some((1, SocketAddr::from((v1_6, 80)))), "to the release's IPv6 address");
    let udp = w.checks.relay_routes.lock().unwrap().last().unwrap().get(&(Protocol::Udp, 5353)).cloned();
    assert_eq!(udp.map(|r| (r.release, r.to)), Some((1, SocketAddr::from((v1_6, 53)))), "UDP too");

    // A ::1 connection to release 1 is open: the deploy switches, then waits for it.
    w.checks.relayed.lock().unwrap().insert(("web".into(), 1), 1);
    let started = std::time::Instant::now();
    let deploy = tokio::spawn({
        let w = w.clone();
        async move { w.releaser.deploy("web", "web:2", &w.tx).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = w.firewall.target(8080).unwrap();
    assert_eq!(w.engine.image_at(v2).as_deref(), Some("web:2"), "switched");
    assert_eq!(relayed_to(&w), Some((2, SocketAddr::from((w.engine.ip6_of(v2).unwrap(), 80)))), "::1 moved in the switch");
    assert!(!deploy.is_finished(), "the relayed connection to release 1 holds its drain");
    assert!(w.engine.running().contains(&"cutover-web-1".to_string()), "release 1 still runs");

    // A busy relayed UDP flow to release 1 holds it too, once the connection is closed.
    w.checks.relayed_udp.lock().unwrap().insert(("web".into(), 1), 1);
    w.checks.relayed.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!deploy.is_finished(), "the busy relayed UDP flow to release 1 holds its drain");
    assert!(w.checks.forgotten_udp.lock().unwrap().is_empty());

    w.checks.relayed_udp.lock().unwrap().clear();
    let o = deploy.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(4), "drained once the connection closed and the flow went quiet, not at the timeout");
    assert_eq!(o.to, 2);
    assert_eq!(w.engine.running(), vec!["cutover-web-2"]);
    assert_eq!(*w.checks.forgotten_udp.lock().unwrap(), vec![("web".to_string(), 1)], "release 1's relayed flows end with it");

    w.releaser.remove("web").await.unwrap();
    assert_eq!(w.checks.relay_routes.lock().unwrap().last(), Some(&crate::relay::Routes::new()), "removed: no longer relayed");
}

mod watch;
