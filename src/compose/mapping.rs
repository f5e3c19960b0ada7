//! One compose service to one [`Manifest`]: the shared container fields carry over by
//! name, `ports:` become cutover's host ports (never published), `healthcheck:` becomes
//! health type `docker`, the network is the service's (or `<project>_default`) with the
//! service's name as an alias, and compose's labels make `docker compose ps` list the
//! releases. Keys cutover cannot honour are refused; harmless ones are noted.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
#[cfg(test)]
use std::time::Duration;

use serde_norway::{Mapping, Value};

use super::{ComposeError, Project, Source, Sources, Taken, COMPOSE_VERSION_LABEL};
use crate::manifest::{valid_name, Manifest, MountKind, PortSpec, Protocol};

/// compose keys the manifest takes under the same name and syntax.
const SHARED: &[&str] = &[
    "image", "command", "entrypoint", "environment", "env_file", "volumes", "user", "working_dir", "labels", "mem_limit",
    "cpus", "pids_limit", "ulimits", "cap_add", "cap_drop", "read_only", "tmpfs", "extra_hosts", "dns", "sysctls",
    "security_opt", "init", "shm_size", "logging", "group_add", "devices", "healthcheck", "stop_signal",
];

/// Keys whose effect cutover leaves out, harmlessly, and why.
const IGNORED: &[(&str, &str)] = &[
    ("restart", "cutover restarts an established release itself"),
    ("depends_on", "start those services with compose first; cutover's health gate waits for this one"),
    ("expose", "releases reach each other on the network without it"),
    ("profiles", "cutover takes the service whatever the profile"),
    ("build", "cutover releases the `image:`; build it before `apply`"),
    ("hostname", "each release has its container's own"),
    ("stdin_open", "releases run detached"),
    ("tty", "releases run detached"),
    ("links", "the service names resolve on the network"),
    ("scale", "cutover runs one release at a time"),
];

/// cutover's own keys under `x-cutover:`.
const X_CUTOVER: &[&str] = &["name", "drain_timeout", "watch", "keep", "health", "udp_idle"];

pub fn map_project(
    project: &str,
    first: &Path,
    top: &Mapping,
    sources: &[Source],
    only: &[String],
    vars: &super::Vars,
    mut notes: Vec<String>,
) -> Result<Project, ComposeError> {
    // Errors name the last file that has the key (an override), else the first.
    let src = Sources::new(sources).ok_or_else(|| ComposeError::Invalid {
        file: first.to_path_buf(),
        line: None,
        key: "files".into(),
        message: "name at least one compose file".into(),
    })?;
    let services = match top.get("services") {
        Some(Value::Mapping(m)) => m.clone(),
        _ => return Err(src.invalid("services", "must be a map of service names to services")),
    };
    for name in only {
        if !services.contains_key(name.as_str()) {
            let known: Vec<&str> = services.keys().filter_map(Value::as_str).collect();
            return Err(src.invalid("services", format!("--service {name}: no such service; the file has {}", known.join(", "))));
        }
    }
    let mut taken = Vec::new();
    let mut left = Vec::new();
    for (name, svc) in &services {
        let name = name.as_str().unwrap_or_default().to_string();
        let Value::Mapping(svc) = svc else {
            return Err(src.invalid(&format!("services.{name}"), "must be a map"));
        };
        let wanted = if only.is_empty() {
            svc.contains_key("ports") || svc.contains_key("x-cutover")
        } else {
            only.contains(&name)
        };
        if !wanted {
            left.push(name);
            continue;
        }
        let ctx = Ctx { project, first, top, vars };
        let manifest = map_service(&ctx, &src, &name, svc, &mut notes)?;
        taken.push(Taken { compose_name: name, manifest });
    }
    let mut names = std::collections::BTreeSet::new();
    for t in &taken {
        if !names.insert(t.manifest.name.clone()) {
            return Err(src.invalid(
                &format!("services.{}", t.compose_name),
                format!("two services become cutover's `{}`: give one an `x-cutover: {{name: ...}}`", t.manifest.name),
            ));
        }
    }
    Ok(Project { name: project.to_string(), file: first.to_path_buf(), taken, left, notes })
}

