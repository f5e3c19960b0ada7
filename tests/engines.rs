//! Acceptance on the engines operators run (issue 16): each engine in its own lab
//! (`lab/engine`: its own network namespace, data root and socket, a client namespace as
//! another host), a cutover daemon in that namespace against the engine's socket. Host
//! clients there are the namespace's own (its `lo`: 127.0.0.1, and `::1` through the
//! daemon's relay; its host addresses).
//!
//! Docker 28.5 (sid) and Podman 5.8 (sid) run every time; Docker 26.1 (trixie) and the
//! host's Docker 20.10 with `CUTOVER_ENGINES=all` (or a list: `docker20,docker26`).
//! Docker 29's nftables firewall is in no Debian suite: its documented ruleset shape is
//! built by hand in a lab whose engine runs with iptables off.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::lab::{engines_under_test, Lab, LabDaemon, HOST_ADDR4, HOST_ADDR6};
use common::*;

const TABLE: &str = "cvlab";
const PORT: u16 = 18080;
const UDP_PORT: u16 = 18053;
const UDP_IN_CONTAINER: u16 = 53;
const SUBNET4: &str = "10.77.0.0/24";
const SUBNET6: &str = "fd77:77::/64";

fn url4(port: u16) -> String {
    format!("http://{HOST_ADDR4}:{port}/")
}

fn url6(port: u16) -> String {
    format!("http://[{HOST_ADDR6}]:{port}/")
}

/// A release serving HTTP on `[::]:80` and UDP on `[::]:53`, both families.
fn image(lab: &Lab, release: &str, extra: &[(&str, &str)]) -> String {
    let udp = format!("[::]:{UDP_IN_CONTAINER}");
    let mut env = vec![("LISTEN", "[::]:80"), ("UDP_LISTEN", udp.as_str())];
    env.extend_from_slice(extra);
    lab.demo_image(&format!("cvlab-demo:{release}"), release, &env)
}

/// cutover's own rules in the lab: its table and its DOCKER-USER accepts, both families.
fn our_rules(lab: &Lab) -> String {
    let mut c = lab.command("nft");
    c.args(["-s", "list", "table", "inet", TABLE]);
    let table = cmd::run_bounded(&mut c, Duration::from_secs(30)).stdout;
    let nat = |tool: &str| {
        let mut c = lab.command(tool);
        c.args(["-w", "-t", "nat", "-S"]);
        cmd::run_bounded(&mut c, Duration::from_secs(30)).stdout.lines().filter(|l| l.contains(TABLE)).collect::<Vec<_>>().join("\n")
    };
    format!(
        "{table}\n{}\n{}\n{}\n{}",
        nat("iptables"),
        nat("ip6tables"),
        lab.iptables_s("iptables", "DOCKER-USER"),
        lab.iptables_s("ip6tables", "DOCKER-USER")
    )
}

/// `::1` in the lab's namespace (where the daemon's relay listens).
fn url_loopback6(port: u16) -> String {
    format!("http://[::1]:{port}/")
}

