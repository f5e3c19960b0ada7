//! What an operator meets first, tested through the `cutover` binary: the example
//! manifests, the systemd unit, shell completions, the manifest reference, the `--json`
//! outputs and exit codes, and `cutover demo` itself.
//!
//! Tests that need root and the Docker engine say why they skip when either is missing.
//! Those make their own names from the test process id (table `cutover_op_<pid>`, label
//! and image `cutover-op-<pid>`, demo lab `cutover-demo-t<pid>`) and a free port, so they
//! can run in parallel with other tests, and a guard removes what they made even when an
//! assertion fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cutover");
const DOCKER: &str = "/usr/bin/docker";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn cutover(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("NO_COLOR", "1").output().expect("run cutover")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Root and a Docker engine, or the reason there are none.
fn engine_missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new("/var/run/docker.sock").exists() {
        return Some("no Docker engine at /var/run/docker.sock (run .ci/provision)".into());
    }
    let ok = Command::new(DOCKER).arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !ok.is_ok_and(|s| s.success()) {
        return Some(format!("{DOCKER} version fails: the engine does not answer"));
    }
    None
}

// ---------------------------------------------------------------------------------------
// Example manifests

#[test]
fn example_manifests_are_valid_per_plan() {
    for (file, expect) in [
        ("manifests/web.yaml", "tcp . 8080 : <address of web's active release> . 80"),
        ("manifests/tcp.yaml", "tcp . 6379 : <address of cache's active release> . 6379"),
        ("manifests/sidecar.yaml", "listeners http=tcp://0.0.0.0:8443"),
        // A compose project: `web` has ports, `cache` stays compose's (tests/compose.rs
        // runs this file on a real engine with docker-compose).
        ("manifests/compose/compose.yaml", "tcp . 8080 : <address of web's active release> . 80"),
        ("manifests/compose/compose.yaml", "left to compose: `cache`"),
    ] {
        let path = repo(file);
        let out = cutover(&["plan", path.to_str().unwrap()]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{file}: {:?}\n{}{}", out.status, stdout, text(&out.stderr));
        assert!(stdout.contains(expect), "{file}: plan does not mention `{expect}`:\n{stdout}");
    }
}

#[test]
fn every_manifest_under_manifests_is_tested() {
    let mut found: Vec<String> = std::fs::read_dir(repo("manifests"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    found.sort();
    assert_eq!(found, ["sidecar.yaml", "tcp.yaml", "web.yaml"], "a new example manifest needs a case in example_manifests_are_valid_per_plan");
    let compose: Vec<String> = std::fs::read_dir(repo("manifests/compose"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    assert_eq!(compose, ["compose.yaml"], "a new compose example needs a case in example_manifests_are_valid_per_plan and tests/compose.rs");
}

#[test]
fn an_invalid_manifest_exits_2_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "name: web\nimage: x\nports:\n  - host: 70000\n    container: 80\n").unwrap();
    let out = cutover(&["plan", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("bad.yaml:4"), "{}", text(&out.stderr));
}

#[test]
fn an_unreachable_daemon_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = cutover(&["--socket", sock.to_str().unwrap(), "status", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot reach the cutover daemon"), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// systemd unit

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo("dist/cutover.service")).unwrap();
    for line in ["Type=notify", "ExecStart=/usr/local/bin/cutover daemon", "KillMode=process", "Restart=on-failure", "Requires=docker.service"] {
        assert!(unit.lines().any(|l| l.trim() == line), "the unit lacks `{line}`");
    }
    assert!(!unit.lines().any(|l| l.trim_start().starts_with("ExecStop")), "stopping the daemon must leave the rules alone");
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("SKIP systemd-analyze verify: /usr/bin/systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    // verify checks that ExecStart's program exists; it is installed only later, so point
    // it at the binary under test. Nothing else of the unit changes.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("cutover.service");
    std::fs::write(&copy, unit.replace("ExecStart=/usr/local/bin/cutover ", &format!("ExecStart={BIN} "))).unwrap();
    let out = Command::new(analyze).args(["verify", "--man=no"]).arg(&copy).output().unwrap();
    // verify exits 0 on mere parse warnings ("ignoring"); any message is a failure here.
    assert!(out.status.success() && out.stderr.is_empty(), "systemd-analyze verify: {:?}\n{}{}", out.status, text(&out.stdout), text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// Completions and help

#[test]
fn completions_generate_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cutover(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.len() > 200, "{shell}: a short script:\n{script}");
        for word in ["deploy", "rollback", "json"] {
            assert!(script.contains(word), "{shell}: `{word}` missing");
        }
    }
    assert_eq!(cutover(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn help_of_demo_and_completions_has_examples() {
    for cmd in ["demo", "completions"] {
        let out = cutover(&[cmd, "--help"]);
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("Examples:"), "{cmd} --help:\n{}", text(&out.stdout));
    }
}

// ---------------------------------------------------------------------------------------
// Manifest reference

/// Every key a manifest can hold, as dotted paths (`health.interval`, `ports[].host`),
/// with the value it serializes to when it is a default.
fn manifest_keys() -> (BTreeSet<String>, Vec<(String, String)>) {
    use cutover::manifest::{HandoffSpec, ListenerSpec, Manifest};
    let minimal = Manifest::parse(Path::new("m.yaml"), "name: a\nimage: x\nports: [{host: 1, container: 2}]\n").unwrap();
    let mut defaults = Vec::new();
    collect(&serde_norway::to_value(&minimal).unwrap(), "", &mut BTreeSet::new(), &mut defaults);
    // The container fields, each with a value (most are left out of the state when unset).
    let container = Manifest::parse(
        Path::new("c.yaml"),
        "name: a\nimage: x\nports: [{host: 1, container: 2}]\npull: always\nvolumes: [\"v:/data:ro\"]\n\
         env_file: e.env\nuser: \"1000\"\nworking_dir: /app\nentrypoint: [/app]\nlabels: {l: v}\nmem_limit: 64m\n\
         cpus: 0.5\npids_limit: 10\nulimits: {nofile: 10}\ncap_add: [NET_ADMIN]\ncap_drop: [ALL]\nread_only: true\n\
         tmpfs: /run\nextra_hosts: [\"db:10.0.0.2\"]\ndns: [10.0.0.53]\nsysctls: {net.core.somaxconn: 1024}\n\
         security_opt: [no-new-privileges]\ninit: true\nshm_size: 64m\nlogging: {driver: local, options: {max-size: 1m}}\n\
         group_add: [audio]\ndevices: [/dev/null]\non_failure: rollback\n",
    )
    .unwrap();
    let mut full = Manifest { name: minimal.name.clone(), ports: minimal.ports.clone(), ..container };
    // Every optional field set, so that it serializes.
    full.ports[0].host_ip = Some("127.0.0.1".parse().unwrap());
    full.health.port = Some(80);
    full.command = Some(vec!["/app".into()]);
    full.env.insert("K".into(), "v".into());
    full.handoff = Some(HandoffSpec {
        namespace: "host".into(),
        listeners: vec![ListenerSpec { name: "http".into(), listen: "tcp://0.0.0.0:80".into() }],
        allow_uids: vec![1],
    });
    let mut keys = BTreeSet::new();
    collect(&serde_norway::to_value(&full).unwrap(), "", &mut keys, &mut Vec::new());
    // Free-form maps: their keys are the user's, not the schema's.
    keys.retain(|k| !["env.", "labels.", "sysctls.", "ulimits.", "logging.options."].iter().any(|m| k.starts_with(m)));
    defaults.retain(|(k, _)| !["name", "image", "ports[].host", "ports[].container"].contains(&k.as_str()));
    (keys, defaults)
}

fn collect(v: &serde_norway::Value, prefix: &str, keys: &mut BTreeSet<String>, leaves: &mut Vec<(String, String)>) {
    use serde_norway::Value;
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap();
                let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                keys.insert(path.clone());
                collect(v, &path, keys, leaves);
            }
        }
        Value::Sequence(s) => {
            for v in s {
                collect(v, &format!("{prefix}[]"), keys, leaves);
            }
        }
        Value::String(s) => leaves.push((prefix.to_string(), s.clone())),
        Value::Number(n) => leaves.push((prefix.to_string(), n.to_string())),
        Value::Bool(b) => leaves.push((prefix.to_string(), b.to_string())),
        _ => {}
    }
}

#[test]
fn manifest_reference_documents_every_field_and_default() {
    let doc = std::fs::read_to_string(repo("docs/manifest.md")).unwrap();
    let (keys, defaults) = manifest_keys();
    assert!(keys.contains("health.deadline") && keys.contains("handoff.listeners[].listen"), "{keys:?}");
    let missing: Vec<&String> = keys.iter().filter(|k| !doc.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "docs/manifest.md does not document {missing:?}");
    for (key, value) in defaults {
        let row = doc.lines().find(|l| l.starts_with(&format!("| `{key}` "))).unwrap_or_else(|| panic!("no table row for `{key}`"));
        assert!(row.contains(&format!("`{value}`")), "docs/manifest.md gives `{key}` a default other than `{value}`:\n{row}");
    }
    for value in ["http", "tcp", "docker", "none", "udp"] {
        assert!(doc.contains(&format!("`{value}`")), "docs/manifest.md does not mention `{value}`");
    }
}

// ---------------------------------------------------------------------------------------
// --json against a real daemon

/// A private daemon and what it made; removed on drop, also after a failed assertion.
struct PrivateDaemon {
    child: Option<Child>,
    socket: PathBuf,
    table: String,
    instance: String,
    images: Vec<String>,
    /// A Docker network named like the instance was created.
    network: bool,
    _dir: tempfile::TempDir,
}

impl PrivateDaemon {
    fn start() -> PrivateDaemon {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        let socket = dir.path().join("cutover.sock");
        let table = format!("cutover_op_{pid}");
        let instance = format!("cutover-op-{pid}");
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(["daemon", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(["--table", &table, "--instance", &instance])
            .env_remove("NOTIFY_SOCKET")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = PrivateDaemon { child: Some(child), socket, table, instance, images: Vec::new(), network: false, _dir: dir };
        let started = Instant::now();
        while d.cli(&["status", "--json"]).status.code() == Some(3) {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({status}): {}", std::fs::read_to_string(d._dir.path().join("daemon.log")).unwrap_or_default());
            }
            assert!(started.elapsed() < Duration::from_secs(20), "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN).arg("--socket").arg(&self.socket).args(args).env("NO_COLOR", "1").output().unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(out.status.success(), "cutover {args:?}: {:?}\n{}", out.status, text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cutover {args:?} printed no JSON ({e}):\n{}", text(&out.stdout)))
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let started = Instant::now();
            while child.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_everything(&self.table, &self.instance, &self.images);
        // The daemon's claim on its table: it leaves the lock file on purpose.
        let lock_dir = Path::new(cutover::daemon::table_lock::LOCK_DIR);
        let _ = std::fs::remove_file(cutover::daemon::table_lock::lock_path(lock_dir, &self.table));
        if self.network {
            let _ = Command::new(DOCKER).args(["network", "rm", &self.instance]).output();
        }
    }
}

/// Containers by label, the table, the DOCKER-USER rule and the images: the manual
/// cleanup docs/operations.md describes, for one test's names.
fn remove_everything(table: &str, instance: &str, images: &[String]) {
    let ids = Command::new(DOCKER).args(["ps", "-aq", "--filter", &format!("label=cutover.instance={instance}")]).output();
    if let Ok(ids) = ids {
        for id in text(&ids.stdout).split_whitespace() {
            let _ = Command::new(DOCKER).args(["rm", "-f", id]).output();
        }
    }
    let _ = Command::new("nft").args(["delete", "table", "inet", table]).output();
    let comment = format!("cutover:{table}");
    for chain in ["DOCKER-USER", "FORWARD"] {
        let _ = Command::new("iptables")
            .args(["-w", "-D", chain, "-m", "mark", "--mark", "0x20000000/0x20000000", "-m", "comment", "--comment", &comment, "-j", "ACCEPT"])
            .output();
    }
    for image in images {
        let _ = Command::new(DOCKER).args(["rmi", "-f", image]).output();
    }
}

#[test]
fn json_outputs_of_apply_deploy_status_history_remove_parse() {
    if let Some(why) = engine_missing() {
        eprintln!("SKIP --json against a daemon: {why}");
        return;
    }
    let mut d = PrivateDaemon::start();
    let pid = std::process::id();
    for release in ["v1", "v2"] {
        let tag = format!("cutover-op-{pid}:{release}");
        d.images.push(tag.clone());
        let out = d.cli(&["demo-image", "--tag", &tag, "--release", release]);
        assert!(out.status.success(), "demo-image: {}", text(&out.stderr));
    }
    // A network of its own: the daemon sets route_localnet on the service's bridge and
    // restores it on removal, which must not touch a bridge other tests rely on.
    let net = Command::new(DOCKER).args(["network", "create", &d.instance]).output().unwrap();
    assert!(net.status.success(), "docker network create: {}", text(&net.stderr));
    d.network = true;
    let service = format!("op-{pid}");
    let port = common::free_port();
    let manifest = format!(
        "name: {service}\nimage: {}\nports: [{{host: {port}, container: 80}}]\nhealth: {{type: http, path: /healthz, interval: 200ms}}\ndrain_timeout: 1s\nstop_timeout: 2s\nnetwork: {}\n",
        d.images[0], d.instance
    );
    let file = d._dir.path().join("op.yaml");
    std::fs::write(&file, manifest).unwrap();

    let applied = d.json(&["apply", file.to_str().unwrap(), "--json"]);
    assert_eq!(applied[0]["service"], service.as_str(), "{applied}");
    assert_eq!(applied[0]["to"], 1, "{applied}");

    let deployed = d.json(&["deploy", &service, "--image", &d.images[1], "--json"]);
    assert_eq!(deployed["to"], 2, "{deployed}");
    assert!(deployed["switch_us"].as_u64().is_some(), "{deployed}");

    let status = d.json(&["status", "--json"]);
    let mine = status.as_array().unwrap().iter().find(|s| s["name"] == service.as_str()).unwrap_or_else(|| panic!("{status}"));
    assert_eq!(mine["active"], 2, "{status}");
    assert_eq!(mine["image"], d.images[1].as_str(), "{status}");

    let one = d.json(&["status", &service, "--json"]);
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one}");

    let history = d.json(&["history", &service, "--json"]);
    assert_eq!(history["active"], 2, "{history}");
    assert_eq!(history["releases"].as_array().map(Vec::len), Some(2), "{history}");
    assert!(history["events"].as_array().is_some_and(|e| !e.is_empty()), "{history}");

    let rolled = d.json(&["rollback", &service, "--json"]);
    assert_eq!((rolled["from"].as_u64(), rolled["to"].as_u64()), (Some(2), Some(1)), "{rolled}");

    // An unknown service is invalid input: exit 2, and no JSON on stdout.
    let unknown = d.cli(&["history", "no-such-service", "--json"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown.stderr));

    let removed = d.json(&["remove", &service, "--json"]);
    assert_eq!(removed["outcome"], "removed", "{removed}");
    let after = d.json(&["status", "--json"]);
    assert!(after.as_array().unwrap().iter().all(|s| s["name"] != service.as_str()), "{after}");
}

// ---------------------------------------------------------------------------------------
// The demo

#[test]
fn demo_runs_to_the_end_with_no_failed_request_and_cleans_up() {
    if let Some(why) = engine_missing() {
        eprintln!("SKIP cutover demo: {why}");
        return;
    }
    let lab = format!("cutover-demo-t{}", std::process::id());
    let table = lab.replace('-', "_");
    let images = vec![format!("{lab}:v1"), format!("{lab}:v2")];
    struct Guard<'a>(&'a str, &'a str, &'a [String]);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            remove_everything(self.0, self.1, self.2);
            let _ = Command::new(DOCKER).args(["network", "rm", self.1]).output();
        }
    }
    let _guard = Guard(&table, &lab, &images);
    let port = common::free_port().to_string();
    let out = cutover(&["demo", "--port", &port, "--lab-name", &lab, "--settle", "1s", "--json"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "cutover demo: {:?}\n{stdout}\n{}", out.status, text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, ["steady on v1", "deploy v2", "rollback to v1"]);
    for (s, now) in steps.iter().zip(["v1", "v2", "v1"]) {
        assert_eq!(s["failed"], 0, "{s}");
        assert!(s["requests"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["now_answering"], now, "{s}");
    }
    for s in &steps[1..] {
        assert!(s["switch_us"].as_u64().is_some() && s["drain_ms"].as_u64().is_some(), "{s}");
        // New connections moved during the step: both releases answered.
        assert!(s["answered"]["v1"].as_u64() > Some(0) && s["answered"]["v2"].as_u64() > Some(0), "{s}");
    }
    assert_eq!(report["failed"], 0);

    // Nothing of it is left.
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!text(&tables.stdout).contains(&table), "{}", text(&tables.stdout));
    let ps = Command::new(DOCKER).args(["ps", "-aq", "--filter", &format!("label=cutover.instance={lab}")]).output().unwrap();
    assert!(text(&ps.stdout).trim().is_empty(), "containers left: {}", text(&ps.stdout));
    for image in &images {
        let inspect = Command::new(DOCKER).args(["image", "inspect", image]).output().unwrap();
        assert!(!inspect.status.success(), "image {image} left");
    }
    for chain in ["DOCKER-USER", "FORWARD"] {
        let rules = Command::new("iptables").args(["-w", "-S", chain]).output().unwrap();
        assert!(!text(&rules.stdout).contains(&format!("cutover:{table}")), "{chain}: {}", text(&rules.stdout));
    }
    let net = Command::new(DOCKER).args(["network", "inspect", &lab]).output().unwrap();
    assert!(!net.status.success(), "network {lab} left");
}

// ---------------------------------------------------------------------------------------
// Install script

#[test]
fn install_script_stages_binary_unit_completions_and_docs() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(repo("dist/install.sh"))
        .env("DESTDIR", root.path())
        .env("BIN", BIN)
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {:?}\n{}", out.status, text(&out.stderr));
    for file in [
        "usr/local/bin/cutover",
        "etc/systemd/system/cutover.service",
        "usr/share/bash-completion/completions/cutover",
        "usr/local/share/zsh/site-functions/_cutover",
        "usr/share/fish/vendor_completions.d/cutover.fish",
        "usr/local/share/doc/cutover/operations.md",
        "usr/local/share/cutover/manifests/web.yaml",
    ] {
        let path = root.path().join(file);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{file} is missing or empty after install.sh");
    }
}

// ---------------------------------------------------------------------------------------
// Vagrant lab

#[test]
fn vagrant_labs_use_the_ci_provisioning_and_validate() {
    let provision = std::fs::read_to_string(repo("vagrant/provision.sh")).unwrap();
    assert!(provision.contains(".ci/provision"), "the lab must prepare hosts as CI does");
    assert!(provision.contains("dist/install.sh") && provision.contains("cutover demo"));
    for dir in ["vagrant", "vagrant/two-host"] {
        let file = std::fs::read_to_string(repo(&format!("{dir}/Vagrantfile"))).unwrap();
        assert!(file.contains("debian/bookworm64"), "{dir}: not the Debian 12 box");
        assert!(file.contains(":libvirt") && file.contains(":virtualbox"), "{dir}: both providers");
        assert!(file.contains("provision.sh"), "{dir}: does not run the lab provisioning");
    }
    let vagrant = ["/usr/bin/vagrant", "/usr/local/bin/vagrant"].into_iter().map(Path::new).find(|p| p.exists());
    let Some(vagrant) = vagrant else {
        eprintln!("SKIP vagrant validate: vagrant is not installed (Debian 12: apt-get install vagrant)");
        return;
    };
    for dir in ["vagrant", "vagrant/two-host"] {
        // Its machine state goes to a temporary directory, not into the checkout.
        let state = tempfile::tempdir().unwrap();
        let out = Command::new(vagrant)
            .args(["validate", "--ignore-provider"])
            .current_dir(repo(dir))
            .env("VAGRANT_DOTFILE_PATH", state.path())
            .env("VAGRANT_HOME", state.path().join("home"))
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "vagrant validate in {dir}: {:?}\n{}{}", out.status, text(&out.stdout), text(&out.stderr));
    }
}
