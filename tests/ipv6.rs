//! Acceptance of IPv6 (issue 6): a service on a user-defined Docker network created with
//! IPv6, clients in another namespace over IPv6, a deploy under their load.
//!
//! Engine 20.10 needs nothing in daemon.json for this: `docker network create --ipv6
//! --subnet fd..::/64` gives containers a global IPv6 address, and cutover does its own
//! NAT (Docker's `ip6tables` option only matters for Docker's own port publishing). The
//! host must forward IPv6; the test turns that on and restores it.
//!
//! A dual-stack UDP service: an IPv6 flow holds the old release's drain like an IPv4 one,
//! and its conntrack entry is deleted before the old release stops, so its next datagram
//! reaches the new release.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;

/// Unique ULA /64s of this test: one for the Docker network, one for the client link.
fn ula(ids: &Ids, which: u16) -> Ipv6Addr {
    let h = common::ids::fnv1a(&ids.tag);
    Ipv6Addr::new(0xfd63, 0x7574, (h & 0xffff) as u16, which, 0, 0, 0, 0)
}

/// A Docker bridge network with IPv6, removed on drop.
struct V6Network {
    name: String,
}

impl V6Network {
    fn new(ids: &Ids, subnet6: Ipv6Addr) -> V6Network {
        V6Network::named(ids, ids.network(), ids.bridge(), subnet6)
    }

    /// A second network of the test (its name and bridge end in `b`).
    fn second(ids: &Ids, subnet6: Ipv6Addr) -> V6Network {
        V6Network::named(ids, format!("{}-b", ids.network()), format!("{}b", ids.bridge()), subnet6)
    }

    fn named(ids: &Ids, name: String, bridge: String, subnet6: Ipv6Addr) -> V6Network {
        let net = V6Network { name };
        run(std::process::Command::new(DOCKER).args([
            "network",
            "create",
            "--driver",
            "bridge",
            "--ipv6",
            "--subnet",
            &format!("{subnet6}/64"),
            "--label",
            &format!("{INSTANCE_LABEL}={}", ids.tag),
            "-o",
            &format!("com.docker.network.bridge.name={bridge}"),
            &net.name,
        ]));
        net
    }
}

impl Drop for V6Network {
    fn drop(&mut self) {
        let _ = try_run(std::process::Command::new(DOCKER).args(["network", "rm", &self.name]));
    }
}

/// Give the client host's link an IPv6 /64: host side `::1`, namespace side `::2`, and a
/// default route over it. `nodad`: usable at once, no duplicate detection wait.
fn add_ipv6(client: &ClientHost, link: Ipv6Addr) -> (Ipv6Addr, Ipv6Addr) {
    let s = link.segments();
    let host = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 1);
    let ns = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 2);
    let steps: [Vec<String>; 3] = [
        vec!["-6".into(), "addr".into(), "add".into(), format!("{host}/64"), "dev".into(), client.veth().into(), "nodad".into()],
        vec!["-n".into(), client.name().into(), "-6".into(), "addr".into(), "add".into(), format!("{ns}/64"), "dev".into(), "eth0".into(), "nodad".into()],
        vec!["-n".into(), client.name().into(), "-6".into(), "route".into(), "add".into(), "default".into(), "via".into(), host.to_string()],
    ];
    for step in steps {
        run(std::process::Command::new("ip").args(&step));
    }
    (host, ns)
}


