//! The engine lab as the tests use it: [`Lab`] runs `lab/engine up NAME ENGINE` (an
//! engine in its own network namespace, with a client namespace as another host) and
//! `lab/engine down NAME` when dropped, also when the test panics; [`LabDaemon`] is a
//! `cutover daemon` inside the lab's namespace, against the lab engine's socket.
//!
//! Everything a lab makes lives in its two namespaces, its socket and data directories
//! and its engine's cgroups, so `down` removes all of it; the only thing outside is the
//! route_localnet markers of its bridges, which [`Lab`] removes too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::cmd::run_bounded;
use super::daemon::{spawn_until_listening, tail, CliOutput, CUTOVER};
use super::netns::At;

/// The lab script, from the crate root.
pub const LAB_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/lab/engine");

/// The engines a lab can run.
pub const ENGINES: [&str; 4] = ["docker20", "docker26", "docker28", "podman5"];

/// The engines this run covers: `CUTOVER_ENGINES` (`all`, or a comma-separated list of
/// [`ENGINES`]); Docker 28 and Podman 5 when unset.
pub fn engines_under_test() -> Vec<String> {
    match std::env::var("CUTOVER_ENGINES").ok().filter(|s| !s.trim().is_empty()) {
        None => vec!["docker28".into(), "podman5".into()],
        Some(s) if s.trim() == "all" => ENGINES.iter().map(|e| e.to_string()).collect(),
        Some(s) => s
            .split(',')
            .map(|e| e.trim().to_string())
            .inspect(|e| assert!(ENGINES.contains(&e.as_str()), "CUTOVER_ENGINES: unknown engine `{e}` (use {ENGINES:?} or all)"))
            .collect(),
    }
}

/// One lab: engine `engine` in netns `name`, a client host in netns `<name>-c`.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    pub engine: String,
    bridges: Vec<String>,
}

/// The lab's fixed addresses (each lab has its own namespaces, so they never clash).
pub const HOST_ADDR4: &str = "192.0.2.1";
pub const CLIENT_ADDR4: &str = "192.0.2.2";
pub const HOST_ADDR6: &str = "2001:db8:ab::1";
pub const CLIENT_ADDR6: &str = "2001:db8:ab::2";

impl Lab {
    /// Starts `engine` in a lab named `<prefix>-<pid>` (unique across parallel test
    /// processes); panics with the script's output if it cannot.
    #[track_caller]
    pub fn up(prefix: &str, engine: &str) -> Lab {
        Lab::up_with(prefix, engine, "")
    }

