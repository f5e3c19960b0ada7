//! The fleet lab as the tests use it: [`Fleet`] runs `lab/fleet up NAME HOSTS` (hosts
//! with their own Docker engine, cutover daemon and sshd, an Ansible control host and
//! HAProxy, each in namespaces of its own) and `lab/fleet down NAME` when dropped, also
//! when the test panics. Playbooks run from the control host over SSH, as on a real
//! fleet; the test reads each host's state through its daemon's socket.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::cmd::run_bounded;
use super::daemon::{CliOutput, CUTOVER};
use super::netns::At;

/// The lab script, from the crate root.
pub const FLEET_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/lab/fleet");
/// The collection's playbooks, from the crate root.
pub const PLAYBOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/ansible/playbooks");

/// The load balancer's address and the service port (lab/fleet's fixed plan).
pub const LB_URL: &str = "http://198.51.100.3:8080/";

/// How long one playbook may take before the test fails.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(240);

/// One fleet lab.
#[derive(Debug)]
pub struct Fleet {
    pub name: String,
    pub hosts: usize,
}

/// What one `ansible-playbook` run printed, and its recap.
#[derive(Debug, Clone)]
pub struct PlaybookRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// One host's line of the PLAY RECAP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recap {
    pub ok: u32,
    pub changed: u32,
    pub unreachable: u32,
    pub failed: u32,
    pub skipped: u32,
    pub rescued: u32,
}

impl PlaybookRun {
    /// The PLAY RECAP by host; a host that no play reached has no line.
    pub fn recap(&self) -> BTreeMap<String, Recap> {
        let mut out = BTreeMap::new();
        let Some(at) = self.stdout.rfind("PLAY RECAP") else { return out };
        for line in self.stdout[at..].lines().skip(1) {
            let Some((host, counts)) = line.split_once(" : ") else { continue };
            let mut r = Recap::default();
            for kv in counts.split_whitespace() {
                let Some((k, v)) = kv.split_once('=') else { continue };
                let v: u32 = v.parse().unwrap_or(0);
                match k {
                    "ok" => r.ok = v,
                    "changed" => r.changed = v,
                    "unreachable" => r.unreachable = v,
                    "failed" => r.failed = v,
                    "skipped" => r.skipped = v,
                    "rescued" => r.rescued = v,
                    _ => {}
                }
            }
            out.insert(host.trim().to_string(), r);
        }
        out
    }

    /// Sum of `changed` over every host.
    pub fn changed(&self) -> u32 {
        self.recap().values().map(|r| r.changed).sum()
    }

    /// The whole output, for assertion messages.
    pub fn text(&self) -> String {
        format!("exit {:?}\n{}\n{}", self.code, self.stdout, self.stderr)
    }
}

impl Fleet {
    /// `lab/fleet up <prefix><pid> hosts`; panics with the script's output if it fails
    /// (the guard exists first, so whatever `up` made is removed).
    #[track_caller]
    pub fn up(prefix: &str, hosts: usize) -> Fleet {
        super::docker::require_root();
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        // A fleet of a crashed run with this process id, and fleets of tests that were
        // killed before their cleanup: remove them first.
        let _ = Command::new(FLEET_SCRIPT).args(["down", &name]).output();
        sweep_orphans();
        let fleet = Fleet { name: name.clone(), hosts };
        let mut c = Command::new(FLEET_SCRIPT);
        c.args(["up", &name, &hosts.to_string()]).env("CUTOVER", CUTOVER).env("FLEET_OWNER", std::process::id().to_string());
        let o = run_bounded(&mut c, Duration::from_secs(300));
        assert!(o.code == Some(0), "`lab/fleet up {name} {hosts}` failed ({:?}):\n{}{}", o.code, o.stdout, o.stderr);
        fleet
    }

    /// Host names as the inventory has them: h1, h2...
    pub fn host_names(&self) -> Vec<String> {
        (1..=self.hosts).map(|i| format!("h{i}")).collect()
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/cutover-fleet/{}", self.name))
    }

    /// Host `n`'s (1-based) daemon socket.
    pub fn socket(&self, n: usize) -> PathBuf {
        self.run_dir().join(format!("h{n}/cutover.sock"))
    }

    /// Host `n`'s engine, for `--docker` and `DOCKER_HOST`.
    pub fn docker_host(&self, n: usize) -> String {
        format!("unix:///run/cutover-lab/{}-h{n}/docker.sock", self.name)
    }

