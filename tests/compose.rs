//! Acceptance of issue 15: a compose file as it is. compose starts `cache`, cutover
//! releases `web` (its `ports:` become the kernel switch, Docker publishes nothing), the
//! two reach each other by name on the project's network, a new image is released under
//! load with no failed request, an edited file redeploys only what changed, and a key
//! cutover cannot honour exits 2 naming file, line and key with nothing changed. Real
//! Docker engine, real kernel, Debian's docker-compose, clients in another namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::cmd::{cmd, output};
use common::*;

const COMPOSE: &str = "/usr/bin/docker-compose";

/// `docker-compose -p P down -v` on drop, also when the test failed.
struct ComposeProject {
    name: String,
    file: String,
}

impl ComposeProject {
    fn run(&self, args: &[&str]) -> String {
        let mut c = cmd(COMPOSE, ["-p", &self.name, "-f", &self.file]);
        c.args(args);
        run(&mut c)
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        let mut c = cmd(COMPOSE, ["-p", &self.name, "-f", &self.file, "down", "-v", "--remove-orphans"]);
        let _ = output(&mut c);
        // `down` reads the file, which a test may have left invalid on purpose: the
        // project's containers go by their label too, before the test's images do.
        let filter = format!("label=com.docker.compose.project={}", self.name);
        if let Ok(ids) = output(&mut cmd(DOCKER, ["ps", "-aq", "--filter", &filter])) {
            let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = output(cmd(DOCKER, ["rm", "-f", "-v"]).args(&ids));
            }
        }
        let _ = output(&mut cmd(DOCKER, ["network", "rm", &format!("{}_default", self.name)]));
        let _ = output(&mut cmd(DOCKER, ["volume", "rm", "-f", &format!("{}_data", self.name)]));
    }
}

fn inspect(container: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&run(&mut cmd(DOCKER, ["inspect", container]))).unwrap();
    v[0].clone()
}

/// Resolve `name` with Docker's DNS inside `container`'s network namespace.
fn resolve_in(container: &str, name: &str) -> String {
    let at = At::container(container);
    let mut c = at.command("dig");
    c.args(["+short", "+time=2", "+tries=3", "@127.0.0.11", name]);
    let out = run(&mut c);
    out.lines().last().unwrap_or_default().trim().to_string()
}

fn write(dir: &Path, rel: &str, text: &str) {
    std::fs::write(dir.join(rel), text).unwrap();
}

/// The example of manifests/compose, with a second released service (`api`) and the
/// test's cutover names.
fn compose_text(service: &str, api: &str) -> String {
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/compose/compose.yaml")).unwrap();
    let example = example.replace("    x-cutover:\n", &format!("    x-cutover:\n      name: {service}\n      watch: 1s\n"));
    let api = format!("  api:\n    image: ${{WEB_IMAGE}}\n    ports: [\"${{API_PORT}}:80\"]\n    x-cutover: {{name: {api}, watch: 1s}}\nvolumes:\n");
    example.replacen("volumes:\n  data:", &format!("{api}  data:"), 1)
}

