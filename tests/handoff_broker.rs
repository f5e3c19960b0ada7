#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The listener broker with peer-credential checks, and the static handoff-exec helper
//! that fetches listeners from it and execs an unmodified socket-activation server.
//! Every test uses its own service name (hence its own @cutover/NAME) and port, and
//! kills the processes it starts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cutover::handoff::broker::{fetch_listeners, Broker, Namespace, Policy};
use cutover::handoff::listeners::ListenSpec;
use cutover::handoff::protocol::ErrorCode;
use cutover::handoff::HandoffError;

const PYTHON: &str = "/usr/bin/python3";

/// A server that takes fd 3 as its listener, answers one connection with its
/// socket-activation environment, and exits.
const ACCEPT_ONCE: &str = "import os,socket
s=socket.socket(fileno=3)
c,_=s.accept()
ok = os.environ.get('LISTEN_PID') == str(os.getpid())
c.sendall(('fds=%s names=%s pid_ok=%s' % (os.environ.get('LISTEN_FDS'), os.environ.get('LISTEN_FDNAMES'), ok)).encode())
c.close()";

fn service(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

/// The embedded helper written to a world-readable directory.
fn helper() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("handoff-exec");
    std::fs::write(&path, cutover::embedded::HANDOFF_EXEC).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, path)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn local_listener(name: &str) -> Vec<ListenSpec> {
    vec![ListenSpec::parse(&format!("{name}=tcp://127.0.0.1:0"), name).unwrap()]
}

