//! Acceptance of the fleet layer (issue 17): three lab hosts (`lab/fleet`: each its own
//! network namespace, Docker engine, cutover daemon and sshd) behind HAProxy, released by
//! the `cutover.fleet` collection's rollout playbook run with `ansible-playbook` from a
//! control host over SSH, under a load of new connections through the load balancer.
//!
//! One lab for every step (starting three engines is the expensive part): v1 everywhere,
//! v2 under load, the same playbook again (nothing changed), check mode (nothing changed
//! on any host), then a v3 that only host 2 refuses (its image fails its health check):
//! the play stops at host 2, host 3 is never touched and host 1 is rolled back to v2.
//! Then the install role (into a staging root) and a daemon that does not answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::fleet::{Fleet, PlaybookRun, LB_URL, PLAYBOOKS};
use common::*;

const SERVICE: &str = "web";

fn rollout() -> String {
    format!("{PLAYBOOKS}/rollout.yml")
}

/// The load: a new connection per request through the load balancer, for as long as the
/// step takes (stopped by the caller).
fn load(fleet: &Fleet) -> WrkRun {
    Wrk::new(LB_URL).at(fleet.lb()).duration(Duration::from_secs(240)).connections(4).threads(1).timeout(Duration::from_secs(5)).start()
}

#[track_caller]
fn assert_ok(run: &PlaybookRun, what: &str) {
    assert!(run.code == Some(0), "{what}: the playbook failed:\n{}", run.text());
}

/// The load balancer answers `body` on each of `n` new connections.
#[track_caller]
fn lb_serves_only(fleet: &Fleet, body: &str, n: usize) {
    for _ in 0..n {
        assert_eq!(get_ok(fleet.lb(), LB_URL), body, "the load balancer answered another release");
    }
}