/// What every service of the project is mapped against.
struct Ctx<'a> {
    project: &'a str,
    /// The first compose file: paths are relative to its folder.
    first: &'a Path,
    /// The merged file.
    top: &'a Mapping,
    vars: &'a super::Vars,
}

fn map_service(ctx: &Ctx<'_>, src: &Sources<'_>, name: &str, svc: &Mapping, notes: &mut Vec<String>) -> Result<Manifest, ComposeError> {
    let Ctx { project, first, top, vars } = *ctx;
    let at = |key: &str| format!("services.{name}.{key}");
    let mut out = Mapping::new();
    let mut x_health: Option<Mapping> = None;
    let mut network: Option<(String, Option<Value>)> = None;
    for (k, v) in svc {
        let key = k.as_str().unwrap_or_default();
        match key {
            "environment" => {
                out.insert(Value::from(key), pass_through(v, vars));
            }
            k if SHARED.contains(&k) => {
                out.insert(Value::from(k), v.clone());
            }
            "ports" => {
                let ports = ports(src, &at("ports"), v)?;
                out.insert(Value::from("ports"), serde_norway::to_value(ports).map_err(|e| src.invalid(&at("ports"), e.to_string()))?);
            }
            "stop_grace_period" => {
                out.insert(Value::from("stop_timeout"), v.clone());
            }
            "pull_policy" => {
                let policy = match v.as_str() {
                    Some("always") => "always",
                    Some("never") => "never",
                    Some("missing") | Some("if_not_present") => "missing",
                    _ => return Err(src.invalid(&at("pull_policy"), "cutover pulls `always`, `never` or `missing`; build the image before `apply`")),
                };
                out.insert(Value::from("pull"), Value::from(policy));
            }
            "container_name" => {
                return Err(src.invalid(&at(key), "each release is a new container with its own name: remove `container_name`"));
            }
            "network_mode" => {
                return Err(src.invalid(&at(key), format!(
                    "`network_mode: {}`: cutover releases a compose service on a bridge network; remove it (handoff mode is configured in a cutover manifest)",
                    v.as_str().unwrap_or("?")
                )));
            }
            "networks" => {
                network = Some(one_network(src, &at(key), v)?);
            }
            "deploy" => deploy(src, &at(key), v, &mut out, notes, name)?,
            "x-cutover" => {
                let Value::Mapping(x) = v else { return Err(src.invalid(&at(key), "must be a map of cutover's keys")) };
                for (xk, xv) in x {
                    let xk = xk.as_str().unwrap_or_default();
                    if !X_CUTOVER.contains(&xk) {
                        return Err(src.invalid(&format!("{}.{xk}", at(key)), format!("not one of cutover's keys: {}", X_CUTOVER.join(", "))));
                    }
                    match (xk, xv) {
                        ("health", Value::Mapping(h)) => x_health = Some(h.clone()),
                        ("health", _) => return Err(src.invalid(&format!("{}.health", at(key)), "must be a map (type, path, port, interval, timeout, deadline)")),
                        _ => {
                            out.insert(Value::from(xk), xv.clone());
                        }
                    }
                }
            }
            k if k.starts_with("x-") => {}
            k => match IGNORED.iter().find(|(i, _)| *i == k) {
                Some((_, why)) => {
                    if k == "build" && !svc.contains_key("image") {
                        return Err(src.invalid(&at(k), "`build:` without `image:`: cutover releases an image; add `image:` and build it before `apply`"));
                    }
                    if k == "scale" && v.as_u64().is_some_and(|n| n > 1) {
                        return Err(src.invalid(&at(k), "cutover runs one release of a service at a time: remove `scale`"));
                    }
                    notes.push(format!("{name}: `{k}` ignored: {why}"));
                }
                None => {
                    return Err(src.invalid(&at(k), format!(
                        "cutover does not release a service with `{k}`: remove it, or leave `{name}` to compose (no `ports:` and no --service)"
                    )))
                }
            },
        }
    }
    if !out.contains_key("image") {
        return Err(src.invalid(&format!("services.{name}"), "no `image:`: cutover releases an image"));
    }
    let cutover_name = match out.remove("name") {
        Some(Value::String(n)) => n,
        Some(_) => return Err(src.invalid(&at("x-cutover.name"), "must be a string")),
        None => name.to_string(),
    };
    if !valid_name(&cutover_name) {
        return Err(src.invalid(&format!("services.{name}"), format!(
            "`{cutover_name}` is not a cutover service name (1 to 32 of a-z, 0-9, '-'): set `x-cutover: {{name: ...}}` on the service"
        )));
    }
    out.insert(Value::from("name"), Value::from(cutover_name.clone()));
    // Health: compose's healthcheck is the gate unless x-cutover.health names another.
    let compose_check = svc.get("healthcheck").is_some_and(|h| !h.get("disable").and_then(Value::as_bool).unwrap_or(false));
    let mut health = x_health.unwrap_or_default();
    if compose_check && !health.contains_key("type") {
        health.insert(Value::from("type"), Value::from("docker"));
    }
    if !health.is_empty() {
        out.insert(Value::from("health"), Value::Mapping(health));
    }
    // Network and aliases.
    let (key, entry) = network.unwrap_or_else(|| ("default".to_string(), None));
    let (net_name, create_labels) = network_name(project, top, src, name, &key)?;
    let mut aliases = vec![name.to_string()];
    if let Some(Value::Mapping(e)) = &entry {
        if let Some(Value::Sequence(extra)) = e.get("aliases") {
            aliases.extend(extra.iter().filter_map(Value::as_str).map(str::to_string));
        }
    }
    out.insert(Value::from("network"), Value::from(net_name));
    out.insert(Value::from("network_aliases"), serde_norway::to_value(&aliases).unwrap_or(Value::Null));
    if !create_labels.is_empty() {
        out.insert(Value::from("network_labels"), serde_norway::to_value(&create_labels).unwrap_or(Value::Null));
    }
    // compose's labels, so `docker compose ps` lists the releases.
    let mut m: Manifest = serde_norway::from_value(Value::Mapping(out))
        .map_err(|e| src.invalid(&format!("services.{name}"), e.to_string()))?;
    let dir = first.parent().map(|p| p.display().to_string()).unwrap_or_default();
    for (k, v) in [
        ("com.docker.compose.project", project.to_string()),
        ("com.docker.compose.service", name.to_string()),
        ("com.docker.compose.oneoff", "False".to_string()),
        ("com.docker.compose.container-number", "1".to_string()),
        ("com.docker.compose.version", COMPOSE_VERSION_LABEL.to_string()),
        ("com.docker.compose.project.working_dir", dir),
        ("com.docker.compose.project.config_files", first.display().to_string()),
    ] {
        m.labels.insert(k.to_string(), v);
    }
    // Named volumes are the project's: `<project>_<name>` unless declared external or named.
    for v in &mut m.volumes {
        if let (MountKind::Volume, Some(short)) = (v.0.kind, v.0.source.clone()) {
            v.0.source = Some(volume_name(project, top, src, name, &short)?);
        }
    }
    let file = src.for_key(&format!("services.{name}"));
    m.validate(&file.path, &file.text)?;
    m.resolve(first, &file.text)?;
    Ok(m)
}

