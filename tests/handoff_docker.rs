//! Acceptance of handoff mode for a Docker service (issue 3, item 2), as root against the
//! real engine: the daemon holds the listener in the host's network namespace, release
//! containers (network mode `host`) take it through the broker with the mounted
//! handoff-exec and serve it as unmodified socket-activation servers. Under a load of
//! new connections (wrk, `Connection: close`, against 127.0.0.1 only) deploy, rollback,
//! a daemon restart and a refused release must not fail a single request.
//!
//! Each test has its own daemon, instance label, images and port (see `common::Ids`);
//! the kit's guards remove containers and images even when a test fails.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// The test's handoff-mode manifest: one listener on 127.0.0.1:`port` in the host's
/// namespace; readiness is the server's `READY=1` (health type tcp, the default).
fn manifest(daemon: &Daemon, ids: &Ids, image: &str, port: u16) -> PathBuf {
    let text = format!(
        "name: {service}\n\
         image: {image}\n\
         handoff:\n  namespace: host\n  listeners:\n    - name: http\n      listen: tcp://127.0.0.1:{port}\n\
         health:\n  interval: 200ms\n  deadline: 6s\n\
         stop_timeout: 5s\n\
         keep: 2\n",
        service = ids.service
    );
    let path = daemon.dir().join(format!("{}.yaml", ids.service));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn load(url: &str, secs: u64) -> WrkRun {
    Wrk::new(url).at(At::Host).duration(Duration::from_secs(secs)).connections(8).threads(2).timeout(Duration::from_secs(5)).start()
}


#[test]
fn handoff_deploy_rollback_restart_and_refusal_under_load() {
    let ids = Ids::new("handoff_deploy_rollback_restart_and_refusal_under_load");
    require_docker();
    let v1 = demo_image(&ids, "v1", &[]);
    let v2 = demo_image(&ids, "v2", &[]);
    // Takes the listeners (handoff-exec runs first) but sleeps far beyond the deadline
    // before it would report ready.
    let never = demo_image(&ids, "never", &[("START_DELAY_MS", "60000")]);
    let mut daemon = Daemon::start(&ids);
    let port = ids.port();
    let url = format!("http://127.0.0.1:{port}/");
    let c = |n: u32| format!("cutover-{}-{n}", ids.service);

    let file = manifest(&daemon, &ids, &v1, port);
    daemon.cli_ok(&["apply", file.to_str().unwrap()]);
    assert_eq!(get_ok(At::Host, &url), "v1");
    let helper = daemon.state_dir().join("bin/handoff-exec");
    assert!(helper.exists(), "the daemon wrote {}", helper.display());

    // Deploy under load.
    let wrk = load(&url, 8);
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    all_new_connections_answer(At::Host, &url, "v2");
    let report = wrk.wait();
    report.assert_no_failures();
    assert!(report.count("v1") > 0 && report.count("v2") > 0, "both releases answered during the run: {:?}", report.bodies);
    assert_eq!(running_container_names(&ids), vec![c(2)], "release 1 is stopped (kept for rollback)");

    // Rollback under load: the kept container starts, fetches the same listener again.
    let wrk = load(&url, 8);
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["rollback", &ids.service]);
    all_new_connections_answer(At::Host, &url, "v1");
    let report = wrk.wait();
    report.assert_no_failures();
    assert!(report.count("v2") > 0 && report.count("v1") > 0, "{:?}", report.bodies);
    assert_eq!(running_container_names(&ids), vec![c(1)]);

    // The daemon dies and comes back under load: it takes the listener back from the
    // running release (pidfd_getfd), so the next release gets the very same socket.
    let wrk = load(&url, 10);
    std::thread::sleep(Duration::from_secs(1));
    daemon.restart();
    assert!(daemon.log().contains("listeners taken back from release process"), "{}", daemon.log());
    daemon.cli_ok(&["rollback", &ids.service, "--to", "2"]);
    all_new_connections_answer(At::Host, &url, "v2");
    let report = wrk.wait();
    report.assert_no_failures();
    assert_eq!(running_container_names(&ids), vec![c(2)]);

    // A release that never gets ready is refused (exit 1) within the deadline; v2 never
    // stopped serving, and nothing of the refused release is left.
    let wrk = load(&url, 10);
    std::thread::sleep(Duration::from_secs(1));
    let out = daemon.cli_expect(&["deploy", &ids.service, "--image", &never], 1);
    assert!(out.stderr.contains("not ready within"), "{out:?}");
    all_new_connections_answer(At::Host, &url, "v2");
    let report = wrk.wait();
    report.assert_no_failures();
    assert_eq!(report.count("v2"), report.requests, "only v2 answered: {:?}", report.bodies);
    assert_eq!(running_container_names(&ids), vec![c(2)]);
    let filter = format!("name={}", c(3));
    let all = run(&mut common::cmd::cmd(DOCKER, ["ps", "-a", "--format", "{{.Names}}", "--filter", &filter]));
    assert!(all.trim().is_empty(), "the refused release's container is removed: {all}");

    // Remove: containers gone, the daemon's listener closed (the port is free again).
    daemon.cli_ok(&["remove", &ids.service]);
    assert!(containers_of(&ids).is_empty(), "no container left: {:?}", containers_of(&ids));
    wait_for("the port to be free", Duration::from_secs(5), || {
        if common::ids::port_is_free(port) { Ok(()) } else { Err(format!("127.0.0.1:{port} is still bound")) }
    });
}
