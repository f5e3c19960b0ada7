//! Faults, concurrency and access (issue 7), as root against the real engine and kernel:
//! a daemon killed at each step of a release, a release dying right after the switch,
//! two operators at once, a non-root peer, a short soak, and the engine restarting.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn status_json(daemon: &Daemon, service: &str) -> serde_json::Value {
    let out = daemon.cli_ok(&["status", service, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {}", out.stdout));
    v[0].clone()
}

/// Kill -9 the daemon while a deploy hangs at `phase` (test hook), restart it: exactly
/// one release serves, the history says which, nothing is orphaned, and a load running
/// throughout sees no failed request.
fn kill_at(test: &str, phase: &str, expect_active: u64, expect_outcome: &str) {
    let ids = Ids::new(test);
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let mut daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).deadline("20s").set("watch", "0s"));
    // The hook from now on: the first release is in place.
    daemon.restart_with(&["--pause-at", phase]);
    let url = client.url(port);
    let run = new_connection_load(&url, client.at(), 14);

    std::thread::scope(|scope| {
        let deploy = scope.spawn(|| daemon.cli(&["deploy", &ids.service, "--image", &v2]));
        wait_for(&format!("the deploy to reach `{phase}`"), Duration::from_secs(30), || {
            let op = status_json(&daemon, &ids.service)["operation"].as_str().unwrap_or_default().to_string();
            if op.ends_with(phase) {
                Ok(())
            } else {
                Err(format!("operation is `{op}`"))
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        // The CLI sees the connection drop: not a success.
        daemon_pid_kill(&daemon);
        let out = deploy.join().unwrap_or_else(|_| panic!("deploy thread"));
        assert_ne!(out.code, 0, "a deploy whose daemon died is not reported done: {out:?}");
    });
    daemon.restart_without(&["--pause-at", phase]);
    let st = status_json(&daemon, &ids.service);
    assert_eq!(st["active"], expect_active, "after a kill at {phase}: {st}");
    assert!(st["operation"].is_null(), "{st}");
    let history: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["history", &ids.service, "--json"]).stdout).unwrap_or_default();
    let last = history["events"].as_array().and_then(|e| e.last()).cloned().unwrap_or_default();
    assert_eq!(last["outcome"], expect_outcome, "{history}");
    let want = format!("v{expect_active}");
    for _ in 0..10 {
        assert_eq!(get_ok(client.at(), &url).trim(), want);
    }
    assert_eq!(running_containers_of(&ids).len(), 1, "exactly one release runs");
    let report = run.wait();
    report.assert_no_failures();
    assert_eq!(docker_user_rules(&ids.table).len(), 1, "one DOCKER-USER accept, not orphaned or doubled");
}

fn daemon_pid_kill(daemon: &Daemon) {
    let pid = daemon.pid().unwrap_or_else(|| panic!("daemon has no pid"));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

#[test]
fn kill9_while_starting_undoes_the_release() {
    kill_at("kill9_while_starting", "starting", 1, "undone");
}

#[test]
fn kill9_when_healthy_undoes_the_release() {
    kill_at("kill9_when_healthy", "healthy", 1, "undone");
}

#[test]
fn kill9_after_the_switch_finishes_the_release() {
    kill_at("kill9_after_the_switch", "switched", 2, "finished_after_restart");
}

#[test]
fn kill9_while_draining_finishes_the_release() {
    kill_at("kill9_while_draining", "draining", 2, "finished_after_restart");
}

#[test]
fn a_release_crashing_after_the_switch_is_switched_back() {
    let ids = Ids::new("a_release_crashing_after_the_switch");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    // Ready at once, dead 1.5 s later: about 1 s after the switch.
    let v2 = demo_image(&ids, "v2", &[("CRASH_AFTER_MS", "1500")]);
    let client = ClientHost::new(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).deadline("20s").set("watch", "8s"));
    let url = client.url(port);
    let connections = 4;
    let run = new_connection_load(&url, client.at(), 12);
    std::thread::sleep(Duration::from_secs(1));
    let out = daemon.cli_expect(&["deploy", &ids.service, "--image", &v2], 1);
    assert!(out.stderr.contains("traffic is back on release 1"), "{}", out.stderr);
    for _ in 0..20 {
        assert_eq!(get_ok(client.at(), &url).trim(), "v1");
    }
    let report = run.wait();
    assert!(report.count("v2") > 0, "v2 served before it died: {:?}", report.bodies);
    // What v2 held when it died fails (at most one request per connection), plus the
    // connections that reached its namespace between its death (seen through a pidfd) and
    // the switch back. Those are refused by v2's dying namespace at once, and wrk retries
    // a refused connection immediately, so their count is wrk's retry rate (thousands per
    // second per connection) times that window, not a share of the run: alone the test
    // sees 0-4, under the full suite on 2 cores up to 3.2% (799 of 25 002 in one CI run,
    // the daemon logging "switching back" and "traffic is back" 78 ms apart). The bound
    // is a tenth of the run: without the switch back every request after v2's death
    // (about 10 of the 12 s) would fail, and the requests after the deploy command
    // returned are checked above to reach v1.
    let bound = connections + report.requests / 10;
    eprintln!("failed {} of {} requests (bound {bound})", report.failed(), report.requests);
    assert!(
        report.failed() <= bound,
        "only the requests v2 was serving when it died may fail ({connections} connections): {}",
        report.output
    );
    let st = status_json(&daemon, &ids.service);
    assert_eq!(st["active"], 1, "{st}");
}

