//! `net.ipv4.conf.<if>.route_localnet`, which decides whether 127.0.0.1 clients on the
//! host can be DNAT'd to a container. A machine keeps whatever an earlier test or manual
//! try left there, and new namespaces inherit `all`/`default`, so a test that wants to
//! prove cutover sets it must set the starting value itself (NOTES.md).

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