#[test]
fn ipv6_clients_reach_v1_then_v2_across_a_deploy() {
    let ids = Ids::new("ipv6_clients_reach_v1_then_v2_across_a_deploy");
    require_root();
    require_docker();
    let _forwarding = ipv6_forwarding_on();
    let net = V6Network::new(&ids, ula(&ids, 1));
    // The server must listen on IPv6 too; `[::]` also takes IPv4 (v4-mapped).
    let v1 = demo_image(&ids, "v1", &[("LISTEN", "[::]:80")]);
    let v2 = demo_image(&ids, "v2", &[("LISTEN", "[::]:80")]);
    let client = ClientHost::new(&ids);
    let (host6, _) = add_ipv6(&client, ula(&ids, 2));
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));

    let table = nft_table_text(&ids.table).expect("table");
    let prefix = format!("{:x}:{:x}:{:x}:1:", 0xfd63, 0x7574, common::ids::fnv1a(&ids.tag) & 0xffff);
    let element = match test_backend().as_deref() {
        Some("iptables") => format!("--dport {port} -j DNAT --to-destination [{prefix}"),
        _ => format!("tcp . {port} : {prefix}"),
    };
    assert!(table.contains(&element), "an IPv6 element for the release:\n{table}");

    let url6 = format!("http://[{host6}]:{port}/");
    let url4 = client.url(port);
    assert_eq!(get_ok(client.at(), &url6).trim(), "v1");
    assert_eq!(get_ok(client.at(), &url4).trim(), "v1");

    let run = Wrk::new(&url6)
        .at(client.at())
        .duration(Duration::from_secs(10))
        .connections(4)
        .threads(1)
        .timeout(Duration::from_secs(5))
        .start();
    std::thread::sleep(Duration::from_secs(1));
    daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    for i in 0..20 {
        let body = get_ok(client.at(), &url6);
        assert_eq!(body.trim(), "v2", "IPv6 request {i} after the switch");
    }
    assert_eq!(get_ok(client.at(), &url4).trim(), "v2", "IPv4 moved in the same switch");
    let report = run.wait();
    report.assert_no_failures();
    assert!(report.count("v1") > 0 && report.count("v2") > 0, "both releases answered IPv6 clients: {:?}", report.bodies);
}

const UDP_PORT_IN_CONTAINER: u16 = 53;

/// A demo release serving HTTP on `[::]:80` and UDP on `[::]:53` (both families).
fn dual_stack_udp_image(ids: &Ids, release: &str) -> String {
    let udp = format!("[::]:{UDP_PORT_IN_CONTAINER}");
    demo_image(ids, release, &[("LISTEN", "[::]:80"), ("UDP_LISTEN", udp.as_str())])
}

#[test]
fn ipv6_udp_flows_drain_and_move_to_the_new_release() {
    let ids = Ids::new("ipv6_udp_flows_drain_and_move_to_the_new_release");
    require_root();
    require_docker();
    let _forwarding = ipv6_forwarding_on();
    let net = V6Network::new(&ids, ula(&ids, 1));
    let v1 = dual_stack_udp_image(&ids, "v1");
    let v2 = dual_stack_udp_image(&ids, "v2");
    let v3 = dual_stack_udp_image(&ids, "v3");
    let client = ClientHost::new(&ids);
    let (host6, _) = add_ipv6(&client, ula(&ids, 2));
    let daemon = Daemon::start(&ids);
    let (tcp, udp) = (ids.port(), ids.port());
    let drain_timeout = Duration::from_secs(6);
    let file = ServiceYaml::http(&ids.service, &v1, tcp, &net.name)
        .udp_port(udp, UDP_PORT_IN_CONTAINER)
        .set("watch", "1s")
        .set("keep", "3")
        .set("drain_timeout", "6s")
        .set("udp_idle", "1s")
        .write(daemon.dir());
    daemon.cli_ok(&["apply", file.to_str().unwrap()]);
    let to = SocketAddr::from((host6, udp));
    // The apply returned after the new bridge's duplicate address detection: IPv6
    // answers at once (see ipv6_new_flows_are_answered_right_after_each_switch).
    assert_eq!(ask_from_port(client.name(), 0, to).as_deref(), Some("v1"), "v1 answers over IPv6 UDP");

    // 1. A busy IPv6 flow and IPv6 DNS-like queries across the switch: held by the old
    //    release to the drain timeout, then moved, as over IPv4.
    let run = DeployUnderDatagrams::run(client.name(), to, || {
        daemon.cli_ok(&["deploy", &ids.service, "--image", &v2]);
    });
    run.assert_busy_flow_held_then_moved("v1", "v2", drain_timeout);

    // 2. An idle IPv6 flow (a fixed source port, so a later datagram is the same flow):
    //    the drain ends after udp_idle, and its next datagram reaches the new release.
    assert_idle_flow_moves(client.name(), ids.port(), to, ("v2", "v3"), drain_timeout, || {
        daemon.cli_ok(&["deploy", &ids.service, "--image", &v3]);
    });
}

