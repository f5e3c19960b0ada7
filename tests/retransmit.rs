//! Acceptance of issue 12, case 0: the packets of a connection after its first one reach
//! the release from another host too. The nat chains see only a connection's first packet,
//! so cutover's mark (what Docker's FORWARD chain lets through for an unpublished port)
//! must follow the connection: a retransmitted SYN, or a UDP datagram sent before the
//! release's first reply, would otherwise be dropped by Docker's FORWARD policy.
//!
//! The release's own namespace drops the first SYN of every TCP connection and the first
//! datagram of every UDP flow (an nftables table inside the container's namespace, gone
//! with the container), so every request is answered only through a retransmission.
//! Runs on both backends (`CUTOVER_TEST_BACKEND=iptables` in CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use common::cmd::cmd;
use common::docker::create_bridge_network;

/// Container ports of the demo release.
const HTTP: u16 = 80;
const UDP: u16 = 5353;

/// The table that loses first packets inside the release's namespace: a dynamic set
/// remembers each flow (source address and port) whose first packet it dropped.
fn lossy_ruleset() -> String {
    format!(
        "table inet lossy {{
  set seen_tcp {{ type ipv4_addr . inet_service; flags dynamic,timeout; timeout 2m; }}
  set seen_udp {{ type ipv4_addr . inet_service; flags dynamic,timeout; timeout 2m; }}
  chain input {{
    type filter hook input priority 0; policy accept;
    tcp dport {HTTP} tcp flags & (syn|ack) == syn ip saddr . tcp sport @seen_tcp accept
    tcp dport {HTTP} tcp flags & (syn|ack) == syn add @seen_tcp {{ ip saddr . tcp sport }} counter drop
    udp dport {UDP} ip saddr . udp sport @seen_udp accept
    udp dport {UDP} add @seen_udp {{ ip saddr . udp sport }} counter drop
  }}
}}
"
    )
}

/// Packets the lossy table dropped so far: (first SYNs, first datagrams).
fn dropped(release: &At) -> (u64, u64) {
    let out = run(release.command("nft").args(["-j", "list", "table", "inet", "lossy"]));
    let json: serde_json::Value = serde_json::from_str(&out).expect("nft -j is JSON");
    let mut counts = Vec::new();
    for rule in json["nftables"].as_array().unwrap().iter().filter_map(|o| o.get("rule")) {
        let exprs = rule["expr"].as_array().unwrap();
        if let Some(c) = exprs.iter().find_map(|e| e.get("counter")) {
            counts.push(c["packets"].as_u64().unwrap());
        }
    }
    assert_eq!(counts.len(), 2, "two counting rules in {out}");
    (counts[0], counts[1])
}

/// One UDP flow that sends its query twice on the same socket (as a resolver retries):
/// the first datagram is lost inside the release, the second must be answered.
fn udp_flow_answered(to: SocketAddr, n: usize) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    s.connect(to).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| format!("timeout: {e}"))?;
    let payload = format!("flow{n}");
    let mut buf = [0u8; 512];
    // Up to three tries, 400 ms apart: the first is always dropped by the release.
    for _ in 0..3 {
        s.send(payload.as_bytes()).map_err(|e| format!("send: {e}"))?;
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_millis(400) {
            if let Ok(len) = s.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..len]).to_string();
                if let Some((release, p)) = text.split_once(' ') {
                    if p == payload {
                        return Ok(release.to_string());
                    }
                }
            }
        }
    }
    Err(format!("flow {n}: no answer to three datagrams"))
}

/// Release v1 of the test's service, serving HTTP and UDP on host ports `tcp` and `udp`,
/// with a client on another host. The daemon goes before the client, the client before
/// the network: fields drop in order, and a destructuring binds `net, client, daemon`
/// (bindings drop in reverse).
struct Served {
    daemon: Daemon,
    client: ClientHost,
    net: DockerNetwork,
    tcp: u16,
    udp: u16,
}

fn served_v1(ids: &Ids) -> Served {
    let net = nat_network(ids);
    let v1 = demo_image(ids, "v1", &[("UDP_LISTEN", &format!("0.0.0.0:{UDP}"))]);
    let client = ClientHost::new(ids);
    let daemon = Daemon::start(ids);
    let (tcp, udp) = (ids.port(), ids.port());
    let file = ServiceYaml::http(&ids.service, &v1, tcp, &net.name).udp_port(udp, UDP).write(daemon.dir());
    daemon.cli_ok(&["apply", file.to_str().unwrap()]);
    assert_eq!(get_ok(client.at(), &format!("http://{}:{tcp}/", client.host_addr())).trim(), "v1");
    Served { daemon, client, net, tcp, udp }
}

