//! Engine objects that change under the daemon (issue 12, case 7): a Docker network
//! removed and created again gets a new Linux bridge; the daemon must program the new
//! one, not a bridge it read earlier, or host clients on 127.0.0.1 fail after a deploy
//! that said "live".
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cmd::cmd;
use common::*;

#[test]
fn a_network_created_again_with_another_bridge_serves_host_clients() {
    let ids = Ids::new("a_network_created_again_with_another_bridge");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let daemon = Daemon::start(&ids);
    // Off wherever it could come from: the daemon must turn it on for the new bridge.
    let _all = set_route_localnet("all", false);
    let port = ids.port();
    let local = format!("http://127.0.0.1:{port}/");
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    assert_eq!(get_ok(At::Host, &local), "v1");
    daemon.cli_ok(&["remove", &ids.service]);

    // The same network name, another bridge (the operator recreated it).
    let bridge = format!("c{}", &ids.bridge()[1..]);
    run(&mut cmd(DOCKER, ["network", "rm", &net.name]));
    common::docker::create_bridge_network(&ids, &net.name, &bridge);
    let _bridge = set_route_localnet(&bridge, false);
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name));
    assert_eq!(get_ok(At::Host, &local), "v1", "a host client on 127.0.0.1 reaches the release on the new bridge");
    assert!(route_localnet(&bridge), "route_localnet is on for the new bridge");
    let out = daemon.cli_expect(&["remove", &ids.service], 0);
    assert!(!out.stderr.contains("error"), "{out:?}");
}
