//! Handoff-mode releases over fakes: which release serves, when the old one is stopped
//! relative to the new one being ready, what is left after a refusal, what a restart
//! does with the listeners.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use std::sync::Mutex as StdMutex;

use futures_util::future::BoxFuture;

use super::*;

use crate::handoff::brokers::{BrokersError, Readiness};
use crate::plan::ElementOp;

use super::super::fakes::{FakeEngine, Log};

/// Brokers whose releases take their listeners and report ready as soon as they are
/// allowed, unless their image says `never`.
struct FakeBrokers {
    engine: Arc<FakeEngine>,
    open: StdMutex<HashMap<String, (BrokerSpec, Option<i32>)>>,
    allowed: StdMutex<BTreeSet<i32>>,
    log: Log,
}

impl ServiceBrokers for FakeBrokers {
    fn open(&self, service: &str, spec: &BrokerSpec, adopt_from: Option<i32>) -> Result<Opened, BrokersError> {
        let mut open = self.open.lock().unwrap();
        if open.get(service).is_some_and(|(s, _)| s == spec) {
            return Ok(Opened::AlreadyOpen);
        }
        open.insert(service.to_string(), (spec.clone(), adopt_from));
        self.log.lock().unwrap().push(format!("open {service} adopt={adopt_from:?}"));
        Ok(adopt_from.map_or(Opened::Bound, |pid| Opened::Adopted { pid }))
    }
    fn is_open(&self, service: &str) -> bool {
        self.open.lock().unwrap().contains_key(service)
    }
    fn allow(&self, _service: &str, pid: i32) -> Result<(), BrokersError> {
        self.allowed.lock().unwrap().insert(pid);
        self.log.lock().unwrap().push(format!("allow {pid}"));
        Ok(())
    }
    fn forget(&self, _service: &str, pid: i32) {
        self.allowed.lock().unwrap().remove(&pid);
        self.log.lock().unwrap().push(format!("forget {pid}"));
    }
    fn readiness(&self, _service: &str, pid: i32) -> Readiness {
        let ok = self.allowed.lock().unwrap().contains(&pid)
            && self.engine.image_of_pid(pid).is_some_and(|i| !i.contains("never"));
        Readiness { fetched: ok, notified: ok }
    }
    fn close(&self, service: &str) {
        self.open.lock().unwrap().remove(service);
        self.log.lock().unwrap().push(format!("close {service}"));
    }
    fn helper(&self) -> Result<PathBuf, BrokersError> {
        Ok(PathBuf::from("/state/bin/handoff-exec"))
    }
}

/// Handoff mode must never touch nftables: every call fails the test.
struct NoFirewall;

impl Firewall for NoFirewall {
    fn sync(&self, ruleset: &Ruleset) -> Result<(), NatError> {
        assert!(ruleset.elements.is_empty(), "handoff mode programmed NAT elements: {:?}", ruleset.elements);
        Ok(())
    }
    fn apply_ops(&self, _table: &str, _map: &str, ops: &[ElementOp]) -> Result<(), NatError> {
        assert!(ops.is_empty(), "handoff mode changed NAT elements");
        Ok(())
    }
    fn delete_table(&self, _table: &str) -> Result<(), NatError> {
        Ok(())
    }
    fn table_exists(&self, _table: &str) -> Result<bool, NatError> {
        Ok(true)
    }
    fn counters(&self, _table: &str) -> Result<std::collections::BTreeMap<String, crate::plan::Traffic>, NatError> {
        Ok(Default::default())
    }
    fn ensure_forward_accept(&self, _table: &str, _mark: u32) -> Result<(), NatError> {
        Ok(())
    }
    fn remove_forward_accept(&self, _table: &str, _mark: u32) -> Result<(), NatError> {
        Ok(())
    }
}

struct NoChecks;

impl crate::health::Probe for NoChecks {
    fn probe(&self, _health: crate::manifest::HealthSpec, _addr: SocketAddr) -> BoxFuture<'_, Result<(), crate::health::HealthError>> {
        Box::pin(async { panic!("handoff mode must not probe an address") })
    }
}

impl crate::drain::Connections for NoChecks {
    fn open_connections(&self, _pid: u32, _ports: Vec<u16>) -> BoxFuture<'_, Result<usize, crate::drain::DrainError>> {
        Box::pin(async { Ok(0) })
    }
}

