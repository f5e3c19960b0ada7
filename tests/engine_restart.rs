//! The Docker engine restarting during a drain (issue 7). Restarting the engine touches
//! every container on the host, so nextest runs this test alone (`exclusive_` prefix,
//! see .config/nextest.toml).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn engine_up() -> bool {
    Command::new(DOCKER).arg("version").output().is_ok_and(|o| o.status.success())
}

/// Stop and start dockerd the way it runs here: systemd's unit, or the background
/// process .ci/provision started.
fn restart_engine() {
    let systemd = Command::new("systemctl").args(["is-active", "--quiet", "docker"]).status().is_ok_and(|s| s.success());
    if systemd {
        run(Command::new("systemctl").args(["restart", "docker"]));
    } else {
        let pid = run(Command::new("pidof").arg("dockerd"));
        let pid = pid.split_whitespace().next().unwrap_or_else(|| panic!("no dockerd runs"));
        run(Command::new("kill").args(["-TERM", pid]));
        wait_for("dockerd to stop", Duration::from_secs(60), || {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() { Err("still running".into()) } else { Ok(()) }
        });
        run(Command::new("bash").args([
            "-c",
            "setsid nohup /usr/sbin/dockerd >>/var/log/cutover-dockerd.log 2>&1 < /dev/null &",
        ]));
    }
    wait_for("the Docker engine to answer again", Duration::from_secs(90), || {
        if engine_up() { Ok(()) } else { Err("not yet".into()) }
    });
}

#[test]
fn exclusive_engine_restart_during_a_drain_completes_or_undoes_the_release() {
    let ids = Ids::new("exclusive_engine_restart_during_a_drain");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let manifest = ServiceYaml::http(&ids.service, &v1, port, &net.name)
        .set("health", "{type: http, path: /healthz, interval: 200ms, deadline: 30s}")
        .set("drain_timeout", "40s")
        .set("watch", "0s")
        .set("keep", "3")
        .write(daemon.dir());
    daemon.cli_ok(&["apply", manifest.to_str().unwrap_or_default()]);
    let url = client.url(port);
    assert_eq!(get_ok(client.at(), &url).trim(), "v1");
    // A long request holds v1 in its drain.
    let slow = SlowRequest::start(&ids, client.at(), &format!("{url}slow?ms=30000"), Duration::from_secs(60));
    slow.wait_established(Duration::from_secs(10));

    let outcome = std::thread::scope(|scope| {
        let deploy = scope.spawn(|| daemon.cli(&["deploy", &ids.service, "--image", &v2]));
        wait_for("the deploy to drain", Duration::from_secs(60), || {
            let out = daemon.cli(&["status", &ids.service, "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            let op = v[0]["operation"].as_str().unwrap_or_default().to_string();
            if op.ends_with("draining") { Ok(()) } else { Err(format!("operation `{op}`")) }
        });
        restart_engine();
        deploy.join().unwrap_or_else(|_| panic!("deploy thread"))
    });
    drop(slow);
    assert!(outcome.code == 0 || outcome.code == 1, "the release completes or is refused cleanly: {outcome:?}");
    // Whatever the outcome, exactly one release serves again and the state says which.
    let expect = wait_for("the service to answer again", Duration::from_secs(90), || {
        let out = daemon.cli(&["status", &ids.service, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
        if !v[0]["operation"].is_null() {
            return Err("operation still open".into());
        }
        let active = v[0]["active"].as_u64().ok_or("no active release")?;
        let body = curl_within(client.at(), &url, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        if body.0 == 200 { Ok((active, body.1.trim().to_string())) } else { Err(format!("status {}", body.0)) }
    });
    assert_eq!(expect.1, format!("v{}", expect.0), "the release the state names is the one answering");
    for _ in 0..10 {
        assert_eq!(get_ok(client.at(), &url).trim(), expect.1);
    }
    wait_for("exactly one release to run", Duration::from_secs(30), || {
        let n = running_containers_of(&ids).len();
        if n == 1 { Ok(()) } else { Err(format!("{n} running")) }
    });
    assert_eq!(docker_user_rules(&ids.table).len(), 1, "the DOCKER-USER accept is there after the engine restart");
}
