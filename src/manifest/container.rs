//! The container an operator defines, in the compose specification's names and syntax:
//! volumes, env files, user, limits, logging and the rest of what `docker run` and a
//! compose service carry, so a service moves to cutover by copying its fields.
//!
//! Owns the field types, their parsing from every syntax compose accepts (short and long
//! volumes, lists or maps, sizes such as `512m`), the pure checks on them, and the one
//! step that reads files ([`ContainerOptions::resolve`]: env files, relative bind
//! sources). It must not talk to the engine: `docker` turns [`ContainerOptions`] into an
//! engine request.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What kind of mount a volume entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A Docker volume: `source` is its name (none: an anonymous volume per release).
    Volume,
    /// A host path: `source` is absolute (after [`ContainerOptions::resolve`]).
    Bind,
    /// A memory file system; no source.
    Tmpfs,
}

/// One entry of `volumes:`, whichever syntax it was written in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    #[serde(rename = "type")]
    pub kind: MountKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl Mount {
    /// The short syntax `[SOURCE:]TARGET[:ro|rw]`: SOURCE is a named volume, an absolute
    /// path or a path starting with `./` or `../` (relative to the manifest's folder).
    pub fn parse_short(s: &str) -> Result<Mount, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [target] => (None, *target, None),
            [source, target] => (Some(*source), *target, None),
            [source, target, mode] => (Some(*source), *target, Some(*mode)),
            _ => return Err(format!("`{s}`: write SOURCE:TARGET or SOURCE:TARGET:ro")),
        };
        let read_only = match mode {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(other) => return Err(format!("`{s}`: the mode `{other}` is not ro or rw")),
        };
        let kind = match source {
            None => MountKind::Volume,
            Some(src) if is_path(src) => MountKind::Bind,
            Some(_) => MountKind::Volume,
        };
        Ok(Mount { kind, source: source.map(str::to_string), target: target.to_string(), read_only })
    }

    /// The checks of one mount, as a message without the field name.
    pub fn check(&self) -> Result<(), String> {
        if !self.target.starts_with('/') {
            return Err(format!("the target `{}` must be an absolute path in the container", self.target));
        }
        match (self.kind, self.source.as_deref()) {
            (MountKind::Volume, Some(name)) if !valid_volume_name(name) => Err(format!(
                "`{name}` is neither a volume name (letters, digits, '_', '.', '-') nor a path: \
                 write a relative path as ./{name} or use an absolute path"
            )),
            (MountKind::Bind, None) => Err("a bind mount needs a source path".into()),
            (MountKind::Bind, Some(p)) if !is_path(p) => {
                Err(format!("the bind source `{p}` must be absolute or start with ./ or ../ (relative to the manifest)"))
            }
            (MountKind::Tmpfs, Some(_)) => Err("a tmpfs mount has no source".into()),
            _ => Ok(()),
        }
    }
}

fn is_path(s: &str) -> bool {
    s.starts_with('/') || s.starts_with("./") || s.starts_with("../") || s == "." || s == ".."
}

/// Docker's rule for volume names.
pub fn valid_volume_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

impl<'de> Deserialize<'de> for MountEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MountEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("SOURCE:TARGET[:ro] or a map with type, source, target, read_only")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<MountEntry, E> {
                Mount::parse_short(s).map(MountEntry).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MountEntry, A::Error> {
                Mount::deserialize(de::value::MapAccessDeserializer::new(map)).map(MountEntry)
            }
        }
        d.deserialize_any(V)
    }
}

/// A `volumes:` entry in either syntax (the state file stores the long one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry(pub Mount);