/// A new Docker network's bridge runs duplicate address detection on its IPv6 addresses
/// (the gateway, fe80::1) when its first container joins: for a second or two the host
/// cannot forward IPv6 to that container, while IPv4 and the health check already work.
/// cutover holds the switch until the path is usable, so IPv6 clients opening new flows
/// right after it (fresh-socket UDP queries, TCP connections) all get answers at once:
/// after the first release on a new network, after a deploy onto another new network,
/// and after the rollback.
#[test]
fn ipv6_new_flows_are_answered_right_after_each_switch() {
    let ids = Ids::new("ipv6_new_flows_are_answered_right_after_each_switch");
    require_root();
    require_docker();
    let _forwarding = ipv6_forwarding_on();
    let net_a = V6Network::new(&ids, ula(&ids, 1));
    let net_b = V6Network::second(&ids, ula(&ids, 3));
    let v1 = dual_stack_udp_image(&ids, "v1");
    let v2 = dual_stack_udp_image(&ids, "v2");
    let client = ClientHost::new(&ids);
    let (host6, _) = add_ipv6(&client, ula(&ids, 2));
    let daemon = Daemon::start(&ids);
    let (tcp, udp) = (ids.port(), ids.port());
    let service = |image: &str, network: &str| {
        ServiceYaml::http(&ids.service, image, tcp, network)
            .udp_port(udp, UDP_PORT_IN_CONTAINER)
            .set("watch", "1s")
            .set("drain_timeout", "3s")
            .set("udp_idle", "1s")
            .write(daemon.dir())
    };
    let (to_udp, to_tcp) = (SocketAddr::from((host6, udp)), SocketAddr::from((host6, tcp)));

    // 1. The first release, on a network no container used before.
    let file = service(&v1, &net_a.name);
    let out = daemon.cli_ok(&["apply", file.to_str().unwrap()]);
    let switched = Instant::now();
    // The wait was for the new bridge, and the progress said so.
    let waited = "waiting for IPv6: duplicate address detection of the host's";
    let bridge = format!(" on {}", ids.bridge());
    assert!(out.stderr.lines().any(|l| l.contains(waited) && l.contains(&bridge)), "{waited:?}{bridge:?} in:\n{}", out.stderr);
    let flows = NewFlows::start(client.name(), to_udp, to_tcp);
    std::thread::sleep(Duration::from_millis(1500));
    flows.finish().assert_all_answered("right after the first release", switched, "v1");

    // 2. A deploy onto another new network: the switch happens while the clients send.
    let flows = NewFlows::start(client.name(), to_udp, to_tcp);
    std::thread::sleep(Duration::from_millis(500));
    let file = service(&v2, &net_b.name);
    daemon.cli_ok(&["apply", file.to_str().unwrap()]);
    let deployed = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    flows.finish().assert_all_answered("across the deploy onto a new network", deployed, "v2");

    // 3. The rollback to release 1, back on the first network.
    let flows = NewFlows::start(client.name(), to_udp, to_tcp);
    std::thread::sleep(Duration::from_millis(500));
    daemon.cli_ok(&["rollback", &ids.service]);
    let rolled_back = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    flows.finish().assert_all_answered("across the rollback", rolled_back, "v1");
}

