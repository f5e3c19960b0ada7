//! `net.ipv4.conf.<if>.route_localnet`, which decides whether 127.0.0.1 clients on the
//! host can be DNAT'd to a container. A machine keeps whatever an earlier test or manual
//! try left there, and new namespaces inherit `all`/`default`, so a test that wants to
//! prove cutover sets it must set the starting value itself (NOTES.md).
//!
//! Also `net.ipv6.conf.all.forwarding`, host-wide, which IPv6 tests need on: held by a
//! count shared between test processes, so one test finishing never turns it off
//! under another still running.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

fn path(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{ifname}/route_localnet"))
}

/// Current value for interface `ifname` (or `all` / `default`).
#[track_caller]
pub fn route_localnet(ifname: &str) -> bool {
    let p = path(ifname);
    let v = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    v.trim() != "0"
}

fn write(ifname: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(path(ifname), value)
}

/// Interfaces whose route_localnet a live guard of this process holds: a second test
/// that wants the same interface waits, so two tests never flip it under each other.
static HELD: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static RELEASED: Condvar = Condvar::new();
const WAIT: Duration = Duration::from_secs(300);

/// Sets route_localnet on `ifname` until dropped, then restores the value it had.
#[derive(Debug)]
pub struct RouteLocalnetGuard {
    ifname: String,
    old: String,
}

/// Sets `net.ipv4.conf.<ifname>.route_localnet` to `on`. Waits (5 minutes at most) while
/// another test of this process holds the same interface; give each test its own bridge
/// (`DockerNetwork`) to avoid that.
#[track_caller]
pub fn set_route_localnet(ifname: &str, on: bool) -> RouteLocalnetGuard {
    let deadline = Instant::now() + WAIT;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    while held.contains(ifname) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "route_localnet on {ifname} stayed held by another test for {WAIT:?}");
        held = RELEASED.wait_timeout(held, left).unwrap_or_else(|p| p.into_inner()).0;
    }
    let p = path(ifname);
    let old = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    write(ifname, if on { "1" } else { "0" }).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    held.insert(ifname.to_string());
    RouteLocalnetGuard { ifname: ifname.to_string(), old: old.trim().to_string() }
}

impl RouteLocalnetGuard {
    /// The value before the guard set it.
    pub fn old(&self) -> bool {
        self.old != "0"
    }
}

impl Drop for RouteLocalnetGuard {
    fn drop(&mut self) {
        match write(&self.ifname, &self.old) {
            // The interface may be gone (a test network removed first): nothing to restore.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("cleanup: restoring route_localnet={} on {}: {e}", self.old, self.ifname);
            }
            _ => {}
        }
        HELD.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.ifname);
        RELEASED.notify_all();
    }
}

const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
/// Shared by every test process (nextest runs each test in its own): who holds IPv6
/// forwarding on (`holders/<pid>`) and the value before the first of them (`before`).
const IPV6_FORWARDING_STATE: &str = "/run/cutover-tests/ipv6-forwarding";

/// `net.ipv6.conf.all.forwarding` on while any test holds this guard, in any process;
/// the last holder to drop it restores the value from before the first one.
#[derive(Debug)]
pub struct Ipv6ForwardingGuard {
    holder: PathBuf,
}

/// Exclusive lock on the shared state, released when the returned file is dropped.
fn lock_ipv6_forwarding() -> nix::fcntl::Flock<std::fs::File> {
    let dir = PathBuf::from(IPV6_FORWARDING_STATE);
    std::fs::create_dir_all(dir.join("holders")).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let file = std::fs::File::create(dir.join("lock")).unwrap_or_else(|e| panic!("create the lock in {}: {e}", dir.display()));
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", dir.display()))
}

/// Holders still alive; files of crashed test processes are removed.
fn live_ipv6_forwarding_holders() -> usize {
    let dir = PathBuf::from(IPV6_FORWARDING_STATE).join("holders");
    let mut live = 0;
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            live += 1;
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    live
}

/// Turns IPv6 forwarding on (cutover leaves that to the operator) until the guard drops.
#[track_caller]
pub fn ipv6_forwarding_on() -> Ipv6ForwardingGuard {
    let _lock = lock_ipv6_forwarding();
    let before = PathBuf::from(IPV6_FORWARDING_STATE).join("before");
    // A `before` left with no live holder is from a crashed run: it still has the
    // value to go back to.
    if live_ipv6_forwarding_holders() == 0 && !before.exists() {
        let now = std::fs::read_to_string(IPV6_FORWARDING).unwrap_or_else(|e| panic!("read {IPV6_FORWARDING}: {e}"));
        std::fs::write(&before, now.trim()).unwrap_or_else(|e| panic!("write {}: {e}", before.display()));
    }
    std::fs::write(IPV6_FORWARDING, "1\n").unwrap_or_else(|e| panic!("enable {IPV6_FORWARDING}: {e}"));
    let holder = PathBuf::from(IPV6_FORWARDING_STATE).join("holders").join(std::process::id().to_string());
    std::fs::write(&holder, "").unwrap_or_else(|e| panic!("write {}: {e}", holder.display()));
    Ipv6ForwardingGuard { holder }
}

impl Drop for Ipv6ForwardingGuard {
    fn drop(&mut self) {
        let _lock = lock_ipv6_forwarding();
        let _ = std::fs::remove_file(&self.holder);
        if live_ipv6_forwarding_holders() > 0 {
            return;
        }
        let before = PathBuf::from(IPV6_FORWARDING_STATE).join("before");
        match std::fs::read_to_string(&before) {
            Ok(v) if v.trim() == "0" => {
                if let Err(e) = std::fs::write(IPV6_FORWARDING, "0\n") {
                    eprintln!("cleanup: restoring {IPV6_FORWARDING}=0: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("cleanup: reading {}: {e}", before.display()),
        }
        let _ = std::fs::remove_file(&before);
    }
}
