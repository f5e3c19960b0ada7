//! The active release dies on its own (issue 12, case 6): `docker kill` of the serving
//! container. The daemon notices it from the engine's events, says so in its log and in
//! `status`, and does what `on_failure` says: restart it (the default) or roll back to
//! the newest kept release; clients from another namespace are answered again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cmd::cmd;
use common::*;

fn status(daemon: &Daemon, service: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&daemon.cli_ok(&["status", service, "--json"]).stdout).unwrap()[0].clone()
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
    let yaml = ServiceYaml::http(&ids.service, &v1, port, &net.name).set("on_failure", "rollback").set("drain_timeout", "2s");
    apply(&daemon, yaml);
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    let url = client.url(port);
    answered_by(&client, &url, "v2");
    run(&mut cmd(DOCKER, ["kill", &format!("cutover-{}-2", ids.service)]));
    answered_by(&client, &url, "v1");
    wait_for("status to show release 1 active", Duration::from_secs(30), || {
        let s = status(&daemon, &ids.service);
        (s["active"] == 1 && s.get("down").is_none_or(serde_json::Value::is_null)).then_some(()).ok_or_else(|| s.to_string())
    });

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
