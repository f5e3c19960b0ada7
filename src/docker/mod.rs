//! Docker engine effects (bollard): create, start, inspect, stop and remove release
//! containers; look up networks and the ports other containers publish.
//!
//! Behind the [`Engine`] trait so the release state machine can be tested with a fake.
//! Never touches containers that do not carry cutover's labels, except to read which
//! host ports they publish.

pub mod container;
pub mod image;
pub mod networks;
pub mod registry;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HealthStatusEnum, HostConfig, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use bollard::Docker;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use crate::manifest::Protocol;
use crate::plan::Bridge;
pub use networks::NetworkEvent;

pub const LABEL_SERVICE: &str = "cutover.service";
pub const LABEL_RELEASE: &str = "cutover.release";
pub const LABEL_INSTANCE: &str = "cutover.instance";
/// The release's manifest as JSON, `env` values left out (they are in the container's
/// environment): what a daemon that lost its state adopts the release from.
pub const LABEL_MANIFEST: &str = "cutover.manifest";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine at {endpoint} (is dockerd running?): {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("Docker could not {action} `{target}`: {}", engine_reason(source))]
    Api {
        action: &'static str,
        target: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("image `{0}` is not on this host and the pull policy is `never`; load it, or deploy with `--pull missing`")]
    NoImage(String),
    #[error("cannot pull `{image}`: {reason}")]
    Pull {
        image: String,
        #[source]
        reason: registry::PullFailure,
    },
    #[error("network `{network}` {problem}")]
    Network { network: String, problem: String },
    #[error("this container engine cannot {0}")]
    Unsupported(&'static str),
}

/// An engine error in the operator's words: a connection that fails (the engine is down
/// or restarting) says so instead of the HTTP client's wording.
fn engine_reason(source: &bollard::errors::Error) -> String {
    let unreachable = match source {
        bollard::errors::Error::HyperLegacyError { err } => err.is_connect(),
        bollard::errors::Error::IOError { err } => matches!(
            err.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
        ),
        bollard::errors::Error::RequestTimeoutError => true,
        _ => false,
    };
    if unreachable {
        "cannot reach the Docker engine (is dockerd running, or restarting?)".to_string()
    } else {
        source.to_string()
    }
}

/// What cutover asks for when it creates a release container.
/// `Debug` shows the `env` names, never their values (see `manifest::RedactedEnv`).
#[derive(Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub env: BTreeMap<String, String>,
    pub command: Option<Vec<String>>,
    /// Replaces the image's ENTRYPOINT when set (handoff mode wraps the server in
    /// handoff-exec this way).
    pub entrypoint: Option<Vec<String>>,
    /// Docker network name, or a network mode such as `host` / `container:<name>`.
    pub network: String,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: String,
    pub stop_timeout: Duration,
    /// Bind mounts `host path -> container path`, read-only.
    pub mounts: Vec<(String, String)>,
    /// What the operator's manifest defines of the container (volumes, user, limits ...).
    pub options: crate::manifest::ContainerOptions,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ContainerSpec { name, image, env, command, entrypoint, network, labels, stop_signal, stop_timeout, mounts, options } = self;
        f.debug_struct("ContainerSpec")
            .field("name", name)
            .field("image", image)
            .field("env", &crate::manifest::RedactedEnv(env))
            .field("command", command)
            .field("entrypoint", entrypoint)
            .field("network", network)
            .field("labels", labels)
            .field("stop_signal", stop_signal)
            .field("stop_timeout", stop_timeout)
            .field("mounts", mounts)
            .field("options", options)
            .finish()
    }
}

/// What cutover needs to know about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub running: bool,
    pub pid: Option<u32>,
    pub addr: Option<Ipv4Addr>,
    /// Its global IPv6 address on the network, when the network has IPv6 enabled.
    pub addr6: Option<Ipv6Addr>,
    pub exit_code: Option<i64>,
    /// How often the engine restarted it (restart policy): a crash that the engine
    /// hides by restarting at once still shows here.
    pub restarts: i64,
    /// Docker health status when the image has a HEALTHCHECK: `starting`, `healthy`, `unhealthy`.
    pub health: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The engine restarts it after a crash or a reboot (restart policy `unless-stopped`
    /// or `always`): what cutover sets on a release once it is established.
    pub kept_running: bool,
}

