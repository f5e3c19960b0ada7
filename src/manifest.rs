//! Service manifests: the YAML an operator writes, parsed and validated.
//!
//! Owns the manifest schema, its defaults and every check on it. A manifest that
//! passes [`Manifest::parse`] is safe to hand to the daemon; one that fails names the
//! file, the line and the field. This module performs no I/O besides reading the file
//! in [`Manifest::load`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod container;
mod healthcheck;
pub mod reference;
pub use healthcheck::Healthcheck;
pub use container::{
    parse_env_file, valid_volume_name, ByteSize, ContainerOptions, Cpus, Logging, Mount, MountEntry, MountKind, PullPolicy,
    Ulimit,
};

/// A manifest that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: cannot read the manifest: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: is not a regular file ({kind}); give the path of a manifest file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{}: larger than {MAX_MANIFEST_BYTES} bytes; a manifest is a few hundred bytes: is this the right file?", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}{}: {field}{message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        file: PathBuf,
        line: Option<usize>,
        /// The field path (`ports[0].host`), or empty when the whole document is at fault.
        field: String,
        message: String,
    },
}

impl ManifestError {
    fn invalid(file: &Path, line: Option<usize>, field: &str, message: impl fmt::Display) -> Self {
        let field = if field.is_empty() { String::new() } else { format!("{field}: ") };
        ManifestError::Invalid { file: file.to_path_buf(), line, field, message: message.to_string() }
    }
}

/// One service, as the operator describes it. Its `Debug` shows `env` names but never
/// their values (they are often secrets, and manifests end up in debug logs).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub health: HealthSpec,
    #[serde(default = "defaults::drain_timeout", with = "duration_text")]
    pub drain_timeout: Duration,
    /// After a switch the old release keeps running at least this long while the new one
    /// is watched; if the new one exits or fails its health check in that time, traffic
    /// is switched back at once.
    #[serde(default = "defaults::watch", with = "duration_text")]
    pub watch: Duration,
    #[serde(default = "defaults::stop_signal")]
    pub stop_signal: String,
    #[serde(default = "defaults::stop_timeout", with = "duration_text")]
    pub stop_timeout: Duration,
    #[serde(default = "defaults::keep")]
    pub keep: u32,
    /// The container's environment (`environment` is the compose name); a map or a list
    /// of `KEY=value`. After [`Manifest::resolve`] it also holds the env files' values
    /// (this map wins over them).
    #[serde(default, alias = "environment", deserialize_with = "container::string_map")]
    pub env: BTreeMap<String, String>,
    /// Files of `KEY=VALUE` lines, relative to the manifest's folder; read by
    /// [`Manifest::resolve`] into `env`.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "container::one_or_many")]
    pub env_file: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "container::words")]
    pub command: Option<Vec<String>>,
    #[serde(default = "defaults::network")]
    pub network: String,
    /// How long the old release's idle UDP flows are kept after a switch before their
    /// conntrack entries are deleted so the clients move to the new release.
    #[serde(default = "defaults::udp_idle", with = "duration_text")]
    pub udp_idle: Duration,
    /// fd-handoff mode instead of NAT: both generations share one network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffSpec>,
    /// What the daemon does when the active release dies on its own (killed, crashed and
    /// not restarted by the engine, removed): `restart` it (default), `rollback` to the
    /// newest kept release, or `none` (only log and show it).
    #[serde(default, skip_serializing_if = "OnFailure::is_default")]
    pub on_failure: OnFailure,
    /// When the image is pulled from its registry: `missing` (default), `always`, `never`.
    #[serde(default, skip_serializing_if = "PullPolicy::is_default")]
    pub pull: PullPolicy,

    // The container an operator defines, in compose's names (see docs/manifest.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<MountEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "container::words")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "container::string_map")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_limit: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, Ulimit>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "container::one_or_many")]
    pub tmpfs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "container::extra_hosts")]
    pub extra_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "container::one_or_many")]
    pub dns: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "container::string_map")]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_opt: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "container::scalar_list")]
    pub group_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// compose's `healthcheck`, set on every release container; health type `docker`
    /// waits for its verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// More names the release answers to on `network` (compose gives the service's name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_aliases: Vec<String>,
    /// When set, `network` is created with these labels if it does not exist yet (compose's
    /// default network); when empty, the network must exist.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_labels: BTreeMap<String, String>,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let Manifest {
            name,
            image,
            ports,
            health,
            drain_timeout,
            watch,
            stop_signal,
            stop_timeout,
            keep,
            env,
            command,
            network,
            udp_idle,
            handoff,
            on_failure,
            env_file,
            pull,
            volumes,
            user,
            working_dir,
            entrypoint,
            labels,
            mem_limit,
            cpus,
            pids_limit,
            ulimits,
            cap_add,
            cap_drop,
            read_only,
            tmpfs,
            extra_hosts,
            dns,
            sysctls,
            security_opt,
            init,
            shm_size,
            logging,
            group_add,
            devices,
            healthcheck,
            network_aliases,
            network_labels,
        } = self;
        f.debug_struct("Manifest")
            .field("name", name)
            .field("image", image)
            .field("ports", ports)
            .field("health", health)
            .field("drain_timeout", drain_timeout)
            .field("watch", watch)
            .field("stop_signal", stop_signal)
            .field("stop_timeout", stop_timeout)
            .field("keep", keep)
            .field("env", &RedactedEnv(env))
            .field("command", command)
            .field("network", network)
            .field("udp_idle", udp_idle)
            .field("handoff", handoff)
            .field("on_failure", on_failure)
            .field("env_file", env_file)
            .field("pull", pull)
            .field("volumes", volumes)
            .field("user", user)
            .field("working_dir", working_dir)
            .field("entrypoint", entrypoint)
            .field("labels", labels)
            .field("mem_limit", mem_limit)
            .field("cpus", cpus)
            .field("pids_limit", pids_limit)
            .field("ulimits", ulimits)
            .field("cap_add", cap_add)
            .field("cap_drop", cap_drop)
            .field("read_only", read_only)
            .field("tmpfs", tmpfs)
            .field("extra_hosts", extra_hosts)
            .field("dns", dns)
            .field("sysctls", sysctls)
            .field("security_opt", security_opt)
            .field("init", init)
            .field("shm_size", shm_size)
            .field("logging", logging)
            .field("group_add", group_add)
            .field("devices", devices)
            .field("healthcheck", healthcheck)
            .field("network_aliases", network_aliases)
            .field("network_labels", network_labels)
            .finish()
    }
}