impl Serialize for MountEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A size in bytes: `512m`, `1g`, `64k`, `1024` (bytes); `b`, `kb`, `mb`, `gb` and the
/// binary `KiB`, `MiB`, `GiB` too, all powers of 1024 as Docker reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
        let (num, unit) = t.split_at(digits);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(format!("`{s}` is not a size; write e.g. 512m, 1g or a number of bytes")),
        };
        let bad = || format!("`{s}` is not a size; write e.g. 512m, 1g or a number of bytes");
        let value = match num.split_once('.') {
            None => num.parse::<u64>().map_err(|_| bad())?.checked_mul(mult).ok_or_else(bad)?,
            Some(_) => {
                let f: f64 = num.parse().map_err(|_| bad())?;
                let v = f * mult as f64;
                if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
                    return Err(bad());
                }
                v as u64
            }
        };
        if value > i64::MAX as u64 {
            return Err(bad());
        }
        Ok(ByteSize(value))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_scalar(d, "a size such as 512m", |s| match s {
            Scalar::Int(i) if *i >= 0 => Ok(ByteSize(*i as u64)),
            Scalar::Text(t) => ByteSize::parse(t),
            other => Err(format!("`{other}` is not a size; write e.g. 512m, 1g or a number of bytes")),
        })
    }
}

/// CPUs as compose writes them (`0.5`, `"2"`), kept as billionths of a CPU (Docker's
/// NanoCpus) so the manifest stays comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cpus(pub u64);

impl Cpus {
    pub fn parse(s: &str) -> Result<Cpus, String> {
        let f: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number of CPUs; write e.g. 0.5 or 2"))?;
        if !f.is_finite() || f <= 0.0 || f > 4096.0 {
            return Err(format!("`{s}` CPUs: use a number above 0 and at most 4096"));
        }
        Ok(Cpus((f * 1e9).round() as u64))
    }
}

impl Serialize for Cpus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}", self.0 as f64 / 1e9))
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_scalar(d, "a number of CPUs such as 0.5", |s| Cpus::parse(&s.to_string()))
    }
}

/// A ulimit: `nofile: 65535` (soft = hard) or `nofile: {soft: 1024, hard: 65535}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ulimit {
    pub soft: i64,
    pub hard: i64,
}

impl<'de> Deserialize<'de> for Ulimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Pair {
            soft: i64,
            hard: i64,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ulimit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or {soft: N, hard: N}")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ulimit, E> {
                Ok(Ulimit { soft: v, hard: v })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ulimit, E> {
                let v = i64::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))?;
                Ok(Ulimit { soft: v, hard: v })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Ulimit, A::Error> {
                let p = Pair::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Ulimit { soft: p.soft, hard: p.hard })
            }
        }
        d.deserialize_any(V)
    }
}

/// `logging:` of compose: the log driver and its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    pub driver: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "string_map")]
    pub options: BTreeMap<String, String>,
}

/// When the image is pulled from its registry before a new release is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only when the image is not on the host (the default).
    #[default]
    Missing,
    /// Every release: a moved tag (e.g. `:latest`) is picked up.
    Always,
    /// Never: the image must be on the host.
    Never,
}

impl PullPolicy {
    pub fn is_default(&self) -> bool {
        *self == PullPolicy::Missing
    }
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(format!("`{s}`: use missing, always or never")),
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Missing => "missing",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        })
    }
}

/// The container fields of a manifest: every release of the service is created with
/// them (cutover keeps the restart policy, the name, the labels it needs and the ports).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContainerOptions {
    pub volumes: Vec<Mount>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    pub mem_limit: Option<ByteSize>,
    pub cpus: Option<Cpus>,
    pub pids_limit: Option<i64>,
    pub ulimits: BTreeMap<String, Ulimit>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub read_only: bool,
    pub tmpfs: Vec<String>,
    pub extra_hosts: Vec<String>,
    pub dns: Vec<String>,
    pub sysctls: BTreeMap<String, String>,
    pub security_opt: Vec<String>,
    pub init: Option<bool>,
    pub shm_size: Option<ByteSize>,
    pub logging: Option<Logging>,
    pub group_add: Vec<String>,
    pub devices: Vec<String>,
    pub healthcheck: Option<super::Healthcheck>,
    /// More DNS names of the container on its network.
    pub network_aliases: Vec<String>,
    /// Labels of the network when cutover has to create it; empty: it must exist.
    pub network_labels: BTreeMap<String, String>,
}