/// A UDP query stream (a new source port per datagram, as resolvers do) and two HTTP
/// loads (IPv4 and IPv6) from the client host, and one from `::1` on the host (the
/// daemon's relay), across `step`; asserts nothing was lost.
fn under_load(lab: &Lab, what: &str, step: impl FnOnce()) {
    let client = lab.client();
    let http4 = Wrk::new(url4(PORT)).at(client.clone()).duration(Duration::from_secs(7)).connections(4).start();
    let http6 = Wrk::new(url6(PORT)).at(client.clone()).duration(Duration::from_secs(7)).connections(4).start();
    let loopback6 = Wrk::new(url_loopback6(PORT)).at(lab.at()).duration(Duration::from_secs(7)).connections(2).threads(1).start();
    let to4 = SocketAddr::from((HOST_ADDR4.parse::<std::net::Ipv4Addr>().unwrap(), UDP_PORT));
    let to6 = SocketAddr::from((HOST_ADDR6.parse::<std::net::Ipv6Addr>().unwrap(), UDP_PORT));
    let udp4 = UdpClient::start(&lab.client_netns(), to4, Duration::from_millis(50), true);
    let udp6 = UdpClient::start(&lab.client_netns(), to6, Duration::from_millis(50), true);
    std::thread::sleep(Duration::from_secs(1));
    step();
    let (r4, r6, rl) = (http4.wait(), http6.wait(), loopback6.wait());
    let (a4, a6) = (udp4.finish(), udp6.finish());
    eprintln!(
        "{} {what}: http4 {} requests, http6 {} requests, ::1 {} requests, udp4 {} answers, udp6 {}",
        lab.engine,
        r4.requests,
        r6.requests,
        rl.requests,
        a4.len(),
        a6.len()
    );
    r4.assert_no_failures();
    r6.assert_no_failures();
    rl.assert_no_failures();
    assert!(r4.requests > 0 && r6.requests > 0 && rl.requests > 0, "{what}: no HTTP requests went through");
    assert_eq!(lost(&a4), 0, "{} {what}: UDP over IPv4 lost datagrams:\n{}", lab.engine, summary(&a4, Instant::now()));
    assert_eq!(lost(&a6), 0, "{} {what}: UDP over IPv6 lost datagrams:\n{}", lab.engine, summary(&a6, Instant::now()));
}

/// A new UDP flow (a new source port) every 3 ms, both families, from the other host while
/// the engine creates and removes a network eight times: every datagram answered.
fn new_flows_while_networks_come_and_go(lab: &Lab) {
    let to4 = SocketAddr::from((HOST_ADDR4.parse::<std::net::Ipv4Addr>().unwrap(), UDP_PORT));
    let to6 = SocketAddr::from((HOST_ADDR6.parse::<std::net::Ipv6Addr>().unwrap(), UDP_PORT));
    let udp4 = UdpClient::start(&lab.client_netns(), to4, Duration::from_millis(3), true);
    let udp6 = UdpClient::start(&lab.client_netns(), to6, Duration::from_millis(3), true);
    for _ in 0..8 {
        lab.docker(&["network", "create", "--driver", "bridge", "cvchurn"]);
        lab.docker(&["network", "rm", "cvchurn"]);
    }
    let (a4, a6) = (udp4.finish(), udp6.finish());
    eprintln!("{}: new flows while networks were created: udp4 {} answers, udp6 {}", lab.engine, a4.len(), a6.len());
    for (family, answers) in [("IPv4", &a4), ("IPv6", &a6)] {
        assert!(answers.len() > 50, "{}: too few {family} flows to tell: {}", lab.engine, answers.len());
        assert_eq!(
            lost(answers),
            0,
            "{}: new UDP flows over {family} lost datagrams while networks were created:\n{}",
            lab.engine,
            summary(answers, Instant::now())
        );
    }
}