impl crate::host::HostNet for NoChecks {
    fn host_ports(&self) -> Result<BTreeSet<(Protocol, u16, Option<std::net::IpAddr>)>, HostError> {
        Ok(BTreeSet::new())
    }
    fn forget_flows(&self, _protocol: crate::manifest::Protocol, _port: u16, _addr: IpAddr) -> Result<(), HostError> {
        Ok(())
    }
    fn drain_udp_flows(&self, _port: u16, _addr: IpAddr, _idle: Duration) -> Result<crate::host::UdpDrain, HostError> {
        Ok(crate::host::UdpDrain { busy: 0, deleted: Ok(0) })
    }
    fn claim_route_localnet(&self, _ifname: &str, _table: &str, _recorded: Option<bool>) -> Result<bool, HostError> {
        panic!("handoff mode must not touch route_localnet")
    }
    fn release_route_localnet(&self, _ifname: &str, _table: &str) -> Result<(), HostError> {
        panic!("handoff mode must not touch route_localnet")
    }
    fn watch_exit(&self, pid: u32) -> Result<crate::host::ExitWatch, HostError> {
        Err(HostError::Pidfd { pid, source: std::io::ErrorKind::Unsupported.into() })
    }
}

impl crate::dad::Ipv6Paths for NoChecks {
    fn readiness(&self, _pid: u32, _addr: std::net::Ipv6Addr) -> BoxFuture<'_, Result<Ipv6Readiness, crate::dad::DadError>> {
        Box::pin(async { Ok(Ipv6Readiness::Usable) })
    }
}

impl crate::relay::Relay for NoChecks {
    fn route(&self, routes: crate::relay::Routes) {
        assert!(routes.is_empty(), "handoff mode must not relay ::1: {routes:?}");
    }
    fn open_to(&self, _service: &str, _release: u32) -> usize {
        0
    }
    fn drain_udp(&self, _service: &str, _release: u32, _idle: std::time::Duration) -> usize {
        0
    }
    fn forget_udp(&self, _service: &str, _release: u32) {}
    fn listening(&self) -> BTreeSet<(crate::manifest::Protocol, u16)> {
        BTreeSet::new()
    }
}

fn no_effects() -> Effects {
    let none = Arc::new(NoChecks);
    Effects { probe: none.clone(), connections: none.clone(), host: none.clone(), ipv6: none.clone(), relay: none }
}

struct World {
    engine: Arc<FakeEngine>,
    brokers: Arc<FakeBrokers>,
    releaser: Releaser,
    tx: ProgressTx,
    log: Log,
}

/// The shared fake engine, its releases logging a slow start.
fn fake_engine() -> Arc<FakeEngine> {
    Arc::new(FakeEngine { logs: "slow start\n", ..Default::default() })
}

