//! The Docker engine as the tests use it: whether it runs, demo images of the project's
//! own HTTP server, and a Docker network (with its own bridge) per test.
//!
//! Demo images go through [`build_demo_image`], the one place to switch to
//! `cutover::docker::image::build_demo_image` when that library function lands (see
//! the comment there).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use super::cleanup::INSTANCE_LABEL;
use super::cmd::{cmd, output, run, try_run, DOCKER};
use super::ids::Ids;

/// True if Debian's docker client reaches an engine.
pub fn docker_available() -> bool {
    static UP: OnceLock<bool> = OnceLock::new();
    *UP.get_or_init(|| {
        output(&mut cmd(DOCKER, ["version", "--format", "{{.Server.Version}}"])).is_ok_and(|o| o.success())
    })
}

/// Panics, saying how to fix it, unless the tests run as root.
#[track_caller]
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(euid == 0, "these acceptance tests need root (namespaces, nftables, Docker): run them with sudo or as root");
}

/// Panics with how to start the engine unless root and Docker are available.
#[track_caller]
pub fn require_docker() {
    require_root();
    if !docker_available() {
        let why = output(&mut cmd(DOCKER, ["version"])).map(|o| o.stderr).unwrap_or_else(|e| e.to_string());
        panic!(
            "the Docker engine is not reachable through {DOCKER} at /var/run/docker.sock ({}).\n\
             Start it with `sudo .ci/provision` (installs Debian's docker.io and starts dockerd), \
             or `nohup /usr/sbin/dockerd >/var/log/cutover-dockerd.log 2>&1 &`.",
            why.trim()
        );
    }
}

/// What a demo image is made of: the library's own description.
pub use cutover::docker::image::DemoImage;

/// Builds (or rebuilds) demo image `ids.image(release)` answering `<release>\n`; the
/// image is removed when `ids` (or the test's `Daemon`) is dropped. Returns its reference.
#[track_caller]
pub fn demo_image(ids: &Ids, release: &str, env: &[(&str, &str)]) -> String {
    let spec = DemoImage {
        tag: ids.image(release),
        release: release.to_string(),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        healthcheck: false,
    };
    demo_image_with(ids, &spec)
}

/// Builds `spec` (its `tag` must come from `ids.image(..)` so cleanup finds it).
#[track_caller]
pub fn demo_image_with(ids: &Ids, spec: &DemoImage) -> String {
    require_docker();
    assert!(
        spec.tag.starts_with(&format!("{}{}:", super::ids::IMAGE_PREFIX, ids.tag)),
        "demo image tag {} does not belong to this test: use ids.image(..)",
        spec.tag
    );
    ids.mark_docker_used();
    build_demo_image(spec).unwrap_or_else(|e| panic!("building demo image {}: {e}", spec.tag));
    spec.tag.clone()
}

/// Builds the image with the library's builder (`FROM scratch` around the static demo
/// server embedded in the crate), through the Docker API.
pub fn build_demo_image(spec: &DemoImage) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let docker = bollard::Docker::connect_with_unix_defaults()
            .map_err(|e| e.to_string())?
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        cutover::docker::image::build_demo_image(&docker, spec).await.map_err(|e| e.to_string())
    })
}

/// True if image `reference` exists in the engine.
pub fn image_exists(reference: &str) -> bool {
    output(&mut cmd(DOCKER, ["image", "inspect", "--format", "{{.Id}}", reference])).is_ok_and(|o| o.success())
}

/// Ids of the containers (running or not) labelled `cutover.instance=<ids.tag>`.
pub fn containers_of(ids: &Ids) -> Vec<String> {
    let out = run(&mut cmd(DOCKER, ["ps", "-aq", "--filter", &format!("label={INSTANCE_LABEL}={}", ids.tag)]));
    out.split_whitespace().map(str::to_string).collect()
}

/// Ids of the running containers labelled `cutover.instance=<ids.tag>`.
pub fn running_containers_of(ids: &Ids) -> Vec<String> {
    let out = run(&mut cmd(
        DOCKER,
        ["ps", "-q", "--filter", &format!("label={INSTANCE_LABEL}={}", ids.tag), "--filter", "status=running"],
    ));
    out.split_whitespace().map(str::to_string).collect()
}

/// Names of the running containers labelled `cutover.instance=<ids.tag>`, sorted.
pub fn running_container_names(ids: &Ids) -> Vec<String> {
    let filter = format!("label={INSTANCE_LABEL}={}", ids.tag);
    let out = run(&mut cmd(DOCKER, ["ps", "--format", "{{.Names}}", "--filter", &filter]));
    let mut names: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    names.sort();
    names
}

/// A Docker bridge network of one test, with its own Linux bridge `ids.bridge()`, so a
/// test can set `route_localnet` on it without touching other tests' traffic. Removed on
/// drop (after the containers on it: create it before the `Daemon`).
#[derive(Debug)]
pub struct DockerNetwork {
    pub name: String,
    pub bridge: String,
}

impl DockerNetwork {
    #[track_caller]
    pub fn new(ids: &Ids) -> DockerNetwork {
        require_docker();
        ids.mark_docker_used();
        let net = DockerNetwork { name: ids.network(), bridge: ids.bridge() };
        create_bridge_network(ids, &net.name, &net.bridge);
        net
    }
}

/// `docker network create` of a bridge network `name` with Linux bridge `bridge`,
/// labelled as the test's (so the sweep finds it).
#[track_caller]
pub fn create_bridge_network(ids: &Ids, name: &str, bridge: &str) {
    run(&mut cmd(
        DOCKER,
        [
            "network",
            "create",
            "--driver",
            "bridge",
            "--label",
            &format!("{INSTANCE_LABEL}={}", ids.tag),
            "-o",
            &format!("com.docker.network.bridge.name={bridge}"),
            name,
        ],
    ));
}

impl Drop for DockerNetwork {
    fn drop(&mut self) {
        match try_run(&mut cmd(DOCKER, ["network", "rm", &self.name])) {
            Err(e) if !e.stderr.contains("No such network") && !e.stderr.contains("not found") => {
                eprintln!("cleanup: removing docker network {}: {e}", self.name);
            }
            _ => {}
        }
    }
}