/// An environment for logs: the names, each value replaced by `<redacted>`.
pub struct RedactedEnv<'a>(pub &'a BTreeMap<String, String>);

impl fmt::Debug for RedactedEnv<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.keys().map(|k| (k, format_args!("<redacted>")))).finish()
    }
}

/// Environment values read back from a container (secrets): `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EnvValues(pub BTreeMap<String, String>);

impl fmt::Debug for EnvValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        RedactedEnv(&self.0).fmt(f)
    }
}

impl Manifest {
    /// The manifest as a release's container carries it (label `cutover.manifest`):
    /// JSON, with each `env` value left empty, since the values (passwords, tokens) are in
    /// the container's own environment and labels are shown to anyone listing containers.
    pub fn to_label(&self) -> Result<String, serde_json::Error> {
        let mut m = self.clone();
        for v in m.env.values_mut() {
            v.clear();
        }
        serde_json::to_string(&m)
    }

    /// A manifest read back from a container's label; its `env` values are empty until
    /// [`Manifest::fill_env`] gives them.
    pub fn from_label(label: &str) -> Result<Manifest, serde_json::Error> {
        serde_json::from_str(label)
    }

    /// Take the `env` values from a container's environment (`values`); a name missing
    /// there stays empty.
    pub fn fill_env(&mut self, values: &EnvValues) {
        for (k, v) in self.env.iter_mut() {
            if let Some(value) = values.0.get(k) {
                v.clone_from(value);
            }
        }
    }
}

/// What to do when the active release is lost (see [`Manifest::on_failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Restart,
    Rollback,
    None,
}