fn world_in(dir: &Path, engine: Arc<FakeEngine>) -> World {
    let log = engine.log.clone();
    let brokers = Arc::new(FakeBrokers {
        engine: engine.clone(),
        open: StdMutex::default(),
        allowed: StdMutex::default(),
        log: log.clone(),
    });
    let settings = Settings { table: "t".into(), mark: 1, instance: "i".into(), drain_poll: Duration::from_millis(5) , pause_at: None, pause_for: None };
    let releaser = Releaser::new(engine.clone(), Arc::new(NoFirewall), no_effects(), settings, StateStore::open(dir).unwrap())
        .unwrap()
        .with_handoff(brokers.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    World { engine, brokers, releaser, tx, log }
}

fn manifest(image: &str) -> Manifest {
    let text = format!(
        "name: web\nimage: {image}\nkeep: 3\n\
         handoff: {{namespace: host, listeners: [{{name: http, listen: 'tcp://127.0.0.1:8080'}}]}}\n\
         health: {{interval: 10ms, deadline: 200ms}}\n"
    );
    Manifest::parse(Path::new("web.yaml"), &text).unwrap()
}

fn position(log: &[String], entry: &str) -> usize {
    log.iter().position(|l| l == entry).unwrap_or_else(|| panic!("`{entry}` not in {log:?}"))
}

async fn active(w: &World) -> Option<u32> {
    w.releaser.snapshot().await.services.get("web").and_then(|s| s.active)
}

#[tokio::test]
async fn the_first_release_runs_the_image_command_under_handoff_exec_in_the_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(dir.path(), fake_engine());
    let o = w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
    assert_eq!((o.from, o.to, o.outcome.as_str()), (None, 1, "switched"));
    let spec = w.engine.spec("cutover-web-1");
    assert_eq!(spec.network, "host");
    assert_eq!(spec.entrypoint.unwrap(), vec![HELPER_IN_CONTAINER, "--service", "web", "--retry-ms", "5000", "--"]);
    assert_eq!(spec.command.unwrap(), vec!["/srv", "--port", "80"]);
    assert_eq!(spec.mounts, vec![("/state/bin/handoff-exec".to_string(), HELPER_IN_CONTAINER.to_string())]);
    assert_eq!(spec.env.get("NOTIFY_SOCKET").map(String::as_str), Some("@cutover/web/notify"));
    let open = w.brokers.open.lock().unwrap();
    let (bspec, adopt) = &open["web"];
    assert_eq!((bspec.namespace.clone(), bspec.listeners.len(), *adopt), (Namespace::Current, 1, None));
    assert_eq!(bspec.listeners[0].addr, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
}

#[tokio::test]
async fn deploy_stops_the_old_release_only_after_the_new_one_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(dir.path(), fake_engine());
    w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
    let pid1 = w.engine.pid_of("cutover-web-1").unwrap();
    let o = w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    assert_eq!((o.from, o.to), (Some(1), 2));
    let pid2 = w.engine.pid_of("cutover-web-2").unwrap();
    let log = w.log.lock().unwrap().clone();
    assert!(position(&log, &format!("allow {pid2}")) < position(&log, "stop id-cutover-web-1"), "{log:?}");
    assert!(position(&log, "stop id-cutover-web-1") < position(&log, &format!("forget {pid1}")), "{log:?}");
    assert_eq!(w.engine.running(), vec!["cutover-web-2"]);
    assert_eq!(w.engine.names(), vec!["cutover-web-1", "cutover-web-2"], "release 1 kept for rollback");
    let state = w.releaser.snapshot().await;
    assert_eq!(state.services["web"].release(1).unwrap().status, ReleaseStatus::Stopped);
    assert_eq!(state.services["web"].history.last().unwrap().outcome, "switched");
}

#[tokio::test]
async fn a_release_that_never_gets_ready_is_stopped_removed_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(dir.path(), fake_engine());
    w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
    let err = w.releaser.deploy("web", "web:never", &w.tx).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReleaseError::Unhealthy { release: 2, .. }), "{msg}");
    assert!(msg.contains("not ready within") && msg.contains("slow start"), "{msg}");
    assert_eq!(w.engine.names(), vec!["cutover-web-1"]);
    assert_eq!(w.engine.running(), vec!["cutover-web-1"]);
    let log = w.log.lock().unwrap().clone();
    assert!(position(&log, "stop id-cutover-web-2") < position(&log, "remove id-cutover-web-2"), "graceful first: {log:?}");
    assert!(!log.contains(&"stop id-cutover-web-1".to_string()), "{log:?}");
    assert_eq!(active(&w).await, Some(1));
    assert!(w.brokers.is_open("web"));
    let crashed = w.releaser.deploy("web", "web:crash", &w.tx).await.unwrap_err().to_string();
    assert!(crashed.contains("exited with code 3"), "{crashed}");
}

#[tokio::test]
async fn a_failed_first_release_leaves_no_service_and_no_listener() {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(dir.path(), fake_engine());
    assert!(w.releaser.apply(manifest("web:never"), &w.tx).await.is_err());
    assert!(w.releaser.snapshot().await.services.is_empty());
    assert!(w.engine.names().is_empty());
    assert!(!w.brokers.is_open("web"));
}

#[tokio::test]
async fn rollback_starts_the_kept_release_trusts_its_new_process_and_stops_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(dir.path(), fake_engine());
    w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    let o = w.releaser.rollback("web", None, &w.tx).await.unwrap();
    assert_eq!((o.from, o.to), (Some(2), 1));
    assert_eq!(w.engine.running(), vec!["cutover-web-1"]);
    let pid = w.engine.pid_of("cutover-web-1").unwrap();
    let log = w.log.lock().unwrap().clone();
    assert!(position(&log, &format!("allow {pid}")) < position(&log, "stop id-cutover-web-2"), "{log:?}");
}