/// The address states cutover waits on and refuses for, read from a real kernel: an
/// address added with duplicate address detection is tentative at first, then usable; one
/// that the other end of the link already has fails detection, and the release would be
/// refused naming it.
#[test]
fn duplicate_address_detection_states_are_read_from_the_kernel() {
    use cutover::dad::{self, DadState, Ipv6Readiness};
    let ids = Ids::new("duplicate_address_detection_states_are_read_from_the_kernel");
    require_root();
    let client = ClientHost::new(&ids);
    let s = ula(&ids, 4).segments();
    let (dup, fresh) = (Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 7), Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 8));
    let ns = format!("/run/netns/{}", client.name());
    let in_ns = || cutover::netns::in_netns_path(&ns, dad::ipv6_addresses_in_current_netns).unwrap().unwrap();
    let state = |addrs: &[dad::Ipv6Address], a: Ipv6Addr| addrs.iter().find(|x| x.addr == a).map(|x| x.state);
    run(std::process::Command::new("ip").args(["-6", "addr", "add", &format!("{dup}/64"), "dev", client.veth(), "nodad"]));
    run(std::process::Command::new("ip").args(["-n", client.name(), "-6", "addr", "add", &format!("{fresh}/64"), "dev", "eth0"]));
    let container = in_ns();
    assert_eq!(state(&container, fresh), Some(DadState::Tentative));
    let host = dad::ipv6_addresses_in_current_netns().unwrap();
    let r = dad::readiness(fresh, &container, &host, dad::interface_name);
    let waiting = format!("duplicate address detection of {fresh} in the container");
    assert!(matches!(&r, Ipv6Readiness::Waiting(w) if w.starts_with(&waiting)), "{r:?}");

    run(std::process::Command::new("ip").args(["-n", client.name(), "-6", "addr", "add", &format!("{dup}/64"), "dev", "eth0"]));
    // The host's new veth runs detection on its link-local address too.
    wait_for("detection to end on both sides", Duration::from_secs(10), || {
        let c = in_ns();
        let host = dad::ipv6_addresses_in_current_netns().unwrap();
        match (dad::readiness(fresh, &c, &host, dad::interface_name), state(&c, dup)) {
            (Ipv6Readiness::Usable, Some(DadState::Failed)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let container = in_ns();
    let host = dad::ipv6_addresses_in_current_netns().unwrap();
    let Ipv6Readiness::Failed(why) = dad::readiness(dup, &container, &host, dad::interface_name) else { panic!("not failed") };
    assert!(why.contains(&format!("{dup} failed duplicate address detection")), "{why}");
}

/// `cutover deploy SERVICE --image IMAGE` in a thread: its output and how long it took.
fn deploy_in_background(daemon: &Daemon, service: &str, image: &str) -> std::thread::JoinHandle<(std::process::Output, Duration)> {
    let socket = daemon.socket().to_path_buf();
    let (service, image) = (service.to_string(), image.to_string());
    std::thread::spawn(move || {
        let started = Instant::now();
        let out = std::process::Command::new(CUTOVER)
            .args(["deploy", &service, "--image", &image])
            .env("CUTOVER_SOCKET", socket)
            .env_remove("CUTOVER_LOG")
            .output()
            .expect("run cutover deploy");
        (out, started.elapsed())
    })
}

/// One `GET /` on an open keep-alive connection; the body.
fn get_on(conn: &mut std::io::BufReader<std::net::TcpStream>) -> std::io::Result<String> {
    use std::io::{BufRead, Read, Write};
    conn.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: loopback6\r\n\r\n")?;
    let mut length = 0usize;
    let mut status = String::new();
    conn.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status line {status:?}")));
    }
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().map_err(std::io::Error::other)?;
            }
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).trim().to_string())
}

fn container_running(name: &str) -> bool {
    try_run(std::process::Command::new(DOCKER).args(["inspect", "-f", "{{.State.Running}}", name]))
        .is_ok_and(|out| out.trim() == "true")
}