/// A problem with one container field: the field path (`volumes[1]`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// The YAML key to find the line of, and which occurrence of it.
    pub key: String,
    pub nth: usize,
    pub field: String,
    pub message: String,
}

impl FieldProblem {
    fn new(key: &str, field: impl Into<String>, message: impl Into<String>) -> FieldProblem {
        FieldProblem { key: key.to_string(), nth: 0, field: field.into(), message: message.into() }
    }
}

/// Labels cutover sets itself; a manifest may not set them.
const RESERVED_LABEL_PREFIX: &str = "cutover.";

impl ContainerOptions {
    /// The pure checks (no file is read).
    pub fn check(&self) -> Result<(), FieldProblem> {
        for (i, m) in self.volumes.iter().enumerate() {
            m.check().map_err(|msg| FieldProblem::new("volumes", format!("volumes[{i}]"), msg))?;
        }
        let mut targets = std::collections::BTreeSet::new();
        for (i, m) in self.volumes.iter().enumerate() {
            if !targets.insert(m.target.as_str()) {
                return Err(FieldProblem::new("volumes", format!("volumes[{i}]"), format!("`{}` is mounted twice", m.target)));
            }
        }
        let no_space = |key: &str, v: &Option<String>| -> Result<(), FieldProblem> {
            match v {
                Some(s) if s.trim().is_empty() || s.chars().any(char::is_whitespace) => {
                    Err(FieldProblem::new(key, key, format!("`{s}` must be non-empty without spaces")))
                }
                _ => Ok(()),
            }
        };
        no_space("user", &self.user)?;
        if let Some(dir) = &self.working_dir {
            if !dir.starts_with('/') {
                return Err(FieldProblem::new("working_dir", "working_dir", format!("`{dir}` must be an absolute path")));
            }
        }
        if let Some(e) = &self.entrypoint {
            if e.is_empty() {
                return Err(FieldProblem::new("entrypoint", "entrypoint", "an empty list; leave it out to use the image's"));
            }
        }
        if let Some(k) = self.labels.keys().find(|k| k.starts_with(RESERVED_LABEL_PREFIX)) {
            return Err(FieldProblem::new("labels", "labels", format!("`{k}`: labels starting with `cutover.` are cutover's own")));
        }
        if let Some(ByteSize(b)) = self.mem_limit {
            // Docker refuses less than 6 MiB.
            if b < 6 << 20 {
                return Err(FieldProblem::new("mem_limit", "mem_limit", format!("{b} bytes is below Docker's minimum of 6m")));
            }
        }
        if let Some(p) = self.pids_limit {
            if p == 0 || p < -1 {
                return Err(FieldProblem::new("pids_limit", "pids_limit", format!("{p}: use a positive number, or -1 for no limit")));
            }
        }
        for (name, u) in &self.ulimits {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(FieldProblem::new("ulimits", "ulimits", format!("`{name}` is not a ulimit name (e.g. nofile, nproc)")));
            }
            if u.soft > u.hard {
                return Err(FieldProblem::new(name, format!("ulimits.{name}"), format!("soft {} is above hard {}", u.soft, u.hard)));
            }
        }
        for (key, list) in [("cap_add", &self.cap_add), ("cap_drop", &self.cap_drop)] {
            if let Some(c) = list.iter().find(|c| c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) {
                return Err(FieldProblem::new(key, key, format!("`{c}` is not a capability (e.g. NET_ADMIN, ALL)")));
            }
        }
        for t in &self.tmpfs {
            if !t.starts_with('/') {
                return Err(FieldProblem::new("tmpfs", "tmpfs", format!("`{t}`: write PATH or PATH:OPTIONS with an absolute PATH")));
            }
        }
        for h in &self.extra_hosts {
            let ok = h.split_once(':').is_some_and(|(name, ip)| !name.is_empty() && (ip.parse::<std::net::IpAddr>().is_ok() || ip == "host-gateway"));
            if !ok {
                return Err(FieldProblem::new("extra_hosts", "extra_hosts", format!("`{h}`: write NAME:IP (or NAME=IP)")));
            }
        }
        if let Some(d) = self.dns.iter().find(|d| d.parse::<std::net::IpAddr>().is_err()) {
            return Err(FieldProblem::new("dns", "dns", format!("`{d}` is not an IP address")));
        }
        if let Some(k) = self.sysctls.keys().find(|k| k.is_empty() || k.contains(char::is_whitespace)) {
            return Err(FieldProblem::new("sysctls", "sysctls", format!("`{k}` is not a sysctl name")));
        }
        if let Some(l) = &self.logging {
            if l.driver.trim().is_empty() {
                return Err(FieldProblem::new("driver", "logging.driver", "name a log driver (e.g. json-file, local, none)"));
            }
        }
        if let Some(g) = self.group_add.iter().find(|g| g.is_empty() || g.contains(char::is_whitespace)) {
            return Err(FieldProblem::new("group_add", "group_add", format!("`{g}` is not a group")));
        }
        if let Some(d) = self.devices.iter().find(|d| !d.starts_with('/')) {
            return Err(FieldProblem::new("devices", "devices", format!("`{d}`: write HOST_PATH[:CONTAINER_PATH[:PERMISSIONS]]")));
        }
        Ok(())
    }

    /// Relative bind sources made absolute against `base` (the manifest's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for m in &mut self.volumes {
            if let (MountKind::Bind, Some(src)) = (m.kind, m.source.as_mut()) {
                if !src.starts_with('/') {
                    *src = normalize(&base.join(&*src)).display().to_string();
                }
            }
        }
    }

    /// The named volumes (created if missing, shared by every release).
    pub fn named_volumes(&self) -> Vec<&str> {
        let mut out: Vec<&str> =
            self.volumes.iter().filter(|m| m.kind == MountKind::Volume).filter_map(|m| m.source.as_deref()).collect();
        out.sort();
        out.dedup();
        out
    }
}