#[tokio::test]
async fn a_restarted_daemon_takes_the_listeners_back_from_the_running_release() {
    let dir = tempfile::tempdir().unwrap();
    let engine = fake_engine();
    {
        let w = world_in(dir.path(), engine.clone());
        w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
        w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    }
    let w = world_in(dir.path(), engine.clone());
    let notes = w.releaser.reconcile().await.unwrap();
    let pid = engine.pid_of("cutover-web-2").unwrap() as i32;
    assert_eq!(w.brokers.open.lock().unwrap()["web"].1, Some(pid), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains(&format!("taken back from release process {pid}"))), "{notes:?}");
    assert!(w.brokers.allowed.lock().unwrap().contains(&pid));
    assert_eq!(engine.running(), vec!["cutover-web-2"]);
}

#[tokio::test]
async fn a_restart_in_the_middle_of_a_deploy_undoes_or_finishes_it() {
    for (phase, expect_active) in [(Phase::Starting, 1), (Phase::Healthy, 1), (Phase::Switched, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let engine = fake_engine();
        {
            // The first daemon's state directory is locked while it lives: the state
            // "it saved when it died" is written into `dir`.
            let first = tempfile::tempdir().unwrap();
            let w = world_in(first.path(), engine.clone());
            w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
            w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
            let mut state = w.releaser.snapshot().await;
            let svc = state.services.get_mut("web").unwrap();
            svc.operation = Some(Operation { kind: OperationKind::Deploy, from: Some(1), to: 2, phase, started_at: 0 });
            svc.active = Some(if phase >= Phase::Switched { 2 } else { 1 });
            StateStore::open(dir.path()).unwrap().save(&state).unwrap();
        }
        // Both containers run, as they do between "new is ready" and "old is stopped".
        engine.start("id-cutover-web-1".into()).await.unwrap();
        let w = world_in(dir.path(), engine.clone());
        let before = engine.log.lock().unwrap().len();
        w.releaser.reconcile().await.unwrap();
        if phase < Phase::Switched {
            // Undone: its stop signal first (it may hold accepted connections), then removed.
            let log = engine.log.lock().unwrap()[before..].to_vec();
            assert!(position(&log, "stop id-cutover-web-2") < position(&log, "remove id-cutover-web-2"), "{phase:?}: {log:?}");
        }
        assert_eq!(active(&w).await, Some(expect_active), "{phase:?}");
        assert_eq!(engine.running(), vec![format!("cutover-web-{expect_active}")], "{phase:?}");
        assert!(w.releaser.snapshot().await.services["web"].operation.is_none());
    }
}

#[tokio::test]
async fn switching_modes_or_changing_the_listeners_of_a_served_service_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(dir.path(), fake_engine());
    w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
    let nat = Manifest::parse(Path::new("w.yaml"), "name: web\nimage: web:1\nports: [{host: 8080, container: 80}]\n").unwrap();
    assert!(matches!(w.releaser.apply(nat, &w.tx).await, Err(ReleaseError::Conflict(_))));
    let mut other = manifest("web:1");
    other.handoff.as_mut().unwrap().listeners[0].listen = "tcp://127.0.0.1:8081".into();
    assert!(matches!(w.releaser.apply(other, &w.tx).await, Err(ReleaseError::Conflict(_))));
    assert_eq!(w.engine.running(), vec!["cutover-web-1"]);
}

#[tokio::test]
async fn remove_closes_the_listeners_and_removes_every_container() {
    let dir = tempfile::tempdir().unwrap();
    let w = world_in(dir.path(), fake_engine());
    w.releaser.apply(manifest("web:1"), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    w.releaser.remove("web").await.unwrap();
    assert!(w.engine.names().is_empty());
    assert!(!w.brokers.is_open("web"));
}

#[test]
fn an_image_without_a_command_cannot_be_wrapped() {
    let m = manifest("web:1");
    let err = container_spec("web", 1, "i", &m, &ImageCommand::default(), Path::new("/h")).unwrap_err();
    assert!(err.contains("neither ENTRYPOINT nor CMD"), "{err}");
    let mut m = manifest("web:1");
    m.command = Some(vec!["serve".into()]);
    let image = ImageCommand { entrypoint: vec!["/bin/app".into()], cmd: vec!["ignored".into()] };
    let spec = container_spec("web", 1, "i", &m, &image, Path::new("/h")).unwrap();
    assert_eq!(spec.command.unwrap(), vec!["/bin/app", "serve"], "the manifest's command replaces CMD, not ENTRYPOINT");
}