fn acceptance(engine: &str) {
    if !engines_under_test().iter().any(|e| e == engine) {
        eprintln!("{engine}: not in CUTOVER_ENGINES (set CUTOVER_ENGINES=all to run it)");
        return;
    }
    require_root();
    let t0 = Instant::now();
    let short: String = engine.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut lab = Lab::up(&format!("cve{}{short}", &engine[..1]), engine);
    let bridge = format!("cvb{}{short}", std::process::id() % 100_000);
    lab.network("cvnet", &bridge, SUBNET4, SUBNET6);
    // Engines that do not turn on IPv6 forwarding themselves (Podman, Docker before 27
    // without ip6tables) need it, as a host serving IPv6 does.
    lab.sysctl("net.ipv6.conf.all.forwarding", "1");
    let v1 = image(&lab, "v1", &[]);
    let v2 = image(&lab, "v2", &[]);
    let bad = image(&lab, "bad", &[("HEALTH", "fail")]);
    let mut daemon = LabDaemon::start(&lab, TABLE, &[]);
    let log = daemon.log();
    assert!(log.contains("container engine"), "the daemon names its engine at start:\n{log}");
    let manifest = ServiceYaml::http("web", &v1, PORT, "cvnet").udp_port(UDP_PORT, UDP_IN_CONTAINER).deadline("20s").write(daemon.dir());
    daemon.cli_ok(&["apply", manifest.to_str().unwrap()]);
    eprintln!("{engine}: lab up and v1 applied after {:?}", t0.elapsed());

    // 1. Every client path answers v1.
    let client = lab.client();
    assert_eq!(get_ok(client.clone(), &url4(PORT)), "v1", "{engine}: IPv4 client on another host");
    assert_eq!(get_ok(client.clone(), &url6(PORT)), "v1", "{engine}: IPv6 client on another host");
    assert_eq!(get_ok(lab.at(), &format!("http://127.0.0.1:{PORT}/")), "v1", "{engine}: host client on 127.0.0.1");
    assert_eq!(get_ok(lab.at(), &url_loopback6(PORT)), "v1", "{engine}: host client on ::1 (the daemon's relay)");
    assert_eq!(get_ok(lab.at(), &url4(PORT)), "v1", "{engine}: host client on a host address");
    assert_eq!(get_ok(lab.at(), &url6(PORT)), "v1", "{engine}: host client on a host IPv6 address");
    lab.docker(&["run", "-d", "--name", "cvclient", "--network", "cvnet", &v1]);
    let other = lab.container_at("cvclient");
    assert_eq!(get_ok(other.clone(), &url4(PORT)), "v1", "{engine}: another container, IPv4 (hairpin)");
    assert_eq!(get_ok(other.clone(), &url6(PORT)), "v1", "{engine}: another container, IPv6 (hairpin)");
    let to4 = SocketAddr::from((HOST_ADDR4.parse::<std::net::Ipv4Addr>().unwrap(), UDP_PORT));
    let to6 = SocketAddr::from((HOST_ADDR6.parse::<std::net::Ipv6Addr>().unwrap(), UDP_PORT));
    assert_eq!(ask_from_port(&lab.client_netns(), 40001, to4).as_deref(), Some("v1"), "{engine}: UDP over IPv4");
    assert_eq!(ask_from_port(&lab.client_netns(), 40002, to6).as_deref(), Some("v1"), "{engine}: UDP over IPv6");
    let loopback6_udp = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, UDP_PORT));
    assert_eq!(ask_from_port(&lab.name, 40003, loopback6_udp).as_deref(), Some("v1"), "{engine}: host client on ::1, UDP (the daemon's relay)");
    // The engine's IPv6 filtering is met with an ip6tables accept where it has one.
    if lab.iptables_s("ip6tables", "DOCKER-USER").contains("-N DOCKER-USER") {
        assert!(
            lab.iptables_s("ip6tables", "DOCKER-USER").contains(&format!("cutover:{TABLE}")),
            "{engine}: no ip6tables DOCKER-USER accept:\n{}",
            lab.iptables_s("ip6tables", "DOCKER-USER")
        );
    }
    eprintln!("{engine}: every client path answered after {:?}", t0.elapsed());

    // 2. Deploy and rollback under load from the other host, both families, TCP and UDP.
    under_load(&lab, "deploy v2", || {
        daemon.cli_ok(&["deploy", "web", "--image", &v2]);
    });
    assert_eq!(get_ok(client.clone(), &url4(PORT)), "v2");
    assert_eq!(get_ok(lab.at(), &url_loopback6(PORT)), "v2", "{engine}: ::1 moved in the switch");
    assert_eq!(ask_from_port(&lab.name, 40004, loopback6_udp).as_deref(), Some("v2"), "{engine}: UDP over ::1 moved in the switch");
    under_load(&lab, "rollback to v1", || {
        daemon.cli_ok(&["rollback", "web"]);
    });
    assert_eq!(get_ok(client.clone(), &url6(PORT)), "v1");
    eprintln!("{engine}: deploy and rollback under load done after {:?}", t0.elapsed());

    // 2b. New flows while the engine creates networks (a compose project starting): Docker
    //     20.10 takes its FORWARD jump to DOCKER-USER out and back in each time.
    new_flows_while_networks_come_and_go(&lab);
    eprintln!("{engine}: new flows during network creation done after {:?}", t0.elapsed());

    // 3. A refused release leaves cutover's rules unchanged and v1 serving.
    let before = our_rules(&lab);
    let refused = daemon.cli(&["deploy", "web", "--image", &bad]);
    assert_ne!(refused.code, 0, "{engine}: a release failing its health check must be refused");
    assert_eq!(our_rules(&lab), before, "{engine}: the refused release changed the rules");
    assert_eq!(get_ok(client.clone(), &url4(PORT)), "v1");

    // 4. route_localnet switched off by hand is back after a daemon restart; a killed
    //    daemon leaves traffic flowing.
    let key = format!("net.ipv4.conf.{bridge}.route_localnet");
    assert_eq!(lab.sysctl_get(&key), "1", "{engine}: route_localnet on the service's bridge");
    lab.sysctl(&key, "0");
    daemon.kill9();
    assert_eq!(get_ok(client.clone(), &url4(PORT)), "v1", "{engine}: traffic flows while the daemon is down");
    daemon.restart();
    assert_eq!(lab.sysctl_get(&key), "1", "{engine}: route_localnet re-asserted at daemon start");
    assert_eq!(get_ok(lab.at(), &format!("http://127.0.0.1:{PORT}/")), "v1");
    assert_eq!(get_ok(lab.at(), &url_loopback6(PORT)), "v1", "{engine}: the restarted daemon relays ::1 again");

    // 5. `remove` after the network was deleted exits 0.
    lab.docker(&["rm", "-f", "cvclient"]);
    let ours = lab.docker(&["ps", "-aq", "--filter", "label=cutover.service=web"]);
    for id in ours.split_whitespace() {
        lab.docker(&["rm", "-f", id]);
    }
    lab.docker(&["network", "rm", "cvnet"]);
    daemon.cli_ok(&["remove", "web"]);
    eprintln!("{engine}: acceptance passed in {:?}", t0.elapsed());
    drop(daemon);
    drop(lab);
}

