//! What an operator reads (issue 18): exit codes and messages of the CLI as a user meets
//! them, through the `cutover` binary against a real daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use common::*;

fn cutover(daemon: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(CUTOVER);
    c.arg("--socket").arg(daemon.socket()).args(args).env("NO_COLOR", "1");
    c
}

#[test]
fn access_unknown_names_broken_pipes_and_times_read_as_an_operator_expects() {
    let ids = Ids::new("access_unknown_names_broken_pipes_and_times");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, ids.port(), &net.name));

    // A user the socket's mode keeps out: refused (1), told how to get access; not
    // "start the daemon" (3), since the daemon runs.
    let out = cutover(&daemon, &["status"]).output().unwrap();
    assert!(out.status.success(), "root is let in");
    let denied = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(CUTOVER)
        .arg("--socket")
        .arg(daemon.socket())
        .arg("status")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert_eq!(denied.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("denied") && stderr.contains("--allow-group"), "{stderr}");
    assert!(!stderr.contains("start it with"), "{stderr}");

    // An unknown service with --json: exit 2 and JSON on stdout.
    let out = cutover(&daemon, &["status", "no-such-service", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["error"]["exit"], 2);
    assert!(v["error"]["message"].as_str().unwrap().contains("no-such-service"), "{v}");

    // A reader that goes away (`| head`): the command ends quietly, exit 0, no panic.
    for args in [&["history", ids.service.as_str()][..], &["status"][..]] {
        let mut child = cutover(&daemon, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // History: local time in the table, RFC 3339 in JSON, no `-->` for the first release.
    let text = daemon.cli_ok(&["history", &ids.service]).stdout;
    let row = text.lines().find(|l| l.contains("switched")).unwrap_or_else(|| panic!("{text}"));
    let at = &row[..19];
    assert!(at.as_bytes()[4] == b'-' && at.as_bytes()[10] == b' ' && at.as_bytes()[13] == b':', "local time first: {row}");
    assert!(!text.contains("-->"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["history", &ids.service, "--json"]).stdout).unwrap();
    let at_time = json["events"][0]["at_time"].as_str().unwrap();
    assert!(at_time.ends_with('Z') && at_time.len() == 20, "{at_time}");
}

/// Health type `docker` with an image that has no HEALTHCHECK is refused from the image
/// itself, before a release number is spent or a container created; an image reference
/// that is not one is refused the same way.
#[test]
fn a_docker_health_check_without_healthcheck_and_a_bad_reference_are_refused_before_any_container() {
    let ids = Ids::new("a_docker_health_check_without_healthcheck");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let yaml = ServiceYaml::http(&ids.service, &v1, port, &net.name).set("health", "\n  type: docker");
    let file = yaml.write(daemon.dir());
    let out = daemon.cli_expect(&["apply", file.to_str().unwrap()], 2);
    assert!(out.stderr.contains("has no HEALTHCHECK") && out.stderr.contains("healthcheck:"), "{}", out.stderr);
    assert!(containers_of(&ids).is_empty(), "no container was created");
    // The same service with an http check, then a deploy of a reference with bad syntax.
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    let out = daemon.cli_expect(&["deploy", &ids.service, "--image", "Not A/Ref:"], 2);
    assert!(out.stderr.contains("is not an image reference"), "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["history", &ids.service, "--json"]).stdout).unwrap();
    assert_eq!(json["releases"].as_array().unwrap().len(), 1, "no release number was spent: {json}");
}

/// A rollback to a kept release whose container was removed outside cutover: refused
/// with what to do, the release no longer listed as kept; `--pull missing` starts its
/// image again as a new release, and clients get it.
#[test]
fn a_rollback_to_a_removed_container_says_so_and_pull_starts_its_image_again() {
    let ids = Ids::new("a_rollback_to_a_removed_container");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    run(&mut common::cmd::cmd(DOCKER, ["rm", "-f", &format!("cutover-{}-1", ids.service)]));
    let out = daemon.cli_expect(&["rollback", &ids.service], 1);
    assert!(out.stderr.contains("is gone") && out.stderr.contains("--pull missing"), "{}", out.stderr);
    assert!(!out.stderr.contains("404"), "no engine wording: {}", out.stderr);
    let status: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["status", &ids.service, "--json"]).stdout).unwrap();
    assert_eq!(status[0]["kept"], serde_json::json!([]), "release 1 is no longer offered as kept: {status}");
    assert_eq!(get_ok(client.at(), &client.url(port)), "v2", "v2 still serves");
    let out = daemon.cli_ok(&["rollback", &ids.service, "--to", "1", "--pull", "missing"]);
    assert!(out.stdout.contains("release 3"), "{out:?}");
    assert_eq!(get_ok(client.at(), &client.url(port)), "v1", "release 1's image serves again");
}

/// A state error names its cause once (the message already carries it; the chain of
/// causes is not printed again after it).
#[test]
fn a_corrupt_state_is_reported_with_its_cause_once() {
    let ids = Ids::new("a_corrupt_state_is_reported");
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("state.json"), "{ nope").unwrap();
    let out = Command::new(CUTOVER)
        .args(["daemon", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--table", &ids.table, "--mark", &ids.mark_arg(), "--instance", &ids.tag])
        .output()
        .unwrap();
    let lock_dir = std::path::Path::new(cutover::daemon::table_lock::LOCK_DIR);
    let _ = std::fs::remove_file(cutover::daemon::table_lock::lock_path(lock_dir, &ids.table));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(error.contains("is corrupt") && error.contains("move it away"), "{error}");
    assert_eq!(error.matches("key must be a string").count(), 1, "the cause once: {error}");
}
