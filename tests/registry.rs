//! Acceptance of issue 14, part 2: images pulled from a private registry. A real registry
//! (Debian's `docker-registry`, distribution 2.8) with htpasswd auth runs on a loopback
//! port of the test; the image is pushed there and removed from the host, so the deploy
//! must pull it, with the credentials `docker login` stored. Every way a pull fails exits 1
//! with the cause and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cmd::cmd;
use common::*;

const USER: &str = "deployer";
const PASSWORD: &str = "pw-never-logged-7f3a";

/// A registry of the test on 127.0.0.1:`port`, killed (and its storage removed) on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(port: u16) -> Registry {
        for tool in ["/usr/bin/docker-registry", "/usr/bin/htpasswd"] {
            assert!(Path::new(tool).exists(), "{tool} is missing: run .ci/provision (docker-registry, apache2-utils)");
        }
        let dir = tempfile::Builder::new().prefix("cutover-registry-").tempdir().unwrap();
        let htpasswd = run(&mut cmd("htpasswd", ["-Bbn", USER, PASSWORD]));
        std::fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: 127.0.0.1:{port}\n\
             auth:\n  htpasswd:\n    realm: cutover-test\n    path: {root}/htpasswd\n",
            root = dir.path().display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let reg = Registry { child, port, _dir: dir };
        wait_for("the registry to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop).map_err(|e| e.to_string())
        });
        reg
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes image references of the test on drop.
struct ImageRefs(Vec<String>);

impl Drop for ImageRefs {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = try_run(&mut cmd(DOCKER, ["rmi", "-f", r]));
        }
    }
}