#[test]
fn docker28_serves_every_client_path_and_switches_without_loss() {
    acceptance("docker28");
}

#[test]
fn podman5_serves_every_client_path_and_switches_without_loss() {
    acceptance("podman5");
}

#[test]
fn docker26_serves_every_client_path_and_switches_without_loss() {
    acceptance("docker26");
}

#[test]
fn docker20_serves_every_client_path_and_switches_without_loss() {
    acceptance("docker20");
}

/// Docker 29's nftables firewall, by its documented shape: `table ip docker-bridges`
/// whose forward chain drops new connections to a bridge's unpublished ports, and accepts
/// the `bridge-accept-fwmark` mark when daemon.json sets it. The engine of the lab runs
/// with iptables off (so no DOCKER-USER exists); the table is built by hand.
#[test]
fn docker29_nftables_backend_is_refused_without_the_fwmark_and_flows_with_it() {
    require_root();
    let mut lab = Lab::up_with("cve29", "docker28", r#"{"iptables": false, "ip6tables": false}"#);
    let bridge = format!("cvb{}29", std::process::id() % 100_000);
    lab.network("cvnet", &bridge, SUBNET4, SUBNET6);
    lab.sysctl("net.ipv4.ip_forward", "1");
    let v1 = image(&lab, "v1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("daemon.json");

    // Without the option: refused, with the exact line to add.
    docker29_table(&lab, &bridge, None);
    std::fs::write(&json, r#"{"firewall-backend": "nftables"}"#).unwrap();
    let (code, out) = LabDaemon::run_to_exit(&lab, TABLE, &["--docker-config", json.to_str().unwrap()]);
    assert_eq!(code, Some(1), "refused:\n{out}");
    let line = r#"add "bridge-accept-fwmark": "0x20000000/0x20000000" to "#;
    assert!(out.contains(line), "the refusal names the daemon.json line:\n{out}");

    // With it (and the engine's accept rule for it): the daemon starts and traffic flows.
    docker29_table(&lab, &bridge, Some(0x2000_0000));
    std::fs::write(&json, r#"{"firewall-backend": "nftables", "bridge-accept-fwmark": "0x20000000/0x20000000"}"#).unwrap();
    let daemon = LabDaemon::start(&lab, TABLE, &["--docker-config", json.to_str().unwrap()]);
    assert!(daemon.log().contains(r#"firewall="nftables""#), "{}", daemon.log());
    let manifest = ServiceYaml::http("web", &v1, PORT, "cvnet").write(daemon.dir());
    daemon.cli_ok(&["apply", manifest.to_str().unwrap()]);
    assert_eq!(get_ok(lab.client(), &url4(PORT)), "v1", "through Docker 29's forward chain by the mark");
    // The shape really filters: without the engine's mark accept, new connections from
    // the other host are dropped.
    docker29_table(&lab, &bridge, None);
    assert!(curl_within(lab.client(), &url4(PORT), Duration::from_secs(3)).is_err(), "the layout must drop unmarked traffic");
    docker29_table(&lab, &bridge, Some(0x2000_0000));
    assert_eq!(get_ok(lab.client(), &url4(PORT)), "v1");
    drop(daemon);
    drop(lab);
}

/// `table ip docker-bridges` as Docker 29 lays it out for one bridge (the parts that
/// decide forwarding): new connections into the bridge are dropped unless they carry
/// the `bridge-accept-fwmark` mark (when set) or are replies.
fn docker29_table(lab: &Lab, bridge: &str, accept_mark: Option<u32>) {
    let mark_rule = accept_mark.map(|m| format!("meta mark & {m:#x} == {m:#x} counter accept")).unwrap_or_default();
    let script = format!(
        "add table ip docker-bridges\n\
         delete table ip docker-bridges\n\
         table ip docker-bridges {{\n\
           chain filter-forward-in__{bridge} {{\n\
             ct state established,related counter accept\n\
             {mark_rule}\n\
             counter drop comment \"unpublished port\"\n\
           }}\n\
           chain filter-FORWARD {{\n\
             type filter hook forward priority filter; policy accept;\n\
             {mark_rule}\n\
             oifname vmap {{ \"{bridge}\" : jump filter-forward-in__{bridge} }}\n\
           }}\n\
         }}\n"
    );
    let path = std::env::temp_dir().join(format!("cvlab-{}-docker29.nft", lab.name));
    std::fs::write(&path, script).unwrap();
    let mut c = lab.command("nft");
    c.arg("-f").arg(&path);
    let o = cmd::run_bounded(&mut c, Duration::from_secs(30));
    let _ = std::fs::remove_file(&path);
    assert_eq!(o.code, Some(0), "building the Docker 29 layout: {}", o.stderr);
}

/// The engine goes away and comes back (Docker 28: its containers stop with it and the
/// engine restarts the live release, `unless-stopped`): the daemon says so once each
/// way, not every second, and both families reach the release again.
#[test]
fn an_engine_outage_is_logged_once_each_way_and_the_release_answers_again() {
    if !engines_under_test().iter().any(|e| e == "docker28") {
        return;
    }
    require_root();
    let mut lab = Lab::up("cveo28", "docker28");
    let bridge = format!("cvb{}o", std::process::id() % 100_000);
    lab.network("cvnet", &bridge, SUBNET4, SUBNET6);
    let v1 = image(&lab, "v1", &[]);
    let daemon = LabDaemon::start(&lab, TABLE, &[]);
    let manifest = ServiceYaml::http("web", &v1, PORT, "cvnet").write(daemon.dir());
    daemon.cli_ok(&["apply", manifest.to_str().unwrap()]);
    assert_eq!(get_ok(lab.client(), &url6(PORT)), "v1");
    let count = |what: &str| daemon.log().matches(what).count();

    lab.engine("stop");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(count("the container engine went away"), 1, "once while it is down:\n{}", daemon.log());
    assert_eq!(count("the container engine is back"), 0);
    lab.engine("start");
    wait_for("the release to answer over IPv4 and IPv6 again", Duration::from_secs(60), || {
        match (curl(lab.client(), &url4(PORT)), curl(lab.client(), &url6(PORT))) {
            (Ok((200, a)), Ok((200, b))) if a.trim() == "v1" && b.trim() == "v1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(count("the container engine went away"), 1, "{}", daemon.log());
    assert_eq!(count("the container engine is back"), 1, "{}", daemon.log());
    drop(daemon);
    drop(lab);
}

// route_localnet: deploy's `assert_host` claims each bridge on every call (a marker per
// daemon table, `crate::localnet`), and `remove` releases the claim.

/// route_localnet switched off by hand on a service's bridge is back after the next deploy.
#[test]
fn route_localnet_switched_off_by_hand_is_back_after_the_next_deploy() {
    require_root();
    let mut lab = Lab::up("cvel28", "docker28");
    let bridge = format!("cvb{}l", std::process::id() % 100_000);
    lab.network("cvnet", &bridge, SUBNET4, SUBNET6);
    let (v1, v2) = (image(&lab, "v1", &[]), image(&lab, "v2", &[]));
    let daemon = LabDaemon::start(&lab, TABLE, &[]);
    let manifest = ServiceYaml::http("web", &v1, PORT, "cvnet").write(daemon.dir());
    daemon.cli_ok(&["apply", manifest.to_str().unwrap()]);
    let key = format!("net.ipv4.conf.{bridge}.route_localnet");
    lab.sysctl(&key, "0");
    daemon.cli_ok(&["deploy", "web", "--image", &v2]);
    assert_eq!(lab.sysctl_get(&key), "1", "route_localnet re-asserted by the deploy");
    assert_eq!(get_ok(lab.at(), &format!("http://127.0.0.1:{PORT}/")), "v2");
    drop(daemon);
    drop(lab);
}

/// Two daemons (two tables) with services behind one bridge: when one removes its last
/// service, the other's 127.0.0.1 path keeps working; the last one restores the flag.
#[test]
fn two_daemons_on_one_bridge_keep_each_others_localhost_path() {
    require_root();
    let mut lab = Lab::up("cvet28", "docker28");
    let bridge = format!("cvb{}t", std::process::id() % 100_000);
    lab.network("cvnet", &bridge, SUBNET4, SUBNET6);
    let v1 = image(&lab, "v1", &[]);
    let key = format!("net.ipv4.conf.{bridge}.route_localnet");
    let original = lab.sysctl_get(&key);
    let a = LabDaemon::start(&lab, "cvla", &[]);
    let b = LabDaemon::start(&lab, "cvlb", &[]);
    let ma = ServiceYaml::http("a", &v1, PORT, "cvnet").write(a.dir());
    let mb = ServiceYaml::http("b", &v1, PORT + 1, "cvnet").write(b.dir());
    a.cli_ok(&["apply", ma.to_str().unwrap()]);
    b.cli_ok(&["apply", mb.to_str().unwrap()]);
    a.cli_ok(&["remove", "a"]);
    assert_eq!(lab.sysctl_get(&key), "1", "b still needs route_localnet");
    assert_eq!(get_ok(lab.at(), &format!("http://127.0.0.1:{}/", PORT + 1)), "v1");
    b.cli_ok(&["remove", "b"]);
    assert_eq!(lab.sysctl_get(&key), original, "the value from before either daemon");
    drop((a, b));
    drop(lab);
}
