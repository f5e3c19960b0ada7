//! The state file under faults (issue 12, cases 2, 3 and 4): a state disk that fills up
//! during a release, a daemon killed between the switch and its record, a state file
//! lost or moved away. In each, clients from another namespace see no failed request,
//! the state and the kernel agree afterwards, no container is orphaned or removed while
//! it serves, and the operator reads what happened and what to do.
//!
//! The state directory is a small tmpfs of the test's own, filled with a file at a known
//! step of a release (the daemon's `--pause-at STEP --pause-for 3s` test hook).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cmd::cmd;
use common::daemon::tail;
use common::*;

/// A 1 MiB tmpfs mounted on the daemon's state directory, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        run(&mut cmd("mount", ["-t", "tmpfs", "-o", "size=1m,mode=0700", "cutover-test-state", &path.display().to_string()]));
        SmallDisk { path: path.to_path_buf() }
    }

    /// Fill it to the last byte.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the state disk: {e}"),
            }
        }
        let _ = f.flush();
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.path.join("state.json")).unwrap()).unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = cmd("umount", ["-l", &self.path.display().to_string()]).status();
    }
}

/// A daemon whose state directory is a [`SmallDisk`], pausing 3 s at `step` of every
/// release (the disk is returned second, so it is unmounted before the daemon's files go).
fn on_small_disk(ids: &Ids, step: &str) -> (Daemon, SmallDisk) {
    let mut disk = None;
    let daemon = Daemon::start_prepared(ids, &[CUTOVER], &["--pause-at", step, "--pause-for", "3s"], |dir| {
        disk = Some(SmallDisk::mount(dir));
    });
    (daemon, disk.expect("mounted"))
}

fn status(daemon: &Daemon, service: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&daemon.cli_ok(&["status", service, "--json"]).stdout).unwrap()[0].clone()
}

/// Wait until the daemon paused at a step for the `n`th time.
fn paused(daemon: &Daemon, n: usize) {
    wait_for(&format!("pause {n} of the --pause-at hook"), Duration::from_secs(60), || {
        let seen = daemon.log().matches("paused at this step").count();
        (seen >= n).then_some(()).ok_or_else(|| format!("{seen} pauses so far"))
    });
}

/// Every new connection from the client namespace is answered by `release`.
#[track_caller]
fn answered_by(client: &ClientHost, url: &str, release: &str) {
    for _ in 0..5 {
        let (code, body) = curl_within(client.at(), url, Duration::from_secs(3)).unwrap();
        assert_eq!((code, body.trim()), (200, release));
    }
}

/// Case 4: the state disk fills up while the new release is waited for. The release is
/// undone (container removed), nothing changed for clients, the status shows no
/// operation in progress, and once space is freed the next deploy goes through.
#[test]
fn a_full_state_disk_before_the_switch_undoes_the_release_and_changes_nothing() {
    let ids = Ids::new("a_full_state_disk_before_the_switch");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let (daemon, disk) = on_small_disk(&ids, "starting");
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "2s"));
    let url = client.url(port);
    answered_by(&client, &url, "v1");
    let rules_before = nft_table_text(&ids.table);

    let load = new_connection_load(&url, client.at(), 10);
    let out = std::thread::scope(|s| {
        let deploy = s.spawn(|| daemon.cli(&["deploy", &ids.service, "--image", &v2]));
        paused(&daemon, 2);
        disk.fill();
        deploy.join().unwrap()
    });
    let report = load.wait();
    assert_eq!(out.code, 1, "deploy: {out:?}\n{}", tail(&daemon.log(), 40));
    for needed in ["No space left on device", "undone before the switch, nothing changed for clients", "free space"] {
        assert!(out.stderr.contains(needed), "`{needed}` in: {}", out.stderr);
    }
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.count("v2"), 0, "{report:?}");
    answered_by(&client, &url, "v1");
    assert_eq!(nft_table_text(&ids.table), rules_before, "the rules are as they were");
    let s = status(&daemon, &ids.service);
    assert_eq!(s["active"], 1, "{s}");
    assert!(s.get("operation").is_none_or(serde_json::Value::is_null), "no operation in progress: {s}");
    assert_eq!(running_container_names(&ids), vec![format!("cutover-{}-1", ids.service)]);
    assert_eq!(containers_of(&ids).len(), 1, "the undone release's container is gone");
    let text = daemon.cli_ok(&["status"]).stdout;
    assert!(!text.contains("in progress"), "{text}");

    disk.free();
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    answered_by(&client, &url, "v2");
    assert_eq!(disk.state()["services"][&ids.service]["active"], 3, "the file caught up");
}

