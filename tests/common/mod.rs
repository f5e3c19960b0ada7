//! The shared kit of the root acceptance tests (`mod common;` in each file of `tests/`).
//!
//! It owns what a test needs around the binary under test, each piece parallel-safe and
//! self-cleaning:
//! - [`Ids`]: names and numbers of one test run (service, table, mark, namespaces,
//!   subnets, ports), unique across parallel tests; sweeps leftovers of crashed runs;
//! - [`ClientHost`]: "another host" (a namespace over a veth pair); [`At`]: where a
//!   client runs (host, namespace, a container's namespace);
//! - [`Wrk`], [`curl`], [`SlowRequest`], [`UdpClient`], [`NewFlows`]: real clients and their results;
//! - [`Daemon`]: a `cutover daemon` of the test and its CLI;
//! - [`set_route_localnet`], [`ipv6_forwarding_on`], [`DockerNetwork`], [`demo_image`], [`require_docker`].
//! - the NAT scenario preamble: [`nat_network`], [`two_releases`], [`apply`], and
//!   [`all_new_connections_answer`]; [`listening_ports`] for tests that pick host ports.
//!
//! It must not touch anything that does not carry the test's tag: other tables, other
//! DOCKER-USER rules, other containers.

// Each test file uses only part of the kit.
#![allow(dead_code, unused_imports)]

pub mod cleanup;
pub mod cmd;
pub mod connect_loop;
pub mod daemon;
pub mod fleet;
pub mod docker;
pub mod flows;
pub mod hardening;
pub mod http;
pub mod ids;
pub mod lab;
pub mod manifest;
pub mod netns;
pub mod sd_server;
pub mod sysctl;
pub mod udp;
pub mod wrk;

pub use cleanup::{remove_tagged, sweep_stale, INSTANCE_LABEL};
pub use connect_loop::{ConnectLoop, ConnectTally};
pub use sd_server::sd_server_command;
pub use cmd::{run, try_run, wait_for, Outcome, DOCKER};
pub use daemon::{CliOutput, Daemon, CUTOVER};
pub use docker::{
    containers_of, running_container_names, running_containers_of, demo_image, demo_image_with, docker_available, image_exists, require_docker, require_root, DemoImage,
    DockerNetwork,
};
pub use flows::{Connect, NewFlows, NewFlowsSeen};
pub use http::{all_new_connections_answer, curl, curl_within, get_ok, CurlError, SlowRequest};
pub use ids::{Ids, Subnet};
pub use manifest::ServiceYaml;
pub use netns::{client_container, link_exists, netns_exists, At, ClientHost};
pub use sysctl::{ipv6_forwarding_on, route_localnet, set_route_localnet, Ipv6ForwardingGuard, RouteLocalnetGuard};
pub use udp::{ask_from_port, assert_idle_flow_moves, lost, summary, Answer, DeployUnderDatagrams, UdpClient};
pub use wrk::{new_connection_load, Latency, SocketErrors, Wrk, WrkReport, WrkRun};

/// Host ports processes use (protocol and number, any address), as cutover's conflict
/// check reads them from `/proc/net`.
pub fn listening_ports() -> Result<std::collections::BTreeSet<(cutover::manifest::Protocol, u16)>, cutover::host::HostError> {
    Ok(cutover::host::listening_sockets()?.into_iter().map(|(proto, port, _)| (proto, port)).collect())
}

/// The preamble of every NAT scenario against the engine: root and Docker required (or
/// the test is skipped as the kit decides), and the test's own bridge network.
pub fn nat_network(ids: &Ids) -> DockerNetwork {
    require_root();
    require_docker();
    DockerNetwork::new(ids)
}

/// What most NAT scenarios start from: [`nat_network`], demo images `v1` and `v2`, and a
/// client on "another host". Destructure it in this order, so the client goes before
/// the network, as the test's daemon (started after) goes before both.
pub struct TwoReleases {
    pub net: DockerNetwork,
    pub v1: String,
    pub v2: String,
    pub client: ClientHost,
}

pub fn two_releases(ids: &Ids) -> TwoReleases {
    two_releases_with(ids, &[])
}

