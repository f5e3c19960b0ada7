//! The fake container engine both modes' state-machine tests run on: it keeps state (which
//! containers exist, run, at which address and pid, from which spec), so tests assert what
//! a user would see. Mode-specific fakes (the handoff brokers, the fakes that fail a test
//! when handoff mode touches NAT) stay with their tests. Test code only.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::docker::{ContainerInfo, ContainerSpec, DockerError, Engine, ImageCommand, Published};
use crate::manifest::Protocol;
use crate::plan::Bridge;

/// What the engine did, in order (`run NAME`, `start ID`, `stop ID`, `remove ID`), shared
/// with the fakes of a test that log into the same list.
pub type Log = Arc<Mutex<Vec<String>>>;

#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub info: ContainerInfo,
    pub spec: ContainerSpec,
}

pub struct FakeEngine {
    pub containers: Mutex<BTreeMap<String, FakeContainer>>,
    pub next_ip: AtomicU8,
    pub next_pid: AtomicU32,
    /// Containers also get an IPv6 address (a network created with `--ipv6`).
    pub dual_stack: AtomicBool,
    pub log: Log,
    /// What every container's log ends with.
    pub logs: &'static str,
}

impl Default for FakeEngine {
    fn default() -> Self {
        FakeEngine {
            containers: Mutex::default(),
            next_ip: AtomicU8::default(),
            next_pid: AtomicU32::default(),
            dual_stack: AtomicBool::default(),
            log: Log::default(),
            logs: "listening\nhealth check failing\n",
        }
    }
}

impl FakeEngine {
    pub fn running(&self) -> Vec<String> {
        let c = self.containers.lock().unwrap();
        c.values().filter(|c| c.info.running).map(|c| c.info.name.clone()).collect()
    }
    pub fn names(&self) -> Vec<String> {
        self.containers.lock().unwrap().values().map(|c| c.info.name.clone()).collect()
    }
    /// The image of the running container at `addr`.
    pub fn image_at(&self, addr: Ipv4Addr) -> Option<String> {
        let c = self.containers.lock().unwrap();
        c.values().find(|c| c.info.addr == Some(addr) && c.info.running).map(|c| c.spec.image.clone())
    }
    pub fn spec(&self, name: &str) -> ContainerSpec {
        self.containers.lock().unwrap().values().find(|c| c.info.name == name).unwrap().spec.clone()
    }
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        self.containers.lock().unwrap().values().find(|c| c.info.name == name).and_then(|c| c.info.pid)
    }
    /// The image of the running container whose main process is `pid`.
    pub fn image_of_pid(&self, pid: i32) -> Option<String> {
        let c = self.containers.lock().unwrap();
        c.values().find(|c| c.info.running && c.info.pid == Some(pid as u32)).map(|c| c.spec.image.clone())
    }
    /// `docker network disconnect`: the container runs on without an address.
    pub fn disconnect(&self, id: &str) {
        if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
            c.info.addr = None;
            c.info.addr6 = None;
        }
    }
    fn note(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
    fn fresh_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 17, 0, 2 + self.next_ip.fetch_add(1, Ordering::SeqCst))
    }
    fn fresh_pid(&self) -> u32 {
        1000 + self.next_pid.fetch_add(1, Ordering::SeqCst)
    }
    /// The IPv6 address that goes with `ip` on a dual-stack network.
    pub fn ip6_of(&self, ip: Ipv4Addr) -> Option<Ipv6Addr> {
        self.dual_stack.load(Ordering::SeqCst).then(|| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(ip.octets()[3])))
    }
}

