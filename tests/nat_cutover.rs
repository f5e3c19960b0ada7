//! Acceptance of the NAT cutover (issue 2), as root against the real Docker engine, real
//! nftables and real network namespaces, with real clients (wrk, curl).
//!
//! Each test has its own daemon, table, mark, Docker network (with its own Linux bridge),
//! images, namespaces and ports (see `common::Ids`), so they run in parallel; the kit's
//! guards remove everything even when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn deploy_and_rollback_under_load_from_another_host() {
    let ids = Ids::new("deploy_and_rollback_under_load_from_another_host");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));

    let url = client.url(port);
    assert_eq!(get_ok(client.at(), &url).trim(), "v1");

    // A slow request in flight across the switch, and a load of new connections.
    let slow = SlowRequest::start(&ids, client.at(), &format!("{url}slow?ms=4000"), Duration::from_secs(30));
    slow.wait_established(Duration::from_secs(10));
    let run = new_connection_load(&url, client.at(), 12);
    std::thread::sleep(Duration::from_secs(1));
    let out = daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    assert!(out.stdout.contains("release 2"), "{out:?}");
    all_new_connections_answer(client.at(), &url, "v2");
    let report = run.wait();
    report.assert_no_failures();
    assert!(report.count("v1") > 0 && report.count("v2") > 0, "both releases answered during the run: {:?}", report.bodies);
    let (status, body) = slow.wait().expect("the slow request completed");
    assert_eq!((status, body.trim()), (200, "v1"), "the request started before the switch finished on v1");

    // Rollback under the same load.
    let run = new_connection_load(&url, client.at(), 8);
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["rollback", &ids.service]);
    all_new_connections_answer(client.at(), &url, "v1");
    let report = run.wait();
    report.assert_no_failures();
    assert!(report.count("v1") > 0 && report.count("v2") > 0, "{:?}", report.bodies);

    let status: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["status", &ids.service, "--json"]).stdout).expect("status --json is JSON");
    assert_eq!(status[0]["active"], 1);
    assert_eq!(status[0]["kept"], serde_json::json!([2]));
}

#[test]
fn host_clients_via_loopback_and_host_address() {
    let ids = Ids::new("host_clients_via_loopback_and_host_address");
    let net = nat_network(&ids);
    // The test sets route_localnet itself: off everywhere it could come from, so the
    // daemon must turn it on for loopback clients to work (NOTES: either alone fails).
    let _all = set_route_localnet("all", false);
    let _bridge = set_route_localnet(&net.bridge, false);
    let v1 = demo_image(&ids, "v1", &[]);
    let v2 = demo_image(&ids, "v2", &[]);
    let other = ClientHost::new(&ids); // only for a host address that is not loopback
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    assert!(route_localnet(&net.bridge), "the daemon enables route_localnet on the release's bridge");

    let loopback = format!("http://127.0.0.1:{port}/");
    let host_addr = other.url(port);
    assert_eq!(get_ok(At::Host, &loopback).trim(), "v1");
    assert_eq!(get_ok(At::Host, &host_addr).trim(), "v1");

    let slow = SlowRequest::start(&ids, At::Host, &format!("{loopback}slow?ms=3000"), Duration::from_secs(30));
    slow.wait_established(Duration::from_secs(10));
    let on_loopback = new_connection_load(&loopback, At::Host, 10);
    let on_host_addr = new_connection_load(&host_addr, At::Host, 10);
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    all_new_connections_answer(At::Host, &loopback, "v2");
    all_new_connections_answer(At::Host, &host_addr, "v2");
    for (what, run) in [("127.0.0.1", on_loopback), ("host address", on_host_addr)] {
        let report = run.wait();
        assert_eq!(report.failed(), 0, "clients via {what}: {}", report.output);
        assert!(report.count("v2") > 0, "clients via {what}: {:?}", report.bodies);
    }
    let (status, body) = slow.wait().expect("slow request");
    assert_eq!((status, body.trim()), (200, "v1"));
}

#[test]
fn clients_in_another_container_reach_the_host_port() {
    let ids = Ids::new("clients_in_another_container_reach_the_host_port");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let v2 = demo_image(&ids, "v2", &[]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));

    // A client container on the same bridge calls the host's address on that bridge:
    // without the hairpin masquerade the replies would bypass the NAT and be dropped.
    let client = client_container(&ids, &v1, Some(&net.name));
    let gateway = run(std::process::Command::new(DOCKER).args([
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        &net.name,
    ]));
    let url = format!("http://{}:{port}/", gateway.trim());
    let at = At::container(&client);
    assert_eq!(get_ok(at.clone(), &url).trim(), "v1");
    let run = new_connection_load(&url, at.clone(), 10);
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    all_new_connections_answer(at.clone(), &url, "v2");
    let report = run.wait();
    report.assert_no_failures();
    assert!(report.count("v2") > 0, "{:?}", report.bodies);
}