#[test]
fn a_compose_project_as_it_is_gets_zero_downtime_releases() {
    let ids = Ids::new("a_compose_project_as_it_is_gets_zero_downtime_releases");
    require_root();
    require_docker();
    if !Path::new(COMPOSE).exists() || !Path::new("/usr/bin/dig").exists() {
        panic!("install docker-compose and bind9-dnsutils (.ci/provision does)");
    }
    let v1 = demo_image(&ids, "v1", &[("INSPECT", "1")]);
    let v2 = demo_image(&ids, "v2", &[("INSPECT", "1")]);
    let cache_image = demo_image(&ids, "cache", &[]);
    let client = ClientHost::new(&ids);
    let project = format!("p{}", ids.tag.replace(['-', '.'], "").to_lowercase());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    let daemon = Daemon::start(&ids);
    // After the daemon: dropped first, so compose's containers are gone before the
    // daemon's cleanup removes the test's images (an image in use is only untagged).
    let guard = ComposeProject { name: project.clone(), file: file.display().to_string() };
    let port = ids.port();
    let api_port = ids.port();
    let api = format!("a{}", &ids.service[..ids.service.len().min(30)]);
    let api = api[..api.len().min(32)].trim_end_matches('-').to_string();
    write(dir.path(), "compose.yaml", &compose_text(&ids.service, &api));
    let dotenv = |greeting: &str| {
        format!("WEB_IMAGE={v1}\nCACHE_IMAGE={cache_image}\nWEB_PORT={port}\nAPI_PORT={api_port}\nGREETING={greeting}\n")
    };
    write(dir.path(), ".env", &dotenv("hello from .env"));
    write(dir.path(), "web.env", "LOG_LEVEL=debug\n");
    let file_arg = file.to_str().unwrap();

    guard.run(&["up", "-d", "cache"]);
    let out = daemon.cli_ok(&["apply", file_arg, "--project-name", &project]);
    assert!(out.stderr.contains("left to compose: `cache`"), "{}", out.stderr);
    assert!(out.stderr.contains("`depends_on` ignored"), "{}", out.stderr);

    let web1 = format!("cutover-{}-1", ids.service);
    let base = format!("http://{}:{port}", client.host_addr());
    assert_eq!(get_ok(client.at(), &format!("{base}/")), "v1", "the web port answers from another namespace");
    let c = inspect(&web1);
    let published = &c["HostConfig"]["PortBindings"];
    assert!(published.is_null() || published.as_object().is_some_and(|m| m.is_empty()), "Docker published nothing: {published}");
    assert_eq!(c["Config"]["Labels"]["com.docker.compose.project"], project.as_str());
    assert_eq!(c["Config"]["Labels"]["com.docker.compose.service"], "web");
    assert!(c["Config"]["Healthcheck"]["Test"][0] == "CMD", "the compose healthcheck is set: {}", c["Config"]["Healthcheck"]);
    let mounts = c["Mounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["Name"] == format!("{project}_data")), "the named volume is the project's: {mounts:?}");
    // The `.env` and env_file values reached the release.
    assert_eq!(get_ok(client.at(), &format!("{base}/env?name=GREETING")), "hello from .env");
    assert_eq!(get_ok(client.at(), &format!("{base}/env?name=LOG_LEVEL")), "debug");

    // By name, both ways, on the project's network.
    let cache = run(&mut cmd(COMPOSE, ["-p", &project, "-f", file_arg, "ps", "-q", "cache"])).trim().to_string();
    let cache_addr = resolve_in(&web1, "cache");
    assert!(!cache_addr.is_empty(), "the web release resolves `cache`");
    assert_eq!(get_ok(At::container(&web1), &format!("http://{cache_addr}:80/")), "cache");
    let web_addr = resolve_in(&cache, "web");
    assert_eq!(web_addr, c["NetworkSettings"]["Networks"][format!("{project}_default")]["IPAddress"].as_str().unwrap());
    assert_eq!(get_ok(At::container(&cache), &format!("http://{web_addr}:80/")), "v1", "cache reaches the release as `web`");
    let ps = run(&mut cmd(COMPOSE, ["-p", &project, "-f", file_arg, "ps"]));
    assert!(ps.contains(&web1), "docker-compose ps lists the release: {ps}");

    // A new image under load: no request fails.
    let load = new_connection_load(&format!("{base}/"), client.at(), 6);
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    let report = load.wait();
    report.assert_no_failures();
    assert!(report.count("v2") > 0, "v2 answered under load");
    assert_eq!(get_ok(client.at(), &format!("{base}/")), "v2");
    daemon.cli_ok(&["rollback", &ids.service]);
    assert_eq!(get_ok(client.at(), &format!("{base}/")), "v1");

    // An edited `.env` changes web's container only: api keeps its release.
    let releases = |svc: &str| -> u64 {
        let s: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["status", "--json"]).stdout).unwrap();
        let all = s.as_array().or_else(|| s["services"].as_array()).cloned().unwrap_or_default();
        let one = all.iter().find(|x| x["name"] == svc).unwrap_or_else(|| panic!("{svc} in {s}"));
        one["active"].as_u64().unwrap_or(0)
    };
    let (web_before, api_before) = (releases(&ids.service), releases(&api));
    write(dir.path(), ".env", &dotenv("edited"));
    daemon.cli_ok(&["apply", file_arg, "--project-name", &project]);
    assert!(releases(&ids.service) > web_before, "web was redeployed");
    assert_eq!(releases(&api), api_before, "api did not change");
    assert_eq!(get_ok(client.at(), &format!("{base}/env?name=GREETING")), "edited");

    // A key cutover cannot honour: exit 2, file:line:key, nothing changed.
    let text = std::fs::read_to_string(&file).unwrap();
    let bad = text.replacen("    ports:\n", "    container_name: web\n    ports:\n", 1);
    let line = bad.lines().position(|l| l.contains("container_name")).unwrap() + 1;
    write(dir.path(), "compose.yaml", &bad);
    let (web_now, api_now) = (releases(&ids.service), releases(&api));
    let out = daemon.cli_expect(&["apply", file_arg, "--project-name", &project], 2);
    let want = format!("{}:{line}: services.web.container_name", file.display());
    assert!(out.stderr.contains(&want), "`{want}` in {}", out.stderr);
    assert_eq!((releases(&ids.service), releases(&api)), (web_now, api_now), "nothing changed");

    daemon.cli_ok(&["remove", &ids.service, "--volumes"]);
    daemon.cli_ok(&["remove", &api]);
}