/// `a/./b/../c` -> `a/c`, without touching the file system (the path may not exist yet).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Parse the text of an env file in Docker's format: `KEY=VALUE` per line, `#` comments
/// and blank lines ignored, an optional `export ` prefix, no quote processing (Docker
/// keeps quotes as part of the value); a line with only `KEY` takes nothing here (Docker
/// would read it from its own environment, which a daemon does not share).
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: `{}` is not KEY=VALUE", i + 1, raw.trim()));
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(format!("line {}: `{key}` is not a variable name", i + 1));
        }
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// A YAML scalar of any type, for fields that take text but where operators write numbers.
/// Read with a visitor, not an untagged enum: an untagged enum buffers the value, and an
/// error then loses its line and field.
pub(crate) enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Text(s) => f.write_str(s),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

struct ScalarVisitor;

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a number")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Text(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(i64::try_from(v).map(Scalar::Int).unwrap_or(Scalar::Text(v.to_string())))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bool(v))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// Read a scalar and turn its text into `T` inside the deserializer, so an error keeps
/// the value's line and the field's path.
pub(crate) fn parse_scalar<'de, D, T, F>(d: D, what: &'static str, parse: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&Scalar) -> Result<T, String>,
{
    struct V<F>(F, &'static str);
    impl<T, F: FnOnce(&Scalar) -> Result<T, String>> Visitor<'_> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.1)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(&Scalar::Text(v.to_string())).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            (self.0)(&Scalar::Int(v)).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            let s = i64::try_from(v).map(Scalar::Int).unwrap_or(Scalar::Text(v.to_string()));
            (self.0)(&s).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            (self.0)(&Scalar::Float(v)).map_err(E::custom)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
            (self.0)(&Scalar::Bool(v)).map_err(E::custom)
        }
    }
    d.deserialize_any(V(parse, what))
}