impl ContainerInfo {
    /// What a container listing says of one: the rest needs an inspect.
    pub fn listed(id: String, name: String, running: bool, labels: BTreeMap<String, String>) -> ContainerInfo {
        ContainerInfo {
            id,
            name,
            running,
            pid: None,
            addr: None,
            addr6: None,
            exit_code: None,
            restarts: 0,
            health: None,
            labels,
            kept_running: false,
        }
    }
}

/// What an image runs when nothing overrides it: its ENTRYPOINT and CMD.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageCommand {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A host port another container publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub protocol: Protocol,
    pub port: u16,
    /// The host address the port is published on (`None`: every address).
    pub host_ip: Option<std::net::IpAddr>,
    pub container: String,
}

/// The container engine as the release state machine sees it.
pub trait Engine: Send + Sync + 'static {
    /// Create and start a container from `spec` (removing a stale container of ours that
    /// has the same name first) and return it inspected.
    fn run(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<ContainerInfo, DockerError>>;
    fn start(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>>;
    /// `None` when the container does not exist.
    fn inspect(&self, id: String, network: String) -> BoxFuture<'_, Result<Option<ContainerInfo>, DockerError>>;
    fn stop(&self, id: String, timeout: Duration) -> BoxFuture<'_, Result<(), DockerError>>;
    /// Force-remove; not an error if it is already gone.
    fn remove(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>>;
    /// The last `lines` lines of the container's output.
    fn logs_tail(&self, id: String, lines: usize) -> BoxFuture<'_, Result<String, DockerError>>;
    /// Host ports published by running containers.
    fn published(&self) -> BoxFuture<'_, Result<Vec<Published>, DockerError>>;
    /// The bridge interface and subnet of a bridge network (`None` for other drivers).
    fn bridge(&self, network: String) -> BoxFuture<'_, Result<Option<Bridge>, DockerError>>;
    /// Containers carrying `cutover.instance=<instance>`, as the engine lists them: id,
    /// name, running and labels (addresses, pid and restart policy need an `inspect`).
    fn list_instance(&self, instance: String) -> BoxFuture<'_, Result<Vec<ContainerInfo>, DockerError>>;
    /// Let the engine restart the container from now on (after a crash, an engine
    /// restart or a reboot): `unless-stopped`.
    fn keep_running(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>>;
    /// The values of the environment variables `names` in a container's configuration
    /// (the ones it has; what a release adopted from its container needs of its manifest).
    fn env_values(&self, id: String, names: Vec<String>) -> BoxFuture<'_, Result<crate::manifest::EnvValues, DockerError>> {
        let _ = (id, names);
        Box::pin(async { Err(DockerError::Unsupported("read a container's environment")) })
    }
    /// Lifecycle events (start, die, restart...) of this instance's containers, as
    /// `(container id, action)`. The stream ends or errs when the engine goes away.
    fn events(&self, instance: String) -> BoxStream<'_, Result<(String, String), DockerError>>;
    /// Remove the volumes cutover created for `service` (labelled with it and `instance`);
    /// their names. Volumes cutover did not create are never removed.
    fn remove_volumes(&self, service: String, instance: String) -> BoxFuture<'_, Result<Vec<String>, DockerError>> {
        let _ = (service, instance);
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Make `image` available as `policy` says, pulling it from its registry when needed
    /// (credentials as `docker login` stored them); `progress` gets one line per step.
    fn ensure_image<'a>(
        &'a self,
        image: String,
        policy: crate::manifest::PullPolicy,
        progress: registry::ProgressFn<'a>,
    ) -> BoxFuture<'a, Result<registry::ImageSource, DockerError>> {
        let _ = (image, policy, progress);
        Box::pin(async { Ok(registry::ImageSource::Local) })
    }
    /// Does a local image define a HEALTHCHECK? `None`: this engine cannot tell.
    fn image_has_healthcheck(&self, image: String) -> BoxFuture<'_, Result<Option<bool>, DockerError>> {
        let _ = image;
        Box::pin(async { Ok(None) })
    }
    /// Containers joining and leaving networks (any container's: the caller picks its
    /// own by id). The default never yields: an engine without network events.
    fn network_events(&self) -> BoxStream<'_, Result<NetworkEvent, DockerError>> {
        Box::pin(futures_util::stream::pending())
    }
    /// Is container `id` on network `network` (name or id)? `None`: no such container.
    /// The default reads whether `inspect` finds an address on it.
    fn connected(&self, id: String, network: String) -> BoxFuture<'_, Result<Option<bool>, DockerError>> {
        Box::pin(async move { Ok(self.inspect(id, network).await?.map(|i| i.addr.is_some() || i.addr6.is_some())) })
    }
    /// Connect container `id` to `network` again, with its DNS `aliases`.
    fn connect_network(&self, id: String, network: String, aliases: Vec<String>) -> BoxFuture<'_, Result<(), DockerError>> {
        let _ = (id, network, aliases);
        Box::pin(async { Err(DockerError::Unsupported("connect a container to a network")) })
    }
    /// The ENTRYPOINT and CMD of a local image (handoff mode runs them under a wrapper).
    /// The default says the engine cannot, so engines that never run handoff-mode
    /// services need not implement it.
    fn image_command(&self, image: String) -> BoxFuture<'_, Result<ImageCommand, DockerError>> {
        let _ = image;
        Box::pin(async { Err(DockerError::Unsupported("read an image's entrypoint and command")) })
    }
}

