//! The soak (issue 12): deploy and rollback, cycle after cycle, under a load of new
//! connections from another namespace; every request must be answered, and the daemon's
//! open fds and memory must stay flat. Not in the default run (it takes long): run it with
//! `cargo nextest run --test soak --run-ignored only` (`CUTOVER_SOAK_CYCLES`, default
//! 200). It prints what it measured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

use common::*;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

#[test]
#[ignore = "soak: cargo nextest run --test soak --run-ignored only (CUTOVER_SOAK_CYCLES, default 200)"]
fn deploy_and_rollback_cycles_under_load_fail_no_request_and_leak_nothing() {
    let cycles: u32 = std::env::var("CUTOVER_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let ids = Ids::new("deploy_and_rollback_cycles_under_load");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "2s").set("watch", "1s"));
    let pid = daemon.pid().expect("the daemon runs");
    let url = client.url(port);
    // A warm-up cycle, so the first measurement is of a daemon that did everything once.
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    daemon.cli_ok(&["rollback", &ids.service]);
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));
    let started = Instant::now();
    let mut failed = 0u64;
    let mut requests = 0u64;
    let mut samples = Vec::new();
    for cycle in 1..=cycles {
        // Each cycle under its own wrk run, so a failure is placed in time.
        let load = new_connection_load(&url, client.at(), 6);
        daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
        daemon.cli_ok(&["rollback", &ids.service]);
        let report = load.wait();
        failed += report.failed();
        requests += report.requests;
        if cycle % 10 == 0 {
            samples.push((cycle, fd_count(pid), rss_kib(pid)));
            eprintln!(
                "soak: cycle {cycle}/{cycles}, {:?}, {requests} requests, {failed} failed, fds {}, rss {} KiB",
                started.elapsed(),
                fd_count(pid),
                rss_kib(pid)
            );
        }
    }
    let (fds1, rss1) = (fd_count(pid), rss_kib(pid));
    println!(
        "soak: {cycles} deploy/rollback cycles in {:?}: {requests} requests, {failed} failed; daemon fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB",
        started.elapsed()
    );
    assert_eq!(failed, 0, "no request failed in {cycles} cycles");
    assert!(fds1 <= fds0 + 8, "open fds stay flat: {fds0} -> {fds1} ({samples:?})");
    // Memory: allow the allocator some slack, not a growth per cycle.
    assert!(rss1 <= rss0 + 16 * 1024, "RSS stays flat: {rss0} -> {rss1} KiB ({samples:?})");
}
