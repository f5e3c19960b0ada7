//! Tests of the test kit itself (tests/common): that a client host really is reachable
//! only through its veth, that wrk's results are read right, that names never collide,
//! and that every guard removes what it made, also after a panic. Root; the Docker parts
//! need the engine (`.ci/provision`). Traffic goes only to loopback and our namespaces.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::cmd::{cmd, output, run};
use common::*;

/// A tiny HTTP/1.1 server: `GET /` answers `body`, `/fail` answers 503, `/slow` answers
/// after `slow`; one connection per request. Records the peers it saw.
struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<BTreeSet<IpAddr>>>,
    accept: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(ip: Ipv4Addr, port: u16, body: &'static str, slow: Duration) -> TestServer {
        let listener = TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(BTreeSet::new()));
        let (stop2, peers2) = (stop.clone(), peers.clone());
        // Non-blocking accept polled with the stop flag: waking a blocking accept by
        // connecting to it fails once the address is gone (its veth deleted first).
        listener.set_nonblocking(true).unwrap_or_else(|e| panic!("set_nonblocking: {e}"));
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let mut conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = conn.set_nonblocking(false);
                if let Ok(p) = conn.peer_addr() {
                    peers2.lock().unwrap_or_else(|e| e.into_inner()).insert(p.ip());
                }
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut req = Vec::new();
                    let mut buf = [0u8; 2048];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let path = String::from_utf8_lossy(&req).split_whitespace().nth(1).unwrap_or("/").to_string();
                    let status = if path.starts_with("/fail") { "503 Service Unavailable" } else { "200 OK" };
                    if path.starts_with("/slow") {
                        std::thread::sleep(slow);
                    }
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        TestServer { addr, stop, peers, accept: Some(accept) }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn peers(&self) -> BTreeSet<IpAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

// ----- pure parts (no root needed) -----

const WRK_PLAIN: &str = "Running 2s test @ http://10.231.0.1:20001/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.21ms  500.00us  15.30ms   90.00%
    Req/Sec     3.00k   200.00     3.50k    70.00%
  Latency Distribution
     50%  635.91us
     75%    1.20ms
     90%    2.00ms
     99%    4.50ms
  12000 requests in 2.00s, 1.00MB read
Requests/sec:   6000.00
Transfer/sec:    512.00KB
";

const WRK_ERRORS: &str = "Running 1s test @ http://127.0.0.1:20002/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.00s     0.00us   2.00s   100.00%
    Req/Sec     0.00      0.00     0.00    100.00%
  77 requests in 1.00s, 7.00KB read
  Socket errors: connect 3, read 4, write 5, timeout 6
  Non-2xx or 3xx responses: 7
Requests/sec:     77.00
Transfer/sec:      7.00KB
";

#[test]
fn wrk_parser_reads_plain_output_without_error_lines() {
    let r = WrkReport::parse(WRK_PLAIN).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.requests, 12000);
    assert_eq!(r.errors, SocketErrors::default());
    assert_eq!(r.non_2xx, 0);
    assert_eq!(r.failed(), 0);
    let l = r.latency.unwrap_or_else(|| panic!("latency distribution not read"));
    assert_eq!(l.p50, Duration::from_micros(636));
    assert_eq!(l.p99, Duration::from_micros(4500));
    assert_eq!(l.max, Duration::from_micros(15300));
}

#[test]
fn wrk_parser_reads_socket_errors_and_non_2xx() {
    let r = WrkReport::parse(WRK_ERRORS).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.requests, 77);
    assert_eq!(r.errors, SocketErrors { connect: 3, read: 4, write: 5, timeout: 6 });
    assert_eq!(r.non_2xx, 7);
    assert_eq!(r.failed(), 3 + 4 + 5 + 6 + 7);
    assert!(r.latency.is_none(), "no distribution without --latency");
}

