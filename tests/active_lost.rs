//! The active release is lost on its own (issue 12, case 6): `docker kill` of the serving
//! container, `docker network disconnect` of it, or a release that keeps running but
//! stops passing its health check. The daemon notices it (the engine's container and
//! network events, its own checks of the active release), says so in its log, in
//! `status` and in its metrics, and does what `on_failure` says: restart it (the
//! default), roll back to the newest kept release, or only report it; clients from
//! another namespace are answered again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cmd::cmd;
use common::*;

fn status(daemon: &Daemon, service: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&daemon.cli_ok(&["status", service, "--json"]).stdout).unwrap()[0].clone()
}

/// Until `status` shows release `n` active and the service not down.
#[track_caller]
fn serving_again(daemon: &Daemon, service: &str, n: u64) {
    wait_for(&format!("status to show release {n} active and not down"), Duration::from_secs(30), || {
        let s = status(daemon, service);
        (s["active"] == n && s.get("down").is_none_or(serde_json::Value::is_null)).then_some(()).ok_or_else(|| s.to_string())
    });
}

/// Service `ids.service` on `port`, `on_failure: rollback`, applied with `v1` and
/// deployed to `v2`, which answers (release 1 kept): its URL from `client`.
#[track_caller]
fn v2_over_kept_v1(daemon: &Daemon, ids: &Ids, network: &str, (v1, v2): (&str, &str), client: &ClientHost, port: u16) -> String {
    let yaml = ServiceYaml::http(&ids.service, v1, port, network).set("on_failure", "rollback").set("drain_timeout", "2s");
    apply(daemon, yaml);
    daemon.cli_ok(&["deploy", &ids.service, "--image", v2]);
    let url = client.url(port);
    answered_by(client, &url, "v2");
    url
}