/// A docker client config folder with credentials for `host` (as `docker login` writes
/// them; `password` may be wrong on purpose).
fn login(dir: &Path, host: &str, password: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = Command::new(DOCKER);
    c.env("DOCKER_CONFIG", dir).args(["login", host, "-u", USER, "--password-stdin"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "docker login: {}", String::from_utf8_lossy(&out.stderr));
}

/// Wrong credentials written the way `docker login` stores them (login itself would
/// refuse them).
fn store_wrong_password(dir: &Path, host: &str) {
    let auth = base64(&format!("{USER}:wrong-password"));
    std::fs::write(dir.join("config.json"), format!("{{\"auths\": {{\"{host}\": {{\"auth\": \"{auth}\"}}}}}}")).unwrap();
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A server that accepts connections and never answers: a registry that hangs.
fn silent_server() -> (u16, std::thread::JoinHandle<()>, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(120);
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (port, t, stop)
}

#[test]
fn deploys_pull_from_a_private_registry_and_failed_pulls_change_nothing() {
    let ids = Ids::new("deploys_pull_from_a_private_registry_and_failed_pulls_change_nothing");
    require_root();
    require_docker();
    let registry = Registry::start(ids.port());
    let host = registry.host();
    let client_config: PathBuf = std::env::temp_dir().join(format!("cutover-dockercfg-{}", ids.tag));
    let _cfg_cleanup = scopeguard(client_config.clone());
    login(&client_config, &host, PASSWORD);

    // Release 2 exists only in the registry.
    let v2_local = demo_image(&ids, "v2", &[]);
    let remote = format!("{host}/cutover-test/{}:v2", ids.service);
    let _refs = ImageRefs(vec![remote.clone(), v2_local.clone()]);
    run(&mut cmd(DOCKER, ["tag", &v2_local, &remote]));
    let push = Command::new(DOCKER).env("DOCKER_CONFIG", &client_config).args(["push", &remote]).output().unwrap();
    assert!(push.status.success(), "docker push: {}", String::from_utf8_lossy(&push.stderr));
    run(&mut cmd(DOCKER, ["rmi", &remote, &v2_local]));
    assert!(!image_exists(&remote), "the image is only in the registry now");

    let net = DockerNetwork::new(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let client = ClientHost::new(&ids);
    // The daemon reads the credentials as `docker login` stored them for its user.
    // SAFETY of the env change: nextest runs each test in its own process, and nothing
    // else in this one reads the environment concurrently.
    std::env::set_var("DOCKER_CONFIG", &client_config);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let file = ServiceYaml::http(&ids.service, &v1, port, &net.name).write(daemon.dir());
    daemon.cli_ok(&["apply", file.to_str().unwrap()]);
    let url = format!("http://{}:{port}/", client.host_addr());
    assert_eq!(get_ok(client.at(), &url).trim(), "v1");
    let rules = nft_table_text(&ids.table);
    let containers = containers_of(&ids);

    // Every failed pull: exit 1 within 60 s naming the cause; v1 serves; nothing changed.
    let (silent_port, silent, stop_silent) = silent_server();
    let silent_image = format!("127.0.0.1:{silent_port}/cutover-test/web:v2");
    let missing = format!("{host}/cutover-test/{}:v9", ids.service);
    // (what, deploy arguments, what to do first, words the message must have)
    type Case<'a> = (&'a str, Vec<String>, Box<dyn Fn() + 'a>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "wrong credentials",
            vec!["--image".into(), remote.clone()],
            Box::new(|| store_wrong_password(&client_config, &host)),
            vec!["refused the credentials", "docker login"],
        ),
        ("an image the registry does not have", vec!["--image".into(), missing.clone()], Box::new(|| login(&client_config, &host, PASSWORD)), vec!["has no such image", "v9"]),
        ("a registry that does not answer", vec!["--image".into(), silent_image.clone()], Box::new(|| {}), vec!["cannot be reached|did not answer"]),
        (
            "pull: never and the image is missing",
            vec!["--image".into(), remote.clone(), "--pull".into(), "never".into()],
            Box::new(|| {}),
            vec!["not on this host", "never"],
        ),
    ];
    for (what, args, prepare, words) in cases {
        prepare();
        let mut argv = vec!["deploy", ids.service.as_str()];
        argv.extend(args.iter().map(String::as_str));
        let began = Instant::now();
        let out = daemon.cli_expect(&argv, 1);
        let took = began.elapsed();
        eprintln!("{what}: exit 1 after {took:?}: {}", out.stderr.trim());
        assert!(took < Duration::from_secs(60), "{what}: exit 1 only after {took:?}");
        for w in words {
            // `a|b`: either wording (the engine's own timeout or cutover's may come first).
            assert!(w.split('|').any(|w| out.stderr.contains(w)), "{what}: the message names `{w}`: {}", out.stderr);
        }
        assert_eq!(get_ok(client.at(), &url).trim(), "v1", "{what}: v1 still serves");
        assert_eq!(nft_table_text(&ids.table), rules, "{what}: the rules did not change");
        assert_eq!(containers_of(&ids), containers, "{what}: no container was created or removed");
    }
    stop_silent.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = silent.join();

    // The image only in the registry, pulled under load from another namespace.
    let load = new_connection_load(&url, client.at(), 12);
    std::thread::sleep(Duration::from_secs(1));
    let out = daemon.cli_ok(&["deploy", &ids.service, "--image", &remote]);
    let report = load.wait();
    report.assert_no_failures();
    assert!(out.stdout.contains("release 2"), "no release number was spent by the failures: {out:?}");
    assert!(out.stderr.contains(&format!("pulling {remote}")), "progress was shown: {}", out.stderr);
    assert_eq!(get_ok(client.at(), &url).trim(), "v2");
    assert!(!daemon.log().contains(PASSWORD), "the password never reaches the log");

    // `--pull always --json`: the pull again, its progress as JSON events on stderr.
    let out = daemon.cli_ok(&["deploy", &ids.service, "--image", &remote, "--pull", "always", "--json"]);
    let events: Vec<serde_json::Value> = out.stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        events.iter().any(|e| e["progress"]["step"] == "pull"),
        "the pull's progress came as JSON events: {}",
        out.stderr
    );
    let outcome: serde_json::Value = serde_json::from_str(&out.stdout).expect("the outcome is JSON on stdout");
    assert_eq!(outcome["to"], 3, "{outcome}");

    // Rollback needs no pull while the kept container exists: with the registry gone.
    drop(registry);
    daemon.cli_ok(&["rollback", &ids.service, "--to", "1"]);
    assert_eq!(get_ok(client.at(), &url).trim(), "v1");
}

/// Removes a folder on drop.
fn scopeguard(dir: PathBuf) -> impl Drop {
    struct G(PathBuf);
    impl Drop for G {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    G(dir)
}
