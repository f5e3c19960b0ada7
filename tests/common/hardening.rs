//! Helpers of the hardening tests (issue 12): a rival daemon on a test's table, file
//! modes, processes run as an unprivileged user.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::cmd::{run_bounded, Outcome};
use super::daemon::CUTOVER;
use super::ids::Ids;

/// The uid/gid the tests use for "an unprivileged local user" (Debian's `nobody`).
pub const NOBODY: u32 = 65534;

/// Runs a second `cutover daemon` on `ids`'s table and mark with its own socket and
/// state directory under `dir`; waits at most `timeout` for it to exit (a daemon that
/// keeps running fails the test: it was meant to refuse).
#[track_caller]
pub fn rival_daemon(ids: &Ids, dir: &Path, timeout: Duration) -> Outcome {
    let mut c = Command::new(CUTOVER);
    c.arg("daemon")
        .arg("--socket")
        .arg(dir.join("rival.sock"))
        .arg("--state-dir")
        .arg(dir.join("rival-state"))
        .args(["--table", &ids.table, "--mark", &ids.mark_arg(), "--instance", &ids.tag]);
    if let Some(backend) = super::test_backend() {
        c.args(["--backend", &backend]);
    }
    c.env("CUTOVER_LOG", "info");
    run_bounded(&mut c, timeout)
}

/// The permission bits (`& 0o7777`) of `path`, not following a symlink.
#[track_caller]
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).permissions().mode() & 0o7777
}