impl OnFailure {
    pub fn is_default(&self) -> bool {
        *self == OnFailure::Restart
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (IPPROTO_TCP / IPPROTO_UDP).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Host port clients use.
    pub host: u16,
    /// Port inside the container.
    pub container: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Only this host address answers on the port (default: every local address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

/// Do two bindings of one port overlap? `None` is every local address, so it overlaps
/// everything; two addresses overlap only when equal. Two services (or a service and a
/// host process) may share a port on different host addresses.
pub fn host_addresses_overlap(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Http,
    #[default]
    Tcp,
    Docker,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(rename = "type", default)]
    pub kind: HealthKind,
    #[serde(default = "defaults::health_path")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "defaults::interval", with = "duration_text")]
    pub interval: Duration,
    #[serde(default = "defaults::timeout", with = "duration_text")]
    pub timeout: Duration,
    #[serde(default = "defaults::deadline", with = "duration_text")]
    pub deadline: Duration,
    /// Consecutive failed checks of the active release before it counts as lost (the
    /// watch of the active release; the gate of a new release uses `deadline`).
    #[serde(default = "defaults::failures")]
    pub failures: u32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            kind: HealthKind::default(),
            path: defaults::health_path(),
            port: None,
            interval: defaults::interval(),
            timeout: defaults::timeout(),
            deadline: defaults::deadline(),
            failures: defaults::failures(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffSpec {
    /// `host`, or `container:<name>` to join another container's network namespace.
    pub namespace: String,
    pub listeners: Vec<ListenerSpec>,
    /// uids besides the started process that may fetch the listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_uids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    /// `tcp://ADDR:PORT`
    pub listen: String,
}

mod defaults {
    use std::time::Duration;
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn stop_signal() -> String {
        "SIGTERM".into()
    }
    pub fn stop_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn keep() -> u32 {
        3
    }
    pub fn network() -> String {
        "bridge".into()
    }
    pub fn watch() -> Duration {
        Duration::from_secs(2)
    }
    pub fn udp_idle() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_path() -> String {
        "/".into()
    }
    pub fn interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn deadline() -> Duration {
        Duration::from_secs(60)
    }
    pub fn failures() -> u32 {
        3
    }
}

/// The largest env file read.
pub const MAX_ENV_FILE: u64 = 1 << 20;

/// Why a bounded read refused a file (see [`read_bounded`], [`read_text`]).
enum Refused {
    NotAFile(&'static str),
    TooLarge,
    Io(std::io::Error),
}

/// The bytes of a regular file of at most `max` bytes; anything else (a FIFO, a device,
/// a directory, a larger file) is refused without blocking.
fn read_file_bounded(path: &Path, max: u64) -> Result<Vec<u8>, Refused> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO with no writer must not hang; regular files ignore it.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(Refused::Io)?;
    let meta = f.metadata().map_err(Refused::Io)?;
    if let Some(kind) = not_a_file(&meta.file_type()) {
        return Err(Refused::NotAFile(kind));
    }
    if meta.len() > max {
        return Err(Refused::TooLarge);
    }
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes).map_err(Refused::Io)?;
    if bytes.len() as u64 > max {
        return Err(Refused::TooLarge);
    }
    Ok(bytes)
}

/// Read a regular file of at most `max` bytes as UTF-8; anything else (a FIFO, a device,
/// a directory, a larger file) is refused without blocking.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let bytes = read_file_bounded(path, max).map_err(|r| match r {
        Refused::NotAFile(kind) => Error::new(ErrorKind::InvalidInput, format!("{kind}, not a regular file")),
        Refused::TooLarge => Error::new(ErrorKind::InvalidInput, format!("larger than {max} bytes")),
        Refused::Io(e) => e,
    })?;
    String::from_utf8(bytes).map_err(|e| Error::new(ErrorKind::InvalidData, e))
}

/// The most releases a manifest may keep for rollback.
pub const MAX_KEEP: u32 = 50;
/// The most consecutive failed checks `health.failures` may ask for.
pub const MAX_HEALTH_FAILURES: u32 = 100;