/// IPv6 clients on the host's `::1` (issue 16, item 5): the kernel never routes `::1` to
/// a container, so the daemon relays them. `::1` answers v1; a deploy under a load of new
/// `::1` connections loses none and sends new ones to v2 at once; a keep-alive `::1`
/// connection opened before the switch stays on v1 and keeps the old release running
/// (its drain counts the relayed connection) until it closes, long before the drain
/// timeout; after `remove`, nothing listens on `[::1]:PORT` any more.
#[test]
fn loopback6_clients_are_relayed_and_move_in_the_switch() {
    let ids = Ids::new("loopback6_clients_are_relayed_and_move_in_the_switch");
    require_root();
    require_docker();
    let net = V6Network::new(&ids, ula(&ids, 1));
    let v1 = demo_image(&ids, "v1", &[("LISTEN", "[::]:80")]);
    let v2 = demo_image(&ids, "v2", &[("LISTEN", "[::]:80")]);
    let daemon = Daemon::start(&ids);
    let port = ids.port();
    let drain_timeout = Duration::from_secs(25);
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "25s"));
    let url = format!("http://[::1]:{port}/");
    assert_eq!(get_ok(At::Host, &url).trim(), "v1", "a ::1 client reaches v1 through the relay");
    assert_eq!(get_ok(At::Host, &format!("http://127.0.0.1:{port}/")).trim(), "v1");

    let stream = std::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port)).expect("connect [::1]");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut long = std::io::BufReader::new(stream);
    assert_eq!(get_on(&mut long).unwrap(), "v1");

    let load = Wrk::new(&url).duration(Duration::from_secs(8)).connections(4).threads(1).start();
    std::thread::sleep(Duration::from_secs(1));
    let deploy = deploy_in_background(&daemon, &ids.service, &v2);
    let switched = wait_for("the switch (new ::1 connections answered by v2)", Duration::from_secs(30), || {
        match curl_within(At::Host, &url, Duration::from_secs(2)) {
            Ok((200, body)) if body.trim() == "v2" => Ok(Instant::now()),
            other => Err(format!("{other:?}")),
        }
    });
    for i in 0..20 {
        assert_eq!(get_ok(At::Host, &url).trim(), "v2", "new ::1 connection {i} after the switch");
    }
    // The connection from before the switch: still v1, for longer than `watch` (2 s).
    let old = format!("cutover-{}-1", ids.service);
    while switched.elapsed() < Duration::from_secs(5) {
        assert_eq!(get_on(&mut long).unwrap(), "v1", "the open ::1 connection stays on v1");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!deploy.is_finished(), "the deploy must still be draining v1 while the ::1 connection is open");
    assert!(container_running(&old), "v1 must not be stopped while a ::1 connection to it is open");
    let report = load.wait();
    report.assert_no_failures();
    assert!(report.count("v1") > 0 && report.count("v2") > 0, "::1 load saw both releases: {:?}", report.bodies);

    drop(long);
    let (out, took) = deploy.join().unwrap();
    assert!(out.status.success(), "deploy: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(took < drain_timeout, "the drain ended when the ::1 connection closed, not at the timeout ({took:?})");
    assert!(!container_running(&old), "v1 is stopped once drained");
    assert_eq!(get_ok(At::Host, &url).trim(), "v2");
    // The relay's own [::1]:PORT listener is no host-port conflict for its service.
    apply(&daemon, ServiceYaml::http(&ids.service, &v2, port, &net.name).set("drain_timeout", "25s"));
    assert_eq!(get_ok(At::Host, &url).trim(), "v2");

    daemon.cli_ok(&["remove", &ids.service]);
    wait_for("[::1] no longer listening", Duration::from_secs(5), || {
        match std::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    drop(daemon);
    drop(net);
}

/// Datagram `n` on `socket` (connected to `[::1]:PORT`): the answering release, or None.
fn ask_on(socket: &std::net::UdpSocket, n: u64) -> Option<String> {
    common::udp::ask_on(socket, &format!("q{n}"), Duration::from_secs(1))
}

fn loopback6_udp(port: u16) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).expect("bind [::1]:0");
    s.connect((Ipv6Addr::LOCALHOST, port)).expect("connect [::1]");
    s.set_read_timeout(Some(Duration::from_millis(500))).expect("read timeout");
    s
}