#[test]
fn wrk_parser_prefers_the_scripts_exact_counts() {
    let out = format!(
        "{WRK_ERRORS}cutover-wrk body 70 x76310a\ncutover-wrk body 5 x76320a\ncutover-wrk body 2 x\n\
         cutover-wrk status 75 200\ncutover-wrk status 2 502\n\
         cutover-wrk summary requests=77 connect=1 read=0 write=0 status=2 timeout=0 duration_us=1000500\n\
         cutover-wrk latency_us p50=100 p99=900 max=2000\n"
    );
    let r = WrkReport::parse(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.count("v1"), 70);
    assert_eq!(r.count("v2\n"), 5);
    assert_eq!(r.count(""), 2);
    assert_eq!(r.non_2xx, 2, "502s counted from the status tally");
    assert_eq!(r.errors, SocketErrors { connect: 1, read: 0, write: 0, timeout: 0 });
    assert_eq!(r.failed(), 3);
    assert_eq!(r.duration, Duration::from_micros(1_000_500));
    let l = r.latency.unwrap_or_else(|| panic!("no latency"));
    assert_eq!((l.p50, l.p99, l.max), (Duration::from_micros(100), Duration::from_micros(900), Duration::from_millis(2)));
}

#[test]
fn wrk_parser_refuses_output_without_a_count() {
    assert!(WrkReport::parse("unable to connect to 127.0.0.1:1 Connection refused\n").is_err());
}