#[test]
fn fleet_rollout_under_load_refusal_stops_and_reverts_idempotent_check_mode() {
    let fleet = Fleet::up("fl", 3);
    for n in 1..=3 {
        fleet.demo_image(n, "fleet-demo:v1", "v1", &[]);
        fleet.demo_image(n, "fleet-demo:v2", "v2", &[]);
        // v3 is healthy everywhere except on host 2.
        let health: &[(&str, &str)] = if n == 2 { &[("HEALTH", "fail")] } else { &[] };
        fleet.demo_image(n, "fleet-demo:v3", "v3", health);
    }

    // v1 on every host: the role registers the service from the lab's manifest.
    let run = fleet.playbook(&[&rollout(), "-e", "image=fleet-demo:v1", "-e", "cutover_settle_seconds=1"]);
    assert_ok(&run, "v1");
    for n in 1..=3 {
        assert_eq!(fleet.image(n, SERVICE), "fleet-demo:v1", "h{n} after the v1 rollout");
    }
    // HAProxy's health checks see every host up.
    wait_for("the load balancer to answer v1", Duration::from_secs(20), || match curl(fleet.lb(), LB_URL) {
        Ok((200, body)) if body.trim() == "v1" => Ok(()),
        other => Err(format!("{other:?}")),
    });

    // v2 under load: every host ends on v2, no request fails.
    let wrk = load(&fleet);
    std::thread::sleep(Duration::from_secs(2));
    let run = fleet.playbook(&[&rollout(), "-e", "image=fleet-demo:v2", "-e", "cutover_settle_seconds=2", "--diff"]);
    std::thread::sleep(Duration::from_secs(1));
    let report = wrk.stop();
    assert_ok(&run, "v2");
    report.assert_no_failures();
    assert!(report.count("v2") > 0, "no response came from v2:\n{}", report.output);
    let recap = run.recap();
    for (n, host) in fleet.host_names().iter().enumerate() {
        assert_eq!(fleet.image(n + 1, SERVICE), "fleet-demo:v2", "{host} after the v2 rollout");
        assert_eq!(recap.get(host).map(|r| r.changed), Some(1), "{host} changed once:\n{}", run.text());
    }
    assert!(run.stdout.contains("+image: fleet-demo:v2"), "diff mode shows the new image:\n{}", run.text());
    lb_serves_only(&fleet, "v2", 6);

    // The same playbook again: nothing to do.
    let run = fleet.playbook(&[&rollout(), "-e", "image=fleet-demo:v2", "-e", "cutover_settle_seconds=0"]);
    assert_ok(&run, "v2 again");
    assert_eq!(run.changed(), 0, "the second run changed something:\n{}", run.text());
    assert_eq!(run.recap().len(), 3, "every host was visited:\n{}", run.text());

    // Check mode reports what would change and changes nothing on any host.
    let before: Vec<String> = (1..=3).map(|n| fleet.snapshot(n, SERVICE)).collect();
    let run = fleet.playbook(&[&rollout(), "-e", "image=fleet-demo:v3", "--check", "--diff"]);
    assert_ok(&run, "v3 in check mode");
    assert_eq!(run.changed(), 3, "check mode says each host would change:\n{}", run.text());
    assert!(run.stdout.contains("-image: fleet-demo:v2") && run.stdout.contains("+image: fleet-demo:v3"), "{}", run.text());
    for n in 1..=3 {
        assert_eq!(fleet.snapshot(n, SERVICE), before[n - 1], "check mode changed h{n}");
    }

    // v3, refused by host 2, with revert_on_failure, under load.
    let h3_before = fleet.snapshot(3, SERVICE);
    let wrk = load(&fleet);
    std::thread::sleep(Duration::from_secs(2));
    let run = fleet.playbook(&[
        &rollout(),
        "-e",
        "image=fleet-demo:v3",
        "-e",
        "revert_on_failure=true",
        "-e",
        "cutover_settle_seconds=2",
    ]);
    std::thread::sleep(Duration::from_secs(1));
    let report = wrk.stop();
    assert!(run.code != Some(0), "the play must fail when host 2 refuses the release:\n{}", run.text());
    let recap = run.recap();
    assert_eq!(recap.get("h1").map(|r| r.failed), Some(0), "h1 switched fine:\n{}", run.text());
    assert_eq!(recap.get("h2").map(|r| r.failed), Some(1), "h2 refused:\n{}", run.text());
    assert!(!recap.contains_key("h3"), "the play stopped before host 3's batch:\n{}", run.text());
    assert!(run.stdout.contains("still serves"), "the failure says the old release still serves:\n{}", run.text());
    assert!(run.stdout.contains("h2 -> h1"), "host 1 was rolled back from host 2's rescue:\n{}", run.text());
    assert_eq!(fleet.image(1, SERVICE), "fleet-demo:v2", "h1 is back on v2");
    assert_eq!(fleet.image(2, SERVICE), "fleet-demo:v2", "h2 kept v2");
    assert_eq!(fleet.snapshot(3, SERVICE), h3_before, "h3 was touched");
    report.assert_no_failures();
    assert!(report.count("v3") > 0, "host 1 served v3 before the revert:\n{}", report.output);
    lb_serves_only(&fleet, "v2", 6);

    // The install role puts the daemon and its unit on a host (into a staging root here:
    // the lab hosts run no systemd), and changes nothing the second time.
    let stage = tempfile::Builder::new().prefix("cutover-fleet-stage-").tempdir().unwrap();
    let binary = format!("cutover_install_binary={CUTOVER}");
    let unit = format!("cutover_install_unit={}/dist/cutover.service", env!("CARGO_MANIFEST_DIR"));
    let destdir = format!("cutover_install_destdir={}", stage.path().display());
    let install = format!("{PLAYBOOKS}/install.yml");
    let args = [install.as_str(), "-l", "h1", "-e", &binary, "-e", &unit, "-e", &destdir];
    let run = fleet.playbook(&args);
    assert_ok(&run, "install");
    let installed = std::fs::read(stage.path().join("usr/local/bin/cutover")).unwrap();
    assert!(installed == std::fs::read(CUTOVER).unwrap(), "the installed binary is the one given");
    assert!(stage.path().join("etc/systemd/system/cutover.service").is_file(), "the unit is installed");
    let run = fleet.playbook(&args);
    assert_ok(&run, "install again");
    assert_eq!(run.changed(), 0, "installing the same files again changed something:\n{}", run.text());

    // A daemon that does not answer is reported as unreachable (exit 3), not as a refusal.
    let mut c = std::process::Command::new(common::fleet::FLEET_SCRIPT);
    c.args([
        "exec",
        &fleet.name,
        "ansible",
        "h1",
        "-m",
        "cutover.fleet.cutover_release",
        "-a",
        "name=web image=fleet-demo:v3 socket=/nonexistent/cutover.sock binary={{ cutover_binary }}",
    ]);
    let o = cmd::run_bounded(&mut c, Duration::from_secs(120));
    assert!(o.code != Some(0), "a missing daemon must fail the task: {}", o.stdout);
    assert!(o.stdout.contains("unreachable at /nonexistent/cutover.sock"), "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("\"rc\": 3"), "{}", o.stdout);
}

/// A step that fails (here: a panic right after `up`) still removes the whole lab: the
/// namespaces, the engine's files and the fleet's own directory.
#[test]
fn fleet_lab_is_removed_when_a_step_fails() {
    let name = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let fleet = Fleet::up("fp", 1);
        *name.lock().unwrap() = fleet.name.clone();
        assert!(fleet.socket(1).exists(), "the host's daemon socket exists while the lab is up");
        panic!("a failing step");
    });
    assert!(result.is_err(), "the step was meant to fail");
    let name = name.into_inner().unwrap();
    assert!(!name.is_empty(), "the lab came up");
    for ns in [format!("{name}-h1"), format!("{name}-h1-c"), format!("{name}-br"), format!("{name}-ctl"), format!("{name}-lb")] {
        assert!(!netns_exists(&ns), "namespace {ns} is left");
    }
    for dir in [format!("/run/cutover-fleet/{name}"), format!("/run/cutover-lab/{name}-h1"), format!("/var/lib/cutover-lab/{name}-h1")] {
        assert!(!std::path::Path::new(&dir).exists(), "{dir} is left");
    }
}