/// Case 3: the state disk fills up right after the switch transaction, before the switch
/// is recorded. The release goes on (the kernel changed: the state in memory says so),
/// the file still says `switching`; a crash then, and a restart once space is freed,
/// finishes the release from the file: the serving release is never removed, and no
/// client request fails.
#[test]
fn a_full_state_disk_after_the_switch_keeps_kernel_and_state_in_agreement_across_a_crash() {
    let ids = Ids::new("a_full_state_disk_after_the_switch");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let (mut daemon, disk) = on_small_disk(&ids, "switching");
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "2s"));
    let url = client.url(port);
    answered_by(&client, &url, "v1");

    let load = new_connection_load(&url, client.at(), 25);
    let out = std::thread::scope(|s| {
        let deploy = s.spawn(|| daemon.cli(&["deploy", &ids.service, "--image", &v2]));
        paused(&daemon, 2);
        disk.fill();
        deploy.join().unwrap()
    });
    assert_eq!(out.code, 0, "deploy: {out:?}\n{}", tail(&daemon.log(), 40));
    assert!(out.stderr.contains("the state file is behind") && out.stderr.contains("No space left on device"), "{}", out.stderr);
    // Memory and kernel agree: release 2 serves, release 1 is kept stopped.
    answered_by(&client, &url, "v2");
    let s = status(&daemon, &ids.service);
    assert_eq!(s["active"], 2, "{s}");
    assert!(s.get("operation").is_none_or(serde_json::Value::is_null), "{s}");
    // The file is behind, at the step recorded before the transaction.
    let file = disk.state();
    assert_eq!(file["services"][&ids.service]["operation"]["phase"], "switching", "{file}");

    // A crash before the file caught up; space freed; a restart finishes the release.
    daemon.kill9();
    disk.free();
    daemon.restart_without(&["--pause-at", "switching", "--pause-for", "3s"]);
    let report = load.wait();
    assert_eq!(report.failed(), 0, "{report:?}");
    answered_by(&client, &url, "v2");
    let log = daemon.log();
    assert!(log.contains("finished the interrupted Deploy to release 2"), "{}", tail(&log, 40));
    let s = status(&daemon, &ids.service);
    assert_eq!(s["active"], 2, "{s}");
    let file = disk.state();
    assert!(file["services"][&ids.service].get("operation").is_none(), "the file agrees: {file}");
    assert_eq!(running_container_names(&ids), vec![format!("cutover-{}-2", ids.service)]);
    assert_eq!(containers_of(&ids).len(), 2, "release 1 is kept for a rollback");
    daemon.cli_ok(&["rollback", &ids.service]);
    answered_by(&client, &url, "v1");
}

/// Case 2: the state file is corrupt; the daemon refuses to start and says to move it
/// away; moved away, the daemon adopts the running releases from their containers
/// instead of deleting the rules: clients never notice, and the adopted service deploys
/// (with its environment) and rolls back as before.
#[test]
fn a_lost_state_is_rebuilt_from_the_running_releases_without_an_outage() {
    let ids = Ids::new("a_lost_state_is_rebuilt");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let mut daemon = Daemon::start(&ids);
    let port = ids.port();
    let yaml = ServiceYaml::http(&ids.service, &v1, port, &net.name)
        .set("drain_timeout", "2s")
        .set("env", "\n  DB_PASSWORD: s3cret-value\n  MODE: blue");
    apply(&daemon, yaml);
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    let url = client.url(port);
    answered_by(&client, &url, "v2");
    let label = run(&mut cmd(DOCKER, ["inspect", "--format", "{{index .Config.Labels \"cutover.manifest\"}}", &format!("cutover-{}-2", ids.service)]));
    assert!(label.contains("DB_PASSWORD") && !label.contains("s3cret-value"), "names, never values, in the label: {label}");

    let load = new_connection_load(&url, client.at(), 20);
    // A corrupt state file: the daemon refuses to start, names it and what to do.
    daemon.kill9();
    let state_file = daemon.state_dir().join("state.json");
    std::fs::write(&state_file, "{\"version\": 1, \"services\": {").unwrap();
    let mut args = vec![
        "daemon".to_string(),
        "--socket".into(),
        daemon.socket().display().to_string(),
        "--state-dir".into(),
        daemon.state_dir().display().to_string(),
        "--table".into(),
        ids.table.clone(),
        "--mark".into(),
        ids.mark_arg(),
        "--instance".into(),
        ids.tag.clone(),
    ];
    if let Some(b) = test_backend() {
        args.extend(["--backend".into(), b]);
    }
    let refused = common::cmd::run_bounded(&mut cmd(CUTOVER, &args), Duration::from_secs(60));
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(refused.stderr.contains("is corrupt") && refused.stderr.contains("move it away"), "{}", refused.stderr);
    // The advice followed: moved away, the daemon starts empty and adopts.
    std::fs::rename(&state_file, daemon.state_dir().join("state.json.corrupt")).unwrap();
    daemon.restart();
    answered_by(&client, &url, "v2");
    let log = daemon.log();
    assert!(log.contains("adopted from its containers"), "{}", tail(&log, 40));
    let s = status(&daemon, &ids.service);
    assert_eq!(s["active"], 2, "{s}");
    if test_backend().is_none() {
        assert!(nft_table_text(&ids.table).is_some(), "the table stays");
    }

    // Deploys go on from the next release number (no name clash, nothing orphaned), with
    // the environment the label did not carry.
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v1]);
    answered_by(&client, &url, "v1");
    let env = run(&mut cmd(DOCKER, ["inspect", "--format", "{{json .Config.Env}}", &format!("cutover-{}-3", ids.service)]));
    assert!(env.contains("DB_PASSWORD=s3cret-value") && env.contains("MODE=blue"), "{env}");
    daemon.cli_ok(&["rollback", &ids.service]);
    answered_by(&client, &url, "v2");
    let report = load.wait();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(containers_of(&ids).len(), 3, "every release accounted for: {:?}", containers_of(&ids));
    assert!(!daemon.log().contains("s3cret-value"), "secrets never in the log");
}
