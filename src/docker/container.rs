//! The engine request for a release's container: the operator's [`ContainerOptions`]
//! (volumes, user, limits, logging ...) turned into Docker's `HostConfig` and container
//! config fields. Pure, so unit tests pin the mapping without an engine.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{DeviceMapping, HealthConfig, HostConfig, HostConfigLogConfig, Mount, MountType, ResourcesUlimits};

use crate::manifest::{ContainerOptions, MountKind};

/// The container config fields that come from the manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigFields {
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    pub healthcheck: Option<HealthConfig>,
    /// More DNS names of the container on its network.
    pub aliases: Vec<String>,
}

/// Fill `host` from `o` (cutover's own fields of `host`, network and restart policy,
/// are left as they are) and return the config fields.
pub fn apply_options(o: &ContainerOptions, host: &mut HostConfig) -> ConfigFields {
    let mounts: Vec<Mount> = o
        .volumes
        .iter()
        .map(|m| Mount {
            target: Some(m.target.clone()),
            source: m.source.clone(),
            typ: Some(match m.kind {
                MountKind::Volume => MountType::VOLUME,
                MountKind::Bind => MountType::BIND,
                MountKind::Tmpfs => MountType::TMPFS,
            }),
            read_only: m.read_only.then_some(true),
            ..Default::default()
        })
        .collect();
    if !mounts.is_empty() {
        host.mounts = Some(mounts);
    }
    host.memory = o.mem_limit.map(|b| i64::try_from(b.0).unwrap_or(i64::MAX));
    host.nano_cpus = o.cpus.map(|c| i64::try_from(c.0).unwrap_or(i64::MAX));
    host.pids_limit = o.pids_limit;
    if !o.ulimits.is_empty() {
        host.ulimits = Some(
            o.ulimits
                .iter()
                .map(|(name, u)| ResourcesUlimits { name: Some(name.clone()), soft: Some(u.soft), hard: Some(u.hard) })
                .collect(),
        );
    }
    host.cap_add = non_empty(&o.cap_add);
    host.cap_drop = non_empty(&o.cap_drop);
    host.readonly_rootfs = o.read_only.then_some(true);
    if !o.tmpfs.is_empty() {
        host.tmpfs = Some(
            o.tmpfs
                .iter()
                .map(|t| match t.split_once(':') {
                    Some((path, opts)) => (path.to_string(), opts.to_string()),
                    None => (t.clone(), String::new()),
                })
                .collect::<HashMap<_, _>>(),
        );
    }
    host.extra_hosts = non_empty(&o.extra_hosts);
    host.dns = non_empty(&o.dns);
    if !o.sysctls.is_empty() {
        host.sysctls = Some(o.sysctls.clone().into_iter().collect());
    }
    host.security_opt = non_empty(&o.security_opt);
    host.init = o.init;
    host.shm_size = o.shm_size.map(|b| i64::try_from(b.0).unwrap_or(i64::MAX));
    host.log_config = o.logging.as_ref().map(|l| HostConfigLogConfig {
        typ: Some(l.driver.clone()),
        config: (!l.options.is_empty()).then(|| l.options.clone().into_iter().collect()),
    });
    host.group_add = non_empty(&o.group_add);
    if !o.devices.is_empty() {
        host.devices = Some(o.devices.iter().map(|d| device(d)).collect());
    }
    ConfigFields {
        user: o.user.clone(),
        working_dir: o.working_dir.clone(),
        entrypoint: o.entrypoint.clone(),
        labels: o.labels.clone(),
        healthcheck: o.healthcheck.as_ref().map(|h| HealthConfig {
            test: Some(h.engine_test()),
            interval: h.interval.map(nanos),
            timeout: h.timeout.map(nanos),
            retries: h.retries.map(i64::from),
            start_period: h.start_period.map(nanos),
            start_interval: None,
        }),
        aliases: o.network_aliases.clone(),
    }
}