/// compose's `ports:` entries as cutover ports.
fn ports(src: &Sources<'_>, key: &str, v: &Value) -> Result<Vec<PortSpec>, ComposeError> {
    let Value::Sequence(seq) = v else { return Err(src.invalid(key, "must be a list")) };
    let mut out = Vec::new();
    for entry in seq {
        match entry {
            Value::Mapping(m) => {
                let target = m.get("target").and_then(port_number).ok_or_else(|| src.invalid(key, "`target` must be a port 1-65535"))?;
                let published = m.get("published").and_then(port_number).ok_or_else(|| {
                    src.invalid(key, format!("port {target}: `published` is needed, cutover serves a fixed host port"))
                })?;
                let protocol = match m.get("protocol").and_then(Value::as_str) {
                    None => Protocol::Tcp,
                    Some(p) => p.parse().map_err(|e: String| src.invalid(key, e))?,
                };
                let host_ip = match m.get("host_ip").and_then(Value::as_str) {
                    None | Some("0.0.0.0") | Some("::") | Some("") => None,
                    Some(ip) => Some(ip.parse::<IpAddr>().map_err(|_| src.invalid(key, format!("`{ip}` is not an IP address")))?),
                };
                out.push(PortSpec { host: published, container: target, protocol, host_ip });
            }
            Value::String(s) => out.extend(short_port(s).map_err(|e| src.invalid(key, e))?),
            Value::Number(n) => {
                return Err(src.invalid(key, format!("`{n}` publishes on a random host port: write HOST:{n}, cutover serves a fixed host port")))
            }
            _ => return Err(src.invalid(key, "an entry is HOST:CONTAINER[/udp] or a map with target and published")),
        }
    }
    Ok(out)
}

