#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `cutover run` + `cutover reload` with gunicorn (Debian's package, unmodified), which
//! takes its listeners by socket activation (LISTEN_FDS/LISTEN_PID) and reports
//! READY=1 on NOTIFY_SOCKET. Each test uses its own name, port and run directory and
//! kills every process it started, also when it fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUNICORN: &str = "/usr/bin/gunicorn";

/// A WSGI app that says which generation (and which gunicorn arbiter) answered.
const APP: &str = r#"
import os
def app(environ, start_response):
    body = ("gen=%s arbiter=%d\n" % (os.environ.get("CUTOVER_GENERATION", "?"), os.getppid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `cutover run` supervisor; on drop it is stopped and every process group the test
/// learned about is killed.
struct Supervised {
    child: Child,
    groups: Vec<i32>,
    dir: tempfile::TempDir,
    name: String,
    addr: SocketAddr,
}

impl Supervised {
    fn start(name: &str, extra: &[&str], command: &[&str]) -> Supervised {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.py"), APP).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("supervisor.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["run", "--name", name, "--listen", &format!("tcp://{addr}")])
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args(extra)
            .arg("--")
            .args(command)
            .current_dir(dir.path())
            .env("CUTOVER_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Supervised { child, groups: Vec::new(), dir, name: name.into(), addr };
        s.wait_serving();
        s
    }

    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if get(self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the first generation never answered; log:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("supervisor.log")).unwrap_or_default()
    }

    /// Runs `cutover reload`; returns its exit code, output and duration.
    fn reload(&self) -> (i32, String, Duration) {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["reload", &self.name, "--run-dir"])
            .arg(self.dir.path().join("run"))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text, t.elapsed())
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: plain kill(2) on a pid this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for g in &self.groups {
            // SAFETY: kill(2) of a process group this test's supervisor created.
            unsafe { libc::kill(-g, libc::SIGKILL) };
        }
    }
}

/// One HTTP/1.1 request on a new connection; returns the body.
fn get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| format!("read: {e}"))?;
    if !resp.starts_with("HTTP/1.1 200") {
        return Err(format!("not a 200: {resp:?}"));
    }
    resp.split("\r\n\r\n").nth(1).map(str::to_string).ok_or_else(|| format!("no body: {resp:?}"))
}

fn generation_of(body: &str) -> u32 {
    body.split_whitespace().find_map(|w| w.strip_prefix("gen=")).and_then(|g| g.parse().ok()).unwrap_or(0)
}

fn arbiter_of(body: &str) -> i32 {
    body.split_whitespace().find_map(|w| w.strip_prefix("arbiter=")).and_then(|g| g.parse().ok()).unwrap_or(0)
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[derive(Default)]
struct LoadResult {
    ok: u64,
    failures: Vec<String>,
    /// (seconds since start, generation) of every answer.
    answers: Vec<(f64, u32)>,
}

/// Clients that each open a new connection per request until `stop`.
fn load(addr: SocketAddr, clients: usize, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<LoadResult>> {
    let start = Instant::now();
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut r = LoadResult::default();
                while !stop.load(Ordering::Relaxed) {
                    match get(addr) {
                        Ok(body) => {
                            r.ok += 1;
                            r.answers.push((start.elapsed().as_secs_f64(), generation_of(&body)));
                        }
                        Err(e) => r.failures.push(e),
                    }
                }
                r
            })
        })
        .collect()
}