/// The real engine over the Docker API.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: Docker,
}

impl DockerEngine {
    /// Connect to `endpoint` (`unix:///var/run/docker.sock`) and negotiate the API version.
    pub async fn connect(endpoint: &str) -> Result<DockerEngine, DockerError> {
        let cerr = |source| DockerError::Connect { endpoint: endpoint.to_string(), source };
        let docker = if endpoint.starts_with("unix://") || endpoint.starts_with('/') {
            Docker::connect_with_unix(endpoint, 120, bollard::API_DEFAULT_VERSION).map_err(cerr)?
        } else {
            Docker::connect_with_local_defaults().map_err(cerr)?
        };
        let docker = docker.negotiate_version().await.map_err(cerr)?;
        Ok(DockerEngine { docker })
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Create bridge network `name` with `labels`, or reuse one of that name (left by a
    /// run that was killed).
    pub async fn ensure_network(&self, name: &str, labels: HashMap<String, String>) -> Result<(), DockerError> {
        let api = |action, source| DockerError::Api { action, target: name.to_string(), source };
        // Inspect first: engines of API 1.41 create a second network of the same name
        // instead of refusing it, and then neither can be removed by name.
        match self.docker.inspect_network(name, None).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(e) => return Err(api("inspect network", e)),
        }
        let request = bollard::models::NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(labels),
            ..Default::default()
        };
        self.docker.create_network(request).await.map_err(|e| api("create network", e))?;
        Ok(())
    }

