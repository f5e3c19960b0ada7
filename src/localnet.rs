//! `route_localnet` of a bridge, shared by every service and every cutover daemon that
//! needs it, reference-counted on disk.
//!
//! A host client's packets to `127.0.0.1:<port>` keep their 127.0.0.1 source after the
//! DNAT to a release behind a bridge, and the kernel routes them out of that bridge only
//! while its `route_localnet` is 1. Several daemons (each with its own `--table`) may
//! serve releases behind one bridge, so the flag belongs to nobody in particular:
//!
//! - [`claim`] writes a marker `<dir>/<bridge>/<table>` and sets the flag to 1, every
//!   time it is called (a flag switched off by hand, or by a daemon of an older version,
//!   comes back at the next apply, deploy or daemon start). The first claimer also
//!   records the value the flag had before anyone claimed it, in `<dir>/<bridge>/.before`.
//! - [`release`] removes the table's marker; when no marker is left, the recorded value
//!   is written back and the bridge's directory removed. A bridge that no longer exists
//!   (its network was deleted) is not an error: there is nothing left to restore.
//!
//! The markers live under `/run` (tmpfs): a reboot forgets them together with the flag
//! values they protect. Writes are small and each daemon serialises its own calls; two
//! daemons racing on one bridge at worst both write 1, and the last release restores.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::host::{self, HostError};

/// Where the markers live by default.
pub const DEFAULT_DIR: &str = "/run/cutover/localnet";
/// The file holding the flag's value from before the first claim.
const BEFORE: &str = ".before";

/// The marker directory of one host (or one test).
#[derive(Debug, Clone)]
pub struct Localnet {
    dir: PathBuf,
    /// Where the per-interface sysctl files are (`/proc/sys/net/ipv4/conf` on a host).
    conf: PathBuf,
}

impl Default for Localnet {
    fn default() -> Self {
        Localnet::new(DEFAULT_DIR)
    }
}

impl Localnet {
    /// Markers under `dir`, the kernel's sysctl files.
    pub fn new(dir: impl Into<PathBuf>) -> Localnet {
        Localnet { dir: dir.into(), conf: PathBuf::from(host::CONF_DIR) }
    }

    /// Markers under `dir`, sysctl files under `conf` (tests).
    pub fn with_conf(dir: impl Into<PathBuf>, conf: impl Into<PathBuf>) -> Localnet {
        Localnet { dir: dir.into(), conf: conf.into() }
    }

    fn bridge_dir(&self, ifname: &str) -> Result<PathBuf, HostError> {
        host::check_ifname(ifname)?;
        Ok(self.dir.join(ifname))
    }

    fn marker(&self, ifname: &str, table: &str) -> Result<PathBuf, HostError> {
        // Table names are checked by the daemon (letters, digits, '_' and '-'); refuse
        // anything that could leave the directory anyway.
        if table.is_empty() || table.starts_with('.') || table.contains('/') || table.contains('\0') {
            return Err(HostError::InvalidInterface(format!("table `{table}`")));
        }
        Ok(self.bridge_dir(ifname)?.join(table))
    }

    /// `table` needs `route_localnet` on `ifname`: record that and set the flag to 1
    /// (again, if someone switched it off).
    pub fn claim(&self, ifname: &str, table: &str) -> Result<(), HostError> {
        self.claim_recorded(ifname, table, None).map(drop)
    }

    /// [`Localnet::claim`], with the value from before cutover when the caller recorded
    /// it elsewhere (a daemon's state from before the markers existed): used as the value
    /// to restore if nobody recorded one yet. Returns the flag's value before this claim.
    pub fn claim_recorded(&self, ifname: &str, table: &str, recorded: Option<bool>) -> Result<bool, HostError> {
        let marker = self.marker(ifname, table)?;
        let dir = self.bridge_dir(ifname)?;
        let flag = host::route_localnet_path_in(&self.conf, ifname)?;
        // A bridge that does not exist is the caller's error, before any marker is made.
        let now = host::read_flag(&flag)?;
        fs::create_dir_all(&dir).map_err(|source| HostError::Write { path: dir.clone(), source })?;
        let before_file = dir.join(BEFORE);
        if !before_file.exists() {
            let before = recorded.unwrap_or(now);
            write_atomic(&before_file, if before { "1\n" } else { "0\n" })?;
        }
        if !marker.exists() {
            write_atomic(&marker, "")?;
        }
        host::write_flag(&flag, true)?;
        Ok(now)
    }