#[test]
fn gunicorn_reload_under_load_fails_no_request_and_the_old_generation_goes() {
    let name = format!("hr-load-{}", std::process::id());
    let mut sup = Supervised::start(
        &name,
        &["--ready-timeout", "20s", "--drain-timeout", "10s"],
        &[GUNICORN, "--chdir", ".", "-w", "2", "app:app"],
    );
    let first = get(sup.addr).unwrap();
    assert_eq!(generation_of(&first), 1);
    let old_arbiter = arbiter_of(&first);
    sup.groups.push(old_arbiter);

    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(sup.addr, 4, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let (code, out, took) = sup.reload();
    assert_eq!(code, 0, "reload failed: {out}\n{}", sup.log());
    let reload_done = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<LoadResult> = workers.into_iter().map(|w| w.join().unwrap()).collect();

    let ok: u64 = results.iter().map(|r| r.ok).sum();
    let failures: Vec<&String> = results.iter().flat_map(|r| &r.failures).collect();
    let on_gen2 = results.iter().flat_map(|r| &r.answers).filter(|(_, g)| *g == 2).count();
    println!("requests: {ok} ok, {} failed, {on_gen2} answered by generation 2; reload took {took:?}", failures.len());
    assert!(failures.is_empty(), "failed requests during the reload: {failures:?}");
    assert!(ok > 50, "too little load to prove anything: {ok}");
    assert!(on_gen2 > 0, "generation 2 never answered");

    let now = get(sup.addr).unwrap();
    assert_eq!(generation_of(&now), 2, "after the reload: {now}");
    sup.groups.push(arbiter_of(&now));

    // The old generation is gone after its drain (drain timeout 10 s).
    let deadline = reload_done + Duration::from_secs(12);
    while alive(old_arbiter) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(old_arbiter), "generation 1 (arbiter {old_arbiter}) is still running after its drain");
    let leftovers: Vec<_> = group_members(old_arbiter);
    assert!(leftovers.is_empty(), "processes of generation 1 left: {leftovers:?}");
    assert!(sup.log().contains("phase=\"drained\"") || sup.log().contains("phase=\"killed\""), "{}", sup.log());
}

fn group_members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return false };
            rest.split_whitespace().nth(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
        })
        .collect()
}

/// Generation 1 is gunicorn; later generations run `bad` (a shell snippet) after writing
/// their pid to gen-N.pid.
fn failing_later(dir_hint: &str, bad: &str) -> Vec<String> {
    let script = format!(
        "echo $$ > {dir_hint}/gen-$CUTOVER_GENERATION.pid; \
         if [ \"$CUTOVER_GENERATION\" = 1 ]; then exec {GUNICORN} --chdir {dir_hint} -w 1 app:app; fi; {bad}"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

fn refused_case(tag: &str, bad: &str, ready_timeout: &str, max: Duration) {
    let name = format!("hr-{tag}-{}", std::process::id());
    // The script needs the directory before the supervisor exists: use a fixed one.
    let work: PathBuf = std::env::temp_dir().join(format!("cutover-{name}"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("app.py"), APP).unwrap();
    let cmd = failing_later(work.to_str().unwrap(), bad);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut sup = Supervised::start(&name, &["--ready-timeout", ready_timeout, "--drain-timeout", "5s"], &cmd);
    let first = get(sup.addr).unwrap();
    sup.groups.push(arbiter_of(&first));

    let (code, out, took) = sup.reload();
    println!("reload: exit {code} after {took:?}: {out}");
    let gen2: i32 = std::fs::read_to_string(work.join("gen-2.pid")).unwrap_or_default().trim().parse().unwrap_or(0);
    if gen2 > 0 {
        sup.groups.push(gen2);
    }
    assert_eq!(code, 1, "reload must be refused: {out}\n{}", sup.log());
    assert!(took < max, "reload took {took:?}, more than {max:?}");
    assert!(out.contains("still serves"), "{out}");
    assert!(gen2 > 0, "generation 2 never started:\n{}", sup.log());
    let left = group_members(gen2);
    assert!(left.is_empty(), "processes of generation 2 left: {left:?}");
    // The old generation still serves, and is still generation 1.
    for _ in 0..20 {
        let body = get(sup.addr).unwrap();
        assert_eq!(generation_of(&body), 1, "{body}");
    }
    assert_eq!(arbiter_of(&get(sup.addr).unwrap()), arbiter_of(&first));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn reload_is_refused_when_the_new_generation_crashes_at_start() {
    refused_case("crash", "echo crashing >&2; exit 3", "20s", Duration::from_secs(5));
}

#[test]
fn reload_is_refused_when_the_new_generation_never_gets_ready() {
    // Never reports READY=1, and leaves a background child in its process group.
    refused_case("hang", "sleep 1000 & exec sleep 1000", "3s", Duration::from_secs(6));
}