    /// Remove network `name`; one that is already gone is fine.
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.docker.remove_network(name).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(DockerError::Api { action: "remove network", target: name.to_string(), source }),
        }
    }

    /// Remove image `tag`, even if a stopped container still uses it; one that is already
    /// gone is fine.
    pub async fn remove_image(&self, tag: &str) -> Result<(), DockerError> {
        let opts = bollard::query_parameters::RemoveImageOptionsBuilder::default().force(true).build();
        match self.docker.remove_image(tag, Some(opts), None).await {
            Ok(_) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(DockerError::Api { action: "remove image", target: tag.to_string(), source }),
        }
    }

    async fn inspect_inner(&self, id: &str, network: &str) -> Result<Option<ContainerInfo>, DockerError> {
        let resp = match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(r) => r,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
            Err(source) => return Err(DockerError::Api { action: "inspect", target: id.to_string(), source }),
        };
        let state = resp.state.clone().unwrap_or_default();
        let networks = resp.network_settings.as_ref().and_then(|n| n.networks.clone()).unwrap_or_default();
        let endpoint = networks.get(network).or_else(|| networks.values().next());
        let addr = endpoint.and_then(|e| e.ip_address.as_deref()).and_then(|ip| ip.parse().ok());
        // Empty unless the network was created with IPv6 enabled.
        let addr6 = endpoint.and_then(|e| e.global_ipv6_address.as_deref()).and_then(|ip| ip.parse().ok());
        let health = state.health.as_ref().and_then(|h| h.status).and_then(|s| match s {
            HealthStatusEnum::STARTING => Some("starting".to_string()),
            HealthStatusEnum::HEALTHY => Some("healthy".to_string()),
            HealthStatusEnum::UNHEALTHY => Some("unhealthy".to_string()),
            HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
        });
        let labels = resp
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .map(|l| l.into_iter().collect())
            .unwrap_or_default();
        let running = state.running.unwrap_or(false);
        let kept_running = resp
            .host_config
            .as_ref()
            .and_then(|h| h.restart_policy.as_ref())
            .and_then(|p| p.name)
            .is_some_and(|n| matches!(n, RestartPolicyNameEnum::UNLESS_STOPPED | RestartPolicyNameEnum::ALWAYS));
        Ok(Some(ContainerInfo {
            id: resp.id.clone().unwrap_or_else(|| id.to_string()),
            name: resp.name.clone().unwrap_or_default().trim_start_matches('/').to_string(),
            running,
            pid: state.pid.filter(|p| running && *p > 0).and_then(|p| u32::try_from(p).ok()),
            addr,
            addr6,
            exit_code: state.exit_code,
            restarts: resp.restart_count.unwrap_or(0),
            health,
            labels,
            kept_running,
        }))
    }

    async fn remove_inner(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(DockerError::Api { action: "remove", target: id.to_string(), source }),
        }
    }

    async fn run_inner(&self, spec: ContainerSpec) -> Result<ContainerInfo, DockerError> {
        // A container of ours left by a crash before its release was recorded.
        if let Some(old) = self.inspect_inner(&spec.name, &spec.network).await? {
            let ours = old.labels.get(LABEL_INSTANCE) == spec.labels.get(LABEL_INSTANCE);
            if !ours {
                return Err(DockerError::Api {
                    action: "create",
                    target: spec.name.clone(),
                    source: bollard::errors::Error::DockerResponseServerError {
                        status_code: 409,
                        message: "a container that cutover does not own has this name; rename or remove it".into(),
                    },
                });
            }
            self.remove_inner(&old.id).await?;
        }
        self.ensure_volumes(&spec).await?;
        self.ensure_release_network(&spec).await?;
        let network_mode = spec.network.clone();
        let mut host_config = HostConfig {
            network_mode: Some(network_mode),
            // A release that has not proven itself is not restarted by the engine: a crash
            // must show (and its address go dark, so clients' SYNs are retried instead of
            // refused) until cutover has switched away from it. `keep_running` turns the
            // restart policy on once the release is established.
            restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
            binds: if spec.mounts.is_empty() {
                None
            } else {
                Some(spec.mounts.iter().map(|(h, c)| format!("{h}:{c}:ro")).collect())
            },
            ..Default::default()
        };
        let fields = container::apply_options(&spec.options, &mut host_config);
        // cutover's labels win over the operator's (validation refuses `cutover.*` ones).
        let mut labels = fields.labels;
        labels.extend(spec.labels.clone());
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            cmd: spec.command.clone(),
            entrypoint: spec.entrypoint.clone().or(fields.entrypoint),
            user: fields.user,
            working_dir: fields.working_dir,
            labels: Some(labels.into_iter().collect::<HashMap<_, _>>()),
            healthcheck: fields.healthcheck,
            networking_config: (!fields.aliases.is_empty()).then(|| bollard::models::NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    spec.network.clone(),
                    bollard::models::EndpointSettings { aliases: Some(fields.aliases.clone()), ..Default::default() },
                )])),
            }),
            stop_signal: Some(spec.stop_signal.clone()),
            stop_timeout: Some(i64::try_from(spec.stop_timeout.as_secs()).unwrap_or(i64::MAX)),
            host_config: Some(host_config),
            ..Default::default()
        };
        let opts = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
        let created = match self.docker.create_container(Some(opts), body).await {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                return Err(DockerError::NoImage(spec.image.clone()))
            }
            Err(source) => return Err(DockerError::Api { action: "create", target: spec.name.clone(), source }),
        };
        if let Err(source) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove_inner(&created.id).await;
            return Err(DockerError::Api { action: "start", target: spec.name.clone(), source });
        }
        self.inspect_inner(&created.id, &spec.network).await?.ok_or_else(|| DockerError::Api {
            action: "inspect",
            target: spec.name.clone(),
            source: bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message: "the container vanished right after it started".into(),
            },
        })
    }

    /// Create the named volumes of `spec` that do not exist yet, labelled with the
    /// service and instance of the release, so `remove --volumes` finds them; a volume
    /// that exists is used as it is (a service moved from `docker run` keeps its data).
    async fn ensure_volumes(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        for name in spec.options.named_volumes() {
            match self.docker.inspect_volume(name).await {
                Ok(_) => continue,
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
                Err(source) => return Err(DockerError::Api { action: "inspect volume", target: name.to_string(), source }),
            }
            let labels: HashMap<String, String> = spec
                .labels
                .iter()
                .filter(|(k, _)| *k == LABEL_SERVICE || *k == LABEL_INSTANCE)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let req = bollard::models::VolumeCreateRequest { name: Some(name.to_string()), labels: Some(labels), ..Default::default() };
            self.docker
                .create_volume(req)
                .await
                .map_err(|source| DockerError::Api { action: "create volume", target: name.to_string(), source })?;
        }
        Ok(())
    }

    /// Create the network of `spec` when it does not exist and the manifest gives the
    /// labels to create it with (compose's default network, so `docker compose` takes it
    /// as its own); otherwise the network is the operator's and must exist.
    async fn ensure_release_network(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        let labels = &spec.options.network_labels;
        if labels.is_empty() {
            return Ok(());
        }
        match self.docker.inspect_network(&spec.network, None).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(source) => return Err(DockerError::Api { action: "inspect network", target: spec.network.clone(), source }),
        }
        let req = bollard::models::NetworkCreateRequest {
            name: spec.network.clone(),
            driver: Some("bridge".to_string()),
            labels: Some(labels.clone().into_iter().collect()),
            ..Default::default()
        };
        match self.docker.create_network(req).await {
            Ok(_) => Ok(()),
            // Created meanwhile (by compose, or a release of another service).
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(source) => Err(DockerError::Api { action: "create network", target: spec.network.clone(), source }),
        }
    }

    /// `docker image inspect` of an image that must be on the host.
    async fn inspect_local_image(&self, image: String) -> Result<bollard::models::ImageInspect, DockerError> {
        match self.docker.inspect_image(&image).await {
            Ok(i) => Ok(i),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Err(DockerError::NoImage(image)),
            Err(source) => Err(DockerError::Api { action: "inspect image", target: image, source }),
        }
    }

    async fn remove_volumes_inner(&self, service: &str, instance: &str) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_SERVICE}={service}"), format!("{LABEL_INSTANCE}={instance}")],
        )]);
        let opts = bollard::query_parameters::ListVolumesOptions { filters: Some(filters) };
        let list = self
            .docker
            .list_volumes(Some(opts))
            .await
            .map_err(|source| DockerError::Api { action: "list volumes of", target: service.to_string(), source })?;
        let mut removed = Vec::new();
        for v in list.volumes.unwrap_or_default() {
            match self.docker.remove_volume(&v.name, None::<bollard::query_parameters::RemoveVolumeOptions>).await {
                Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => removed.push(v.name),
                Err(source) => return Err(DockerError::Api { action: "remove volume", target: v.name, source }),
            }
        }
        Ok(removed)
    }

    async fn bridge_inner(&self, network: &str) -> Result<Option<Bridge>, DockerError> {
        if network == "host" || network == "none" || network.starts_with("container:") {
            return Ok(None);
        }
        let net = self
            .docker
            .inspect_network(network, None)
            .await
            .map_err(|source| DockerError::Api { action: "inspect network", target: network.to_string(), source })?;
        if net.driver.as_deref() != Some("bridge") {
            return Ok(None);
        }
        let options = net.options.clone().unwrap_or_default();
        let id = net.id.clone().unwrap_or_default();
        let gateways: Vec<std::net::IpAddr> = net
            .ipam
            .as_ref()
            .and_then(|i| i.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.gateway.as_deref()?.parse().ok())
            .collect();
        let ifname = bridge_ifname(&options, &id, &gateways, &host_interfaces());
        let subnet = net
            .ipam
            .as_ref()
            .and_then(|i| i.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.subnet.as_deref())
            .find_map(|s| {
                let (addr, prefix) = s.split_once('/')?;
                Some((addr.parse::<Ipv4Addr>().ok()?, prefix.parse::<u8>().ok()?))
            });
        match subnet {
            Some((subnet, prefix)) => Ok(Some(Bridge { ifname, subnet, prefix })),
            None => Err(DockerError::Network { network: network.to_string(), problem: "has no IPv4 subnet".into() }),
        }
    }
}

