//! What `cutover run` leaves in its run directory so that a supervisor started again
//! after being killed can adopt the generation that still serves: its number, pid and
//! start time (`/proc/PID/stat` field 22, so a recycled pid is never adopted). Written
//! atomically (temp file, fsync, rename) each time the serving generation changes;
//! removed when the supervisor stops on purpose. A new generation being started or
//! watched is recorded too, so that one started again can stop it: it holds the
//! listeners and would otherwise accept connections unsupervised.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingRecord {
    pub generation: u64,
    pub pid: i32,
    pub start_time: u64,
    /// The next generation while it is started and watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting: Option<Starting>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Starting {
    pub generation: u64,
    pub pid: i32,
    pub start_time: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a serving record: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub fn record_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.serving"))
}

/// The record, or `None` if there is none.
pub fn load(path: &Path) -> Result<Option<ServingRecord>, RecordError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| RecordError::Corrupt { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RecordError::Io { op: "read", path: path.to_path_buf(), source }),
    }
}

pub fn save(path: &Path, record: &ServingRecord) -> Result<(), RecordError> {
    let io = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| RecordError::Io { op, path: p, source }
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let body = serde_json::to_vec(record).map_err(|e| RecordError::Io { op: "encode", path: path.to_path_buf(), source: e.into() })?;
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&body).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("rename into", path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync", dir))?;
    }
    Ok(())
}

pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_a_round_trip_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "web");
        assert_eq!(load(&path).unwrap(), None);
        let r = ServingRecord { generation: 3, pid: 42, start_time: 99, starting: Some(Starting { generation: 4, pid: 43, start_time: 100 }) };
        save(&path, &r).unwrap();
        assert_eq!(load(&path).unwrap(), Some(r));
        std::fs::write(&path, r#"{"generation":1,"pid":2,"start_time":3}"#).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().starting, None);
        remove(&path);
        assert_eq!(load(&path).unwrap(), None);
        std::fs::write(&path, "nope").unwrap();
        assert!(matches!(load(&path), Err(RecordError::Corrupt { .. })));
    }
}
