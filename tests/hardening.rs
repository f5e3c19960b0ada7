//! Issue 12: nothing the daemon does, or fails to do, may cost traffic or leak secrets.
//! One test (or a few) per numbered case this file covers: 1 (a second daemon on the
//! same table), 5 (numbers that overflow), 8 (services nobody could reach), 9 (secrets
//! on disk), 10 (an unprivileged user starving the daemon), 11 (groups, manifest reads).
//! Each runs against the real kernel and engine with its own names (see common::ids).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::hardening::*;
use common::*;

/// Case 1: a second daemon given the same `--table` (and another state directory) must
/// refuse to start, naming the first, before it touches a rule; the first keeps serving.
#[test]
fn a_second_daemon_on_the_same_table_refuses_and_the_first_keeps_serving() {
    let ids = Ids::new("a_second_daemon_on_the_same_table");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let client = ClientHost::new(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let manifest = ServiceYaml::http(&ids.service, &v1, port, &net.name).write(daemon.dir());
    daemon.cli_ok(&["apply", manifest.to_str().unwrap()]);
    let url = format!("http://{}:{port}/", client.host_addr());
    assert_eq!(get_ok(client.at(), &url).trim(), "v1");
    let rules_before = nft_table_text(&ids.table).expect("the first daemon's table");
    let accept_before = docker_user_rules(&ids.table);
    assert_eq!(accept_before.len(), 1, "{accept_before:?}");

    let load = Wrk::new(&url).at(client.at()).duration(Duration::from_secs(6)).connections(4).threads(1).start();
    std::thread::sleep(Duration::from_millis(500));
    let rival_dir = tempfile::tempdir().unwrap();
    let rival = rival_daemon(&ids, rival_dir.path(), Duration::from_secs(30));
    let report = load.wait();

    assert_ne!(rival.code, Some(0), "the second daemon must refuse to start: {rival:?}");
    let pid = daemon.pid().unwrap().to_string();
    let state_dir = daemon.state_dir().display().to_string();
    for want in [pid.as_str(), state_dir.as_str(), "--table"] {
        assert!(rival.stderr.contains(want), "the refusal names the other daemon ({want}):\n{}", rival.stderr);
    }
    report.assert_no_failures();
    assert!(report.count("v1") > 0, "{report:?}");
    assert_eq!(nft_table_text(&ids.table).as_deref(), Some(rules_before.as_str()), "the kernel rules are unchanged");
    assert_eq!(docker_user_rules(&ids.table), accept_before, "the DOCKER-USER accept is still there");
    assert_eq!(get_ok(client.at(), &url).trim(), "v1");
    let status = daemon.cli_ok(&["status", &ids.service, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status[0]["active"], 1, "{status}");
}

/// Case 9: without the systemd unit (a umask of 022), the state directory holding the
/// manifests' `env` must still be 0700 and its files 0600; secrets never reach the log.
#[test]
fn the_state_and_its_secrets_are_private_under_umask_022() {
    let ids = Ids::new("the_state_and_its_secrets_are_private");
    require_root();
    require_docker();
    // nextest runs each test in its own process: the daemon inherits this umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let net = DockerNetwork::new(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let secret = format!("s3cret-{}", ids.tag);
    let manifest = ServiceYaml::http(&ids.service, &v1, port, &net.name)
        .set("env", &format!("\n  DB_PASSWORD: {secret}"))
        .write(daemon.dir());
    daemon.cli_ok(&["apply", manifest.to_str().unwrap()]);
    let state_file = daemon.state_dir().join("state.json");
    assert!(std::fs::read_to_string(&state_file).unwrap().contains(&secret), "the state holds the env (it is what makes it secret)");
    assert_eq!(mode_of(daemon.state_dir()), 0o700, "state dir");
    assert_eq!(mode_of(&state_file), 0o600, "state.json");
    for entry in std::fs::read_dir(daemon.state_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert_eq!(mode_of(&path) & 0o077, 0, "{} is readable by others", path.display());
        }
    }
    let log = daemon.log();
    assert!(log.contains("DB_PASSWORD") || log.contains("control request"), "the daemon logged at debug level:\n{log}");
    assert!(!log.contains(&secret), "the secret is in the daemon's log:\n{log}");
}

/// Case 5: durations that overflow the clock are refused at validation, by `plan` and by
/// `apply` (exit 2, the field named), and nothing is created.
#[test]
fn durations_that_would_overflow_are_refused_by_plan_and_apply() {
    let ids = Ids::new("durations_that_would_overflow");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    for field in ["deadline", "interval"] {
        let health = format!("\n  type: http\n  path: /healthz\n  {field}: 18446744073709551615");
        let manifest = ServiceYaml::http(&ids.service, &v1, port, &net.name).set("health", &health).write(daemon.dir());
        let path = manifest.to_str().unwrap();
        let plan = daemon.cli(&["plan", path]);
        assert_eq!(plan.code, 2, "plan: {plan:?}");
        assert!(plan.stderr.contains(&format!("health.{field}")), "plan names the field: {}", plan.stderr);
        let apply = daemon.cli(&["apply", path]);
        assert_eq!(apply.code, 2, "apply: {apply:?}");
        assert!(apply.stderr.contains(&format!("health.{field}")), "apply names the field: {}", apply.stderr);
        assert!(apply.stderr.contains("too long"), "{}", apply.stderr);
    }
    assert!(containers_of(&ids).is_empty(), "no container was created: {:?}", containers_of(&ids));
    let status = daemon.cli_ok(&["status", "--json"]);
    assert_eq!(status.stdout.trim(), "[]", "no service was registered");
}

/// A handoff-mode service with one listener on 127.0.0.1:`port` in the host's namespace
/// (readiness: the server's READY=1 on the service's notify socket).
fn handoff_manifest(daemon: &Daemon, ids: &Ids, image: &str, port: u16) -> std::path::PathBuf {
    let text = format!(
        "name: {service}\nimage: {image}\n\
         handoff:\n  namespace: host\n  listeners:\n    - name: http\n      listen: tcp://127.0.0.1:{port}\n\
         health:\n  interval: 200ms\n  deadline: 30s\n\
         stop_timeout: 5s\nkeep: 2\n",
        service = ids.service
    );
    let path = daemon.dir().join(format!("{}.yaml", ids.service));
    std::fs::write(&path, text).unwrap();
    path
}

/// `cutover status` as root, which must answer within `within`.
#[track_caller]
fn status_answers_within(daemon: &Daemon, within: Duration) {
    let started = std::time::Instant::now();
    let mut c = std::process::Command::new(CUTOVER);
    c.args(["status", "--json"]).env("CUTOVER_SOCKET", daemon.socket());
    let out = common::cmd::run_bounded(&mut c, within + Duration::from_secs(10));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(started.elapsed() < within, "the root CLI took {:?}", started.elapsed());
}

/// Case 10: an unprivileged user cannot starve the daemon. With the daemon's fd limit at
/// 256, 1 100 idle connections as nobody to the broker's abstract socket and 1 100 to
/// the metrics port leave the root CLI answered at once; 70 processes as nobody sending
/// READY=1 to the service's notify socket do not keep the real release from counting.
#[test]
fn an_unprivileged_flood_starves_neither_the_cli_nor_a_release() {
    let ids = Ids::new("an_unprivileged_flood_starves");
    require_root();
    require_docker();
    let v1 = demo_image(&ids, "v1", &[]);
    let v2 = demo_image(&ids, "v2", &[]);
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", ids.port()).parse().unwrap();
    let daemon = Daemon::start_program(&ids, &["prlimit", "--nofile=256:256", CUTOVER], &["--metrics", &metrics.to_string()]);
    let pid = daemon.pid().unwrap();
    let port = ids.port();
    daemon.cli_ok(&["apply", handoff_manifest(&daemon, &ids, &v1, port).to_str().unwrap()]);
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(get_ok(At::Host, &url).trim(), "v1");

    let (flood, connected) = hold_connections_as_nobody(&format!("cutover/{}", ids.service), metrics, 1100);
    eprintln!("flood as nobody: {connected}; the daemon has {} fds open", open_fds(pid));
    for _ in 0..5 {
        status_answers_within(&daemon, Duration::from_secs(3));
    }
    assert!(open_fds(pid) < 200, "the flood holds the daemon's fds: {} of 256", open_fds(pid));
    assert_eq!(get_ok(At::Host, &url).trim(), "v1");
    drop(flood);
    let scrape = get_ok(At::Host, &format!("http://{metrics}/metrics"));
    assert!(scrape.contains("cutover_build_info"), "{scrape}");

    let senders = ready_senders_as_nobody(&format!("cutover/{}/notify", ids.service), 70, Duration::from_millis(5));
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    assert_eq!(get_ok(At::Host, &url).trim(), "v2");
    status_answers_within(&daemon, Duration::from_secs(3));
    assert_eq!(senders.len(), 70);
    drop(senders);
    assert!(daemon.log().contains("closed at once"), "the refused connections were logged");
}

/// Case 8: services that no client could ever reach are refused at validation (exit 2,
/// the reason given), not reported live: a `host_ip` that is not a local address, and
/// `network: none`.
#[test]
fn services_nobody_could_reach_are_refused() {
    let ids = Ids::new("services_nobody_could_reach");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    // 192.0.2.0/24 is TEST-NET-1: never configured on a host.
    let not_local = ServiceYaml::http(&ids.service, &v1, port, &net.name)
        .set("ports", &format!("\n  - host: {port}\n    container: 80\n    host_ip: 192.0.2.77"))
        .write(daemon.dir());
    let out = daemon.cli_expect(&["apply", not_local.to_str().unwrap()], 2);
    assert!(out.stderr.contains("192.0.2.77 is not an address of this host"), "{}", out.stderr);
    let no_network = ServiceYaml::http(&ids.service, &v1, port, "none").set("health", "{type: none}").write(daemon.dir());
    let out = daemon.cli_expect(&["apply", no_network.to_str().unwrap()], 2);
    assert!(out.stderr.contains("network") && out.stderr.contains("no address"), "{}", out.stderr);
    assert!(containers_of(&ids).is_empty(), "no container was created: {:?}", containers_of(&ids));
    assert_eq!(daemon.cli_ok(&["status", "--json"]).stdout.trim(), "[]");
    // A local host_ip is still fine.
    let local = ServiceYaml::http(&ids.service, &v1, port, &net.name)
        .set("ports", &format!("\n  - host: {port}\n    container: 80\n    host_ip: 127.0.0.1"))
        .write(daemon.dir());
    daemon.cli_ok(&["apply", local.to_str().unwrap()]);
    assert_eq!(get_ok(At::Host, &format!("http://127.0.0.1:{port}/")).trim(), "v1");
}

/// Case 11: `--allow-group` lets in a member of the group through a supplementary
/// group, not only through the primary one; others are still refused.
#[test]
fn allow_group_honours_supplementary_groups() {
    let ids = Ids::new("allow_group_honours_supplementary_groups");
    require_root();
    let group = 4242u32;
    let daemon = Daemon::start_with(&ids, &["--allow-group", &group.to_string()]);
    // The test's scratch dir is private; nobody must be able to reach the socket in it.
    std::fs::set_permissions(daemon.dir(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let as_nobody = |groups: Option<u32>| {
        let mut c = std::process::Command::new("setpriv");
        c.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")]);
        match groups {
            Some(g) => c.arg(format!("--groups={g}")),
            None => c.arg("--clear-groups"),
        };
        c.args([CUTOVER, "status", "--json"]).env("CUTOVER_SOCKET", daemon.socket()).current_dir("/");
        common::cmd::run_bounded(&mut c, Duration::from_secs(20))
    };
    let member = as_nobody(Some(group));
    assert_eq!(member.code, Some(0), "a member through a supplementary group is let in: {member:?}");
    assert_eq!(member.stdout.trim(), "[]");
    let stranger = as_nobody(None);
    assert_ne!(stranger.code, Some(0), "{stranger:?}");
}

/// Case 11: a manifest path that is not a regular file, or is too large, is refused at
/// once with exit 2 by `plan` and `apply` (it used to read /dev/zero without bound and
/// wait forever on a FIFO).
#[test]
fn manifest_reads_are_bounded_and_only_of_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, format!("name: web\nimage: x\nports: [{{host: 1, container: 2}}]\n{}", "#".repeat(2 << 20))).unwrap();
    let socket = dir.path().join("none.sock");
    for (path, want) in [(std::path::Path::new("/dev/zero"), "character device"), (fifo.as_path(), "FIFO"), (big.as_path(), "larger than")] {
        for cmd in ["plan", "apply"] {
            let started = std::time::Instant::now();
            let mut c = std::process::Command::new(CUTOVER);
            c.args(["--socket", socket.to_str().unwrap(), cmd, path.to_str().unwrap()]);
            let out = common::cmd::run_bounded(&mut c, Duration::from_secs(20));
            assert_eq!(out.code, Some(2), "{cmd} {}: {out:?}", path.display());
            assert!(out.stderr.contains(want), "{cmd} {}: {}", path.display(), out.stderr);
            assert!(started.elapsed() < Duration::from_secs(5), "{cmd} {} took {:?}", path.display(), started.elapsed());
        }
    }
}

/// Case 11: the drain of a release with many UDP ports reads conntrack over netlink, one
/// dump per poll: no `conntrack` process per port per poll (98 ports used to spawn 98
/// processes every 250 ms on the async runtime, and a 2 s drain took 11 s).
#[test]
fn draining_many_udp_ports_runs_no_conntrack_process() {
    let ids = Ids::new("draining_many_udp_ports_runs_no_conntrack");
    let TwoReleases { net, v1, v2, client: _client } = two_releases_with(&ids, &[("UDP_LISTEN", "0.0.0.0:5353")]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let mut yaml = ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "2s").set("udp_idle", "1s");
    for _ in 0..98 {
        yaml = yaml.udp_port(ids.port(), 5353);
    }
    daemon.cli_ok(&["apply", yaml.write(daemon.dir()).to_str().unwrap()]);
    let pid = daemon.pid().unwrap();
    // Watch the daemon's children while it deploys and drains.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
                    let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
                    let ppid: u32 = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
                    if ppid == pid {
                        let comm = stat.split('(').nth(1).and_then(|c| c.split(')').next()).unwrap_or("").to_string();
                        seen.insert(comm);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };
    let started = std::time::Instant::now();
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    let took = started.elapsed();
    eprintln!("deploy with 98 UDP ports: {took:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let children = watcher.join().unwrap();
    assert!(!children.contains("conntrack"), "the daemon ran conntrack processes: {children:?}");
    // A bound for a loaded machine; it took about 5 s on an idle one.
    assert!(took < Duration::from_secs(60), "the deploy with 98 UDP ports took {took:?}");
    let log = daemon.log();
    assert!(!log.contains("cannot read the old release's UDP flows"), "{log}");
}
