//! Acceptance of issue 14, part 1: the whole container an operator defines (volumes, env
//! files, user, limits, labels, logging) reaches every release, data in a named volume
//! outlives releases, and bad values are refused before anything changes. Real Docker
//! engine, real kernel rules, clients in another namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::cmd::{cmd, output};
use common::*;

/// `docker inspect` of a container, as JSON.
fn inspect(container: &str) -> serde_json::Value {
    let out = run(&mut cmd(DOCKER, ["inspect", container]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// Removes a Docker volume of the test on drop (also when an assertion failed).
struct VolumeGuard(String);

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let _ = try_run(&mut cmd(DOCKER, ["volume", "rm", "-f", &self.0]));
    }
}

fn volume_exists(name: &str) -> bool {
    output(&mut cmd(DOCKER, ["volume", "inspect", name])).is_ok_and(|o| o.success())
}

fn write(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The manifest of the test's service: every container field the acceptance names.
fn service(ids: &Ids, image: &str, port: u16, network: &str, volume: &str) -> ServiceYaml {
    ServiceYaml::http(&ids.service, image, port, network)
        .set("volumes", &format!("\n  - {volume}:/data\n  - ./conf:/etc/app:ro"))
        .set("env_file", "web.env")
        .set("environment", "\n  GREETING: hello\n  DB_USER: from-manifest")
        .set("user", "\"1000:1000\"")
        .set("mem_limit", "64m")
        .set("labels", "\n  team: web\n  tier: front")
        .set("logging", "\n  driver: json-file\n  options:\n    max-size: 1m\n    max-file: \"2\"")
}

#[test]
fn the_whole_container_reaches_every_release_and_the_volume_outlives_them() {
    let ids = Ids::new("the_whole_container_reaches_every_release_and_the_volume_outlives_them");
    let TwoReleases { net, v1, v2, client } = two_releases_with(&ids, &[("INSPECT", "1")]);
    let daemon = Daemon::start(&ids);
    let volume = format!("{}-data", ids.tag);
    let _volume_guard = VolumeGuard(volume.clone());
    let port = ids.port();
    let dir = daemon.dir();
    write(dir, "conf/app.toml", "greeting = \"hi\"\n");
    write(dir, "web.env", "# secrets\nDB_USER=app\nDB_PASSWORD=s3cret\n\nexport REGION=eu-1\n");
    let file = service(&ids, &v1, port, &net.name, &volume).write(dir);
    daemon.cli_ok(&["apply", file.to_str().unwrap()]);

    let base = format!("http://{}:{port}", client.host_addr());
    let get = |path: &str| get_ok(client.at(), &format!("{base}{path}"));

    // What Docker was asked for, release by release.
    let check_release = |n: u32| {
        let c = inspect(&format!("cutover-{}-{n}", ids.service));
        assert_eq!(c["Config"]["User"], "1000:1000", "release {n}");
        assert_eq!(c["HostConfig"]["Memory"], 64 << 20, "release {n}");
        assert_eq!(c["HostConfig"]["LogConfig"]["Type"], "json-file", "release {n}");
        assert_eq!(c["HostConfig"]["LogConfig"]["Config"]["max-size"], "1m", "release {n}");
        assert_eq!(c["HostConfig"]["LogConfig"]["Config"]["max-file"], "2", "release {n}");
        assert_eq!(c["Config"]["Labels"]["team"], "web", "release {n}");
        assert_eq!(c["Config"]["Labels"]["tier"], "front", "release {n}");
        assert_eq!(c["Config"]["Labels"]["cutover.release"], n.to_string(), "cutover's own labels stay");
        let mounts = c["Mounts"].as_array().unwrap();
        let data = mounts.iter().find(|m| m["Destination"] == "/data").expect("the volume is mounted");
        assert_eq!((data["Type"].as_str(), data["Name"].as_str(), data["RW"].as_bool()), (Some("volume"), Some(volume.as_str()), Some(true)));
        let conf = mounts.iter().find(|m| m["Destination"] == "/etc/app").expect("the config is mounted");
        assert_eq!(conf["Type"], "bind");
        assert_eq!(conf["Source"], dir.join("conf").display().to_string(), "./conf is relative to the manifest");
        assert_eq!(conf["RW"], false, "read-only");
        let env: Vec<&str> = c["Config"]["Env"].as_array().unwrap().iter().filter_map(|e| e.as_str()).collect();
        assert!(env.contains(&"DB_PASSWORD=s3cret") && env.contains(&"REGION=eu-1"), "{env:?}");
        assert!(env.contains(&"DB_USER=from-manifest"), "the manifest's environment wins over the env file: {env:?}");
    };
    check_release(1);

    // What the application sees.
    let id = get("/id");
    assert!(id.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("1000")), "{id}");
    assert_eq!(get("/env?name=DB_PASSWORD"), "s3cret");
    assert_eq!(get("/env?name=GREETING"), "hello");
    assert_eq!(get("/file?path=/etc/app/app.toml"), "greeting = \"hi\"");
    let ro = curl(client.at(), &format!("{base}/write?path=/etc/app/x&body=no")).unwrap();
    assert_eq!(ro.0, 500, "the bind mount is read-only: {ro:?}");
    // The volume: created by cutover, labelled as the service's.
    let vol: serde_json::Value = serde_json::from_str(&run(&mut cmd(DOCKER, ["volume", "inspect", &volume]))).unwrap();
    assert_eq!(vol[0]["Labels"]["cutover.service"], ids.service.as_str());
    assert_eq!(get("/write?path=/data/note&body=written-by-v1"), "written");

    // Release 2 reads what release 1 wrote, and gets the same container.
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    assert_eq!(get("/"), "v2");
    check_release(2);
    assert_eq!(get("/file?path=/data/note"), "written-by-v1");
    assert_eq!(get("/write?path=/data/note&body=written-by-v2"), "written");
    // And release 1, back after a rollback, reads what release 2 wrote.
    daemon.cli_ok(&["rollback", &ids.service]);
    assert_eq!(get("/"), "v1");
    assert_eq!(get("/file?path=/data/note"), "written-by-v2");

    // A changed container field in `apply` is a new release, like a changed image.
    let changed = service(&ids, &v1, port, &net.name, &volume).set("mem_limit", "96m").write(dir);
    let out = daemon.cli_ok(&["apply", changed.to_str().unwrap()]);
    assert!(out.stdout.contains("release 3"), "{out:?}");
    assert_eq!(inspect(&format!("cutover-{}-3", ids.service))["HostConfig"]["Memory"], 96 << 20);
    // Applying the same file again changes nothing.
    let same = daemon.cli_ok(&["apply", changed.to_str().unwrap(), "--json"]);
    assert!(!same.stdout.contains("\"to\":4"), "{same:?}");

    // `remove` keeps the volume; a new apply finds the data; `remove --volumes` deletes it.
    daemon.cli_ok(&["remove", &ids.service]);
    assert!(volume_exists(&volume), "remove keeps the named volume");
    daemon.cli_ok(&["apply", changed.to_str().unwrap()]);
    assert_eq!(get("/file?path=/data/note"), "written-by-v2", "the data outlived the service");
    let out = daemon.cli_ok(&["remove", &ids.service, "--volumes"]);
    assert!(out.stdout.contains(&volume), "{out:?}");
    assert!(!volume_exists(&volume), "remove --volumes deleted the volume");
}

#[test]
fn invalid_container_fields_exit_2_with_file_line_and_field_and_change_nothing() {
    let ids = Ids::new("invalid_container_fields_exit_2_with_file_line_and_field_and_change_nothing");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let dir = daemon.dir();
    let base = ServiceYaml::http(&ids.service, &v1, port, &net.name);
    let line_of = |text: &str, key: &str| text.lines().position(|l| l.trim_start().starts_with(&format!("{key}:"))).unwrap() + 1;
    for (key, value, field, why) in [
        ("volumes", "\n  - conf/app.toml:/etc/app.toml", "volumes[0]", "./conf/app.toml"),
        ("mem_limit", "lots", "mem_limit", "not a size"),
        ("env_file", "missing.env", "env_file", "missing.env"),
        ("cpus", "many", "cpus", "number of CPUs"),
        ("ulimit", "\n  nofile: 1", "ulimit", "unknown field"),
    ] {
        let yaml = base.clone().set(key, value);
        let file = yaml.write(dir);
        let out = daemon.cli_expect(&["apply", file.to_str().unwrap()], 2);
        let line = line_of(&yaml.text(), key);
        let where_ = format!("{}:{line}", file.display());
        assert!(out.stderr.contains(&where_), "{key}: the error names {where_}: {}", out.stderr);
        assert!(out.stderr.contains(field) && out.stderr.contains(why), "{key}: the error names {field} and why: {}", out.stderr);
        // `plan` refuses it the same way, without a daemon.
        let plan = daemon.cli_expect(&["plan", file.to_str().unwrap()], 2);
        assert!(plan.stderr.contains(&where_), "{}", plan.stderr);
    }
    assert!(containers_of(&ids).is_empty(), "no container was created");
    assert_eq!(nft_table_text(&ids.table), None, "no rule was installed");
    let status = daemon.cli_ok(&["status", "--json"]);
    assert_eq!(status.stdout.trim(), "[]", "no service was registered");
}