    /// `table` no longer needs `route_localnet` on `ifname`. When nobody else does, the
    /// value from before the first claim is written back. Returns whether it was.
    pub fn release(&self, ifname: &str, table: &str) -> Result<bool, HostError> {
        let marker = self.marker(ifname, table)?;
        let dir = self.bridge_dir(ifname)?;
        match fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(HostError::Write { path: marker, source }),
        }
        if self.holders(ifname)?.iter().any(|t| t != table) {
            return Ok(false);
        }
        let before_file = dir.join(BEFORE);
        let before = match fs::read_to_string(&before_file) {
            Ok(t) => Some(t.trim() == "1"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(HostError::Read { path: before_file.clone(), source }),
        };
        let flag = host::route_localnet_path_in(&self.conf, ifname)?;
        let mut restored = false;
        if let Some(before) = before {
            match host::write_flag(&flag, before) {
                Ok(()) => restored = true,
                // The bridge is gone (its network was deleted first): nothing to restore.
                Err(HostError::Read { source, .. } | HostError::Write { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let _ = fs::remove_file(&before_file);
        let _ = fs::remove_dir(&dir);
        Ok(restored)
    }

    /// Release every bridge `table` holds (its last service is gone).
    pub fn release_all(&self, table: &str) -> Result<Vec<String>, HostError> {
        let mut released = Vec::new();
        for ifname in self.bridges_of(table)? {
            self.release(&ifname, table)?;
            released.push(ifname);
        }
        Ok(released)
    }

    /// The tables holding `ifname`.
    pub fn holders(&self, ifname: &str) -> Result<Vec<String>, HostError> {
        let dir = self.bridge_dir(ifname)?;
        list(&dir).map(|names| names.into_iter().filter(|n| !n.starts_with('.')).collect())
    }

    /// The bridges `table` holds.
    pub fn bridges_of(&self, table: &str) -> Result<Vec<String>, HostError> {
        let mut out = Vec::new();
        for ifname in list(&self.dir)? {
            if self.dir.join(&ifname).join(table).exists() {
                out.push(ifname);
            }
        }
        Ok(out)
    }

    /// Claim again every bridge `table` holds (daemon start): the flag may have been
    /// switched off while the daemon was down. A bridge that is gone is skipped.
    pub fn reassert(&self, table: &str) -> Result<Vec<String>, HostError> {
        let mut done = Vec::new();
        for ifname in self.bridges_of(table)? {
            match self.claim(&ifname, table) {
                Ok(()) => done.push(ifname),
                Err(HostError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

fn list(dir: &Path) -> Result<Vec<String>, HostError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut names = Vec::new();
            for e in entries {
                let e = e.map_err(|source| HostError::Read { path: dir.to_path_buf(), source })?;
                if let Some(n) = e.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(HostError::Read { path: dir.to_path_buf(), source }),
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<(), HostError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, text).map_err(|source| HostError::Write { path: tmp.clone(), source })?;
    fs::rename(&tmp, path).map_err(|source| HostError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/proc/sys/net/ipv4/conf` with one bridge.
    fn fake(bridge: &str, value: &str) -> (tempfile::TempDir, Localnet) {
        let t = tempfile::tempdir().unwrap();
        let conf = t.path().join("conf");
        fs::create_dir_all(conf.join(bridge)).unwrap();
        fs::write(conf.join(bridge).join("route_localnet"), value).unwrap();
        let l = Localnet::with_conf(t.path().join("markers"), conf);
        (t, l)
    }

    fn flag(t: &tempfile::TempDir, bridge: &str) -> String {
        fs::read_to_string(t.path().join("conf").join(bridge).join("route_localnet")).unwrap().trim().to_string()
    }

    #[test]
    fn a_flag_switched_off_by_hand_comes_back_at_the_next_claim() {
        let (t, l) = fake("br0", "0\n");
        l.claim("br0", "a").unwrap();
        assert_eq!(flag(&t, "br0"), "1");
        fs::write(t.path().join("conf/br0/route_localnet"), "0\n").unwrap();
        l.claim("br0", "a").unwrap();
        assert_eq!(flag(&t, "br0"), "1");
        fs::write(t.path().join("conf/br0/route_localnet"), "0\n").unwrap();
        assert_eq!(l.reassert("a").unwrap(), vec!["br0".to_string()]);
        assert_eq!(flag(&t, "br0"), "1");
    }

    #[test]
    fn two_tables_on_one_bridge_keep_it_until_the_last_one_releases() {
        let (t, l) = fake("br0", "0\n");
        l.claim("br0", "a").unwrap();
        l.claim("br0", "b").unwrap();
        assert!(!l.release("br0", "a").unwrap(), "b still needs it");
        assert_eq!(flag(&t, "br0"), "1");
        assert_eq!(l.holders("br0").unwrap(), vec!["b".to_string()]);
        assert!(l.release("br0", "b").unwrap());
        assert_eq!(flag(&t, "br0"), "0", "the value from before the first claim");
        assert!(!t.path().join("markers/br0").exists());
        // A flag that was already on stays on.
        let (t2, l2) = fake("br1", "1\n");
        l2.claim("br1", "a").unwrap();
        l2.release("br1", "a").unwrap();
        assert_eq!(flag(&t2, "br1"), "1");
    }

    #[test]
    fn a_value_recorded_elsewhere_is_the_one_restored() {
        // A daemon upgraded from before the markers: the flag is already 1 (it set it),
        // its state says it was 0.
        let (t, l) = fake("br0", "1\n");
        l.claim_recorded("br0", "a", Some(false)).unwrap();
        assert!(l.release("br0", "a").unwrap());
        assert_eq!(flag(&t, "br0"), "0");
    }

    #[test]
    fn a_bridge_that_is_gone_is_not_an_error() {
        let (t, l) = fake("br0", "0\n");
        l.claim("br0", "a").unwrap();
        fs::remove_dir_all(t.path().join("conf/br0")).unwrap();
        assert_eq!(l.release_all("a").unwrap(), vec!["br0".to_string()]);
        assert!(l.bridges_of("a").unwrap().is_empty());
        // Releasing what was never claimed is fine too.
        assert!(!l.release("br9", "a").unwrap());
        assert!(l.reassert("a").unwrap().is_empty());
    }

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        let (_t, l) = fake("br0", "0\n");
        assert!(l.claim("../x", "a").is_err());
        assert!(l.claim("br0", "../a").is_err());
        assert!(l.claim("br0", ".before").is_err());
    }
}