/// A map of text values written as a map (`KEY: value`) or as a list (`- KEY=value`), as
/// compose accepts for `environment`, `labels` and `sysctls`. A key given twice is an
/// error (the last would silently win otherwise).
pub fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of KEY: value, or a list of KEY=value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, Option<Scalar>>()? {
                let v = v.map(|v| v.to_string()).unwrap_or_default();
                if out.insert(k.clone(), v).is_some() {
                    return Err(de::Error::custom(format!("`{k}` is given twice")));
                }
            }
            Ok(out)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(item) = seq.next_element::<String>()? {
                let (k, v) = item.split_once('=').unwrap_or((item.as_str(), ""));
                if out.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(de::Error::custom(format!("`{k}` is given twice")));
                }
            }
            Ok(out)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
    }
    d.deserialize_any(V)
}

/// One string or a list of them (`env_file`, `dns`, `tmpfs`).
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("one string or a list of strings")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<String>, A::Error> {
            strings(seq)
        }
    }
    d.deserialize_any(V)
}

/// Every element of a sequence, as strings.
pub(crate) fn strings<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<String>, A::Error> {
    let mut out = Vec::new();
    while let Some(s) = seq.next_element::<String>()? {
        out.push(s);
    }
    Ok(out)
}

/// Scalars of any type as text (`group_add: [1000, audio]`).
pub fn scalar_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<Scalar>::deserialize(d)?.into_iter().map(|s| s.to_string()).collect())
}

/// `extra_hosts` as a list (`NAME:IP` or `NAME=IP`) or a map (`NAME: IP`), as `NAME:IP`.
pub fn extra_hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of NAME:IP or a map of NAME: IP")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                out.push(format!("{k}:{v}"));
            }
            Ok(out)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                // NAME=IP (compose) or NAME:IP; an IPv6 address has colons of its own.
                let entry = match item.split_once('=') {
                    Some((name, ip)) => format!("{name}:{ip}"),
                    None => item,
                };
                out.push(entry);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// `entrypoint` (and `command`) as a list, or as one string split like a shell would
