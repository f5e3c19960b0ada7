//! The demo release image against the real Docker engine (root, /var/run/docker.sock).
//!
//! Each test builds its own image tag and runs its own containers, all named
//! `cutover-test-img-<pid>-<test>`, without published ports on the default bridge, and
//! talks to them at their container address from the host. A guard removes containers and
//! images even when an assertion fails, so tests can run in parallel with others.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, KillContainerOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
};
use bollard::Docker;

use cutover::docker::image::{build_demo_image, DemoImage};
use cutover::drain::{open_connections, wait_drained, DrainOutcome};
use cutover::health::{probe_http, probe_tcp, HealthError};

async fn docker() -> Docker {
    Docker::connect_with_socket_defaults().unwrap().negotiate_version().await.unwrap()
}

fn unique(test: &str) -> String {
    format!("cutover-test-img-{}-{test}", std::process::id())
}

/// Removes what a test created, also when it panics. Drop cannot await, so removal runs
/// on its own thread with its own runtime (the test's runtime may be the one unwinding).
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let containers = std::mem::take(&mut self.containers);
        let images = std::mem::take(&mut self.images);
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let docker = docker().await;
                for c in &containers {
                    let opts = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
                    let _ = docker.remove_container(c, Some(opts)).await;
                }
                for i in &images {
                    let opts = RemoveImageOptionsBuilder::default().force(true).build();
                    let _ = docker.remove_image(i, Some(opts), None).await;
                }
            });
        });
        let _ = done.join();
    }
}

struct Running {
    ip: IpAddr,
    pid: u32,
}

async fn build(docker: &Docker, cleanup: &mut Cleanup, name: &str, release: &str, healthcheck: bool) -> String {
    let tag = format!("{name}:latest");
    cleanup.images.push(tag.clone());
    let spec = DemoImage { tag: tag.clone(), release: release.to_string(), env: BTreeMap::new(), healthcheck };
    build_demo_image(docker, &spec).await.unwrap();
    tag
}