#[track_caller]
fn answered_by(client: &ClientHost, url: &str, release: &str) {
    wait_for(&format!("{url} to be answered by {release}"), Duration::from_secs(40), || {
        match curl_within(client.at(), url, Duration::from_secs(2)) {
            Ok((200, body)) if body.trim() == release => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn a_killed_active_release_is_restarted() {
    let ids = Ids::new("a_killed_active_release_is_restarted");
    let TwoReleases { net, v1, v2: _v2, client } = two_releases(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    let url = client.url(port);
    answered_by(&client, &url, "v1");
    run(&mut cmd(DOCKER, ["kill", &format!("cutover-{}-1", ids.service)]));
    answered_by(&client, &url, "v1");
    let s = status(&daemon, &ids.service);
    assert_eq!(s["active"], 1);
    assert!(s.get("down").is_none_or(serde_json::Value::is_null), "recovered: {s}");
    let log = daemon.log();
    assert!(log.contains("the active release is down") && log.contains("restarted release 1"), "{log}");
}

#[test]
fn a_killed_active_release_is_rolled_back_and_none_only_reports() {
    let ids = Ids::new("a_killed_active_release_is_rolled_back");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let url = v2_over_kept_v1(&daemon, &ids, &net.name, (&v1, &v2), &client, port);
    run(&mut cmd(DOCKER, ["kill", &format!("cutover-{}-2", ids.service)]));
    answered_by(&client, &url, "v1");
    serving_again(&daemon, &ids.service, 1);

    // `none`: only reported, in status (and the log).
    let none = ServiceYaml::http(&ids.service, &v1, port, &net.name).set("on_failure", "none").set("drain_timeout", "2s");
    apply(&daemon, none);
    let active = status(&daemon, &ids.service)["active"].as_u64().unwrap();
    run(&mut cmd(DOCKER, ["kill", &format!("cutover-{}-{active}", ids.service)]));
    wait_for("status to say the release is down", Duration::from_secs(20), || {
        let s = status(&daemon, &ids.service);
        s["down"].as_str().filter(|d| d.contains("died")).map(drop).ok_or_else(|| s.to_string())
    });
    let text = daemon.cli_ok(&["status"]).stdout;
    assert!(text.contains("DOWN: release"), "{text}");
}

/// `GET /metrics` of the daemon's `--metrics` address, from the host.
fn metrics(addr: &str) -> String {
    match curl_within(At::Host, &format!("http://{addr}/metrics"), Duration::from_secs(5)) {
        Ok((200, body)) => body,
        other => panic!("scrape {addr}: {other:?}"),
    }
}

/// The value of sample `series` (name and labels, as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_disconnected_active_release_is_rolled_back() {
    let ids = Ids::new("a_disconnected_active_release_is_rolled_back");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let metrics_addr = format!("127.0.0.1:{}", ids.port());
    let daemon = Daemon::start_with(&ids, &["--metrics", &metrics_addr]);
    let port = ids.port();
    let url = v2_over_kept_v1(&daemon, &ids, &net.name, (&v1, &v2), &client, port);

    // Still running, but nothing can reach it.
    run(&mut cmd(DOCKER, ["network", "disconnect", &net.name, &format!("cutover-{}-2", ids.service)]));
    answered_by(&client, &url, "v1");
    all_new_connections_answer(client.at(), &url, "v1");
    serving_again(&daemon, &ids.service, 1);
    let text = metrics(&metrics_addr);
    let lost = format!("cutover_active_lost_total{{service=\"{}\",reason=\"disconnected\"}}", ids.service);
    assert_eq!(sample(&text, &lost), Some(1.0), "{text}");
    assert_eq!(sample(&text, &format!("cutover_active_down{{service=\"{}\"}}", ids.service)), Some(0.0), "{text}");
    let log = daemon.log();
    assert!(log.contains(&format!("release 2 was disconnected from network {}", net.name)) && log.contains("rolled back to release 1"), "{log}");

    // The kept release 2 was put back on its network: rolling forward to it works.
    daemon.cli_ok(&["rollback", &ids.service, "--to", "2"]);
    answered_by(&client, &url, "v2");
}

#[test]
fn an_active_release_that_fails_its_health_check_is_rolled_back_or_reported() {
    let ids = Ids::new("an_active_release_that_fails_its_health_check");
    let TwoReleases { net, v1, v2, client } = two_releases_with(&ids, &[("HEALTH", "switch")]);
    let metrics_addr = format!("127.0.0.1:{}", ids.port());
    let daemon = Daemon::start_with(&ids, &["--metrics", &metrics_addr]);
    let port = ids.port();
    let service = ids.service.clone();
    let yaml = ServiceYaml::http(&service, &v1, port, &net.name).set("on_failure", "rollback").set("drain_timeout", "2s");
    apply(&daemon, yaml);
    daemon.cli_ok(&["deploy", &service, "--image", &v2]);
    let url = client.url(port);
    answered_by(&client, &url, "v2");
    let health = format!("{url}health");
    let lost = format!("cutover_active_lost_total{{service=\"{service}\",reason=\"unhealthy\"}}");
    let down_gauge = format!("cutover_active_down{{service=\"{service}\"}}");

    // Clients keep coming while release 2 stops passing its check (it still answers `/`).
    let load = new_connection_load(&url, client.at(), 14);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(get_ok(client.at(), &format!("{health}?set=fail")), "health failing");
    answered_by(&client, &url, "v1");
    let report = load.wait();
    report.assert_no_failures();
    assert!(report.count("v1") > 0 && report.count("v2") > 0, "{:?}", report.bodies);
    serving_again(&daemon, &service, 1);
    let text = metrics(&metrics_addr);
    assert_eq!(sample(&text, &lost), Some(1.0), "{text}");
    let log = daemon.log();
    assert!(log.contains("release 2 failed 3 health checks in a row") && log.contains("rolled back to release 1"), "{log}");

    // `none`: only reported (status, metrics), and cleared once it passes again.
    apply(&daemon, ServiceYaml::http(&service, &v1, port, &net.name).set("on_failure", "none").set("drain_timeout", "2s"));
    assert_eq!(get_ok(client.at(), &format!("{health}?set=fail")), "health failing");
    wait_for("status to say release 1 is down", Duration::from_secs(30), || {
        let s = status(&daemon, &service);
        s["down"].as_str().filter(|d| d.contains("release 1 failed 3 health checks in a row")).map(drop).ok_or_else(|| s.to_string())
    });
    let text = daemon.cli_ok(&["status"]).stdout;
    assert!(text.contains("DOWN: release 1 failed 3 health checks"), "{text}");
    let text = metrics(&metrics_addr);
    assert_eq!(sample(&text, &down_gauge), Some(1.0), "{text}");
    assert_eq!(sample(&text, &lost), Some(2.0), "{text}");
    assert_eq!(get_ok(client.at(), &url), "v1", "on_failure none changed nothing");
    assert_eq!(status(&daemon, &service)["active"], 1);

    assert_eq!(get_ok(client.at(), &format!("{health}?set=ok")), "health ok");
    wait_for("DOWN to clear", Duration::from_secs(30), || {
        let s = status(&daemon, &service);
        s.get("down").is_none_or(serde_json::Value::is_null).then_some(()).ok_or_else(|| s.to_string())
    });
    assert_eq!(sample(&metrics(&metrics_addr), &down_gauge), Some(0.0));
    let log = daemon.log();
    assert_eq!(log.matches("passes its health check again; no longer down").count(), 1, "{log}");
}

/// `docker rm -f` of the active release while the daemon was not running (so no event
/// says it): after the restart the health watch finds it gone and rolls back.
#[test]
fn an_active_release_removed_while_the_daemon_was_down_is_found_and_rolled_back() {
    let ids = Ids::new("an_active_release_removed_while_down");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let metrics_addr = format!("127.0.0.1:{}", ids.port());
    let mut daemon = Daemon::start_with(&ids, &["--metrics", &metrics_addr]);
    let port = ids.port();
    let url = v2_over_kept_v1(&daemon, &ids, &net.name, (&v1, &v2), &client, port);

    daemon.kill9();
    run(&mut cmd(DOCKER, ["rm", "-f", &format!("cutover-{}-2", ids.service)]));
    daemon.restart();
    answered_by(&client, &url, "v1");
    all_new_connections_answer(client.at(), &url, "v1");
    serving_again(&daemon, &ids.service, 1);
    let text = metrics(&metrics_addr);
    let lost = format!("cutover_active_lost_total{{service=\"{}\",reason=\"removed\"}}", ids.service);
    assert_eq!(sample(&text, &lost), Some(1.0), "{text}");
    let log = daemon.log();
    assert!(log.contains("release 2 was removed") && log.contains("rolled back to release 1"), "{log}");
}