#[test]
fn two_deploys_of_one_service_one_runs_the_other_is_busy() {
    let ids = Ids::new("two_deploys_of_one_service");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let slow = demo_image(&ids, "slow", &[("START_DELAY_MS", "3000")]);
    let daemon = Daemon::start(&ids);
    let (port_a, port_b) = (ids.port(), ids.port());
    let other = format!("{}-b", &ids.service[..ids.service.len().min(29)]);
    let a = ServiceYaml::http(&ids.service, &v1, port_a, &net.name).deadline("20s").write(daemon.dir());
    let b = ServiceYaml::http(&other, &v1, port_b, &net.name).deadline("20s").write(daemon.dir());
    daemon.cli_ok(&["apply", a.to_str().unwrap_or_default(), b.to_str().unwrap_or_default()]);

    std::thread::scope(|scope| {
        let first = scope.spawn(|| daemon.cli(&["deploy", &ids.service, "--image", &slow]));
        wait_for("the first deploy to start", Duration::from_secs(20), || {
            let op = status_json(&daemon, &ids.service)["operation"].as_str().unwrap_or_default().to_string();
            if op.is_empty() { Err("no operation yet".into()) } else { Ok(()) }
        });
        let started = Instant::now();
        let second = daemon.cli_expect(&["deploy", &ids.service, "--image", &v1], 1);
        assert!(second.stderr.contains("busy"), "{}", second.stderr);
        assert!(started.elapsed() < Duration::from_secs(2), "the refusal is immediate");
        // Another service is not held up by it.
        let parallel = daemon.cli(&["deploy", &other, "--image", &v1]);
        assert_eq!(parallel.code, 0, "{parallel:?}");
        let first = first.join().unwrap_or_else(|_| panic!("first deploy thread"));
        assert_eq!(first.code, 0, "{first:?}");
    });
    assert_eq!(status_json(&daemon, &ids.service)["active"], 2);
}

#[test]
fn a_non_root_peer_is_refused() {
    let ids = Ids::new("a_non_root_peer_is_refused");
    require_root();
    let daemon = Daemon::start(&ids);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(daemon.socket()).unwrap_or_else(|e| panic!("socket: {e}"));
    assert_eq!(meta.mode() & 0o777, 0o600, "the control socket is private");
    assert_eq!(meta.uid(), 0, "and owned by root");
    // Open the file mode so that only the peer-credential check stands in the way.
    std::fs::set_permissions(daemon.socket(), std::fs::Permissions::from_mode(0o666)).unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", CUTOVER, "status"])
        .env("CUTOVER_SOCKET", daemon.socket())
        .output()
        .unwrap_or_else(|e| panic!("setpriv: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("may not control cutover"), "{stderr}");
    wait_for("the refusal to be logged", Duration::from_secs(5), || {
        if daemon.log().contains("control request refused") { Ok(()) } else { Err("not yet".into()) }
    });
    // Root still gets in.
    daemon.cli_ok(&["status"]);
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The daemon's fds at rest: the fewest of samples over 1.5 s. The health watch probes the
/// active release at least once a second through a socket of its own, which a single
/// sample may catch open; a leaked fd is in every sample.
fn fd_count_at_rest(pid: u32) -> usize {
    (0..6)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            fd_count(pid)
        })
        .min()
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The table's shape (chains, rules, elements) without the addresses, which Docker may
/// hand out anew when a kept release starts again.
fn table_shape(table: &str) -> String {
    let text = nft_table_text(table).unwrap_or_default();
    text.lines()
        .map(|l| l.split(|c: char| c.is_ascii_digit() || c == '.').filter(|s| !s.is_empty()).collect::<Vec<_>>().join("#"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Deploy/rollback cycles under load: no failed request, and the daemon's fds, memory,
/// containers and rules are the same at the end as after the first cycle. CI runs a few
/// cycles; `CUTOVER_SOAK_CYCLES=100` runs the long version.
#[test]
fn soak_deploy_rollback_cycles_under_load() {
    let cycles: usize = std::env::var("CUTOVER_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let ids = Ids::new("soak_deploy_rollback_cycles");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).deadline("20s").set("watch", "0s").set("drain_timeout", "3s").set("keep", "1"));
    let url = client.url(port);
    let pid = daemon.pid().unwrap_or_else(|| panic!("daemon pid"));
    let mut baseline = None;
    let mut requests = 0;
    for cycle in 1..=cycles {
        let run = new_connection_load(&url, client.at(), 600);
        daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
        assert_eq!(get_ok(client.at(), &url).trim(), "v2", "cycle {cycle}");
        daemon.cli_ok(&["rollback", &ids.service]);
        assert_eq!(get_ok(client.at(), &url).trim(), "v1", "cycle {cycle}");
        // wrk has no "stop now": its duration is long, end it early with SIGINT.
        let report = run.stop();
        report.assert_no_failures();
        requests += report.requests;
        let now = (fd_count_at_rest(pid), rss_kib(pid), containers_of(&ids).len(), table_shape(&ids.table));
        eprintln!("cycle {cycle}: fds {} rss {} KiB containers {}", now.0, now.1, now.2);
        match &baseline {
            None => baseline = Some(now),
            Some(b) => {
                assert_eq!(now.0, b.0, "cycle {cycle}: the daemon's fd count changed");
                assert_eq!(now.2, b.2, "cycle {cycle}: the number of containers changed");
                assert_eq!(now.3, b.3, "cycle {cycle}: the rules changed");
                assert!(now.1 < b.1 + 16 * 1024, "cycle {cycle}: the daemon grew from {} to {} KiB", b.1, now.1);
            }
        }
    }
    assert!(requests > 0);
}

#[test]
fn kill9_after_the_old_release_stopped_finishes_the_release() {
    kill_at("kill9_after_the_old_release_stopped", "stopped", 2, "finished_after_restart");
}