    /// `up` with the engine's daemon.json replaced by `daemon_json` (Docker engines;
    /// empty: the lab's default).
    #[track_caller]
    pub fn up_with(prefix: &str, engine: &str, daemon_json: &str) -> Lab {
        super::docker::require_root();
        sweep_stale_labs();
        let name = format!("{prefix}-{}", std::process::id());
        // A lab of a crashed run of this process id: remove it first.
        let _ = Command::new(LAB_SCRIPT).args(["down", &name]).output();
        let lab = Lab { name: name.clone(), engine: engine.to_string(), bridges: Vec::new() };
        let out = Command::new(LAB_SCRIPT)
            .args(["up", &name, engine])
            .env("LAB_DAEMON_JSON", daemon_json)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {LAB_SCRIPT}: {e}"));
        assert!(
            out.status.success(),
            "`lab/engine up {name} {engine}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    /// `lab/engine stop|start NAME`: an engine outage and its end.
    #[track_caller]
    pub fn engine(&self, action: &str) {
        let out = Command::new(LAB_SCRIPT)
            .args([action, &self.name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {LAB_SCRIPT}: {e}"));
        assert!(
            out.status.success(),
            "`lab/engine {action} {}` failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The engine's socket path.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/cutover-lab/{}/docker.sock", self.name))
    }

    /// `unix://<socket>` for `--docker` and `DOCKER_HOST`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The engine's host namespace.
    pub fn at(&self) -> At {
        At::Netns(self.name.clone())
    }

    /// The client host's namespace.
    pub fn client(&self) -> At {
        At::Netns(self.client_netns())
    }

    pub fn client_netns(&self) -> String {
        format!("{}-c", self.name)
    }

    /// Debian's docker client against the lab engine; must succeed; returns stdout.
    #[track_caller]
    pub fn docker(&self, args: &[&str]) -> String {
        let mut c = Command::new(super::cmd::DOCKER);
        c.args(args).env("DOCKER_HOST", self.docker_host());
        let o = run_bounded(&mut c, Duration::from_secs(120));
        assert!(o.code == Some(0), "`docker {}` on lab {} failed: {}{}", args.join(" "), self.name, o.stdout, o.stderr);
        o.stdout
    }

    /// A demo image built in the lab engine (the library's FROM-scratch builder, through
    /// `cutover demo-image --docker <lab socket>`).
    #[track_caller]
    pub fn demo_image(&self, tag: &str, release: &str, env: &[(&str, &str)]) -> String {
        let mut c = Command::new(CUTOVER);
        c.args(["demo-image", "--tag", tag, "--release", release, "--docker", &self.docker_host()]);
        for (k, v) in env {
            c.args(["--env", &format!("{k}={v}")]);
        }
        let o = run_bounded(&mut c, Duration::from_secs(120));
        assert!(o.code == Some(0), "building {tag} in lab {}: {}{}", self.name, o.stdout, o.stderr);
        tag.to_string()
    }

    /// A bridge network with IPv4 and IPv6 subnets and its own bridge `bridge`.
    #[track_caller]
    pub fn network(&mut self, name: &str, bridge: &str, subnet4: &str, subnet6: &str) {
        self.bridges.push(bridge.to_string());
        self.docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--ipv6",
            "--subnet",
            subnet4,
            "--subnet",
            subnet6,
            "-o",
            &format!("com.docker.network.bridge.name={bridge}"),
            name,
        ]);
    }

    /// The network namespace of a running container of the lab (a client "in another
    /// container").
    #[track_caller]
    pub fn container_at(&self, name: &str) -> At {
        let pid = self.docker(&["inspect", "-f", "{{.State.Pid}}", name]);
        let pid: u32 = pid.trim().parse().unwrap_or_else(|_| panic!("container {name} has no pid: `{}`", pid.trim()));
        assert!(pid != 0, "container {name} is not running");
        At::NetPath(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// A command run inside the engine's namespace.
    pub fn command(&self, program: &str) -> Command {
        self.at().command(program)
    }

    /// `nft -s list ruleset` of the engine's namespace (stateless: no counters).
    #[track_caller]
    pub fn ruleset(&self) -> String {
        let mut c = self.command("nft");
        c.args(["-s", "list", "ruleset"]);
        let o = run_bounded(&mut c, Duration::from_secs(30));
        assert!(o.code == Some(0), "nft list ruleset in {}: {}", self.name, o.stderr);
        o.stdout
    }

    /// `iptables -S` (or ip6tables) of chain `chain` in the engine's namespace.
    pub fn iptables_s(&self, tool: &str, chain: &str) -> String {
        let mut c = self.command(tool);
        c.args(["-w", "-S", chain]);
        run_bounded(&mut c, Duration::from_secs(30)).stdout
    }

    /// Write `value` to `/proc/sys/<key>` inside the engine's namespace.
    #[track_caller]
    pub fn sysctl(&self, key: &str, value: &str) {
        let mut c = self.command("sysctl");
        c.args(["-qw", &format!("{key}={value}")]);
        let o = run_bounded(&mut c, Duration::from_secs(10));
        assert!(o.code == Some(0), "sysctl {key}={value} in {}: {}", self.name, o.stderr);
    }

    /// Read `/proc/sys/<key>` inside the engine's namespace.
    #[track_caller]
    pub fn sysctl_get(&self, key: &str) -> String {
        let mut c = self.command("sysctl");
        c.args(["-n", key]);
        run_bounded(&mut c, Duration::from_secs(10)).stdout.trim().to_string()
    }
}

/// `lab/engine down` for every lab of a test process that no longer runs (killed by a
/// timeout before its guard could run): names `cve<...>-<pid>` whose pid is gone.
pub fn sweep_stale_labs() {
    let Ok(entries) = std::fs::read_dir("/run/cutover-lab") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some((prefix, pid)) = name.rsplit_once('-') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !prefix.starts_with("cve") || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match Command::new(LAB_SCRIPT).args(["down", &name]).output() {
            Ok(o) if o.status.success() => eprintln!("swept the stale lab {name}"),
            Ok(o) => eprintln!("cleanup: `lab/engine down {name}`: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("cleanup: cannot run {LAB_SCRIPT}: {e}"),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = Command::new(LAB_SCRIPT).args(["down", &self.name]).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("cleanup: `lab/engine down {}`: {}", self.name, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("cleanup: cannot run {LAB_SCRIPT}: {e}"),
        }
        for b in &self.bridges {
            let _ = std::fs::remove_dir_all(Path::new(cutover::localnet::DEFAULT_DIR).join(b));
        }
    }
}

/// A `cutover daemon` in the lab engine's namespace, against its socket; killed on drop
/// (the lab's `down` removes its rules with the namespace).
#[derive(Debug)]
pub struct LabDaemon {
    netns: String,
    args: Vec<String>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl LabDaemon {
    /// The `--table` this daemon was started with.
    fn table(&self) -> Option<String> {
        self.args.iter().position(|a| a == "--table").and_then(|i| self.args.get(i + 1)).cloned()
    }

    /// Starts `cutover daemon` with table `table` and `extra` flags; waits for its socket.
    #[track_caller]
    pub fn start(lab: &Lab, table: &str, extra: &[&str]) -> LabDaemon {
        let instance = format!("{}-{table}", lab.name);
        let mut flags: Vec<String> = vec!["--instance".into(), instance];
        // CUTOVER_TEST_BACKEND=iptables runs the lab tests with that backend too.
        if !extra.contains(&"--backend") {
            if let Some(backend) = super::test_backend() {
                flags.extend(["--backend".to_string(), backend]);
            }
        }
        // The lab engine's daemon.json, unless the test names another.
        if !extra.contains(&"--docker-config") {
            flags.extend(["--docker-config".into(), format!("/run/cutover-lab/{}/daemon.json", lab.name)]);
        }
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut d = LabDaemon::start_no_wait(lab, table, &flags);
        d.spawn();
        d
    }

    /// The command line, run in the lab's namespace (`nsenter --net`: the mount
    /// namespace stays the host's, so the socket and state paths are the same).
    fn command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns)).arg("--").arg(CUTOVER).args(&self.args);
        c
    }

    /// Runs the daemon to its end (for a start that must be refused): exit code and log.
    #[track_caller]
    pub fn run_to_exit(lab: &Lab, table: &str, extra: &[&str]) -> (Option<i32>, String) {
        let d = LabDaemon::start_no_wait(lab, table, extra);
        let mut c = d.command();
        c.env("CUTOVER_LOG", "info");
        let o = run_bounded(&mut c, Duration::from_secs(60));
        (o.code, format!("{}{}", o.stdout, o.stderr))
    }

    /// The daemon's command line and scratch directory, not started.
    fn start_no_wait(lab: &Lab, table: &str, extra: &[&str]) -> LabDaemon {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cutover-{}-", lab.name))
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir for the lab daemon: {e}"));
        let socket = dir.path().join("cutover.sock");
        let log = dir.path().join("daemon.log");
        let mut args: Vec<String> = vec!["daemon".into(), "--socket".into(), socket.display().to_string()];
        args.extend(["--state-dir".into(), dir.path().join("state").display().to_string()]);
        args.extend(["--table".into(), table.into(), "--docker".into(), lab.docker_host()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        LabDaemon { netns: lab.name.clone(), args, dir, socket, log, child: None }
    }

    #[track_caller]
    fn spawn(&mut self) {
        self.child = Some(spawn_until_listening(self.command(), &self.log, &self.socket));
    }

    /// A scratch directory living as long as the daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill and start again with the same arguments.
    #[track_caller]
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `cutover <args>` against this daemon.
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        super::daemon::cli_on(&self.socket, args)
    }

    /// `cli` that must exit `code`.
    #[track_caller]
    pub fn cli_expect(&self, args: &[&str], code: i32) -> CliOutput {
        super::daemon::expect_exit(self.cli(args), args, code, &self.log())
    }

    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> CliOutput {
        self.cli_expect(args, 0)
    }
}

impl Drop for LabDaemon {
    fn drop(&mut self) {
        let was = self.child.is_some();
        self.kill9();
        // The daemon's claim on its table in the lab's namespace (a daemon leaves it).
        if let (Ok(meta), Some(table)) = (std::fs::metadata(format!("/run/netns/{}", self.netns)), self.table()) {
            use std::os::unix::fs::MetadataExt;
            let dir = std::path::Path::new(cutover::daemon::table_lock::LOCK_DIR);
            let _ = std::fs::remove_file(cutover::daemon::table_lock::lock_path_in(dir, &table, meta.ino()));
        }
        if std::thread::panicking() && was {
            eprintln!("----- log of the lab daemon in {} -----\n{}\n----- end -----", self.netns, tail(&self.log(), 200));
        }
    }
}