#[test]
fn wrk_time_units() {
    use common::wrk::parse_time;
    assert_eq!(parse_time("635.91us"), Ok(Duration::from_micros(636)));
    assert_eq!(parse_time("1.50ms"), Ok(Duration::from_micros(1500)));
    assert_eq!(parse_time("2.00s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_time("1.00m"), Ok(Duration::from_secs(60)));
    assert!(parse_time("12").is_err());
}

#[test]
fn iptables_rule_lines_split_like_iptables_save() {
    use common::cleanup::{rule_comment, split_rule};
    let line = r#"-A DOCKER-USER -m mark --mark 0x20000/0x20000 -m comment --comment "cutover:cutover_c1234" -j ACCEPT"#;
    assert_eq!(rule_comment(line).as_deref(), Some("cutover:cutover_c1234"));
    assert_eq!(split_rule(line).len(), 12);
    assert_eq!(rule_comment(r#"-A X -m comment --comment "a \"b\" c" -j RETURN"#).as_deref(), Some(r#"a "b" c"#));
    assert_eq!(rule_comment("-A DOCKER-USER -j RETURN"), None);
}

// ----- identities -----

#[test]
fn ids_do_not_collide() {
    require_root();
    // At most 8 alive here: other tests of this binary hold some of the 13 mark bits.
    let ids: Vec<Ids> = ["deploy_basic", "deploy_basic", "deploy_basic", "rollback", "a", "b", "c", "a_much_longer_test_name_than_any_real_one"]
        .iter()
        .map(|n| Ids::new(n))
        .collect();
    let distinct = |f: &dyn Fn(&Ids) -> String| ids.iter().map(f).collect::<BTreeSet<_>>().len() == ids.len();
    assert!(distinct(&|i| i.tag.clone()), "tags collide");
    assert!(distinct(&|i| i.service.clone()), "services collide");
    assert!(distinct(&|i| i.table.clone()), "tables collide");
    assert!(distinct(&|i| i.netns(0)), "namespaces collide");
    assert!(distinct(&|i| i.veth(0)), "veths collide");
    assert!(distinct(&|i| i.mark.to_string()), "marks collide");
    assert!(distinct(&|i| i.subnet(0).network.to_string()), "subnets collide");
    assert!(distinct(&|i| i.image("v1")), "images collide");
    let mut subnets = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for i in &ids {
        assert_eq!(i.stem, common::ids::stem_of(&i.test));
        assert_eq!(common::ids::pid_of_tag(&i.tag), Some(std::process::id()));
        assert!(
            (1..=32).contains(&i.service.len())
                && i.service.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "service name {:?} is not [a-z0-9-]{{1,32}}",
            i.service
        );
        assert!(i.veth(3).len() <= 15 && i.bridge().len() <= 15, "interface names too long: {}", i.veth(3));
        assert_eq!(i.mark.count_ones(), 1, "mark {:#x} is not a single bit", i.mark);
        assert_ne!(i.mark, 0x2000_0000, "the production default mark must not be used");
        for n in 0..4 {
            let s = i.subnet(n);
            assert!(s.network.octets()[..2] == [10, 231] && s.network.octets()[3] % 4 == 0);
            assert!(subnets.insert(s), "subnet {s:?} handed out twice");
        }
        for _ in 0..3 {
            let p = i.port();
            assert!(ports.insert(p), "port {p} handed out twice");
            assert!(common::ids::port_is_free(p), "port {p} is in use");
        }
    }
    assert_eq!(ids[0].stem, ids[1].stem, "runs of one test share a stem (what the sweeper matches)");
    // Everything is given back on drop: the whole set can be claimed again.
    drop(ids);
    let again: Vec<Ids> = (0..8).map(|n| Ids::new(&format!("again{n}"))).collect();
    assert_eq!(again.len(), 8);
}

// ----- client host, curl, wrk -----

#[test]
fn client_host_reaches_a_server_on_its_host_addr() {
    require_root();
    let ids = Ids::new("client_host_reaches_a_server_on_its_host_addr");
    let client = ClientHost::new(&ids);
    let (netns, veth) = (client.name().to_string(), client.veth().to_string());
    assert!(netns_exists(&netns) && link_exists(&veth));
    let server = TestServer::start(client.host_addr(), ids.port(), "kit-ok\n", Duration::ZERO);

    assert_eq!(curl(&client, &server.url("/")).map_err(|e| e.to_string()), Ok((200, "kit-ok\n".to_string())));
    assert_eq!(get_ok(Some(netns.as_str()), &server.url("/")), "kit-ok");
    assert_eq!(server.peers(), BTreeSet::from([IpAddr::V4(client.addr())]), "traffic must come from the namespace");
    // The namespace is another host: it has no other way out than its veth.
    let routes = client.try_exec(&["ip", "-4", "route"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(routes.contains(&format!("default via {}", client.host_addr())), "routes in the namespace: {routes}");

    let report = Wrk::new(server.url("/")).at(&client).duration(Duration::from_secs(2)).connections(8).run();
    report.assert_no_failures();
    assert_eq!(report.count("kit-ok"), report.requests, "every response tallied: {:?}", report.bodies);
    assert_eq!(report.statuses.get(&200), Some(&report.requests));
    assert!(report.latency.is_some_and(|l| l.p50 <= l.p99 && l.p99 <= l.max));

    let failing = Wrk::new(server.url("/fail")).at(&client).duration(Duration::from_secs(1)).connections(2).keep_alive().start();
    let failing = failing.wait();
    assert!(failing.requests > 0 && failing.non_2xx == failing.requests, "503s are failures: {failing:?}");
    assert_eq!(failing.failed(), failing.requests);

    drop(client);
    assert!(!netns_exists(&netns), "namespace {netns} left after drop");
    assert!(!link_exists(&veth), "veth {veth} left after drop");
}

#[test]
fn curl_and_wrk_report_a_refused_port() {
    require_root();
    let ids = Ids::new("curl_and_wrk_report_a_refused_port");
    let client = ClientHost::new(&ids);
    let closed = format!("http://{}:{}/", client.host_addr(), ids.port());
    let e = curl(&client, &closed).err().unwrap_or_else(|| panic!("a closed port answered"));
    assert_eq!(e.code, Some(7), "curl exit 7 is 'connection refused': {e}");
    let err = Wrk::new(closed).at(&client).duration(Duration::from_secs(1)).start().try_wait();
    assert!(err.is_err_and(|e| e.contains("unable to connect")), "wrk refuses to start on a closed port");
}

#[test]
fn slow_request_started_in_the_background_completes_later() {
    require_root();
    let ids = Ids::new("slow_request_started_in_the_background_completes_later");
    let client = ClientHost::new(&ids);
    let server = TestServer::start(client.host_addr(), ids.port(), "slow-done\n", Duration::from_millis(1500));
    let t0 = Instant::now();
    let slow = SlowRequest::start(&ids, &client, &server.url("/slow"), Duration::from_secs(10));
    slow.wait_established(Duration::from_secs(5));
    assert!(t0.elapsed() < Duration::from_millis(1400), "established well before the answer");
    let (status, body) = slow.wait().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((status, body.as_str()), (200, "slow-done\n"));
    assert!(t0.elapsed() >= Duration::from_millis(1500));
}

#[test]
fn client_host_is_removed_when_the_test_panics() {
    require_root();
    let ids = Ids::new("client_host_is_removed_when_the_test_panics");
    let (netns, veth) = (ids.netns(1), ids.veth(1));
    let ids = Arc::new(ids);
    let ids2 = ids.clone();
    let r = std::thread::spawn(move || {
        let _client = ClientHost::nth(&ids2, 1);
        assert!(netns_exists(&ids2.netns(1)));
        panic!("a failing test");
    })
    .join();
    assert!(r.is_err());
    assert!(!netns_exists(&netns) && !link_exists(&veth), "left after a panic: {netns} / {veth}");
}

#[test]
fn route_localnet_guard_restores_the_old_value() {
    require_root();
    let ids = Ids::new("route_localnet_guard_restores_the_old_value");
    let client = ClientHost::new(&ids);
    let veth = client.veth().to_string();
    let before = route_localnet(&veth);
    {
        let g = set_route_localnet(&veth, !before);
        assert_eq!(g.old(), before);
        assert_eq!(route_localnet(&veth), !before);
    }
    assert_eq!(route_localnet(&veth), before, "restored on drop");
}

// ----- leftovers -----

fn dead_pid() -> u32 {
    (1_000_000..4_000_000u32).rev().step_by(7919).find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()).unwrap_or(3_999_999)
}

#[test]
fn sweep_removes_what_a_crashed_run_left_and_nothing_alive() {
    require_root();
    let name = "sweep_removes_what_a_crashed_run_left";
    let stem = common::ids::stem_of(name);
    let dead = common::ids::tag_for(&stem, dead_pid(), 0);
    let alive = common::ids::tag_for(&stem, std::process::id(), 1295);
    sweep_stale(&stem); // what an interrupted run of this very test left
    for tag in [&dead, &alive] {
        let ns = format!("{}{tag}-0", common::ids::NETNS_PREFIX);
        run(&mut cmd("ip", ["netns", "add", &ns]));
        run(&mut cmd("ip", ["link", "add", &format!("{tag}h0"), "type", "veth", "peer", "name", "eth0", "netns", &ns]));
        run(&mut cmd("ip", ["link", "add", &format!("{tag}h1"), "type", "veth", "peer", "name", &format!("{tag}h2")]));
        run(&mut cmd("nft", ["add", "table", "inet", &format!("{}{tag}", common::ids::TABLE_PREFIX)]));
        // A rule that matches nothing (a source address no one has), behind Docker's RETURN.
        run(&mut cmd(
            "iptables",
            ["-w", "-A", "DOCKER-USER", "-s", "10.231.255.255/32", "-m", "comment", "--comment"]
                .into_iter()
                .chain([format!("cutover:{}{tag}", common::ids::TABLE_PREFIX).as_str(), "-j", "RETURN"]),
        ));
    }
    let _ids = Ids::new(name); // sweeps
    let exists = |tag: &str| {
        [
            netns_exists(&format!("{}{tag}-0", common::ids::NETNS_PREFIX)),
            link_exists(&format!("{tag}h1")),
            nft_table_text(&format!("{}{tag}", common::ids::TABLE_PREFIX)).is_some(),
            !docker_user_rules(&format!("{}{tag}", common::ids::TABLE_PREFIX)).is_empty(),
        ]
    };
    let dead_left = exists(&dead);
    let alive_left = exists(&alive);
    // Clean the live run's objects by hand before asserting.
    run(&mut cmd("ip", ["netns", "delete", &format!("{}{alive}-0", common::ids::NETNS_PREFIX)]));
    run(&mut cmd("ip", ["link", "delete", &format!("{alive}h1")]));
    let p = remove_tagged(&alive, &format!("{}{alive}", common::ids::TABLE_PREFIX));
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(dead_left, [false; 4], "stale netns / link / table / DOCKER-USER rule not swept");
    assert_eq!(alive_left, [true; 4], "the sweeper touched a live run's objects");
    assert!(docker_user_rules(&format!("{}{alive}", common::ids::TABLE_PREFIX)).is_empty());
}

/// A stand-in for `cutover daemon`: binds the socket it is given and accepts forever.
const STAND_IN: &str = r#"
import os, socket, sys
a = sys.argv
path = a[a.index('--socket') + 1]
try:
    os.unlink(path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(16)
print('stand-in daemon up:', ' '.join(a[1:]), file=sys.stderr, flush=True)
while True:
    s.accept()[0].close()
"#;

#[test]
fn daemon_guard_restarts_and_removes_everything_tagged() {
    require_docker();
    let ids = Ids::new("daemon_guard_restarts_and_removes_everything_tagged");
    let image = demo_image(&ids, "v1", &[("DEMO_SLOW_START", "0")]);
    assert!(image_exists(&image), "demo image {image} built");
    let mut daemon = Daemon::start_program(&ids, &["/usr/bin/python3", "-c", STAND_IN], &[]);
    assert!(daemon.log().contains(&format!("--table {} --mark {} --instance {}", ids.table, ids.mark_arg(), ids.tag)), "{}", daemon.log());
    assert!(std::os::unix::net::UnixStream::connect(daemon.socket()).is_ok());

    // What a real daemon would have made.
    run(&mut cmd("nft", ["add", "table", "inet", &ids.table]));
    let comment = format!("cutover:{}", ids.table);
    run(&mut cmd("iptables", ["-w", "-A", "DOCKER-USER", "-s", "10.231.255.254/32", "-m", "comment", "--comment", &comment, "-j", "RETURN"]));
    let label = format!("{INSTANCE_LABEL}={}", ids.tag);
    run(&mut cmd(DOCKER, ["create", "--label", &label, &image]));
    assert_eq!(containers_of(&ids).len(), 1);
    assert_eq!(docker_user_rules(&ids.table).len(), 1);

    daemon.kill9();
    assert!(!daemon.is_running());
    daemon.restart();
    assert!(daemon.is_running());
    assert_eq!(daemon.log().matches("stand-in daemon up").count(), 2, "both runs logged: {}", daemon.log());

    let v = daemon.cli_ok(&["--version"]);
    assert!(v.stdout.starts_with("cutover "), "{v:?}");
    assert_eq!(daemon.cli(&["deploy"]).code, 2, "clap's usage error is exit 2");

    drop(daemon);
    assert!(containers_of(&ids).is_empty(), "containers left");
    assert!(nft_table_text(&ids.table).is_none(), "table left");
    assert!(docker_user_rules(&ids.table).is_empty(), "DOCKER-USER rule left");
    assert!(!image_exists(&image), "image left");
}

#[test]
fn docker_network_and_client_container_are_removed() {
    require_docker();
    let ids = Ids::new("docker_network_and_client_container_are_removed");
    let image = demo_image(&ids, "client", &[]);
    let net = DockerNetwork::new(&ids);
    assert!(link_exists(&net.bridge), "own bridge {}", net.bridge);
    let bridge = net.bridge.clone();
    let id = client_container(&ids, &image, Some(&net.name));
    assert!(containers_of(&ids).iter().any(|c| id.starts_with(c.as_str())));
    let p = remove_tagged(&ids.tag, &ids.table);
    assert!(p.is_empty(), "{p:?}");
    assert!(containers_of(&ids).is_empty() && !image_exists(&image));
    drop(net); // already gone: must not complain
    assert!(!link_exists(&bridge));
    let ls = output(&mut cmd(DOCKER, ["network", "ls", "--format", "{{.Name}}"])).unwrap_or_else(|e| panic!("{e}"));
    assert!(!ls.stdout.lines().any(|n| n == ids.network()));
}