/// [`two_releases`] with further variables baked into both images (e.g. `INSPECT`).
pub fn two_releases_with(ids: &Ids, env: &[(&str, &str)]) -> TwoReleases {
    let net = nat_network(ids);
    let v1 = demo_image(ids, "v1", env);
    let v2 = demo_image(ids, "v2", env);
    let client = ClientHost::new(ids);
    TwoReleases { net, v1, v2, client }
}

/// Write `service` into the daemon's directory and `cutover apply` it (which must
/// succeed); returns the manifest file.
pub fn apply(daemon: &Daemon, service: ServiceYaml) -> std::path::PathBuf {
    let file = service.write(daemon.dir());
    daemon.cli_ok(&["apply", file.to_str().unwrap_or_default()]);
    file
}

/// A TCP port nothing listens on right now, for tests without [`Ids`] (the kernel's pick;
/// a tiny race accepted).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap_or_else(|e| panic!("bind a free port: {e}"));
    l.local_addr().unwrap_or_else(|e| panic!("local address: {e}")).port()
}

/// The backend the kit's daemons run with: `CUTOVER_TEST_BACKEND` (`nftables` when unset).
pub fn test_backend() -> Option<String> {
    std::env::var("CUTOVER_TEST_BACKEND").ok().filter(|b| !b.is_empty())
}

/// Delete every rule the test's daemon made for `table`, whatever its backend (as a
/// reboot would).
pub fn delete_dataplane(table: &str) {
    let r = if iptables_backend() { cleanup::delete_iptables_chains(table) } else { cleanup::delete_table(table) };
    r.unwrap_or_else(|e| panic!("deleting the rules of {table}: {e}"));
}

fn iptables_backend() -> bool {
    test_backend().as_deref() == Some("iptables")
}

/// With the iptables backend: our chains and jumps (`iptables -S` lines, IPv4 then
/// IPv6), or `None` when the backend made none for `table`.
pub fn iptables_chains_text(table: &str) -> Option<String> {
    let mut text = String::new();
    for tool in ["iptables", "ip6tables"] {
        let all = cmd::output(&mut cmd::cmd(tool, ["-w", "-t", "nat", "-S"])).ok()?;
        let ours: Vec<&str> = all
            .stdout
            .lines()
            .filter(|l| l.contains(&format!("{table}-pre")) || l.contains(&format!("{table}-out")) || l.contains(&format!("{table}-post")))
            .collect();
        if tool == "iptables" && ours.is_empty() {
            return None;
        }
        text.push_str(&ours.join("\n"));
        text.push('\n');
    }
    Some(text)
}

/// `nft -s -j list table inet <table>` as JSON (the independent oracle of what cutover
/// installed; stateless: without counter values), or `None` if the table does not exist.
/// With the iptables backend: the text of our chains as a JSON string.
pub fn nft_table_json(table: &str) -> Option<serde_json::Value> {
    if iptables_backend() {
        return iptables_chains_text(table).map(serde_json::Value::String);
    }
    let out = cmd::output(&mut cmd::cmd("nft", ["-s", "-j", "list", "table", "inet", table])).ok()?;
    if !out.success() {
        return None;
    }
    serde_json::from_str(&out.stdout).ok()
}

/// `nft -s list table inet <table>` as text, or `None` if it does not exist. Without
/// handles and counter values (`-s`: stateless), so two listings compare equal when the
/// ruleset did not change, whatever traffic passed.
pub fn nft_table_text(table: &str) -> Option<String> {
    if iptables_backend() {
        return iptables_chains_text(table);
    }
    let out = cmd::output(&mut cmd::cmd("nft", ["-s", "list", "table", "inet", table])).ok()?;
    out.success().then_some(out.stdout)
}

/// The DOCKER-USER rules (`iptables -S` lines) carrying comment `cutover:<table>`.
pub fn docker_user_rules(table: &str) -> Vec<String> {
    let want = cleanup::docker_user_comment(table);
    cmd::output(&mut cmd::cmd("iptables", ["-w", "-S", "DOCKER-USER"]))
        .map(|o| {
            o.stdout
                .lines()
                .filter(|l| cleanup::rule_comment(l).as_deref() == Some(want.as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