/// The engine takes health durations in nanoseconds.
fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn non_empty(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// `HOST[:CONTAINER[:PERMISSIONS]]`, as `docker run --device`.
fn device(spec: &str) -> DeviceMapping {
    let mut parts = spec.splitn(3, ':');
    let host = parts.next().unwrap_or_default().to_string();
    let container = parts.next().map(str::to_string).unwrap_or_else(|| host.clone());
    let perms = parts.next().unwrap_or("rwm").to_string();
    DeviceMapping { path_on_host: Some(host), path_in_container: Some(container), cgroup_permissions: Some(perms) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ByteSize, Cpus, Logging, Mount as M, Ulimit};

    #[test]
    fn every_option_reaches_the_engine_request() {
        let o = ContainerOptions {
            volumes: vec![
                M::parse_short("data:/var/lib/app").unwrap(),
                M::parse_short("/srv/conf:/etc/app:ro").unwrap(),
                M { kind: MountKind::Tmpfs, source: None, target: "/scratch".into(), read_only: false },
            ],
            user: Some("1000:1000".into()),
            working_dir: Some("/app".into()),
            entrypoint: Some(vec!["/app/run".into()]),
            labels: BTreeMap::from([("team".into(), "web".into())]),
            mem_limit: Some(ByteSize(64 << 20)),
            cpus: Some(Cpus(500_000_000)),
            pids_limit: Some(100),
            ulimits: BTreeMap::from([("nofile".into(), Ulimit { soft: 1024, hard: 4096 })]),
            cap_add: vec!["NET_ADMIN".into()],
            cap_drop: vec!["ALL".into()],
            read_only: true,
            tmpfs: vec!["/run:size=1m".into(), "/tmp".into()],
            extra_hosts: vec!["db:10.0.0.2".into()],
            dns: vec!["10.0.0.53".into()],
            sysctls: BTreeMap::from([("net.core.somaxconn".into(), "1024".into())]),
            security_opt: vec!["no-new-privileges:true".into()],
            init: Some(true),
            shm_size: Some(ByteSize(128 << 20)),
            logging: Some(Logging { driver: "json-file".into(), options: BTreeMap::from([("max-size".into(), "10m".into())]) }),
            group_add: vec!["1001".into()],
            devices: vec!["/dev/null:/dev/nothing".into()],
            healthcheck: Some(crate::manifest::Healthcheck {
                test: vec!["CMD".into(), "/app".into(), "health".into()],
                interval: Some(std::time::Duration::from_secs(1)),
                retries: Some(5),
                ..Default::default()
            }),
            network_aliases: vec!["web".into()],
            network_labels: BTreeMap::new(),
        };
        let mut host = HostConfig::default();
        let config = apply_options(&o, &mut host);
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[0].source.as_deref(), Some("data"));
        assert_eq!((mounts[1].typ, mounts[1].read_only), (Some(MountType::BIND), Some(true)));
        assert_eq!(mounts[2].typ, Some(MountType::TMPFS));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(100));
        assert_eq!(host.ulimits.unwrap()[0].hard, Some(4096));
        assert_eq!(host.readonly_rootfs, Some(true));
        let tmpfs = host.tmpfs.unwrap();
        assert_eq!(tmpfs["/run"], "size=1m");
        assert_eq!(tmpfs["/tmp"], "");
        assert_eq!(host.log_config.unwrap().config.unwrap()["max-size"], "10m");
        assert_eq!(host.devices.unwrap()[0].cgroup_permissions.as_deref(), Some("rwm"));
        assert_eq!(host.shm_size, Some(128 << 20));
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        assert_eq!(config.labels["team"], "web");
        let health = config.healthcheck.unwrap();
        assert_eq!(health.test.unwrap()[0], "CMD");
        assert_eq!((health.interval, health.retries, health.timeout), (Some(1_000_000_000), Some(5), None));
        assert_eq!(config.aliases, vec!["web".to_string()]);
    }

    #[test]
    fn no_options_leave_the_engine_defaults() {
        let mut host = HostConfig::default();
        let config = apply_options(&ContainerOptions::default(), &mut host);
        assert_eq!(host, HostConfig::default());
        assert_eq!(config, ConfigFields::default());
    }
}