/// Starts `sh -c 'read go; <script>' arg0` so the test can allow its pid before it
/// connects.
fn gated(script: &str, arg0: &str) -> Child {
    Command::new("/bin/sh")
        .args(["-c", &format!("read go; {script}"), arg0])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn release(child: &mut Child) {
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descendant_of_the_started_process_gets_working_listeners_through_handoff_exec() {
    let svc = service("desc");
    let broker = Broker::bind_in_namespace(&Namespace::Current, &svc, &local_listener("http"), Policy::new()).unwrap();
    let addr = broker.listeners()[0].local_addr().unwrap();
    let (_dir, helper) = helper();
    // The started process is `sh`; handoff-exec runs as its child (a descendant). The
    // python program is passed as $0.
    let mut child = Killed(gated(
        &format!("{} --service {svc} -- {PYTHON} -c \"$0\"", quote(&helper)),
        ACCEPT_ONCE,
    ));
    broker.allow_pid(child.0.id() as i32).unwrap();
    release(&mut child.0);

    let mut answer = String::new();
    let mut s = connect_retry(addr);
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "fds=1 names=http pid_ok=True");
    let out = child.0.wait_with_output_ref();
    assert!(out.0, "helper failed: {}", out.1);
    assert_eq!(broker.stats().snapshot().0, 1, "one process served");
}

trait WaitRef {
    fn wait_with_output_ref(&mut self) -> (bool, String);
}

impl WaitRef for Child {
    fn wait_with_output_ref(&mut self) -> (bool, String) {
        let status = self.wait().unwrap();
        let mut err = String::new();
        if let Some(e) = self.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        (status.success(), err)
    }
}

fn connect_retry(addr: std::net::SocketAddr) -> TcpStream {
    // The listener exists from the start; connecting succeeds at once and the
    // connection waits in the accept queue until the server takes fd 3.
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_not_started_for_the_service_is_refused_and_gets_no_fd() {
    let svc = service("stranger");
    let broker = Broker::bind_in_namespace(&Namespace::Current, &svc, &local_listener("http"), Policy::new()).unwrap();
    // The service's process is some other process; this test process is not its descendant.
    let started = Killed(Command::new("/bin/sleep").arg("30").spawn().unwrap());
    broker.allow_pid(started.0.id() as i32).unwrap();

    let socket = broker.socket().clone();
    let err = tokio::task::spawn_blocking(move || fetch_listeners(&socket, &[])).await.unwrap().unwrap_err();
    assert!(matches!(err, HandoffError::Refused { code: ErrorCode::NotPermitted, .. }), "{err}");
    assert!(err.to_string().contains("not started for this service"), "{err}");

    // The helper, also a stranger: refused, exit 4, and the server never runs.
    let (dir, helper) = helper();
    let marker = dir.path().join("ran");
    let out = tokio::task::spawn_blocking({
        let svc = svc.clone();
        let marker = marker.clone();
        move || Command::new(&helper).args(["--service", &svc, "--", "/usr/bin/touch"]).arg(&marker).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
    assert!(!marker.exists(), "the server ran without its listeners");
    let (served, refused, _, _) = broker.stats().snapshot();
    assert_eq!((served, refused), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_uid_is_refused_and_an_allowed_uid_is_served() {
    let (_dir, helper) = helper();
    let run_as = |svc: String, helper: PathBuf| {
        move || {
            Command::new(&helper)
                .args(["--service", &svc, "--", "/bin/sh", "-c", "test \"$LISTEN_FDS\" = 1 && echo served"])
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap()
        }
    };
    // Only uid 65533 is allowed: nobody (65534) is refused.
    let svc = service("uid-no");
    let broker = Broker::bind_in_namespace(&Namespace::Current, &svc, &local_listener("http"), Policy::new().allow_uid(65533)).unwrap();
    let out = tokio::task::spawn_blocking(run_as(svc, helper.clone())).await.unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(broker.stats().snapshot().1, 1);

    // uid 65534 allowed explicitly: served.
    let svc = service("uid-yes");
    let broker = Broker::bind_in_namespace(&Namespace::Current, &svc, &local_listener("http"), Policy::new().allow_uid(65534)).unwrap();
    let out = tokio::task::spawn_blocking(run_as(svc, helper)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "served");
    assert_eq!(broker.stats().snapshot().0, 1);
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_socket_and_listeners_live_in_the_given_namespace_only() {
    let ns = Netns(format!("cutover-t{}", std::process::id()));
    assert!(Command::new("ip").args(["netns", "add", &ns.0]).status().unwrap().success());
    assert!(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]).status().unwrap().success());
    let svc = service("netns");
    let broker = Broker::bind_in_namespace(&Namespace::named(&ns.0), &svc, &local_listener("http"), Policy::new()).unwrap();

    // From this (host) namespace, @cutover/NAME does not exist.
    let socket = broker.socket().clone();
    let err = tokio::task::spawn_blocking(move || fetch_listeners(&socket, &[])).await.unwrap().unwrap_err();
    assert!(matches!(err, HandoffError::Io { .. }), "{err}");

    // Inside the namespace, the started process gets the listener, which is bound there.
    let (_dir, helper) = helper();
    let check = "import socket; s=socket.socket(fileno=3); print(s.getsockname()[0])";
    let mut child = Killed(gated(&format!("exec ip netns exec {} {} --service {svc} -- {PYTHON} -c \"$0\"", ns.0, quote(&helper)), check));
    broker.allow_pid(child.0.id() as i32).unwrap();
    release(&mut child.0);
    let mut out = String::new();
    child.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let (ok, err) = child.0.wait_with_output_ref();
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "127.0.0.1");
}

/// A flood of refused requests (issue 18): each is refused and counted, but the log gets
/// at most one warning a second, saying how many were held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_requests_writes_one_warning_a_second() {
    use std::sync::{Arc, Mutex};
    let lines: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || {
            struct W(Arc<Mutex<Vec<u8>>>);
            impl Write for W {
                fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                    self.0.lock().unwrap().extend_from_slice(b);
                    Ok(b.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            W(sink.clone())
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let svc = service("flood");
    let broker = Broker::bind_in_namespace(&Namespace::Current, &svc, &local_listener("http"), Policy::new()).unwrap();
    let started = std::time::Instant::now();
    const ASKS: u64 = 300;
    for _ in 0..ASKS {
        let socket = broker.socket().clone();
        let err = tokio::task::spawn_blocking(move || fetch_listeners(&socket, &[])).await.unwrap().unwrap_err();
        assert!(matches!(err, HandoffError::Refused { .. }), "{err}");
    }
    let elapsed = started.elapsed().as_secs();
    let (_, refused, _, _) = broker.stats().snapshot();
    assert_eq!(refused, ASKS, "every request was refused and counted");
    let log = String::from_utf8_lossy(&lines.lock().unwrap()).to_string();
    let warnings = log.lines().filter(|l| l.contains("broker refused listeners")).count() as u64;
    assert!(warnings >= 1, "the refusals are logged: {log}");
    assert!(warnings <= elapsed + 2, "{warnings} warnings in {elapsed} s: one a second at most\n{log}");
}