impl Engine for FakeEngine {
    fn keep_running(&self, _id: String) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async { Ok(()) })
    }
    /// An image named `missing` is not there; one named `crash` exits at once (code 3).
    fn run(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<ContainerInfo, DockerError>> {
        Box::pin(async move {
            if spec.image.contains("missing") {
                return Err(DockerError::NoImage(spec.image));
            }
            let crash = spec.image.contains("crash");
            let ip = self.fresh_ip();
            let info = ContainerInfo {
                id: format!("id-{}", spec.name),
                name: spec.name.clone(),
                running: !crash,
                pid: (!crash).then(|| self.fresh_pid()),
                addr: Some(ip),
                addr6: self.ip6_of(ip),
                exit_code: crash.then_some(3),
                restarts: 0,
                health: None,
                labels: spec.labels.clone(),
                kept_running: false,
            };
            self.note(format!("run {}", spec.name));
            self.containers.lock().unwrap().insert(info.id.clone(), FakeContainer { info: info.clone(), spec });
            Ok(info)
        })
    }
    /// Docker may hand out another address (and always another pid) on start.
    fn start(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move {
            let (ip, pid) = (self.fresh_ip(), self.fresh_pid());
            if let Some(c) = self.containers.lock().unwrap().get_mut(&id) {
                c.info.running = true;
                c.info.pid = Some(pid);
                c.info.addr = Some(ip);
                c.info.addr6 = self.ip6_of(ip);
            }
            self.note(format!("start {id}"));
            Ok(())
        })
    }
    fn inspect(&self, id: String, _network: String) -> BoxFuture<'_, Result<Option<ContainerInfo>, DockerError>> {
        Box::pin(async move { Ok(self.containers.lock().unwrap().get(&id).map(|c| c.info.clone())) })
    }
    fn stop(&self, id: String, _timeout: Duration) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move {
            if let Some(c) = self.containers.lock().unwrap().get_mut(&id) {
                c.info.running = false;
                c.info.pid = None;
            }
            self.note(format!("stop {id}"));
            Ok(())
        })
    }
    /// By id or by name.
    fn remove(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move {
            self.containers.lock().unwrap().retain(|k, c| *k != id && c.info.name != id);
            self.note(format!("remove {id}"));
            Ok(())
        })
    }
    fn logs_tail(&self, _id: String, _lines: usize) -> BoxFuture<'_, Result<String, DockerError>> {
        Box::pin(async move { Ok(self.logs.to_string()) })
    }
    /// Two ports other containers publish: 9999 on every address, 9998 on 10.0.0.9.
    fn published(&self) -> BoxFuture<'_, Result<Vec<Published>, DockerError>> {
        Box::pin(async {
            Ok(vec![
                Published { protocol: Protocol::Tcp, port: 9999, host_ip: None, container: "someone-else".into() },
                Published { protocol: Protocol::Tcp, port: 9998, host_ip: Some([10, 0, 0, 9].into()), container: "on-one-address".into() },
            ])
        })
    }
    fn bridge(&self, _network: String) -> BoxFuture<'_, Result<Option<Bridge>, DockerError>> {
        Box::pin(async { Ok(None) })
    }
    fn list_instance(&self, _instance: String) -> BoxFuture<'_, Result<Vec<ContainerInfo>, DockerError>> {
        Box::pin(async move { Ok(self.containers.lock().unwrap().values().map(|c| c.info.clone()).collect()) })
    }
    fn events(&self, _instance: String) -> futures_util::stream::BoxStream<'_, Result<(String, String), DockerError>> {
        Box::pin(futures_util::stream::empty())
    }
    /// Joins the network with a fresh address (`connect ID NETWORK`).
    fn connect_network(&self, id: String, network: String, _aliases: Vec<String>) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move {
            let ip = self.fresh_ip();
            if let Some(c) = self.containers.lock().unwrap().get_mut(&id) {
                c.info.addr = Some(ip);
                c.info.addr6 = self.ip6_of(ip);
            }
            self.note(format!("connect {id} {network}"));
            Ok(())
        })
    }
    fn image_command(&self, _image: String) -> BoxFuture<'_, Result<ImageCommand, DockerError>> {
        Box::pin(async { Ok(ImageCommand { entrypoint: vec!["/srv".into()], cmd: vec!["--port".into(), "80".into()] }) })
    }
}
