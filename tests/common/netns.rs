//! Where a client runs ([`At`]) and "another host" ([`ClientHost`]): a network namespace
//! joined to the root namespace by a veth pair, so its traffic to the host arrives from
//! outside, through prerouting and FORWARD, exactly like a remote client's.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use super::cleanup::INSTANCE_LABEL;
use super::cmd::{cmd, output, run, try_run, CmdError, Outcome, Problems, DOCKER};
use super::ids::{Ids, Subnet};

/// The network namespace a client command runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// The root namespace: a client on the host itself (output hook).
    Host,
    /// A named namespace (`ip netns exec`).
    Netns(String),
    /// A namespace by path, e.g. `/proc/<pid>/ns/net` of a container (`nsenter`).
    NetPath(PathBuf),
}

impl At {
    /// The network namespace of a running Docker container (a client "in another
    /// container"): the host's tools run inside it with `nsenter`, so a FROM-scratch
    /// container needs no client of its own.
    #[track_caller]
    pub fn container(id_or_name: &str) -> At {
        let pid = run(&mut cmd(DOCKER, ["inspect", "-f", "{{.State.Pid}}", id_or_name]));
        let pid: u32 = pid.trim().parse().unwrap_or_else(|_| panic!("container {id_or_name} has no pid: `{}`", pid.trim()));
        assert!(pid != 0, "container {id_or_name} is not running");
        At::NetPath(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// A command that runs `program` in this namespace.
    pub fn command(&self, program: &str) -> Command {
        match self {
            At::Host => Command::new(program),
            At::Netns(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            At::NetPath(p) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", p.display())).arg("--").arg(program);
                c
            }
        }
    }
}

impl From<Option<&str>> for At {
    fn from(ns: Option<&str>) -> At {
        ns.map_or(At::Host, |n| At::Netns(n.to_string()))
    }
}

impl From<&str> for At {
    fn from(ns: &str) -> At {
        At::Netns(ns.to_string())
    }
}

impl From<&ClientHost> for At {
    fn from(c: &ClientHost) -> At {
        c.at()
    }
}

impl From<&At> for At {
    fn from(a: &At) -> At {
        a.clone()
    }
}

/// A network namespace standing for another host. Created by [`ClientHost::new`],
/// deleted (with its veth pair) on drop, also when the test panicked.
#[derive(Debug)]
pub struct ClientHost {
    name: String,
    veth: String,
    subnet: Subnet,
}

impl ClientHost {
    /// Client host #0 of this test.
    #[track_caller]
    pub fn new(ids: &Ids) -> ClientHost {
        ClientHost::nth(ids, 0)
    }

    /// Client host #n (0..4) of this test: namespace `ids.netns(n)`, host side
    /// `ids.veth(n)` with `.1/30`, namespace side `eth0` with `.2/30`, lo up, default route
    /// via `.1`.
    #[track_caller]
    pub fn nth(ids: &Ids, n: u8) -> ClientHost {
        // The guard exists before the first step so that a failure half-way is undone.
        let host = ClientHost { name: ids.netns(n), veth: ids.veth(n), subnet: ids.subnet(n) };
        let (ns, veth) = (host.name.as_str(), host.veth.as_str());
        let h = format!("{}/{}", host.subnet.host_side(), Subnet::PREFIX);
        let c = format!("{}/{}", host.subnet.client_side(), Subnet::PREFIX);
        let gw = host.subnet.host_side().to_string();
        let steps: [&[&str]; 8] = [
            &["netns", "add", ns],
            &["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
            &["addr", "add", &h, "dev", veth],
            &["link", "set", veth, "up"],
            &["-n", ns, "addr", "add", &c, "dev", "eth0"],
            &["-n", ns, "link", "set", "eth0", "up"],
            &["-n", ns, "link", "set", "lo", "up"],
            &["-n", ns, "route", "add", "default", "via", &gw],
        ];
        for step in steps {
            if let Err(e) = try_run(&mut cmd("ip", step)) {
                panic!("setting up client host {ns}: {e}");
            }
        }
        host
    }

    /// Name of the namespace.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where to run clients of this host.
    pub fn at(&self) -> At {
        At::Netns(self.name.clone())
    }

    /// The address clients in this namespace use to reach the host (host side of the veth).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.subnet.host_side()
    }

    /// The URL of an HTTP service on host `port`, as clients in this namespace reach it.
    pub fn url(&self, port: u16) -> String {
        format!("http://{}:{port}/", self.host_addr())
    }

    /// This namespace's own address, the source address the host sees.
    pub fn addr(&self) -> Ipv4Addr {
        self.subnet.client_side()
    }

    /// Name of the host-side veth (an interface of the root namespace).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// `ip netns exec <ns> <program>`, to add arguments and run yourself.
    pub fn command(&self, program: &str) -> Command {
        self.at().command(program)
    }

    /// Runs `args` (program first) inside; returns its output whatever the exit code.
    #[track_caller]
    pub fn exec(&self, args: &[&str]) -> Outcome {
        let (program, rest) = args.split_first().unwrap_or_else(|| panic!("exec needs a program"));
        output(self.command(program).args(rest)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `args` inside; Ok(stdout) only if it exited 0.
    pub fn try_exec(&self, args: &[&str]) -> Result<String, CmdError> {
        let (program, rest) = args.split_first().unwrap_or_else(|| panic!("exec needs a program"));
        try_run(self.command(program).args(rest))
    }

    /// Deletes the namespace and the veth; absent is fine. Also called by `Drop`.
    pub fn remove(&self) -> Problems {
        let mut p = Problems::default();
        let gone = |e: &CmdError| e.stderr.contains("No such file") || e.stderr.contains("Cannot find device");
        // Deleting the namespace destroys eth0 and so its peer; the explicit link delete
        // covers a setup that failed between the two.
        match try_run(&mut cmd("ip", ["netns", "delete", &self.name])) {
            Err(e) if !gone(&e) => p.0.push(format!("delete netns {}: {e}", self.name)),
            _ => {}
        }
        match try_run(&mut cmd("ip", ["link", "delete", &self.veth])) {
            Err(e) if !gone(&e) => p.0.push(format!("delete link {}: {e}", self.veth)),
            _ => {}
        }
        p
    }
}

impl Drop for ClientHost {
    fn drop(&mut self) {
        self.remove().report(&format!("client host {}", self.name));
    }
}

/// True if `ip netns list` shows `name`.
pub fn netns_exists(name: &str) -> bool {
    output(&mut cmd("ip", ["netns", "list"]))
        .map(|o| o.stdout.lines().any(|l| l.split_whitespace().next() == Some(name)))
        .unwrap_or(false)
}

/// True if the root namespace has an interface `name`.
pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Runs a long-lived container of this test (labelled for cleanup) from `image` on
/// `network` (None: Docker's default bridge) and returns its id; use
/// [`At::container`] to run clients inside its network namespace.
#[track_caller]
pub fn client_container(ids: &Ids, image: &str, network: Option<&str>) -> String {
    ids.mark_docker_used();
    let mut c = cmd(DOCKER, ["run", "-d", "--label", &format!("{INSTANCE_LABEL}={}", ids.tag)]);
    if let Some(n) = network {
        c.args(["--network", n]);
    }
    c.arg(image);
    run(&mut c).trim().to_string()
}