/// UDP over `::1` (a resolver on the host asking `[::1]:53`): relayed like TCP. A flow
/// keeps its release while it is busy and holds the old release's drain; a flow quiet for
/// `udp_idle` reaches the new release during the drain; new flows go to the new release
/// at once; none loses a datagram; after `remove` nothing answers on `[::1]:PORT`.
#[test]
fn loopback6_udp_flows_are_relayed_and_move_in_the_switch() {
    let ids = Ids::new("loopback6_udp_flows_are_relayed_and_move_in_the_switch");
    require_root();
    require_docker();
    let net = V6Network::new(&ids, ula(&ids, 1));
    let env = [("LISTEN", "[::]:80"), ("UDP_LISTEN", "[::]:53")];
    let v1 = demo_image(&ids, "v1", &env);
    let v2 = demo_image(&ids, "v2", &env);
    let daemon = Daemon::start(&ids);
    let (port, uport) = (ids.port(), ids.port());
    let drain_timeout = Duration::from_secs(20);
    let service = |image: &str| {
        ServiceYaml::http(&ids.service, image, port, &net.name).udp_port(uport, 53).set("drain_timeout", "20s").set("udp_idle", "1s")
    };
    apply(&daemon, service(&v1));
    assert_eq!(ask_on(&loopback6_udp(uport), 0).as_deref(), Some("v1"), "a ::1 datagram reaches v1 through the relay");
    let quiet = loopback6_udp(uport);
    assert_eq!(ask_on(&quiet, 0).as_deref(), Some("v1"));

    // A busy flow (one socket, a datagram every 100 ms) and new flows (a new socket each,
    // every 50 ms), both on ::1, across the deploy.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = std::thread::spawn({
        let stop = stop_busy.clone();
        move || {
            let s = loopback6_udp(uport);
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                answers.push(ask_on(&s, answers.len() as u64));
                std::thread::sleep(Duration::from_millis(100));
            }
            answers
        }
    });
    let fresh = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                answers.push(ask_on(&loopback6_udp(uport), 0));
                std::thread::sleep(Duration::from_millis(50));
            }
            answers
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let deploy = deploy_in_background(&daemon, &ids.service, &v2);
    wait_for("the switch (new ::1 flows answered by v2)", Duration::from_secs(30), || {
        match ask_on(&loopback6_udp(uport), 0).as_deref() {
            Some("v2") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // Within the drain: the quiet flow (quiet since before the deploy) moved, the busy one
    // still holds v1.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ask_on(&quiet, 1).as_deref(), Some("v2"), "the quiet ::1 flow reaches v2 during the drain");
    assert!(!deploy.is_finished(), "the busy ::1 flow holds v1's drain");
    assert!(container_running(&format!("cutover-{}-1", ids.service)), "v1 runs while a ::1 flow to it is busy");

    stop_busy.store(true, std::sync::atomic::Ordering::SeqCst);
    let busy = busy.join().unwrap();
    let (out, took) = deploy.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let fresh = fresh.join().unwrap();
    assert!(out.status.success(), "deploy: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(took < drain_timeout, "the drain ended when the busy ::1 flow went quiet, not at the timeout ({took:?})");
    let lost = |a: &[Option<String>]| a.iter().filter(|r| r.is_none()).count();
    assert_eq!(lost(&busy), 0, "the busy ::1 flow lost datagrams: {busy:?}");
    assert!(busy.iter().all(|r| r.as_deref() == Some("v1")), "the busy ::1 flow stayed on v1: {busy:?}");
    assert_eq!(lost(&fresh), 0, "new ::1 flows lost datagrams: {fresh:?}");
    assert!(fresh.iter().any(|r| r.as_deref() == Some("v1")) && fresh.iter().any(|r| r.as_deref() == Some("v2")), "{fresh:?}");
    assert_eq!(ask_on(&loopback6_udp(uport), 0).as_deref(), Some("v2"));
    assert_eq!(ask_on(&quiet, 2).as_deref(), Some("v2"));

    daemon.cli_ok(&["remove", &ids.service]);
    wait_for("[::1] no longer answering UDP", Duration::from_secs(5), || match ask_on(&loopback6_udp(uport), 0) {
        None => Ok(()),
        Some(r) => Err(format!("answered by {r}")),
    });
    drop(daemon);
    drop(net);
}