/// Runs `image` as container `name` with extra env, nothing published, and waits until
/// its port 80 accepts connections.
async fn run(docker: &Docker, cleanup: &mut Cleanup, image: &str, name: &str, env: &[&str]) -> Running {
    cleanup.containers.push(name.to_string());
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        env: Some(env.iter().map(|s| s.to_string()).collect()),
        host_config: Some(HostConfig { network_mode: Some("bridge".into()), ..Default::default() }),
        ..Default::default()
    };
    let opts = CreateContainerOptionsBuilder::default().name(name).build();
    docker.create_container(Some(opts), body).await.unwrap();
    docker.start_container(name, None).await.unwrap();
    let info = docker.inspect_container(name, None::<InspectContainerOptions>).await.unwrap();
    let state = info.state.unwrap();
    let pid = u32::try_from(state.pid.unwrap()).unwrap();
    let settings = info.network_settings.unwrap();
    assert!(
        settings.ports.unwrap_or_default().values().all(|b| b.as_ref().is_none_or(|b| b.is_empty())),
        "nothing may be published"
    );
    let ip: IpAddr = settings.networks.unwrap()["bridge"].ip_address.as_ref().unwrap().parse().unwrap();
    let addr = SocketAddr::new(ip, 80);
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe_tcp(addr, Duration::from_millis(500)).await.is_err() {
        assert!(Instant::now() < deadline, "{name} never listened on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Running { ip, pid }
}

struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 request on an open connection; reads exactly one response.
fn request_on(reader: &mut BufReader<TcpStream>, path: &str, close: bool) -> Answer {
    let conn = if close { "Connection: close\r\n" } else { "" };
    write!(reader.get_mut(), "GET {path} HTTP/1.1\r\nHost: test\r\n{conn}\r\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        let (k, v) = line.trim_end().split_once(':').unwrap();
        headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    Answer { status, headers, body: String::from_utf8(body).unwrap() }
}

fn connect(ip: IpAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::new(ip, 80), Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

fn get(ip: IpAddr, path: &str) -> Answer {
    request_on(&mut connect(ip), path, true)
}

async fn get_async(ip: IpAddr, path: &str) -> Answer {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || get(ip, &path)).await.unwrap()
}

async fn count_connections(pid: u32) -> usize {
    tokio::task::spawn_blocking(move || open_connections(pid)).await.unwrap().unwrap()
}

async fn health_status(docker: &Docker, name: &str) -> String {
    let info = docker.inspect_container(name, None::<InspectContainerOptions>).await.unwrap();
    info.state.and_then(|s| s.health).and_then(|h| h.status).map(|s| s.to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_release_slow_requests_and_counts_connections() {
    let docker = docker().await;
    let name = unique("serve");
    let mut cleanup = Cleanup { containers: vec![], images: vec![] };
    let release = format!("v-{}", std::process::id());
    let image = build(&docker, &mut cleanup, &name, &release, false).await;
    let c = run(&docker, &mut cleanup, &image, &name, &[]).await;

    let root = get_async(c.ip, "/").await;
    assert_eq!(root.status, 200);
    assert_eq!(root.body, format!("{release}\n"));
    assert_eq!(root.headers["x-release"], release);
    let health = get_async(c.ip, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    assert_eq!(get_async(c.ip, "/nope").await.status, 404);

    let started = Instant::now();
    let slow = get_async(c.ip, "/slow?ms=400").await;
    assert_eq!((slow.status, slow.body), (200, format!("{release}\n")));
    assert!(started.elapsed() >= Duration::from_millis(400));

    let addr = SocketAddr::new(c.ip, 80);
    probe_http(addr, "/healthz", Duration::from_secs(2)).await.unwrap();
    probe_tcp(addr, Duration::from_secs(2)).await.unwrap();
    let missing = probe_http(addr, "/nope", Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(missing, HealthError::Status { status: 404, .. }), "{missing}");

    // Probes and requests above closed their connections: nothing but TIME_WAIT (on the
    // side that closed first) is left, which does not count.
    wait_for_count(c.pid, 0).await;

    // A keep-alive connection the test holds open is counted from inside the container.
    let mut held = tokio::task::spawn_blocking(move || {
        let mut conn = connect(c.ip);
        let a = request_on(&mut conn, "/", false);
        assert_eq!(a.headers["connection"], "keep-alive");
        let again = request_on(&mut conn, "/", false);
        assert_eq!(again.status, 200, "keep-alive connection reused");
        conn
    })
    .await
    .unwrap();
    assert!(count_connections(c.pid).await >= 1);
    let outcome = wait_drained(c.pid, Duration::from_millis(300), Duration::from_millis(50), |_, _| {}).await.unwrap();
    assert!(matches!(outcome, DrainOutcome::TimedOut { left } if left >= 1), "{outcome:?}");

    // Connection: close on the held connection ends it from the server side.
    let last = tokio::task::spawn_blocking(move || {
        let a = request_on(&mut held, "/", true);
        let mut rest = Vec::new();
        let n = held.read_to_end(&mut rest).unwrap();
        (a.headers["connection"].clone(), n)
    })
    .await
    .unwrap();
    assert_eq!(last, ("close".to_string(), 0));
    let mut seen = Vec::new();
    let outcome = wait_drained(c.pid, Duration::from_secs(5), Duration::from_millis(50), |n, _| seen.push(n)).await.unwrap();
    assert!(matches!(outcome, DrainOutcome::Drained { .. }), "{outcome:?} after {seen:?}");
    assert_eq!(count_connections(c.pid).await, 0);
}

async fn wait_for_count(pid: u32, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = count_connections(pid).await;
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {n} connections, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_healthcheck_uses_probe_mode() {
    let docker = docker().await;
    let name = unique("health");
    let mut cleanup = Cleanup { containers: vec![], images: vec![] };
    let image = build(&docker, &mut cleanup, &name, "hc", true).await;
    let good_name = format!("{name}-good");
    let bad_name = format!("{name}-bad");
    let good = run(&docker, &mut cleanup, &image, &good_name, &[]).await;
    let bad = run(&docker, &mut cleanup, &image, &bad_name, &["HEALTH=fail"]).await;

    let answer = get_async(bad.ip, "/healthz").await;
    assert_eq!(answer.status, 503);
    assert_eq!(get_async(bad.ip, "/").await.status, 200, "only health fails");
    let err = probe_http(SocketAddr::new(bad.ip, 80), "/healthz", Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(err, HealthError::Status { status: 503, .. }), "{err}");
    probe_tcp(SocketAddr::new(bad.ip, 80), Duration::from_secs(2)).await.unwrap();
    probe_http(SocketAddr::new(good.ip, 80), "/healthz", Duration::from_secs(2)).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (g, b) = (health_status(&docker, &good_name).await, health_status(&docker, &bad_name).await);
        if g == "healthy" && b == "unhealthy" {
            break;
        }
        assert!(Instant::now() < deadline, "health: good={g} bad={b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_request_then_exits_zero() {
    let docker = docker().await;
    let name = unique("term");
    let mut cleanup = Cleanup { containers: vec![], images: vec![] };
    let image = build(&docker, &mut cleanup, &name, "term", false).await;
    let c = run(&docker, &mut cleanup, &image, &name, &[]).await;

    // Two idle keep-alive connections: one stays silent, one sends a request during the
    // stop's one-second grace.
    let keep_alive = || {
        tokio::task::spawn_blocking(move || {
            let mut conn = connect(c.ip);
            assert_eq!(request_on(&mut conn, "/", false).status, 200);
            conn
        })
    };
    let mut silent = keep_alive().await.unwrap();
    let mut talker = keep_alive().await.unwrap();
    let slow = tokio::spawn(get_async(c.ip, "/slow?ms=3000"));
    // Let the slow request reach the server before the signal.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let signalled = Instant::now();
    let kill = KillContainerOptionsBuilder::default().signal("SIGTERM").build();
    docker.kill_container(&name, Some(kill)).await.unwrap();

    // A request on an idle connection during the grace is answered, with the close
    // announced, and the server then closes the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (answer, then) = tokio::task::spawn_blocking(move || {
        let answer = request_on(&mut talker, "/", false);
        let mut rest = Vec::new();
        (answer, talker.read_to_end(&mut rest).map(|n| n == 0))
    })
    .await
    .unwrap();
    assert_eq!((answer.status, answer.headers["connection"].as_str()), (200, "close"), "answered during the grace");
    assert!(matches!(then, Ok(true)), "closed after that answer: {then:?}");

    // The silent one is closed when the grace ends, not when the slow request finishes.
    let idle_closed = tokio::task::spawn_blocking(move || {
        let mut rest = Vec::new();
        silent.read_to_end(&mut rest).map(|n| n == 0)
    })
    .await
    .unwrap();
    assert!(matches!(idle_closed, Ok(true)), "idle keep-alive connection closed on stop: {idle_closed:?}");
    let closed_after = signalled.elapsed();
    assert!(closed_after >= Duration::from_millis(900), "idle connection closed before the grace ended: {closed_after:?}");
    assert!(closed_after < Duration::from_millis(2400), "idle close waited for the slow request: {closed_after:?}");

    let answer = slow.await.unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "term\n"));
    assert_eq!(answer.headers["connection"], "close", "last answer announces the close");

    let deadline = Instant::now() + Duration::from_secs(10);
    let exit_code = loop {
        let info = docker.inspect_container(&name, None::<InspectContainerOptions>).await.unwrap();
        let state = info.state.unwrap();
        if state.running != Some(true) {
            break state.exit_code;
        }
        assert!(Instant::now() < deadline, "container still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit_code, Some(0));
    // After the stop nothing listens any more, and a gone process counts as drained.
    assert!(probe_tcp(SocketAddr::new(c.ip, 80), Duration::from_millis(500)).await.is_err());
    let outcome = wait_drained(c.pid, Duration::from_secs(1), Duration::from_millis(50), |_, _| {}).await.unwrap();
    assert!(matches!(outcome, DrainOutcome::Drained { .. }), "{outcome:?}");
}

/// The stop signal may be delivered to any thread, also to one that waits for the first
/// request of a connection it just accepted. Such a read (the socket has a receive
/// timeout) is not restarted after the handler: it fails with EINTR. The server must read
/// again and answer, not close the connection unanswered (which wrk counted as a rare
/// read error at handoff-mode releases under load). Here the signal goes to exactly that
/// thread (tgkill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_signal_delivered_to_a_waiting_connection_thread_does_not_drop_its_request() {
    let docker = docker().await;
    let name = unique("eintr");
    let mut cleanup = Cleanup { containers: vec![], images: vec![] };
    let image = build(&docker, &mut cleanup, &name, "eintr", false).await;
    let c = run(&docker, &mut cleanup, &image, &name, &[]).await;
    let (pid, ip) = (c.pid as i32, c.ip);

    let answer = tokio::task::spawn_blocking(move || {
        // Accepted, no request yet: its thread waits in read.
        let mut conn = connect(ip);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The newest connection thread is this connection's (an earlier one, e.g. of the
        // readiness check, may still be ending); if it is gone by the signal, look again.
        let newest_conn_thread = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|t| {
                    let tid: i32 = t.ok()?.file_name().to_str()?.parse().ok()?;
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
                    comm.starts_with("conn-").then_some(tid)
                })
                .max()
        };
        loop {
            let Some(tid) = newest_conn_thread() else {
                assert!(Instant::now() < deadline, "no connection thread in {pid}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            // Let it block in read first.
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: tgkill(2) with plain integers, aimed at a thread of the test's container.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGTERM) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            assert!(err.raw_os_error() == Some(libc::ESRCH) && Instant::now() < deadline, "tgkill: {err}");
        }
        std::thread::sleep(Duration::from_millis(200));
        request_on(&mut conn, "/", false)
    })
    .await
    .unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "eintr\n"));
    assert_eq!(answer.headers["connection"], "close", "answered as the last request of a stopping server");
}