/// split words (quotes group, no expansion).
pub fn words<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Vec<String>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings or one command line")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            split_words(v).map(Some).map_err(E::custom)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            strings(seq).map(Some)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Split a command line into words: whitespace separates, single and double quotes
/// group, a backslash escapes the next character outside single quotes.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(format!("`{s}` has an unclosed quote"));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_volume_syntax() {
        let m = Mount::parse_short("data:/var/lib/app").unwrap();
        assert_eq!((m.kind, m.source.as_deref(), m.target.as_str(), m.read_only), (MountKind::Volume, Some("data"), "/var/lib/app", false));
        let m = Mount::parse_short("./conf/app.toml:/etc/app.toml:ro").unwrap();
        assert_eq!((m.kind, m.read_only), (MountKind::Bind, true));
        let m = Mount::parse_short("/srv/x:/x:rw").unwrap();
        assert_eq!(m.kind, MountKind::Bind);
        let anon = Mount::parse_short("/cache").unwrap();
        assert_eq!((anon.kind, anon.source), (MountKind::Volume, None));
        assert!(Mount::parse_short("a:/b:rx").unwrap_err().contains("not ro or rw"));
        let rel = Mount::parse_short("conf/app.toml:/etc/app.toml").unwrap();
        assert!(rel.check().unwrap_err().contains("./conf/app.toml"), "a relative path without ./ is refused with the fix");
        assert!(Mount::parse_short("data:relative").unwrap().check().is_err());
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(ByteSize::parse("512m").unwrap(), ByteSize(512 << 20));
        assert_eq!(ByteSize::parse("1g").unwrap(), ByteSize(1 << 30));
        assert_eq!(ByteSize::parse("1GiB").unwrap(), ByteSize(1 << 30));
        assert_eq!(ByteSize::parse("64kb").unwrap(), ByteSize(64 << 10));
        assert_eq!(ByteSize::parse("1.5g").unwrap(), ByteSize(3 << 29));
        assert_eq!(ByteSize::parse("4096").unwrap(), ByteSize(4096));
        assert!(ByteSize::parse("lots").unwrap_err().contains("not a size"));
        assert!(ByteSize::parse("99999999999999999999g").is_err());
        assert_eq!(Cpus::parse("0.5").unwrap(), Cpus(500_000_000));
        assert!(Cpus::parse("0").is_err());
        assert!(Cpus::parse("many").is_err());
    }

    #[test]
    fn env_files_in_dockers_format() {
        let text = "# comment\n\nDB_USER=app\nexport DB_PASSWORD=s3cr=t\nQUOTED=\"kept\"\n";
        let got = parse_env_file(text).unwrap();
        assert_eq!(
            got,
            vec![
                ("DB_USER".into(), "app".into()),
                ("DB_PASSWORD".into(), "s3cr=t".into()),
                ("QUOTED".into(), "\"kept\"".into())
            ]
        );
        assert!(parse_env_file("OK=1\nno equals here\n").unwrap_err().starts_with("line 2:"));
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(split_words("/app -c 'a b' \"c d\" e\\ f").unwrap(), ["/app", "-c", "a b", "c d", "e f"]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn relative_binds_resolve_against_the_manifest_folder() {
        let mut o = ContainerOptions {
            volumes: vec![Mount::parse_short("./conf:/etc/app:ro").unwrap(), Mount::parse_short("../shared:/s").unwrap()],
            ..Default::default()
        };
        o.resolve_paths(Path::new("/srv/web"));
        assert_eq!(o.volumes[0].source.as_deref(), Some("/srv/web/conf"));
        assert_eq!(o.volumes[1].source.as_deref(), Some("/srv/shared"));
    }

    #[test]
    fn value_errors_name_their_line_and_field() {
        for (tail, want) in [
            ("mem_limit: lots\n", "w.yaml:4: mem_limit: `lots` is not a size"),
            ("cpus: many\n", "w.yaml:4: cpus: `many` is not a number of CPUs"),
            ("drain_timeout: -1s\n", "w.yaml:4: drain_timeout: `-1s` is not a duration"),
            ("health:\n  deadline: -5\n", "w.yaml:5: health.deadline: `-5` is not a duration"),
            ("volumes:\n  - /a:/b\n  - a:b:c:d\n", "w.yaml:6: volumes[1]: `a:b:c:d`"),
            ("ulimits:\n  nofile: {soft: 1}\n", "w.yaml:5: ulimits.nofile: missing field `hard`"),
            ("environment:\n  A: 1\n  A: 2\n", "`A` is given twice"),
        ] {
            let text = format!("name: web\nimage: x\nports: [{{host: 1, container: 2}}]\n{tail}");
            let err = crate::manifest::Manifest::parse(Path::new("w.yaml"), &text).unwrap_err().to_string();
            assert!(err.contains(want), "{tail:?}: {err}");
        }
    }

    #[test]
    fn checks_name_the_field() {
        let o = ContainerOptions { mem_limit: Some(ByteSize(1024)), ..Default::default() };
        assert_eq!(o.check().unwrap_err().field, "mem_limit");
        let o = ContainerOptions { labels: BTreeMap::from([("cutover.release".into(), "9".into())]), ..Default::default() };
        assert_eq!(o.check().unwrap_err().field, "labels");
        let o = ContainerOptions { extra_hosts: vec!["db".into()], ..Default::default() };
        assert_eq!(o.check().unwrap_err().field, "extra_hosts");
        let o = ContainerOptions { extra_hosts: vec!["db:10.0.0.2".into(), "gw:host-gateway".into(), "v6:fd00::1".into()], ..Default::default() };
        assert!(o.check().is_ok());
    }
}