/// The Linux bridge of a network, as the engine names it: Docker's
/// `com.docker.network.bridge.name` option (set for the default bridge and for networks
/// created with it), Podman's `network_interface` where its compat API shows it; else
/// the interface of this network namespace holding the network's gateway address
/// (Podman's `podman0`, `podman1`...); else Docker's default `br-<first 12 of the id>`.
pub fn bridge_ifname(
    options: &HashMap<String, String>,
    id: &str,
    gateways: &[std::net::IpAddr],
    interfaces: &[(String, std::net::IpAddr)],
) -> String {
    for key in ["com.docker.network.bridge.name", "network_interface"] {
        if let Some(name) = options.get(key).filter(|n| !n.is_empty()) {
            return name.clone();
        }
    }
    if let Some((name, _)) = interfaces.iter().find(|(_, a)| gateways.contains(a)) {
        return name.clone();
    }
    format!("br-{}", id.get(..12).unwrap_or(id))
}

/// Every address of this network namespace's interfaces, with the interface's name.
fn host_interfaces() -> Vec<(String, std::net::IpAddr)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                std::net::IpAddr::V4(v4.ip())
            } else {
                std::net::IpAddr::V6(addr.as_sockaddr_in6()?.ip())
            };
            Some((a.interface_name, ip))
        })
        .collect()
}