fn port_number(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|p| *p != 0)
}

/// `[IP:]HOST:CONTAINER[/PROTO]`, with port ranges of equal length.
pub fn short_port(s: &str) -> Result<Vec<PortSpec>, String> {
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((spec, p)) => (spec, p.parse::<Protocol>()?),
        None => (s, Protocol::Tcp),
    };
    let (rest, container) = spec.rsplit_once(':').ok_or_else(|| {
        format!("`{s}` publishes on a random host port: write HOST:CONTAINER, cutover serves a fixed host port")
    })?;
    let (ip, host) = match rest.rsplit_once(':') {
        Some((ip, host)) => (Some(ip.trim_start_matches('[').trim_end_matches(']')), host),
        None => (None, rest),
    };
    if host.is_empty() {
        return Err(format!("`{s}` publishes on a random host port: write IP:HOST:CONTAINER"));
    }
    let host_ip = match ip {
        None | Some("0.0.0.0") | Some("::") | Some("") => None,
        Some(ip) => Some(ip.parse::<IpAddr>().map_err(|_| format!("`{s}`: `{ip}` is not an IP address"))?),
    };
    let range = |r: &str| -> Result<(u16, u16), String> {
        let (a, b) = r.split_once('-').unwrap_or((r, r));
        let a: u16 = a.parse().map_err(|_| format!("`{s}`: `{r}` is not a port"))?;
        let b: u16 = b.parse().map_err(|_| format!("`{s}`: `{r}` is not a port"))?;
        if a == 0 || b < a {
            return Err(format!("`{s}`: `{r}` is not a port range of 1-65535"));
        }
        Ok((a, b))
    };
    let (h0, h1) = range(host)?;
    let (c0, c1) = range(container)?;
    if h1 - h0 != c1 - c0 {
        return Err(format!("`{s}`: the host and container ranges differ in length"));
    }
    Ok((0..=h1 - h0).map(|i| PortSpec { host: h0 + i, container: c0 + i, protocol, host_ip }).collect())
}