    /// Host `n`'s address on the lab network.
    pub fn addr(&self, n: usize) -> String {
        format!("198.51.100.1{n}")
    }

    /// The load balancer's namespace (the clients run there too).
    pub fn lb(&self) -> At {
        At::Netns(format!("{}-lb", self.name))
    }

    /// A demo image built in host `n`'s engine.
    #[track_caller]
    pub fn demo_image(&self, n: usize, tag: &str, release: &str, env: &[(&str, &str)]) {
        let mut c = Command::new(CUTOVER);
        c.args(["demo-image", "--tag", tag, "--release", release, "--docker", &self.docker_host(n)]);
        for (k, v) in env {
            c.args(["--env", &format!("{k}={v}")]);
        }
        let o = run_bounded(&mut c, Duration::from_secs(120));
        assert!(o.code == Some(0), "building {tag} on h{n} of {}: {}{}", self.name, o.stdout, o.stderr);
    }

    /// `ansible-playbook <args>` from the control host.
    #[track_caller]
    pub fn playbook(&self, args: &[&str]) -> PlaybookRun {
        let mut c = Command::new(FLEET_SCRIPT);
        c.args(["playbook", &self.name]).args(args);
        let o = run_bounded(&mut c, PLAYBOOK_TIMEOUT);
        PlaybookRun { code: o.code, stdout: o.stdout, stderr: o.stderr }
    }

    /// `cutover <args>` against host `n`'s daemon.
    #[track_caller]
    pub fn cli(&self, n: usize, args: &[&str]) -> CliOutput {
        let mut c = Command::new(CUTOVER);
        c.args(args).env("CUTOVER_SOCKET", self.socket(n)).env_remove("CUTOVER_LOG");
        let o = run_bounded(&mut c, Duration::from_secs(60));
        CliOutput { code: o.code.unwrap_or(-1), stdout: o.stdout, stderr: o.stderr }
    }

    /// Host `n`'s `cutover status --json` entry of `service` (Null if it has none).
    #[track_caller]
    pub fn status(&self, n: usize, service: &str) -> serde_json::Value {
        let o = self.cli(n, &["status", "--json"]);
        assert!(o.code == 0, "status on h{n}: {}{}", o.stdout, o.stderr);
        let all: serde_json::Value =
            serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("status --json on h{n}: {e}: {}", o.stdout));
        all.as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == service).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// The image host `n` serves `service` with.
    #[track_caller]
    pub fn image(&self, n: usize, service: &str) -> String {
        self.status(n, service)["image"].as_str().unwrap_or("-").to_string()
    }

    /// Everything a host's state is made of, to compare before and after: its status,
    /// its history and the names of its engine's containers.
    #[track_caller]
    pub fn snapshot(&self, n: usize, service: &str) -> String {
        let status = self.status(n, service);
        let history = self.cli(n, &["history", service, "--json"]).stdout;
        let mut c = Command::new(super::cmd::DOCKER);
        c.args(["ps", "-a", "--format", "{{.Names}} {{.Image}} {{.State}}"]).env("DOCKER_HOST", self.docker_host(n));
        let mut containers: Vec<String> = run_bounded(&mut c, Duration::from_secs(60)).stdout.lines().map(str::to_string).collect();
        containers.sort();
        format!("status: {status}\nhistory: {history}\ncontainers: {containers:?}")
    }
}

/// `lab/fleet down` of every fleet whose recorded owner process is gone (labs made by
/// hand have no owner and are left alone).
fn sweep_orphans() {
    let Ok(dirs) = std::fs::read_dir("/run/cutover-fleet") else { return };
    for d in dirs.flatten() {
        let Ok(owner) = std::fs::read_to_string(d.path().join("owner")) else { continue };
        let Ok(pid) = owner.trim().parse::<i32>() else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let name = d.file_name().to_string_lossy().into_owned();
        eprintln!("removing fleet {name} of a test process ({pid}) that is gone");
        let _ = Command::new(FLEET_SCRIPT).args(["down", &name]).output();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        match Command::new(FLEET_SCRIPT).args(["down", &self.name]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("cleanup: `lab/fleet down {}`: {}", self.name, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("cleanup: cannot run {FLEET_SCRIPT}: {e}"),
        }
    }
}