/// What the daemon logs about its engine at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineFacts {
    /// `Docker Engine` or `Podman Engine` (the engine's own component name).
    pub product: String,
    pub version: String,
    /// The highest API version the engine serves.
    pub api_version: String,
    /// The API version this client negotiated.
    pub negotiated: String,
}

impl DockerEngine {
    /// The engine's product, version and API versions.
    pub async fn facts(&self) -> Result<EngineFacts, DockerError> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|source| DockerError::Api { action: "read the version of", target: "the engine".into(), source })?;
        let components = v.components.clone().unwrap_or_default();
        let product = components
            .iter()
            .map(|c| c.name.clone())
            .find(|n| n.contains("Podman"))
            .or_else(|| components.first().map(|c| c.name.clone()))
            // Docker calls its own component just "Engine".
            .filter(|n| n != "Engine")
            .unwrap_or_else(|| "Docker Engine".into());
        Ok(EngineFacts {
            product,
            version: v.version.clone().unwrap_or_default(),
            api_version: v.api_version.clone().unwrap_or_default(),
            negotiated: self.docker.client_version().to_string(),
        })
    }

    /// True when the engine answers `/_ping`.
    async fn answers(&self) -> bool {
        self.docker.ping().await.is_ok()
    }
}

impl Engine for DockerEngine {
    fn network_events(&self) -> BoxStream<'_, Result<NetworkEvent, DockerError>> {
        self.network_events_inner()
    }

    fn connected(&self, id: String, network: String) -> BoxFuture<'_, Result<Option<bool>, DockerError>> {
        Box::pin(async move { self.connected_inner(&id, &network).await })
    }

    fn connect_network(&self, id: String, network: String, aliases: Vec<String>) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move { self.connect_network_inner(&id, &network, aliases).await })
    }

    fn remove_volumes(&self, service: String, instance: String) -> BoxFuture<'_, Result<Vec<String>, DockerError>> {
        Box::pin(async move { self.remove_volumes_inner(&service, &instance).await })
    }

    fn ensure_image<'a>(
        &'a self,
        image: String,
        policy: crate::manifest::PullPolicy,
        progress: registry::ProgressFn<'a>,
    ) -> BoxFuture<'a, Result<registry::ImageSource, DockerError>> {
        Box::pin(async move { registry::ensure(&self.docker, &image, policy, progress).await })
    }

    fn image_has_healthcheck(&self, image: String) -> BoxFuture<'_, Result<Option<bool>, DockerError>> {
        Box::pin(async move {
            let inspected = self.inspect_local_image(image).await?;
            // `HEALTHCHECK NONE` is stored as the test ["NONE"]: no check.
            let test = inspected.config.and_then(|c| c.healthcheck).and_then(|h| h.test).unwrap_or_default();
            Ok(Some(!test.is_empty() && test.first().map(String::as_str) != Some("NONE")))
        })
    }

    fn image_command(&self, image: String) -> BoxFuture<'_, Result<ImageCommand, DockerError>> {
        Box::pin(async move {
            let inspected = self.inspect_local_image(image).await?;
            let config = inspected.config.unwrap_or_default();
            Ok(ImageCommand { entrypoint: config.entrypoint.unwrap_or_default(), cmd: config.cmd.unwrap_or_default() })
        })
    }

    fn run(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<ContainerInfo, DockerError>> {
        Box::pin(self.run_inner(spec))
    }

    fn start(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move {
            match self.docker.start_container(&id, None).await {
                // 304: already running.
                Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
                Err(source) => Err(DockerError::Api { action: "start", target: id, source }),
            }
        })
    }

    fn inspect(&self, id: String, network: String) -> BoxFuture<'_, Result<Option<ContainerInfo>, DockerError>> {
        Box::pin(async move { self.inspect_inner(&id, &network).await })
    }

    fn stop(&self, id: String, timeout: Duration) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move {
            let t = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
            let opts = StopContainerOptions { t: Some(t), signal: None };
            match self.docker.stop_container(&id, Some(opts)).await {
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. })
                | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
                Err(source) => Err(DockerError::Api { action: "stop", target: id, source }),
            }
        })
    }

    fn remove(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move { self.remove_inner(&id).await })
    }

    fn logs_tail(&self, id: String, lines: usize) -> BoxFuture<'_, Result<String, DockerError>> {
        Box::pin(async move {
            let opts = LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() };
            let mut stream = self.docker.logs(&id, Some(opts));
            let mut out = String::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => out.push_str(&String::from_utf8_lossy(&chunk.into_bytes())),
                    Err(source) => return Err(DockerError::Api { action: "read the logs of", target: id, source }),
                }
            }
            Ok(out)
        })
    }

    fn published(&self) -> BoxFuture<'_, Result<Vec<Published>, DockerError>> {
        Box::pin(async move {
            let list = self
                .docker
                .list_containers(Some(ListContainersOptions { all: false, ..Default::default() }))
                .await
                .map_err(|source| DockerError::Api { action: "list", target: "containers".into(), source })?;
            let mut out = Vec::new();
            for c in list {
                let name = c.names.as_ref().and_then(|n| n.first()).map(|n| n.trim_start_matches('/').to_string());
                for p in c.ports.unwrap_or_default() {
                    let Some(port) = p.public_port else { continue };
                    let protocol = match p.typ {
                        Some(bollard::models::PortSummaryTypeEnum::UDP) => Protocol::Udp,
                        Some(bollard::models::PortSummaryTypeEnum::TCP) => Protocol::Tcp,
                        _ => continue,
                    };
                    // "0.0.0.0" or "::" (or nothing): every host address.
                    let host_ip = p.ip.as_deref().and_then(|ip| ip.parse::<std::net::IpAddr>().ok()).filter(|ip| !ip.is_unspecified());
                    out.push(Published { protocol, port, host_ip, container: name.clone().unwrap_or_default() });
                }
            }
            Ok(out)
        })
    }

    fn bridge(&self, network: String) -> BoxFuture<'_, Result<Option<Bridge>, DockerError>> {
        Box::pin(async move { self.bridge_inner(&network).await })
    }

    fn list_instance(&self, instance: String) -> BoxFuture<'_, Result<Vec<ContainerInfo>, DockerError>> {
        Box::pin(async move {
            let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_INSTANCE}={instance}")])]);
            let list = self
                .docker
                .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
                .await
                .map_err(|source| DockerError::Api { action: "list", target: "containers".into(), source })?;
            // From the listing alone, one request at daemon start however many releases
            // are kept: what it lacks (addresses, pid, restart policy) is inspected for the
            // few containers a caller needs it of.
            Ok(list
                .into_iter()
                .filter_map(|c| {
                    let running = c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
                    let name = c.names.as_ref().and_then(|n| n.first()).map(|n| n.trim_start_matches('/').to_string());
                    Some(ContainerInfo::listed(c.id?, name.unwrap_or_default(), running, c.labels.unwrap_or_default().into_iter().collect()))
                })
                .collect())
        })
    }

    fn events(&self, instance: String) -> BoxStream<'_, Result<(String, String), DockerError>> {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![format!("{LABEL_INSTANCE}={instance}")]),
        ]);
        let opts = bollard::query_parameters::EventsOptions { filters: Some(filters), ..Default::default() };
        let events = self.docker.events(Some(opts)).map(|e| {
            let e = e.map_err(|source| DockerError::Api { action: "watch the events of", target: "containers".into(), source })?;
            let id = e.actor.and_then(|a| a.id).unwrap_or_default();
            Ok((id, e.action.unwrap_or_default()))
        });
        // When the stream fails or ends because the engine went away, say so once, wait
        // until the engine answers again, say that once, and only then end the stream
        // (with the error): the caller re-subscribes and re-asserts once per outage
        // instead of once a second while the engine is down.
        let guarded = futures_util::stream::unfold((Box::pin(events), false), move |(mut events, done)| async move {
            if done {
                return None;
            }
            let item = events.next().await;
            let failure = match item {
                Some(Ok(ev)) => return Some((Ok(ev), (events, false))),
                Some(Err(e)) => Some(e),
                None => None,
            };
            if !self.answers().await {
                match &failure {
                    Some(e) => tracing::warn!(error = %e, "the container engine went away; waiting for it to come back"),
                    None => tracing::warn!("the container engine went away; waiting for it to come back"),
                }
                while !self.answers().await {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                match self.facts().await {
                    Ok(f) => tracing::info!(engine = %f.product, version = %f.version, "the container engine is back"),
                    Err(_) => tracing::info!("the container engine is back"),
                }
            }
            let e = failure.unwrap_or(DockerError::Unsupported("keep its event stream open (it ended)"));
            Some((Err(e), (events, true)))
        });
        Box::pin(guarded)
    }

    fn env_values(&self, id: String, names: Vec<String>) -> BoxFuture<'_, Result<crate::manifest::EnvValues, DockerError>> {
        Box::pin(async move {
            let resp = self
                .docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
                .map_err(|source| DockerError::Api { action: "inspect", target: id.clone(), source })?;
            let env = resp.config.and_then(|c| c.env).unwrap_or_default();
            let mut out = BTreeMap::new();
            for pair in env {
                if let Some((k, v)) = pair.split_once('=') {
                    if names.iter().any(|n| n == k) {
                        out.insert(k.to_string(), v.to_string());
                    }
                }
            }
            Ok(crate::manifest::EnvValues(out))
        })
    }

    fn keep_running(&self, id: String) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(async move {
            let body = bollard::models::ContainerUpdateBody {
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            };
            self.docker
                .update_container(&id, body)
                .await
                .map_err(|source| DockerError::Api { action: "set the restart policy of", target: id, source })
        })
    }
}

