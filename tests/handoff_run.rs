#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `cutover run` + `cutover reload` with gunicorn (Debian's package, unmodified), which
//! takes its listeners by socket activation (LISTEN_FDS/LISTEN_PID) and reports
//! READY=1 on NOTIFY_SOCKET. Each test uses its own name, port and run directory and
//! kills every process it started, also when it fails.

mod common;

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
    /// `cutover run` arguments after `--listen`, to start it again.
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Supervised {
    fn start(name: &str, extra: &[&str], command: &[&str]) -> Supervised {
        Supervised::start_with_env(name, extra, command, &[])
    }

    fn start_with_env(name: &str, extra: &[&str], command: &[&str], env: &[(&str, &str)]) -> Supervised {
        let s = Supervised::spawn(name, extra, command, env);
        s.wait_serving();
        s
    }

    /// Starts the supervisor without waiting for it to serve.
    fn spawn(name: &str, extra: &[&str], command: &[&str], env: &[(&str, &str)]) -> Supervised {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.py"), APP).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.push("--".into());
        args.extend(command.iter().map(|s| s.to_string()));
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let child = supervisor_command(dir.path(), name, addr, &args, &env).spawn().unwrap();
        Supervised { child, groups: Vec::new(), dir, name: name.into(), addr, args, env }
    }

    /// SIGKILLs the supervisor (its generations are left running) and starts it again
    /// with the same arguments; its log goes on in the same file.
    fn kill_and_start_again(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = supervisor_command(self.dir.path(), &self.name, self.addr, &self.args, &self.env).spawn().unwrap();
    }

    /// Changes the value of `flag` for the next start (see `kill_and_start_again`).
    fn set_arg(&mut self, flag: &str, value: &str) {
        let i = self.args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} not in {:?}", self.args));
        self.args[i + 1] = value.to_string();
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
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

fn supervisor_command(dir: &Path, name: &str, addr: SocketAddr, args: &[String], env: &[(String, String)]) -> Command {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("supervisor.log")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_cutover"));
    c.args(["run", "--name", name, "--listen", &format!("tcp://{addr}")])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(args)
        .current_dir(dir)
        .env("CUTOVER_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    c
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

/// gunicorn's app module for the watch test: generation 2 cannot import it. gunicorn's
/// master has sent READY=1 long before its workers find out (and exit with status 3,
/// which makes the master exit with 3).
const BROKEN_LATER: &str = r#"
import os
if os.environ.get("CUTOVER_GENERATION") == "2":
    raise ImportError("the new release cannot import its dependencies")
from app import app
"#;

fn wrk_load(addr: SocketAddr, secs: u64) -> common::WrkRun {
    common::Wrk::new(format!("http://{addr}/"))
        .duration(Duration::from_secs(secs))
        .connections(4)
        .threads(2)
        .timeout(Duration::from_secs(5))
        .start()
}

#[test]
fn gunicorn_whose_new_app_fails_after_ready_is_refused_in_the_watch_under_load() {
    let name = format!("hr-watch-{}", std::process::id());
    let mut sup = Supervised::spawn(
        &name,
        &["--ready-timeout", "20s", "--drain-timeout", "10s", "--watch", "4s"],
        &[GUNICORN, "--chdir", ".", "-w", "2", "broken_later:app"],
        &[],
    );
    std::fs::write(sup.dir.path().join("broken_later.py"), BROKEN_LATER).unwrap();
    sup.wait_serving();
    let first = get(sup.addr).unwrap();
    assert_eq!(generation_of(&first), 1);
    sup.groups.push(arbiter_of(&first));

    let connects = common::ConnectLoop::start(sup.addr);
    let wrk = wrk_load(sup.addr, 8);
    std::thread::sleep(Duration::from_secs(2));
    let (code, out, took) = sup.reload();
    println!("reload: exit {code} after {took:?}:\n{out}");
    let log = sup.log();
    assert_eq!(code, 1, "the reload must be refused: {out}\n{log}");
    // Gunicorn 20.1 halts with 3 (worker failed to boot), or with 1 when that HaltServer
    // is raised again inside its own halt (a SIGCHLD during its stop; the nested traceback
    // is in its output): either way the reason names the status it exited with.
    let nested_halt = out.contains("exit code 1") && out.contains("in halt") && out.contains("HaltServer");
    assert!(out.contains("exit code 3") || nested_halt, "the reason names the exit status: {out}");
    assert!(out.contains("during the watch"), "{out}");
    assert!(out.contains("ImportError") || out.contains("Worker failed to boot"), "the tail of its output: {out}");
    assert!(out.contains("generation 1") && out.contains("still serves"), "{out}");
    let report = wrk.wait();
    let tally = connects.stop();
    println!("wrk: {} requests, bodies {:?}; connects: {tally:?}", report.requests, report.bodies);
    report.assert_no_failures();
    assert_eq!(tally.refused, 0, "connections refused: {tally:?}\n{log}");
    assert!(tally.other.is_empty(), "{tally:?}");
    assert!(tally.connected > 100, "too few connects to prove anything: {tally:?}");
    for _ in 0..10 {
        let body = get(sup.addr).unwrap();
        assert_eq!(generation_of(&body), 1, "{body}");
        assert_eq!(arbiter_of(&body), arbiter_of(&first), "{body}");
    }
    assert!(!log.contains("phase=\"switched\""), "generation 1 was never told to stop:\n{log}");
}

#[test]
fn a_serving_generation_killed_with_sigkill_is_restarted_until_the_limit() {
    let name = format!("hr-restart-{}", std::process::id());
    let mut sup = Supervised::start(
        &name,
        &["--ready-timeout", "20s", "--drain-timeout", "5s", "--restart-limit", "2", "--restart-window", "120s"],
        &[GUNICORN, "--chdir", ".", "-w", "1", "app:app"],
    );
    let first = get(sup.addr).unwrap();
    sup.groups.push(arbiter_of(&first));
    let connects = common::ConnectLoop::start(sup.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(sup.addr, 2, stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    // Twice within the limit: each time a new generation serves.
    for generation in [2, 3] {
        let serving = arbiter_of(&get(sup.addr).unwrap());
        // SAFETY: kill(2) of the serving gunicorn master this test's supervisor started.
        unsafe { libc::kill(serving, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = get(sup.addr).unwrap_or_default();
            if generation_of(&body) == generation {
                sup.groups.push(arbiter_of(&body));
                break;
            }
            assert!(Instant::now() < deadline, "generation {generation} never answered:\n{}", sup.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<LoadResult> = clients.into_iter().map(|w| w.join().unwrap()).collect();
    let tally = connects.stop();
    let refused: Vec<&String> = results.iter().flat_map(|r| &r.failures).filter(|f| f.contains("refused")).collect();
    let ok: u64 = results.iter().map(|r| r.ok).sum();
    println!("requests: {ok} ok, failures {:?}; connects {tally:?}", results.iter().flat_map(|r| &r.failures).collect::<Vec<_>>());
    assert_eq!(tally.refused, 0, "connections refused while no generation served: {tally:?}\n{}", sup.log());
    assert!(refused.is_empty(), "{refused:?}");
    assert!(tally.connected > 50, "{tally:?}");

    // The third death within the window is beyond the limit: the supervisor gives up.
    let serving = arbiter_of(&get(sup.addr).unwrap());
    // SAFETY: as above.
    unsafe { libc::kill(serving, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = sup.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the supervisor did not give up:\n{}", sup.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = sup.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("2 restarts within 120s, the limit"), "a clear message: {log}");
}

#[test]
fn the_supervisor_killed_under_load_leaves_its_generation_serving_and_is_adopted() {
    let name = format!("hr-adopt-{}", std::process::id());
    let mut sup = Supervised::start(
        &name,
        &["--ready-timeout", "20s", "--drain-timeout", "10s", "--watch", "1s"],
        &[GUNICORN, "--chdir", ".", "-w", "2", "app:app"],
    );
    let first = get(sup.addr).unwrap();
    sup.groups.push(arbiter_of(&first));
    let wrk = wrk_load(sup.addr, 12);
    let connects = common::ConnectLoop::start(sup.addr);
    std::thread::sleep(Duration::from_secs(1));
    let old_supervisor = sup.pid();
    sup.kill_and_start_again();
    assert!(!alive(old_supervisor));
    // The new supervisor adopts generation 1 (it serves on, it is not started anew).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sup.log().contains("phase=\"adopted\"") || !control_socket(&sup).exists() {
        assert!(Instant::now() < deadline, "no adoption:\n{}", sup.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = get(sup.addr).unwrap();
    assert_eq!((generation_of(&body), arbiter_of(&body)), (1, arbiter_of(&first)), "{body}");
    std::thread::sleep(Duration::from_secs(1));
    let (code, out, _) = sup.reload();
    assert_eq!(code, 0, "reload after the adoption: {out}\n{}", sup.log());
    assert!(out.contains("generation 2"), "{out}");
    let report = wrk.wait();
    let tally = connects.stop();
    println!("wrk: {} requests, bodies {:?}; connects {tally:?}", report.requests, report.bodies);
    report.assert_no_failures();
    assert!(report.count("gen=1 arbiter=0") == 0);
    assert_eq!(tally.refused, 0, "{tally:?}");
    let now = get(sup.addr).unwrap();
    assert_eq!(generation_of(&now), 2, "{now}");
    sup.groups.push(arbiter_of(&now));
    // Generation 1 (not the new supervisor's child) is stopped after the switch.
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(arbiter_of(&first)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(arbiter_of(&first)), "generation 1 still runs:\n{}", sup.log());
}

fn control_socket(sup: &Supervised) -> PathBuf {
    sup.dir.path().join("run").join(format!("{}.sock", sup.name))
}

#[test]
fn a_generation_that_accepts_but_never_gets_ready_is_refused_and_answers_what_it_accepted() {
    let name = format!("hr-unready-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let cmd = common::sd_server_command(dir.path());
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    // Generation 2 accepts and answers (slowly, so that some answers are in flight when
    // it is refused) but never reports READY=1.
    let mut sup = Supervised::start_with_env(
        &name,
        &["--ready-timeout", "3s", "--drain-timeout", "10s"],
        &cmd,
        &[("NEVER_READY_GEN", "2"), ("SLOW_GEN", "2"), ("SLOW_MS", "300")],
    );
    assert_eq!(get(sup.addr).unwrap().trim(), "gen=1");
    let wrk = wrk_load(sup.addr, 8);
    std::thread::sleep(Duration::from_secs(1));
    let (code, out, took) = sup.reload();
    println!("reload: exit {code} after {took:?}: {out}");
    let gen2: Vec<i32> = sup.log().lines().filter(|l| l.contains("generation=2") && l.contains("pid=")).filter_map(|l| {
        l.split("pid=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }).collect();
    sup.groups.extend(gen2);
    assert_eq!(code, 1, "{out}\n{}", sup.log());
    assert!(out.contains("did not report READY=1"), "{out}");
    let report = wrk.wait();
    println!("wrk: {} requests, bodies {:?}", report.requests, report.bodies);
    report.assert_no_failures();
    assert!(report.count("gen=2") > 0, "generation 2 accepted connections (and answered them): {:?}", report.bodies);
    assert!(sup.log().contains("generation 2: every accepted connection answered"), "{}", sup.log());
    assert!(!sup.log().contains("phase=\"killed\""), "nothing was SIGKILLed:\n{}", sup.log());
    assert_eq!(get(sup.addr).unwrap().trim(), "gen=1");
}

/// The pid the supervisor logged for `generation` (`generation=N pid=P`).
fn logged_pid(log: &str, generation: u64) -> Option<i32> {
    log.lines()
        .filter(|l| l.contains(&format!("generation={generation} ")) && l.contains(" pid="))
        .find_map(|l| l.split(" pid=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
}

#[test]
fn a_supervisor_killed_during_the_watch_is_adopted_and_the_watched_generation_stopped() {
    let name = format!("hr-midwatch-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let cmd = common::sd_server_command(dir.path());
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut sup = Supervised::start(&name, &["--ready-timeout", "10s", "--drain-timeout", "10s", "--watch", "60s"], &cmd);
    assert_eq!(get(sup.addr).unwrap().trim(), "gen=1");
    let gen1 = logged_pid(&sup.log(), 1).unwrap();
    sup.groups.push(gen1);
    let wrk = wrk_load(sup.addr, 10);

    // A reload that will not finish: generation 2 is in its watch when the supervisor dies.
    let run_dir = sup.dir.path().join("run");
    let reload_name = sup.name.clone();
    let reload = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["reload", &reload_name, "--run-dir"]).arg(run_dir).output().unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sup.log().contains("phase=\"watching\"") {
        assert!(Instant::now() < deadline, "generation 2 never got to its watch:\n{}", sup.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let gen2 = logged_pid(&sup.log(), 2).unwrap();
    sup.groups.push(gen2);
    // The next supervisor watches briefly, so that the last reload below is quick.
    sup.set_arg("--watch", "1s");
    sup.kill_and_start_again();
    let out = reload.join().unwrap();
    assert_ne!(out.status.code(), Some(0), "the reload cannot have succeeded: {out:?}");

    // Generation 1 is adopted; generation 2 (half-way through its watch) is stopped.
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(gen2) || !control_socket(&sup).exists() {
        assert!(Instant::now() < deadline, "generation 2 still runs or no control socket:\n{}", sup.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(alive(gen1));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sup.log().contains("generation 2: every accepted connection answered") {
        assert!(Instant::now() < deadline, "stopped gracefully:\n{}", sup.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = wrk.wait();
    println!("wrk: {} requests, bodies {:?}", report.requests, report.bodies);
    report.assert_no_failures();
    for _ in 0..10 {
        assert_eq!(get(sup.addr).unwrap().trim(), "gen=1");
    }
    // The next reload starts generation 3 and goes through.
    let (code, out, _) = sup.reload();
    assert_eq!(code, 0, "{out}\n{}", sup.log());
    assert_eq!(get(sup.addr).unwrap().trim(), "gen=3");
    if let Some(p) = logged_pid(&sup.log(), 3) {
        sup.groups.push(p);
    }
}

#[test]
fn a_generation_that_reports_ready_but_fails_its_probe_is_refused() {
    let name = format!("hr-probe-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let cmd = common::sd_server_command(dir.path());
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    // The probe's target stands in for a private health port: up, then down, then up.
    let health = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = health.local_addr().unwrap().port();
    let probe = format!("tcp://127.0.0.1:{port}");
    let mut sup = Supervised::start(&name, &["--ready-timeout", "3s", "--drain-timeout", "5s", "--watch", "1s", "--health", &probe], &cmd);
    if let Some(p) = logged_pid(&sup.log(), 1) {
        sup.groups.push(p);
    }
    // Serving comes before READY=1 is read: wait for the supervisor to have seen it.
    common::wait_for("the first generation to report ready", Duration::from_secs(20), || {
        let log = sup.log();
        log.contains("reported ready; probing").then_some(()).ok_or(log)
    });
    drop(health);
    let (code, out, _) = sup.reload();
    assert_eq!(code, 1, "{out}\n{}", sup.log());
    assert!(out.contains("did not pass its probe") && out.contains(&probe), "{out}");
    assert_eq!(get(sup.addr).unwrap().trim(), "gen=1");
    let _health = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (code, out, _) = sup.reload();
    assert_eq!(code, 0, "{out}\n{}", sup.log());
    assert_eq!(get(sup.addr).unwrap().trim(), "gen=3");
    if let Some(p) = logged_pid(&sup.log(), 3) {
        sup.groups.push(p);
    }
}