#[test]
fn cutover_first_creates_the_network_compose_then_takes_as_its_own_and_refusals_change_nothing() {
    let ids = Ids::new("cutover_first_creates_the_network_compose_then_takes_as_its_own_and_refusals_change_nothing");
    require_root();
    require_docker();
    if !Path::new(COMPOSE).exists() || !Path::new("/usr/bin/dig").exists() {
        panic!("install docker-compose and bind9-dnsutils (.ci/provision does)");
    }
    let v1 = demo_image(&ids, "v1", &[]);
    let cache_image = demo_image(&ids, "cache", &[]);
    let project = format!("q{}", ids.tag.replace(['-', '.'], "").to_lowercase());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    let daemon = Daemon::start(&ids);
    // After the daemon: dropped first, so compose's containers are gone before the
    // daemon's cleanup removes the test's images (an image in use is only untagged).
    let guard = ComposeProject { name: project.clone(), file: file.display().to_string() };
    let port = ids.port();
    let text = format!(
        "services:\n  web:\n    image: {v1}\n    ports: [\"{port}:80\"]\n    restart: always\n    x-cutover: {{name: {}, watch: 1s}}\n  cache:\n    image: {cache_image}\n",
        ids.service
    );
    write(dir.path(), "compose.yaml", &text);
    let file_arg = file.to_str().unwrap();

    // cutover first: it creates `<project>_default` with compose's labels ...
    daemon.cli_ok(&["apply", file_arg, "-p", &project]);
    let net: serde_json::Value =
        serde_json::from_str(&run(&mut cmd(DOCKER, ["network", "inspect", &format!("{project}_default")]))).unwrap();
    assert_eq!(net[0]["Labels"]["com.docker.compose.project"], project.as_str());
    assert_eq!(net[0]["Labels"]["com.docker.compose.network"], "default");
    // ... which compose then uses as its own: `cache` joins it and reaches `web` by name.
    guard.run(&["up", "-d", "cache"]);
    let cache = run(&mut cmd(COMPOSE, ["-p", &project, "-f", file_arg, "ps", "-q", "cache"])).trim().to_string();
    let web_addr = resolve_in(&cache, "web");
    assert_eq!(get_ok(At::container(&cache), &format!("http://{web_addr}:80/")), "v1");

    // Keys cutover cannot honour: exit 2 naming file, line and key; nothing changed.
    let status = || daemon.cli_ok(&["status", "--json"]).stdout;
    let before = status();
    for (edit, key) in [
        ("    build: .\n", "services.web.build"),
        ("    deploy: {replicas: 3}\n", "services.web.deploy.replicas"),
        ("    network_mode: host\n", "services.web.network_mode"),
        ("    container_name: web\n", "services.web.container_name"),
    ] {
        let mut bad = text.replacen("    restart: always\n", &format!("    restart: always\n{edit}"), 1);
        if key.ends_with("build") {
            bad = bad.replacen(&format!("    image: {v1}\n"), "", 1);
        }
        write(dir.path(), "compose.yaml", &bad);
        let line = bad.lines().position(|l| l.starts_with(edit.trim_end())).unwrap() + 1;
        let out = daemon.cli_expect(&["apply", file_arg, "-p", &project], 2);
        let want = format!("{}:{line}: {key}", file.display());
        assert!(out.stderr.contains(&want), "`{want}` in {}", out.stderr);
        assert_eq!(status(), before, "{key}: nothing changed");
    }
    daemon.cli_ok(&["remove", &ids.service]);
}