#[cfg(test)]
mod bridge_tests {
    use super::*;

    #[test]
    fn an_engine_that_is_down_is_said_so() {
        let down = DockerError::Api {
            action: "inspect",
            target: "cutover-web-2".into(),
            source: bollard::errors::Error::IOError { err: std::io::ErrorKind::ConnectionRefused.into() },
        };
        let text = down.to_string();
        assert_eq!(text, "Docker could not inspect `cutover-web-2`: cannot reach the Docker engine (is dockerd running, or restarting?)");
        let other = DockerError::Api {
            action: "inspect",
            target: "x".into(),
            source: bollard::errors::Error::DockerResponseServerError { status_code: 500, message: "boom".into() },
        };
        assert!(other.to_string().contains("boom"), "{other}");
    }

    #[test]
    fn the_bridge_name_comes_from_the_engine() {
        let gw: Vec<std::net::IpAddr> = vec!["10.88.0.1".parse().unwrap()];
        let ifaces = vec![("lo".to_string(), "127.0.0.1".parse().unwrap()), ("podman0".to_string(), "10.88.0.1".parse().unwrap())];
        let opt = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        // Docker: the option, whatever the interfaces say.
        assert_eq!(bridge_ifname(&opt("com.docker.network.bridge.name", "docker0"), "abc", &gw, &ifaces), "docker0");
        // Podman where the compat API shows it.
        assert_eq!(bridge_ifname(&opt("network_interface", "podman3"), "abc", &gw, &ifaces), "podman3");
        // Podman's compat API without it: the interface holding the gateway.
        assert_eq!(bridge_ifname(&HashMap::new(), "0123456789abcdef", &gw, &ifaces), "podman0");
        // Nothing known (the bridge is not up yet): Docker's default naming.
        assert_eq!(bridge_ifname(&HashMap::new(), "0123456789abcdef", &gw, &[]), "br-0123456789ab");
    }
}