#[test]
fn retransmitted_syns_and_early_datagrams_from_another_host_reach_the_release() {
    let ids = Ids::new("retransmitted_syns_and_early_datagrams_from_another_host_reach_the_release");
    let Served { net: _net, client, daemon, tcp: port, udp: uport } = served_v1(&ids);
    let url = format!("http://{}:{port}/", client.host_addr());

    let containers = running_containers_of(&ids);
    assert_eq!(containers.len(), 1, "{containers:?}");
    let release = At::container(&containers[0]);
    let rules = daemon.dir().join("lossy.nft");
    std::fs::write(&rules, lossy_ruleset()).unwrap();
    run(release.command("nft").arg("-f").arg(&rules));

    // TCP: every connection's first SYN is lost; the kernel retransmits it after 1 s.
    const CONNECTIONS: usize = 8;
    let mut failed = Vec::new();
    for i in 0..CONNECTIONS {
        match curl_within(client.at(), &url, Duration::from_secs(4)) {
            Ok((200, body)) if body.trim() == "v1" => {}
            other => failed.push(format!("connection {i}: {other:?}")),
        }
    }
    // UDP: every flow's first datagram is lost; the retry on the same flow is answered.
    const FLOWS: usize = 8;
    let to = SocketAddr::from((client.host_addr(), uport));
    let answers: Vec<Result<String, String>> = cutover::netns::in_netns_path(format!("/run/netns/{}", client.name()), move || {
        (0..FLOWS).map(|n| udp_flow_answered(to, n)).collect()
    })
    .expect("enter the client namespace");
    for (n, a) in answers.iter().enumerate() {
        match a {
            Ok(r) if r == "v1" => {}
            other => failed.push(format!("udp flow {n}: {other:?}")),
        }
    }

    let (syns, datagrams) = dropped(&release);
    assert!(
        failed.is_empty(),
        "{} of {} requests ({CONNECTIONS} TCP connections, {FLOWS} UDP flows) failed after their first packet was lost \
         (the release dropped {syns} first SYNs and {datagrams} first datagrams):\n{}",
        failed.len(),
        CONNECTIONS + FLOWS,
        failed.join("\n")
    );
    // The test proves something only if the first packets really were lost.
    assert!(syns >= CONNECTIONS as u64, "only {syns} first SYNs were dropped");
    assert!(datagrams >= FLOWS as u64, "only {datagrams} first datagrams were dropped");
}

/// Docker (20.10 here) re-arranges FORWARD whenever a network is created: it deletes its
/// jump to DOCKER-USER and inserts it again at the top, two separate iptables commands.
/// A connection's first packet that arrives in between never sees DOCKER-USER, so the
/// accept there cannot let it through. New flows from another host, while networks come
/// and go on the host (a compose project starting), must still all be answered.
#[test]
fn new_flows_reach_the_release_while_the_engine_creates_networks() {
    let ids = Ids::new("new_flows_reach_the_release_while_the_engine_creates_networks");
    let Served { net, client, daemon: _daemon, tcp, udp } = served_v1(&ids);
    let tcp_to = SocketAddr::from((client.host_addr(), tcp));
    let udp_to = SocketAddr::from((client.host_addr(), udp));
    let syn_retrans_before = syn_retransmissions(client.name());

    // New flows from the other host (a new UDP source port and a new TCP connection every
    // 2 ms each) while a network of the test's is created and removed, again and again.
    const CYCLES: usize = 12;
    let flows = NewFlows::start_every(client.name(), udp_to, tcp_to, Duration::from_millis(2));
    let (name, bridge) = (format!("{}-churn", net.name), format!("{}c", net.bridge));
    for _ in 0..CYCLES {
        let churn = DockerNetwork { name: name.clone(), bridge: bridge.clone() };
        create_bridge_network(&ids, &churn.name, &churn.bridge);
        drop(churn);
    }
    let seen = flows.finish();
    let syn_retrans = syn_retransmissions(client.name()) - syn_retrans_before;

    let (udp, tcp) = (&seen.queries, &seen.connects);
    let udp_failed = udp.iter().filter(|a| a.release.as_deref() != Some("v1")).count();
    let tcp_failed = tcp.iter().filter(|c| c.release.as_deref() != Some("v1")).count();
    assert!(udp.len() > 100 && tcp.len() > 20, "too few flows to tell: {} UDP, {} TCP", udp.len(), tcp.len());
    assert!(
        udp_failed == 0 && tcp_failed == 0 && syn_retrans == 0,
        "while Docker created {CYCLES} networks: {udp_failed} of {} UDP flows lost their datagram, {tcp_failed} of {} TCP \
         connections failed, {syn_retrans} SYNs had to be retransmitted (a first SYN dropped):\n{}",
        udp.len(),
        tcp.len(),
        seen.context()
    );
}

/// The kernel's count of SYN retransmissions (`TcpExt: TCPSynRetrans`) in a namespace.
fn syn_retransmissions(netns: &str) -> u64 {
    let text = run(&mut cmd("ip", ["netns", "exec", netns, "cat", "/proc/net/netstat"]));
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("TcpExt names"), lines.next().expect("TcpExt values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .expect("TCPSynRetrans in /proc/net/netstat")
}