/// The service's one network: its key in the top-level `networks:` and its entry.
fn one_network(src: &Sources<'_>, key: &str, v: &Value) -> Result<(String, Option<Value>), ComposeError> {
    let entries: Vec<(String, Option<Value>)> = match v {
        Value::Sequence(s) => s.iter().filter_map(Value::as_str).map(|n| (n.to_string(), None)).collect(),
        Value::Mapping(m) => m.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), Some(v.clone())))).collect(),
        _ => return Err(src.invalid(key, "a list or a map of network names")),
    };
    match entries.len() {
        1 => Ok(entries.into_iter().next().unwrap_or_default()),
        0 => Err(src.invalid(key, "names no network: remove `networks:` to use the project's default network")),
        _ => Err(src.invalid(key, format!(
            "cutover attaches a release to one network, this service names {}: keep one (the one its clients use)",
            entries.iter().map(|e| e.0.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The engine's name of network `key`, and the labels to create it with (empty when it
/// is external, so it must exist).
fn network_name(project: &str, top: &Mapping, src: &Sources<'_>, service: &str, key: &str) -> Result<(String, BTreeMap<String, String>), ComposeError> {
    let decl = top.get("networks").and_then(|n| n.get(key));
    if decl.is_none() && key != "default" {
        return Err(src.invalid(&format!("services.{service}.networks"), format!("`{key}` is not declared under the top-level `networks:`")));
    }
    let decl = decl.cloned().unwrap_or(Value::Null);
    let external = decl.get("external");
    let named = decl.get("name").and_then(Value::as_str).map(str::to_string);
    if let Some(ext) = external {
        if ext.as_bool() == Some(true) || ext.is_mapping() {
            let name = ext.get("name").and_then(Value::as_str).map(str::to_string).or(named).unwrap_or_else(|| key.to_string());
            return Ok((name, BTreeMap::new()));
        }
    }
    let name = named.unwrap_or_else(|| format!("{project}_{key}"));
    // A network with its own driver or options is compose's to create.
    let custom = decl.as_mapping().is_some_and(|m| m.keys().any(|k| !matches!(k.as_str(), Some("name" | "labels" | "external"))));
    if custom {
        return Ok((name, BTreeMap::new()));
    }
    let mut labels = BTreeMap::from([
        ("com.docker.compose.network".to_string(), key.to_string()),
        ("com.docker.compose.project".to_string(), project.to_string()),
        ("com.docker.compose.version".to_string(), COMPOSE_VERSION_LABEL.to_string()),
    ]);
    if let Some(Value::Mapping(l)) = decl.get("labels") {
        for (k, v) in l {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                labels.insert(k.to_string(), v.to_string());
            }
        }
    }
    Ok((name, labels))
}

/// The engine's name of the named volume `short`, as compose names it.
fn volume_name(project: &str, top: &Mapping, src: &Sources<'_>, service: &str, short: &str) -> Result<String, ComposeError> {
    let Some(decl) = top.get("volumes").and_then(|v| v.as_mapping()).and_then(|v| v.get(short)) else {
        return Err(src.invalid(&format!("services.{service}.volumes"), format!(
            "the named volume `{short}` is not declared under the top-level `volumes:` (compose refuses it too): add `volumes: {{{short}: {{}}}}`"
        )));
    };
    let named = decl.get("name").and_then(Value::as_str).map(str::to_string);
    if let Some(ext) = decl.get("external") {
        if ext.as_bool() == Some(true) || ext.is_mapping() {
            return Ok(ext.get("name").and_then(Value::as_str).map(str::to_string).or(named).unwrap_or_else(|| short.to_string()));
        }
    }
    Ok(named.unwrap_or_else(|| format!("{project}_{short}")))
}

/// `deploy:`: one replica at most; resource limits map to `mem_limit` and `cpus`.
fn deploy(src: &Sources<'_>, key: &str, v: &Value, out: &mut Mapping, notes: &mut Vec<String>, name: &str) -> Result<(), ComposeError> {
    if v.get("replicas").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(src.invalid(&format!("{key}.replicas"), "cutover runs one release of a service at a time: set `replicas: 1` or remove it"));
    }
    if let Some(limits) = v.get("resources").and_then(|r| r.get("limits")) {
        if let Some(mem) = limits.get("memory") {
            if !out.contains_key("mem_limit") {
                out.insert(Value::from("mem_limit"), mem.clone());
            }
        }
        if let Some(cpus) = limits.get("cpus") {
            if !out.contains_key("cpus") {
                out.insert(Value::from("cpus"), cpus.clone());
            }
        }
    }
    if let Value::Mapping(m) = v {
        for k in m.keys().filter_map(Value::as_str) {
            if k != "replicas" && k != "resources" {
                notes.push(format!("{name}: `deploy.{k}` ignored: cutover releases one container on this host"));
            }
        }
    }
    Ok(())
}

/// `environment` entries without a value (`- KEY`, `KEY:`) take the CLI's value, as in
/// compose, and are left out when it has none.
fn pass_through(v: &Value, vars: &super::Vars) -> Value {
    let from_cli = |k: &str| vars.get(k).map(|x| Value::String(x.clone()));
    match v {
        Value::Sequence(seq) => Value::Sequence(
            seq.iter()
                .filter_map(|e| match e.as_str() {
                    Some(t) if !t.contains('=') => from_cli(t).map(|x| Value::String(format!("{t}={}", x.as_str().unwrap_or_default()))),
                    _ => Some(e.clone()),
                })
                .collect(),
        ),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .filter_map(|(k, x)| match x {
                    Value::Null => Some((k.clone(), from_cli(k.as_str().unwrap_or_default())?)),
                    _ => Some((k.clone(), x.clone())),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load, Request, Vars};
    use super::*;
    use crate::manifest::HealthKind;

    const FILE: &str = r#"name: shop
services:
  web:
    image: ${WEB_IMAGE:-example/web:1.0}
    ports:
      - "8080:80"
      - "127.0.0.1:9090:90"
      - "5353:53/udp"
      - target: 81
        published: "8081"
        host_ip: 127.0.0.2
    environment:
      GREETING: ${GREETING:-hi}
      PASSED:
      NOT_SET:
    volumes: ["data:/data", "./conf:/etc/app:ro"]
    healthcheck:
      test: ["CMD", "/app", "health"]
      interval: 1s
    stop_grace_period: 20s
    depends_on: [db]
    deploy:
      resources:
        limits: {memory: 64m}
  db:
    image: postgres:16
volumes:
  data: {}
"#;

    fn project(text: &str, extra: &[&str], vars: &[(&str, &str)]) -> Result<Project, ComposeError> {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("compose.yaml");
        std::fs::write(&first, text).unwrap();
        let mut files = vec![first];
        for (i, e) in extra.iter().enumerate() {
            let f = dir.path().join(format!("override{i}.yaml"));
            std::fs::write(&f, e).unwrap();
            files.push(f);
        }
        let vars: Vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        load(&Request { files, project_name: None, services: Vec::new() }, &vars)
    }

    fn refused(text: &str) -> String {
        match project(text, &[], &[]) {
            Ok(p) => panic!("accepted: {:?}", p.taken),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_service_with_ports_becomes_a_manifest() {
        let p = project(FILE, &[], &[("GREETING", "from env"), ("PASSED", "through")]).unwrap();
        assert_eq!(p.name, "shop");
        assert_eq!(p.left, vec!["db".to_string()]);
        assert_eq!(p.taken.len(), 1);
        let m = &p.taken[0].manifest;
        assert_eq!(m.name, "web");
        assert_eq!(m.image, "example/web:1.0");
        assert_eq!(m.ports.len(), 4);
        assert_eq!((m.ports[1].host, m.ports[1].host_ip), (9090, Some("127.0.0.1".parse().unwrap())));
        assert_eq!((m.ports[2].host, m.ports[2].protocol), (5353, Protocol::Udp));
        assert_eq!((m.ports[3].host, m.ports[3].container), (8081, 81));
        assert_eq!(m.env["GREETING"], "from env");
        assert_eq!(m.env["PASSED"], "through");
        assert!(!m.env.contains_key("NOT_SET"), "a value-less entry the CLI does not have is left out");
        assert_eq!(m.health.kind, HealthKind::Docker);
        assert_eq!(m.healthcheck.as_ref().unwrap().interval, Some(Duration::from_secs(1)));
        assert_eq!(m.stop_timeout, Duration::from_secs(20));
        assert_eq!(m.network, "shop_default");
        assert_eq!(m.network_aliases, vec!["web".to_string()]);
        assert_eq!(m.network_labels["com.docker.compose.project"], "shop");
        assert_eq!(m.network_labels["com.docker.compose.network"], "default");
        assert_eq!(m.labels["com.docker.compose.service"], "web");
        assert_eq!(m.labels["com.docker.compose.oneoff"], "False");
        assert_eq!(m.volumes[0].0.source.as_deref(), Some("shop_data"));
        assert!(m.volumes[1].0.source.as_deref().unwrap().starts_with('/'), "bind sources are absolute");
        assert_eq!(m.mem_limit.map(|b| b.0), Some(64 << 20));
        assert!(p.notes.iter().any(|n| n.contains("depends_on")), "{:?}", p.notes);
        // What the daemon gets reads back to the same manifest.
        let text = serde_norway::to_string(m).unwrap();
        let back = Manifest::parse(Path::new("x.yaml"), &text).unwrap();
        assert_eq!(&back, m);
    }

    #[test]
    fn override_files_merge_and_x_cutover_names_the_service() {
        let over = "services:\n  web:\n    image: example/web:2.0\n    x-cutover: {name: shop-web, keep: 5, health: {deadline: 90s}}\n";
        let p = project(FILE, &[over], &[]).unwrap();
        let m = &p.taken[0].manifest;
        assert_eq!((m.name.as_str(), m.image.as_str(), m.keep), ("shop-web", "example/web:2.0", 5));
        assert_eq!(m.health.deadline, Duration::from_secs(90));
        assert_eq!(m.health.kind, HealthKind::Docker, "compose's healthcheck still gates");
        assert_eq!(m.network_aliases, vec!["web".to_string()], "others still reach it by its compose name");
    }

    #[test]
    fn keys_cutover_cannot_honour_name_file_line_and_key() {
        let msg = refused(&FILE.replace("    stop_grace_period", "    container_name: web\n    stop_grace_period"));
        assert!(msg.contains("compose.yaml:20: services.web.container_name"), "{msg}");
        let msg = refused(&FILE.replace("    image: ${WEB_IMAGE:-example/web:1.0}\n", "    build: .\n"));
        assert!(msg.contains("services.web.build") && msg.contains("without `image:`"), "{msg}");
        let msg = refused(&FILE.replace("      resources:", "      replicas: 3\n      resources:"));
        assert!(msg.contains("services.web.deploy.replicas"), "{msg}");
        let msg = refused(&FILE.replace("    depends_on: [db]", "    network_mode: host"));
        assert!(msg.contains(":21: services.web.network_mode"), "{msg}");
        let msg = refused(&FILE.replace("    depends_on: [db]", "    privileged: true"));
        assert!(msg.contains("services.web.privileged"), "{msg}");
        let msg = refused(&FILE.replace("\"8080:80\"", "\"80\""));
        assert!(msg.contains("random host port"), "{msg}");
        let msg = refused(&FILE.replace("    depends_on: [db]", "    networks: [a, b]"));
        assert!(msg.contains("one network"), "{msg}");
        let msg = refused(&FILE.replace("volumes:\n  data: {}\n", ""));
        assert!(msg.contains("not declared"), "{msg}");
        let msg = refused(&FILE.replace("  web:", "  Web_1:"));
        assert!(msg.contains("x-cutover"), "{msg}");
        let msg = refused(&FILE.replace("${WEB_IMAGE:-example/web:1.0}", "${WEB_IMAGE:?set WEB_IMAGE}"));
        assert!(msg.contains("compose.yaml:4: services.web.image") && msg.contains("set WEB_IMAGE"), "{msg}");
    }

    #[test]
    fn a_refusal_names_the_file_that_holds_the_key() {
        let base = FILE.replace("    stop_grace_period", "    container_name: web\n    stop_grace_period");
        let over = "services:\n  web:\n    image: example/web:2.0\n";
        let msg = project(&base, &[over], &[]).unwrap_err().to_string();
        assert!(msg.contains("/compose.yaml:20: services.web.container_name"), "{msg}");
        let over = "services:\n  web:\n    privileged: true\n";
        let msg = project(FILE, &[over], &[]).unwrap_err().to_string();
        assert!(msg.contains("/override0.yaml:3: services.web.privileged"), "{msg}");
    }

    #[test]
    fn project_names_and_networks_follow_compose() {
        assert_eq!(super::super::normalise_project("My App.v2"), "myappv2");
        let no_name = FILE.replace("name: shop\n", "");
        let p = project(&no_name, &[], &[("COMPOSE_PROJECT_NAME", "Env_Name")]).unwrap();
        assert_eq!(p.name, "env_name");
        let nets = format!("{FILE}networks:\n  front: {{}}\n  outside: {{external: true, name: edge}}\n");
        let p = project(&nets.replace("    depends_on: [db]", "    networks: {front: {aliases: [www]}}"), &[], &[]).unwrap();
        let m = &p.taken[0].manifest;
        assert_eq!((m.network.as_str(), m.network_aliases.clone()), ("shop_front", vec!["web".to_string(), "www".to_string()]));
        let p = project(&nets.replace("    depends_on: [db]", "    networks: [outside]"), &[], &[]).unwrap();
        let m = &p.taken[0].manifest;
        assert_eq!(m.network, "edge");
        assert!(m.network_labels.is_empty(), "an external network is never created");
    }

    #[test]
    fn short_ports() {
        assert_eq!(short_port("8000-8001:80-81").unwrap().len(), 2);
        assert!(short_port("8000-8002:80-81").is_err());
        assert_eq!(short_port("[::1]:8080:80").unwrap()[0].host_ip, Some("::1".parse().unwrap()));
        assert!(short_port("8080:80/sctp").is_err());
    }
}