#[test]
fn a_release_that_never_gets_healthy_is_refused_and_changes_nothing() {
    let ids = Ids::new("a_release_that_never_gets_healthy_is_refused");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let bad = demo_image(&ids, "bad", &[("HEALTH", "fail")]);
    let client = ClientHost::new(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    let url = client.url(port);

    let rules_before = nft_table_text(&ids.table).expect("table exists");
    let containers_before = containers_of(&ids);
    let run = new_connection_load(&url, client.at(), 20);
    let started = Instant::now();
    let out = daemon.cli_expect(&["deploy", &ids.service, "--image", &bad], 1);
    let took = started.elapsed();
    // health.deadline is 15s in the manifest; allow for container start and teardown.
    assert!(took < Duration::from_secs(15 + 10), "refused after {took:?}");
    assert!(out.stderr.contains("503"), "the reason is shown: {}", out.stderr);
    assert!(out.stderr.contains("last lines of its log"), "the tail of its log is shown: {}", out.stderr);
    assert_eq!(get_ok(client.at(), &url).trim(), "v1", "v1 still serves");
    assert_eq!(nft_table_text(&ids.table).as_deref(), Some(rules_before.as_str()), "the ruleset is unchanged");
    assert_eq!(containers_of(&ids), containers_before, "no container of the refused release is left");
    let report = run.wait();
    report.assert_no_failures();
    assert_eq!(report.count("bad"), 0);

    let history: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["history", &ids.service, "--json"]).stdout).expect("history --json");
    assert_eq!(history["active"], 1);
    let last = history["events"].as_array().and_then(|e| e.last()).cloned().unwrap_or_default();
    assert_eq!(last["outcome"], "refused", "{history}");
}

#[test]
fn the_daemon_killed_keeps_traffic_and_restart_restores_a_lost_table() {
    let ids = Ids::new("the_daemon_killed_keeps_traffic");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let client = ClientHost::new(&ids);
    let mut daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    let url = client.url(port);

    let run = new_connection_load(&url, client.at(), 6);
    std::thread::sleep(Duration::from_secs(2));
    daemon.kill9();
    let report = run.wait();
    report.assert_no_failures();
    assert!(report.requests > 100, "traffic flowed while the daemon was dead: {}", report.output);

    // As after a reboot: the table is gone while the daemon is down.
    delete_dataplane(&ids.table);
    assert!(curl_within(client.at(), &url, Duration::from_secs(2)).is_err(), "without the table nothing answers");
    daemon.restart();
    assert_eq!(get_ok(client.at(), &url).trim(), "v1", "restart restored the rules from state");
    assert!(nft_table_json(&ids.table).is_some());
    assert_eq!(docker_user_rules(&ids.table).len(), 1, "exactly one DOCKER-USER accept");
}

#[test]
fn invalid_manifests_exit_2_and_change_nothing() {
    let ids = Ids::new("invalid_manifests_exit_2");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let good = apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    let rules = nft_table_text(&ids.table);
    let state = daemon.cli_ok(&["status", "--json"]).stdout;
    let containers = containers_of(&ids);

    let text = std::fs::read_to_string(&good).unwrap();
    let cases = [
        ("port", text.replace(&format!("host: {port}"), "host: 70000"), "ports[0].host"),
        ("unknown", format!("{text}colour: blue\n"), "unknown field `colour`"),
        ("malformed", text.replace("ports:\n", "ports: [\n"), ""),
    ];
    for (name, body, needle) in cases {
        let path = daemon.dir().join(format!("{name}.yaml"));
        std::fs::write(&path, body).unwrap();
        let out = daemon.cli_expect(&["apply", path.to_str().unwrap()], 2);
        let file = path.display().to_string();
        assert!(out.stderr.contains(&format!("{file}:")), "{name}: the message names the file and line: {}", out.stderr);
        assert!(out.stderr.contains(needle), "{name}: {}", out.stderr);
        // Also when a valid manifest comes along in the same command: nothing applies.
        daemon.cli_expect(&["apply", good.to_str().unwrap(), path.to_str().unwrap()], 2);
    }
    assert_eq!(nft_table_text(&ids.table), rules);
    assert_eq!(daemon.cli_ok(&["status", "--json"]).stdout, state);
    assert_eq!(containers_of(&ids), containers);
}

#[test]
fn plan_prints_the_rules_and_changes_nothing() {
    let ids = Ids::new("plan_prints_the_rules");
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let port = ids.port();
    let file = dir.path().join("web.yaml");
    std::fs::write(&file, format!("name: {}\nimage: x:1\nports: [{{host: {port}, container: 80}}]\n", ids.service)).unwrap();
    let out = std::process::Command::new(CUTOVER)
        .args(["plan", file.to_str().unwrap(), "--table", &ids.table])
        .env("CUTOVER_SOCKET", dir.path().join("no-daemon.sock"))
        .output()
        .expect("run cutover plan");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("table inet {}", ids.table)), "{stdout}");
    assert!(stdout.contains("type nat hook prerouting priority -105"), "{stdout}");
    assert!(stdout.contains("type nat hook output priority -105"), "{stdout}");
    assert!(stdout.contains(&format!("tcp . {port} : <address of {}'s active release> . 80", ids.service)), "{stdout}");
    assert!(stdout.contains("masquerade"), "{stdout}");
    assert!(nft_table_json(&ids.table).is_none(), "plan created no table");
    assert!(docker_user_rules(&ids.table).is_empty(), "plan added no DOCKER-USER rule");
}
