//! Helpers of the hardening tests (issue 12): a rival daemon on a test's table, file
//! modes, processes run as an unprivileged user.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::cmd::{run_bounded, Outcome};
use super::daemon::CUTOVER;
use super::ids::Ids;

/// The uid/gid the tests use for "an unprivileged local user" (Debian's `nobody`).
pub const NOBODY: u32 = 65534;

/// Runs a second `cutover daemon` on `ids`'s table and mark with its own socket and
/// state directory under `dir`; waits at most `timeout` for it to exit (a daemon that
/// keeps running fails the test: it was meant to refuse).
#[track_caller]
pub fn rival_daemon(ids: &Ids, dir: &Path, timeout: Duration) -> Outcome {
    let mut c = Command::new(CUTOVER);
    c.arg("daemon")
        .arg("--socket")
        .arg(dir.join("rival.sock"))
        .arg("--state-dir")
        .arg(dir.join("rival-state"))
        .args(["--table", &ids.table, "--mark", &ids.mark_arg(), "--instance", &ids.tag]);
    if let Some(backend) = super::test_backend() {
        c.args(["--backend", &backend]);
    }
    c.env("CUTOVER_LOG", "info");
    run_bounded(&mut c, timeout)
}

/// The permission bits (`& 0o7777`) of `path`, not following a symlink.
#[track_caller]
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).permissions().mode() & 0o7777
}

/// Processes running as uid/gid [`NOBODY`] (no supplementary groups), killed on drop.
#[derive(Debug, Default)]
pub struct AsNobody {
    children: Vec<std::process::Child>,
}

impl AsNobody {
    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl Drop for AsNobody {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `python3 -c SCRIPT ARGS` as nobody with an fd limit of `nofile`; stdin and stdout piped.
fn python_as_nobody(nofile: u32, script: &str, args: &[String]) -> std::process::Child {
    use std::process::Stdio;
    let mut c = Command::new("prlimit");
    c.arg(format!("--nofile={nofile}:{nofile}"))
        .args(["setpriv", &format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups"])
        .args(["/usr/bin/python3", "-c", script])
        .args(args)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let described = super::cmd::describe(&c);
    c.spawn().unwrap_or_else(|e| panic!("cannot start `{described}` (python3, util-linux): {e}"))
}

const HOLD_CONNECTIONS: &str = r#"
import socket, sys, time
name, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
held = []
def hold(make):
    ok, failed_in_a_row = 0, 0
    for _ in range(n):
        try:
            held.append(make()); ok += 1; failed_in_a_row = 0
        except OSError:
            failed_in_a_row += 1
            if failed_in_a_row >= 20:
                break
    return ok
def unix():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(0.2)
    s.connect("\0" + name)
    return s
unix_ok = hold(unix)
tcp_ok = hold(lambda: socket.create_connection((host, port), timeout=0.2))
print("connected", unix_ok, tcp_ok, flush=True)
sys.stdin.read()
"#;

/// As nobody, opens up to `n` idle connections to the abstract SOCK_SEQPACKET socket
/// `@name`, then up to `n` to `tcp`, and holds them. Returns once they are open, with
/// how many of each connected (a daemon that accepts and closes at once still counts).
#[track_caller]
pub fn hold_connections_as_nobody(name: &str, tcp: std::net::SocketAddr, n: usize) -> (AsNobody, String) {
    use std::io::BufRead;
    let args = [name.to_string(), tcp.ip().to_string(), tcp.port().to_string(), n.to_string()];
    let mut child = python_as_nobody(u32::try_from(3 * n + 64).unwrap_or(u32::MAX), HOLD_CONNECTIONS, &args);
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let flood = AsNobody { children: vec![child] };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("the connection flood did not finish connecting"));
    assert!(line.starts_with("connected"), "the connection flood failed: `{line}`");
    (flood, line.trim().to_string())
}

const SEND_READY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setblocking(False)
addr, every = "\0" + sys.argv[1], float(sys.argv[2])
end = time.time() + 120
while time.time() < end:
    try:
        s.sendto(b"READY=1", addr)
    except OSError:
        pass
    time.sleep(every)
"#;

/// `n` processes as nobody, each sending `READY=1` to the abstract datagram socket
/// `@name` every `every` (for two minutes at most).
pub fn ready_senders_as_nobody(name: &str, n: usize, every: Duration) -> AsNobody {
    let args = [name.to_string(), format!("{}", every.as_secs_f64())];
    AsNobody { children: (0..n).map(|_| python_as_nobody(64, SEND_READY, &args)).collect() }
}

/// How many fds process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}