/// The longest any duration of a manifest may be. Far beyond any sensible health
/// deadline, drain or stop, and small enough that no clock arithmetic on it (an
/// `Instant` plus it, milliseconds of it in a u64) can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest manifest file read (the control socket's request limit is 1 MiB too).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// The text of the manifest file at `path`: a regular file of at most
/// [`MAX_MANIFEST_BYTES`]. Anything else is refused at once: a FIFO is opened without
/// waiting for a writer, a device (`/dev/zero`) is never read from.
pub fn read_text(path: &Path) -> Result<String, ManifestError> {
    let rerr = |source| ManifestError::Read { path: path.to_path_buf(), source };
    let bytes = read_file_bounded(path, MAX_MANIFEST_BYTES).map_err(|r| match r {
        Refused::NotAFile(kind) => ManifestError::NotAFile { path: path.to_path_buf(), kind },
        Refused::TooLarge => ManifestError::TooLarge { path: path.to_path_buf() },
        Refused::Io(e) => rerr(e),
    })?;
    String::from_utf8(bytes).map_err(|e| rerr(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// What a file that is not a regular file is, in words; `None` for a regular file.
fn not_a_file(kind: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// `start + d`, for deadlines computed from a manifest's durations: never a panic. A
/// duration past what the clock can hold (only possible for a manifest that skipped
/// validation) gives the latest instant that can be represented near it, i.e. "never".
pub fn instant_after(start: std::time::Instant, d: Duration) -> std::time::Instant {
    start.checked_add(d).unwrap_or_else(|| {
        // Halve until it fits: Instant's range is platform-defined, not a constant.
        let mut step = d;
        let mut at = start;
        while !step.is_zero() {
            step /= 2;
            if let Some(later) = at.checked_add(step) {
                at = later;
            }
        }
        at
    })
}

impl Manifest {
    /// Read (see [`read_text`]) and validate the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = read_text(path)?;
        Manifest::parse(path, &text)
    }

    /// Parse and validate `text`; `file` is only used in error messages.
    pub fn parse(file: &Path, text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_norway::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            let message = e.to_string();
            // serde_norway appends " at line L column C"; the line is already in the prefix.
            let message = match message.rfind(" at line ") {
                Some(at) => message[..at].to_string(),
                None => message,
            };
            ManifestError::invalid(file, line, "", message)
        })?;
        manifest.validate(file, text)?;
        Ok(manifest)
    }

    /// The checks serde cannot express. Each error points at the field's line (of the
    /// first `key:` in `text`).
    pub fn validate(&self, file: &Path, text: &str) -> Result<(), ManifestError> {
        let err = |key: &str, nth: usize, field: &str, msg: String| {
            ManifestError::invalid(file, find_key_line(text, key, nth), field, msg)
        };
        if !valid_name(&self.name) {
            return Err(err("name", 0, "name", format!(
                "`{}` is not a valid service name: use 1 to 32 characters of a-z, 0-9 and '-', starting with a letter or digit",
                self.name
            )));
        }
        if let Err(why) = reference::check_reference(&self.image) {
            return Err(err("image", 0, "image", why));
        }
        if self.ports.is_empty() && self.handoff.is_none() {
            return Err(err("ports", 0, "ports", "at least one port is needed (or a `handoff` section)".into()));
        }
        if !self.ports.is_empty() && self.handoff.is_some() {
            return Err(err("handoff", 0, "handoff", "a service uses either `ports` (NAT mode) or `handoff`, not both".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.host == 0 {
                return Err(err("host", i, &format!("ports[{i}].host"), "port 0 is not a port; use 1-65535".into()));
            }
            if p.container == 0 {
                return Err(err("container", i, &format!("ports[{i}].container"), "port 0 is not a port; use 1-65535".into()));
            }
            if !seen.insert((p.protocol, p.host, p.host_ip)) {
                return Err(err("host", i, &format!("ports[{i}].host"), format!("{}/{} is listed twice", p.host, p.protocol)));
            }
        }
        if let Some(port) = self.health.port {
            if port == 0 {
                return Err(err("port", 0, "health.port", "port 0 is not a port; use 1-65535".into()));
            }
        }
        if self.health.kind == HealthKind::Http && !self.health.path.starts_with('/') {
            return Err(err("path", 0, "health.path", format!("`{}` must start with '/'", self.health.path)));
        }
        if matches!(self.health.kind, HealthKind::Http | HealthKind::Tcp)
            && self.health.port.is_none()
            && self.ports.iter().all(|p| p.protocol != Protocol::Tcp)
            && self.handoff.is_none()
        {
            return Err(err("type", 0, "health.type", "an http or tcp check needs a tcp port: set health.port".into()));
        }
        for (key, field, d) in [
            ("interval", "health.interval", self.health.interval),
            ("timeout", "health.timeout", self.health.timeout),
            ("deadline", "health.deadline", self.health.deadline),
        ] {
            if d.is_zero() {
                return Err(err(key, 0, field, "must be longer than 0s".into()));
            }
        }
        for (key, field, d) in self.durations() {
            if d > MAX_DURATION {
                return Err(err(key, 0, field, format!(
                    "{} is too long; use at most 24h ({})",
                    format_duration(d),
                    format_duration(MAX_DURATION)
                )));
            }
        }
        if self.stop_signal.parse::<nix::sys::signal::Signal>().is_err() {
            return Err(err("stop_signal", 0, "stop_signal", format!(
                "`{}` is not a signal name; use e.g. SIGTERM, SIGINT, SIGQUIT",
                self.stop_signal
            )));
        }
        if !(1..=MAX_HEALTH_FAILURES).contains(&self.health.failures) {
            return Err(err("failures", 0, "health.failures", format!(
                "{} is not a number of checks; use 1 to {MAX_HEALTH_FAILURES}",
                self.health.failures
            )));
        }
        if self.keep > MAX_KEEP {
            return Err(err("keep", 0, "keep", format!("{} is too many; keep at most {MAX_KEEP}", self.keep)));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(err(key, 0, "env", format!("`{key}` is not an environment variable name")));
            }
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() {
                return Err(err("command", 0, "command", "an empty list; leave `command` out to use the image's".into()));
            }
        }
        if self.network.trim().is_empty() {
            return Err(err("network", 0, "network", "must name a Docker network".into()));
        }
        if self.network == "none" && self.handoff.is_none() {
            return Err(err("network", 0, "network", "`none` gives the container no address, so no host port can ever reach it; \
                 use a Docker bridge network (the default `bridge`)".into()));
        }
        if let Some(f) = self.env_file.iter().find(|f| f.trim().is_empty()) {
            return Err(err("env_file", 0, "env_file", format!("`{f}` is not a file name")));
        }
        self.container_options().check().map_err(|p| err(&p.key, p.nth, &p.field, p.message))?;
        if let Some(h) = &self.healthcheck {
            h.check().map_err(|m| err("healthcheck", 0, "healthcheck", m))?;
        }
        if self.handoff.is_some() && (!self.network_aliases.is_empty() || !self.network_labels.is_empty()) {
            let key = if self.network_aliases.is_empty() { "network_labels" } else { "network_aliases" };
            return Err(err(key, 0, key, "a handoff-mode service shares a namespace; it has no network of its own".into()));
        }
        if let Some(a) = self.network_aliases.iter().find(|a| !valid_alias(a)) {
            return Err(err("network_aliases", 0, "network_aliases", format!(
                "`{a}` is not a host name: use letters, digits, '-', '_' and '.'"
            )));
        }
        if let Some(h) = &self.handoff {
            if h.namespace != "host" && h.namespace.strip_prefix("container:").is_none_or(|c| c.is_empty()) {
                return Err(err("namespace", 0, "handoff.namespace", format!(
                    "`{}`: use `host` or `container:<name>`",
                    h.namespace
                )));
            }
            if h.listeners.is_empty() {
                return Err(err("listeners", 0, "handoff.listeners", "name at least one listener".into()));
            }
            for (i, l) in h.listeners.iter().enumerate() {
                if l.name.is_empty() || !l.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                    return Err(err("name", i + 1, &format!("handoff.listeners[{i}].name"), format!("`{}` is not a listener name", l.name)));
                }
                if parse_listen(&l.listen).is_none() {
                    return Err(err("listen", i, &format!("handoff.listeners[{i}].listen"), format!(
                        "`{}`: use tcp://ADDR:PORT",
                        l.listen
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every duration of the manifest: (key in the YAML, field path, value).
    fn durations(&self) -> [(&'static str, &'static str, Duration); 7] {
        [
            ("interval", "health.interval", self.health.interval),
            ("timeout", "health.timeout", self.health.timeout),
            ("deadline", "health.deadline", self.health.deadline),
            ("drain_timeout", "drain_timeout", self.drain_timeout),
            ("watch", "watch", self.watch),
            ("stop_timeout", "stop_timeout", self.stop_timeout),
            ("udp_idle", "udp_idle", self.udp_idle),
        ]
    }

    /// Brings a manifest that never went through [`Manifest::parse`] (one stored by an
    /// older cutover, read back from the state file) within the bounds that `parse`
    /// enforces, so that no arithmetic on it can overflow. Returns what was changed, to
    /// be logged.
    pub fn clamp_to_bounds(&mut self) -> Vec<String> {
        let mut changed = Vec::new();
        let name = self.name.clone();
        for (field, d) in [
            ("health.interval", &mut self.health.interval),
            ("health.timeout", &mut self.health.timeout),
            ("health.deadline", &mut self.health.deadline),
            ("drain_timeout", &mut self.drain_timeout),
            ("watch", &mut self.watch),
            ("stop_timeout", &mut self.stop_timeout),
            ("udp_idle", &mut self.udp_idle),
        ] {
            if *d > MAX_DURATION {
                changed.push(format!("{name}: {field} {} is beyond the bound; using {}", format_duration(*d), format_duration(MAX_DURATION)));
                *d = MAX_DURATION;
            }
        }
        if !(1..=MAX_HEALTH_FAILURES).contains(&self.health.failures) {
            let bounded = self.health.failures.clamp(1, MAX_HEALTH_FAILURES);
            changed.push(format!("{name}: health.failures {} is beyond the bounds; using {bounded}", self.health.failures));
            self.health.failures = bounded;
        }
        if self.keep > MAX_KEEP {
            changed.push(format!("{name}: keep {} is beyond the bound; using {MAX_KEEP}", self.keep));
            self.keep = MAX_KEEP;
        }
        changed
    }

    /// The container fields, for the engine.
    pub fn container_options(&self) -> ContainerOptions {
        ContainerOptions {
            volumes: self.volumes.iter().map(|v| v.0.clone()).collect(),
            user: self.user.clone(),
            working_dir: self.working_dir.clone(),
            entrypoint: self.entrypoint.clone(),
            labels: self.labels.clone(),
            mem_limit: self.mem_limit,
            cpus: self.cpus,
            pids_limit: self.pids_limit,
            ulimits: self.ulimits.clone(),
            cap_add: self.cap_add.clone(),
            cap_drop: self.cap_drop.clone(),
            read_only: self.read_only,
            tmpfs: self.tmpfs.clone(),
            extra_hosts: self.extra_hosts.clone(),
            dns: self.dns.clone(),
            sysctls: self.sysctls.clone(),
            security_opt: self.security_opt.clone(),
            init: self.init,
            shm_size: self.shm_size,
            logging: self.logging.clone(),
            group_add: self.group_add.clone(),
            devices: self.devices.clone(),
            healthcheck: self.healthcheck.clone(),
            network_aliases: self.network_aliases.clone(),
            network_labels: self.network_labels.clone(),
        }
    }

    /// Read what the manifest refers to, relative to `file`'s folder: the env files'
    /// values go into `env` (the manifest's own `env` wins; a later file wins over an
    /// earlier one) and `env_file` is emptied; relative bind mount sources become
    /// absolute. `text` is the manifest's text, for error lines.
    pub fn resolve(&mut self, file: &Path, text: &str) -> Result<(), ManifestError> {
        let base = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = std::path::absolute(&base).unwrap_or(base);
        let mut env = BTreeMap::new();
        for (i, name) in self.env_file.iter().enumerate() {
            let path = base.join(name);
            let field = if self.env_file.len() == 1 { "env_file".to_string() } else { format!("env_file[{i}]") };
            let line = find_key_line(text, "env_file", 0);
            let content = read_bounded(&path, MAX_ENV_FILE).map_err(|e| {
                ManifestError::invalid(file, line, &field, format!("cannot read the env file {}: {e}", path.display()))
            })?;
            let pairs = parse_env_file(&content).map_err(|e| {
                ManifestError::invalid(file, line, &field, format!("{}: {e}", path.display()))
            })?;
            env.extend(pairs);
        }
        env.extend(std::mem::take(&mut self.env));
        self.env = env;
        self.env_file.clear();
        for v in &mut self.volumes {
            if let (MountKind::Bind, Some(src)) = (v.0.kind, v.0.source.as_ref()) {
                if !src.starts_with('/') {
                    let mut o = ContainerOptions { volumes: vec![v.0.clone()], ..Default::default() };
                    o.resolve_paths(&base);
                    v.0 = o.volumes.remove(0);
                }
            }
        }
        Ok(())
    }

    /// Load (bounded), parse, validate and resolve the manifest at `path`.
    pub fn load_resolved(path: &Path) -> Result<Manifest, ManifestError> {
        let text = read_text(path)?;
        let mut m = Manifest::parse(path, &text)?;
        m.resolve(path, &text)?;
        Ok(m)
    }

    /// The port the health check connects to inside the container.
    pub fn health_port(&self) -> Option<u16> {
        self.health
            .port
            .or_else(|| self.ports.iter().find(|p| p.protocol == Protocol::Tcp).map(|p| p.container))
    }
}

/// Parse `tcp://ADDR:PORT` into a socket address.
pub fn parse_listen(s: &str) -> Option<std::net::SocketAddr> {
    s.strip_prefix("tcp://")?.parse().ok()
}

/// Service names: `[a-z0-9-]{1,32}`, not starting with '-'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A network alias: a DNS name on the network.
fn valid_alias(a: &str) -> bool {
    !a.is_empty() && a.len() <= 253 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The 1-based line of the `nth` occurrence of `key:` in `text`, if any.
pub fn find_key_line(text: &str, key: &str, nth: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let t = line.trim_start().trim_start_matches("- ").trim_start();
            t.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(':'))
                || line.contains(&format!("{{ {key}:"))
                || line.contains(&format!(", {key}:"))
        })
        .nth(nth)
        .map(|(i, _)| i + 1)
}

/// Durations as operators write them: `500ms`, `2s`, `1m30s`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{s}` is not a duration; write e.g. 500ms, 2s, 1m30s"));
        }
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(format!("`{s}`: unknown unit `{unit}`; use ms, s, m or h")),
        };
        let part = decimal_nanos(num, unit_nanos).ok_or_else(|| format!("`{s}` is not a duration"))?;
        // `+=` panics on overflow; the parts may each fit while their sum does not.
        total = total.checked_add(part).ok_or_else(|| format!("`{s}` is out of range"))?;
        rest = tail;
    }
    Ok(total)
}

/// `num` (digits with at most one '.') times `unit_nanos`, exactly, to the nanosecond.
/// Decimal, not f64, so that [`format_duration`]'s output reads back to the same value
/// (the state file stores durations as text); `None` if malformed or out of range.
fn decimal_nanos(num: &str, unit_nanos: u128) -> Option<Duration> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    // A unit is at most 3.6e12 ns, so digits past the 13th are below a nanosecond.
    let frac = &frac[..frac.len().min(13)];
    let scale = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let frac: u128 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let nanos = int.checked_mul(unit_nanos)?.checked_add(frac * unit_nanos / scale)?;
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    Some(Duration::new(secs, u32::try_from(nanos % 1_000_000_000).ok()?))
}

/// Format a duration the way [`parse_duration`] reads it back, exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let below_ms = d.subsec_nanos() % 1_000_000;
    if below_ms != 0 {
        let frac = format!("{below_ms:06}");
        format!("{ms}.{}ms", frac.trim_end_matches('0'))
    } else if ms % 1000 != 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

mod duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        // Parsed inside the deserializer (not through an untagged enum), so an error
        // names the value's line and the field.
        container::parse_scalar(d, "a duration such as 2s", |s| match s {
            container::Scalar::Int(secs) if *secs >= 0 => Ok(Duration::from_secs(*secs as u64)),
            container::Scalar::Text(t) => parse_duration(t),
            other => Err(format!("`{other}` is not a duration; write e.g. 500ms, 2s, 1m30s")),
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("`{s}`: use tcp or udp")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"name: web                 # [a-z0-9-]{1,32}, unique on the host
image: example/web:1.0    # image of the first release
ports:
  - host: 8080            # host port clients use (tcp)
    container: 80         # port inside the container
health:
  type: http              # http | tcp | docker (the image's HEALTHCHECK) | none
  path: /healthz          # http only; any 2xx is healthy
  port: 80                # optional; default: the first container port
  interval: 1s
  timeout: 2s
  deadline: 60s           # not healthy by then: the release is refused
drain_timeout: 30s
stop_signal: SIGTERM
stop_timeout: 10s
keep: 3                   # stopped old releases kept for rollback
env: { KEY: value }       # optional, passed to the container
command: ["/app", "-v"]   # optional
network: bridge           # optional Docker network
"#;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(Path::new("web.yaml"), text)
    }

    fn message(text: &str) -> String {
        match parse(text) {
            Ok(m) => panic!("accepted: {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn accepts_the_documented_shape() {
        let m = parse(FULL).unwrap();
        assert_eq!(m.name, "web");
        assert_eq!(m.ports, vec![PortSpec { host: 8080, container: 80, protocol: Protocol::Tcp, host_ip: None }]);
        assert_eq!(m.health.kind, HealthKind::Http);
        assert_eq!(m.health.path, "/healthz");
        assert_eq!(m.health.deadline, Duration::from_secs(60));
        assert_eq!(m.env.get("KEY").map(String::as_str), Some("value"));
        assert_eq!(m.command.as_deref(), Some(&["/app".to_string(), "-v".to_string()][..]));
        assert_eq!(m.keep, 3);
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = parse("name: a\nimage: x\nports: [{host: 1, container: 2}]\n").unwrap();
        assert_eq!(m.health.kind, HealthKind::Tcp);
        assert_eq!(m.drain_timeout, Duration::from_secs(30));
        assert_eq!(m.stop_signal, "SIGTERM");
        assert_eq!(m.network, "bridge");
        assert_eq!(m.health_port(), Some(2));
    }

    #[test]
    fn port_out_of_range_names_file_line_and_field() {
        let msg = message(&FULL.replace("host: 8080", "host: 70000"));
        assert!(msg.starts_with("web.yaml:4:"), "{msg}");
        assert!(msg.contains("ports[0].host"), "{msg}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let msg = message(&format!("{FULL}colour: blue\n"));
        assert!(msg.contains("unknown field `colour`"), "{msg}");
        assert!(msg.starts_with("web.yaml:20:"), "{msg}");
    }

    #[test]
    fn malformed_yaml_is_refused_with_a_line() {
        let msg = message("name: web\nports: [\n  - :\n");
        assert!(msg.starts_with("web.yaml:"), "{msg}");
    }

    #[test]
    fn semantic_errors_point_at_the_field() {
        let msg = message(&FULL.replace("name: web ", "name: Web "));
        assert!(msg.starts_with("web.yaml:1: name:"), "{msg}");
        let msg = message(&FULL.replace("stop_signal: SIGTERM", "stop_signal: SIGNOPE"));
        assert!(msg.starts_with("web.yaml:14: stop_signal:"), "{msg}");
        let msg = message(&FULL.replace("interval: 1s", "interval: 1 fortnight"));
        assert!(msg.contains("health.interval") || msg.contains("unit"), "{msg}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn durations_read_back_exactly_as_the_state_file_writes_them() {
        // Caught by the manifest fuzz target's round trip: `interval: 0.5ms` passed
        // validation but was stored as `0ms`, so after a restart the health check slept 0
        // between probes; and whole seconds past 2^53 came back different (or not at all)
        // through f64.
        for d in [
            Duration::from_micros(500),
            Duration::from_nanos(1),
            Duration::new(1, 1),
            Duration::from_millis(1500),
            Duration::from_secs((1 << 53) + 1),
            Duration::from_secs(u64::MAX),
            Duration::new(u64::MAX, 999_999_999),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{}", format_duration(d));
        }
        assert_eq!(format_duration(Duration::from_micros(500)), "0.5ms");
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration(".5s").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration(".s").is_err());
        let m = parse(&FULL.replace("interval: 1s", "interval: 0.5ms")).unwrap();
        let stored = serde_json::to_vec(&m).unwrap();
        assert_eq!(serde_json::from_slice::<Manifest>(&stored).unwrap(), m);
    }

    #[test]
    fn a_duration_whose_parts_overflow_together_is_refused_not_a_panic() {
        // Each part fits in a Duration, their sum does not (`+=` used to panic).
        assert!(parse_duration("18446744073709549568s18446744073709549568s").is_err());
        let msg = message(&FULL.replace("drain_timeout: 30s", "drain_timeout: 10000000000000000000s10000000000000000000s"));
        assert!(msg.contains("out of range"), "{msg}");
    }

    #[test]
    fn durations_beyond_the_bound_are_refused_with_field_and_line() {
        for (from, to, field, line) in [
            ("deadline: 60s", "deadline: 18446744073709551615", "health.deadline", 12),
            ("interval: 1s", "interval: 18446744073709551615", "health.interval", 10),
            ("timeout: 2s", "timeout: 25h", "health.timeout", 11),
            ("drain_timeout: 30s", "drain_timeout: 100000h", "drain_timeout", 13),
            ("stop_timeout: 10s", "stop_timeout: 9223372036854775808", "stop_timeout", 15),
        ] {
            let msg = message(&FULL.replace(from, to));
            assert!(msg.starts_with(&format!("web.yaml:{line}: {field}: ")), "{msg}");
            assert!(msg.contains("too long"), "{msg}");
        }
        for extra in ["watch: 86401s", "udp_idle: 1441m"] {
            let msg = message(&format!("{FULL}{extra}\n"));
            assert!(msg.starts_with("web.yaml:20: "), "{msg}");
        }
        // The bound itself is fine.
        parse(&FULL.replace("deadline: 60s", "deadline: 24h")).unwrap();
    }

    #[test]
    fn health_failures_default_to_3_and_are_bounded_with_the_field_named() {
        assert_eq!(parse(FULL).unwrap().health.failures, 3);
        assert_eq!(parse(&FULL.replace("deadline: 60s", "deadline: 60s\n  failures: 5")).unwrap().health.failures, 5);
        for bad in ["0", "101"] {
            let msg = message(&FULL.replace("deadline: 60s", &format!("deadline: 60s\n  failures: {bad}")));
            assert!(msg.starts_with("web.yaml:13: health.failures: "), "{msg}");
            assert!(msg.contains("1 to 100"), "{msg}");
        }
        let msg = message(&FULL.replace("deadline: 60s", "deadline: 60s\n  failures: -1"));
        assert!(msg.contains("failures"), "{msg}");
    }

    #[test]
    fn stored_manifests_beyond_the_bounds_are_clamped() {
        let mut m = parse(FULL).unwrap();
        m.health.deadline = Duration::from_secs(u64::MAX);
        m.keep = 1000;
        let changed = m.clamp_to_bounds();
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert_eq!(m.health.deadline, MAX_DURATION);
        assert_eq!(m.keep, MAX_KEEP);
        assert!(m.clamp_to_bounds().is_empty());
    }

    #[test]
    fn debug_output_never_shows_env_values() {
        let m = parse(&FULL.replace("env: { KEY: value }", "env: { DB_PASSWORD: hunter2 }")).unwrap();
        let shown = format!("{m:?} {m:#?}");
        assert!(shown.contains("DB_PASSWORD"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Returns at once (no writer is waited for) with the kind named.
        let msg = read_text(&fifo).unwrap_err().to_string();
        assert!(msg.contains("a FIFO"), "{msg}");
        let msg = read_text(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(msg.contains("character device"), "{msg}");
        assert!(matches!(read_text(dir.path()), Err(ManifestError::NotAFile { .. })));
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; (MAX_MANIFEST_BYTES + 1) as usize]).unwrap();
        assert!(matches!(read_text(&big), Err(ManifestError::TooLarge { .. })));
        let ok = dir.path().join("ok.yaml");
        std::fs::write(&ok, FULL).unwrap();
        assert_eq!(Manifest::load(&ok).unwrap().name, "web");
    }

    #[test]
    fn a_service_nobody_could_reach_is_refused() {
        for health in ["none", "tcp"] {
            let text = FULL.replace("network: bridge", "network: none").replace("type: http", &format!("type: {health}"));
            let msg = message(&text);
            assert!(msg.starts_with("web.yaml:19: network:"), "{msg}");
            assert!(msg.contains("no address"), "{msg}");
        }
    }

    #[test]
    fn deadlines_from_any_duration_never_panic() {
        let now = std::time::Instant::now();
        assert_eq!(instant_after(now, Duration::from_secs(2)), now + Duration::from_secs(2));
        let never = instant_after(now, Duration::MAX);
        assert!(never > now + MAX_DURATION);
        let _ = instant_after(never, Duration::from_secs(u64::MAX));
    }

    #[test]
    fn names() {
        assert!(valid_name("web-1"));
        assert!(!valid_name("-web"));
        assert!(!valid_name(&"a".repeat(33)));
        assert!(!valid_name("Web"));
    }
}
