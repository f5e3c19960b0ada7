//! NftFirewall against the real kernel (run as root): `cargo test --test nat_kernel`.
//!
//! Each test owns its table (`cutover_nat_test_<pid>_<n>`), network namespaces, veths,
//! addresses in 10.231.X.0/24 (X from the pid) and host ports; everything is removed by
//! Drop guards, also when an assertion fails. Traffic only goes to addresses in those
//! namespaces and to loopback. `nft -j` is the independent oracle of the table content.
// Helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

mod common;

use cutover::host;
use cutover::manifest::Protocol;
use cutover::nat::{Firewall, MessageRejected, NatError, NftFirewall};
use cutover::plan::{self, Bridge, Desired, Element, ElementKey, ElementOp, Target};
use serde_json::Value;

/// A mark bit no daemon of the other tests uses (they use the default bit, or the kit's
/// bits 16-28): the test shows that Docker drops the traffic without *our* accept, which
/// another daemon's accept for the same bit would hide.
const MARK: u32 = 0x8000_0000;
const RELEASE_PORT: u16 = 8000;
const FAIL_TIMEOUT: Duration = Duration::from_millis(1500);

fn pid() -> u32 {
    std::process::id()
}

/// Run a command, panic with its stderr when it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run cleanup commands in reverse order on drop; errors are printed, not fatal, so the
/// rest still runs.
#[derive(Default)]
struct Cleanup(Vec<Box<dyn FnOnce() + Send>>);

impl Cleanup {
    fn cmd(&mut self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.0.push(Box::new(move || match Command::new(&args[0]).args(&args[1..]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("cleanup {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("cleanup {args:?}: {e}"),
        }));
    }
    fn call(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }
}

fn guard_table(cleanup: &mut Cleanup, table: &str) {
    let table = table.to_string();
    cleanup.call(move || {
        if let Err(e) = NftFirewall::new().delete_table(&table) {
            eprintln!("cleanup table {table}: {e}");
        }
    });
}

/// The table as `nft -j` sees it.
fn nft_json(table: &str) -> Vec<Value> {
    let out = sh(&["nft", "-j", "list", "table", "inet", table]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["nftables"].as_array().unwrap().clone()
}

/// Elements of the map as `(proto, port, addr, port)` text, sorted.
fn map_elements(table: &str) -> Vec<String> {
    let objs = nft_json(table);
    let map = objs.iter().find_map(|o| o.get("map")).expect("map in table");
    let mut out: Vec<String> = map["elem"]
        .as_array()
        .map(|elems| {
            elems
                .iter()
                .map(|e| {
                    let k = &e[0]["concat"];
                    let d = &e[1]["concat"];
                    format!("{} . {} : {} . {}", k[0].as_str().unwrap(), k[1], d[0].as_str().unwrap(), d[1])
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Drop kernel-assigned handles so two listings of the same content compare equal.
fn without_handles(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| k.as_str() != "handle").map(|(k, v)| (k.clone(), without_handles(v))).collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_handles).collect()),
        other => other.clone(),
    }
}

fn target(port: u16, protocol: Protocol, addr: Ipv4Addr, to: u16) -> Target {
    Target::new(&format!("svc{port}{protocol}"), 1, protocol, port, addr, to)
}

fn rejected(e: &NatError) -> &MessageRejected {
    match e {
        NatError::Batch { source, .. } => source.get_ref().and_then(|e| e.downcast_ref::<MessageRejected>()).expect("MessageRejected"),
        other => panic!("expected a batch error, got {other:?}"),
    }
}

#[test]
fn map_transactions_are_atomic_and_sync_is_idempotent() {
    let fw = NftFirewall::new();
    let table = format!("cutover_nat_test_{}_tx", pid());
    let mut cleanup = Cleanup::default();
    guard_table(&mut cleanup, &table);

    assert!(!fw.table_exists(&table).unwrap());
    fw.delete_table(&table).expect("deleting a missing table is not an error");

    let a = Ipv4Addr::new(10, 231, 254, 2);
    let desired = Desired {
        table: table.clone(),
        mark: MARK,
        targets: vec![target(41080, Protocol::Tcp, a, 80), target(41053, Protocol::Udp, a, 53)],
        bridges: vec![Bridge { ifname: "br-test0".into(), subnet: Ipv4Addr::new(10, 231, 254, 0), prefix: 24 }],
    };
    let rs = plan::ruleset(&desired);
    fw.sync(&rs).unwrap();
    assert!(fw.table_exists(&table).unwrap());

    // The oracle: chains, hooks, priorities, policy and the map content.
    let objs = nft_json(&table);
    let mut chains: Vec<(String, String, i64, String, String)> = objs
        .iter()
        .filter_map(|o| o.get("chain"))
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["hook"].as_str().unwrap().into(),
                c["prio"].as_i64().unwrap(),
                c["type"].as_str().unwrap().into(),
                c["policy"].as_str().unwrap().into(),
            )
        })
        .collect();
    chains.sort();
    assert_eq!(
        chains,
        vec![
            ("count_output".into(), "output".into(), -90, "filter".into(), "accept".into()),
            ("count_prerouting".into(), "prerouting".into(), -90, "filter".into(), "accept".into()),
            ("mark_prerouting".into(), "prerouting".into(), -150, "filter".into(), "accept".into()),
            ("output".into(), "output".into(), -105, "nat".into(), "accept".into()),
            ("postrouting".into(), "postrouting".into(), 95, "nat".into(), "accept".into()),
            ("prerouting".into(), "prerouting".into(), -105, "nat".into(), "accept".into()),
        ]
    );
    let map = objs.iter().find_map(|o| o.get("map")).unwrap();
    assert_eq!(map["name"], "dnat4");
    assert_eq!(map["type"], serde_json::json!(["inet_proto", "inet_service"]));
    assert_eq!(map["map"], "ipv4_addr . inet_service");
    assert_eq!(map_elements(&table), vec!["tcp . 41080 : 10.231.254.2 . 80", "udp . 41053 : 10.231.254.2 . 53"]);
    let rules = objs.iter().filter(|o| o.get("rule").is_some()).count();
    assert_eq!(
        rules,
        17,
        "four dnat rules (IPv4/IPv6, by address or not) in prerouting and output, ::1 left to the relay in output, three masquerades (loopback, IPv4 and IPv6 hairpin), a counting rule per port in each counting chain, the mark restore"
    );
    // `nft` reads our rules back as the plan describes them.
    let text = sh(&["nft", "list", "table", "inet", &table]);
    assert!(text.contains("dnat ip to meta l4proto . th dport map @dnat4"), "{text}");
    assert!(text.contains("dnat ip to ip daddr . meta l4proto . th dport map @dnat4_addr"), "{text}");
    assert!(text.contains("dnat ip6 to meta l4proto . th dport map @dnat6"), "{text}");
    assert!(text.contains("ip6 daddr ::1 return"), "{text}");
    assert!(text.contains("dnat ip6 to ip6 daddr . meta l4proto . th dport map @dnat6_addr"), "{text}");
    assert!(text.contains("type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service"), "{text}");
    assert!(text.contains(&format!("meta mark set meta mark | {MARK:#010x} ct mark set ct mark | {MARK:#010x}")), "{text}");
    assert!(
        // nft prints `x & m == m` of a single bit as `x m/1`.
        text.contains(&format!("ct direction original ct mark {MARK:#010x}/1 meta mark set meta mark | {MARK:#010x}")),
        "{text}"
    );
    assert!(text.contains("oifname \"br-test0\" ip saddr 10.231.254.0/24 masquerade"), "{text}");
    assert!(text.contains("ip saddr 127.0.0.0/8 masquerade"), "{text}");
    assert!(text.contains("iifname \"br-test0\" oifname \"br-test0\" masquerade"), "{text}");
    assert!(text.contains("ct status dnat meta l4proto tcp ct original proto-dst 41080 counter packets 0 bytes 0 comment \"svc41080tcp\""), "{text}");
    assert!(text.contains("ct status dnat meta l4proto udp ct original proto-dst 41053 counter packets 0 bytes 0 comment \"svc41053udp\""), "{text}");
    let counts = fw.counters(&table).unwrap();
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["svc41053udp", "svc41080tcp"], "both services are counted, from zero");
    assert!(counts.values().all(|t| *t == plan::Traffic::default()), "{counts:?}");

    // sync twice: same content.
    let before = without_handles(&Value::Array(nft_json(&table)));
    fw.sync(&rs).unwrap();
    assert_eq!(without_handles(&Value::Array(nft_json(&table))), before);

    // A batch with one bad op changes nothing, and the error names the bad op.
    let key_tcp = ElementKey::v4(Protocol::Tcp, 41080);
    let bad = [
        ElementOp::Delete(ElementKey::v4(Protocol::Udp, 9)),
        ElementOp::Delete(key_tcp),
        ElementOp::Add(Element { key: ElementKey::v4(Protocol::Tcp, 41081), addr: a.into(), port: 81 }),
    ];
    let err = fw.apply_ops(&table, plan::DNAT_MAP, &bad).unwrap_err();
    let r = rejected(&err);
    assert_eq!(r.errno, libc::ENOENT, "{err}");
    assert!(r.message.contains("udp . 9"), "{err}");
    assert!(err.to_string().contains("map update"), "{err}");
    assert_eq!(map_elements(&table), vec!["tcp . 41080 : 10.231.254.2 . 80", "udp . 41053 : 10.231.254.2 . 53"]);

    // Adding a key that exists is refused rather than silently overwritten.
    let dup = [ElementOp::Add(Element { key: key_tcp, addr: Ipv4Addr::new(10, 231, 254, 3).into(), port: 80 })];
    let err = fw.apply_ops(&table, plan::DNAT_MAP, &dup).unwrap_err();
    assert_eq!(rejected(&err).errno, libc::EEXIST, "{err}");

    // The cutover: delete + add of the same key in one batch.
    let switch = [
        ElementOp::Delete(key_tcp),
        ElementOp::Add(Element { key: key_tcp, addr: Ipv4Addr::new(10, 231, 254, 3).into(), port: 8080 }),
    ];
    fw.apply_ops(&table, plan::DNAT_MAP, &switch).unwrap();
    assert_eq!(map_elements(&table), vec!["tcp . 41080 : 10.231.254.3 . 8080", "udp . 41053 : 10.231.254.2 . 53"]);
    fw.apply_ops(&table, plan::DNAT_MAP, &[]).unwrap();

    // Ops on a missing table fail with a typed error.
    let err = fw.apply_ops("cutover_nat_test_no_such_table", plan::DNAT_MAP, &switch).unwrap_err();
    assert_eq!(rejected(&err).errno, libc::ENOENT, "{err}");

    // A big sync goes in several element messages of one batch.
    let many: Vec<Target> = (0..5000).map(|i| target(20000 + i, Protocol::Tcp, a, 80)).collect();
    fw.sync(&plan::ruleset(&Desired { targets: many, ..desired })).unwrap();
    assert_eq!(map_elements(&table).len(), 5000);

    fw.delete_table(&table).unwrap();
    assert!(!fw.table_exists(&table).unwrap());
}

// ---------------------------------------------------------------------------------------
// Traffic: namespaces, servers and clients.

/// Run `f` on a new thread inside network namespace `ns` (setns is per thread; the test
/// thread itself never changes namespace).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// A release: answers every line on TCP and every datagram on UDP with its name.
struct Release {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Release {
    fn start(ns: &str, name: &'static str) -> Release {
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, s2) = (stop.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        let tcp = in_netns(ns, move || {
            let l = TcpListener::bind(("0.0.0.0", RELEASE_PORT)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s1.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, _)) => {
                        thread::spawn(move || {
                            conn.set_nonblocking(false).ok();
                            let mut w = conn.try_clone().unwrap();
                            for line in BufReader::new(conn).lines() {
                                if line.is_err() || writeln!(w, "{name}").is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let udp = in_netns(ns, move || {
            let s = UdpSocket::bind(("0.0.0.0", RELEASE_PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            tx2.send(()).unwrap();
            let mut buf = [0u8; 64];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(name.as_bytes(), from);
                }
            }
        });
        rx.recv().unwrap();
        rx.recv().unwrap();
        Release { stop, threads: vec![tcp, udp] }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Ask over an open connection which release answers.
fn ask(conn: &mut TcpStream) -> io::Result<String> {
    conn.write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Connect to `to` from namespace `ns` (None: the host) and ask who answers.
fn connect_from(ns: Option<&str>, to: SocketAddrV4) -> io::Result<(TcpStream, String)> {
    let work = move || -> io::Result<(TcpStream, String)> {
        let mut c = TcpStream::connect_timeout(&SocketAddr::V4(to), FAIL_TIMEOUT)?;
        c.set_read_timeout(Some(FAIL_TIMEOUT))?;
        let who = ask(&mut c)?;
        Ok((c, who))
    };
    match ns {
        Some(ns) => in_netns(ns, work).join().unwrap(),
        None => work(),
    }
}

fn who_from(ns: Option<&str>, to: SocketAddrV4) -> io::Result<String> {
    connect_from(ns, to).map(|(_, who)| who)
}

/// A client namespace or release namespace joined to the host by a veth with a /30.
struct Link {
    ns: String,
    host_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

fn add_link(cleanup: &mut Cleanup, ns: String, host_if: String, subnet: [u8; 3], base: u8) -> Link {
    let host_ip = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], base + 1);
    let ns_ip = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], base + 2);
    let peer = format!("{host_if}p");
    sh(&["ip", "netns", "add", &ns]);
    cleanup.cmd(&["ip", "netns", "del", &ns]);
    sh(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer]);
    cleanup.cmd(&["ip", "link", "del", &host_if]);
    sh(&["ip", "link", "set", &peer, "netns", &ns]);
    sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
    sh(&["ip", "link", "set", &host_if, "up"]);
    sh(&["ip", "-n", &ns, "addr", "add", &format!("{ns_ip}/30"), "dev", &peer]);
    sh(&["ip", "-n", &ns, "link", "set", &peer, "up"]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &ns, "route", "add", "default", "via", &host_ip.to_string()]);
    Link { ns, host_if, host_ip, ns_ip }
}

fn docker_user_rules(comment: &str) -> usize {
    sh(&["iptables", "-w", "-S", "DOCKER-USER"]).lines().filter(|l| l.contains(comment)).count()
}

/// Where our copies in FORWARD are, by line of `iptables -S FORWARD`, and where Docker's
/// jump to DOCKER-USER is.
fn forward_rules(comment: &str) -> (Vec<usize>, Option<usize>) {
    let listing = sh(&["iptables", "-w", "-S", "FORWARD"]);
    let ours = listing.lines().enumerate().filter(|(_, l)| l.contains(comment)).map(|(i, _)| i).collect();
    let jump = listing.lines().position(|l| l.trim() == "-A FORWARD -j DOCKER-USER");
    (ours, jump)
}

fn docker_user_exists() -> bool {
    Command::new("iptables").args(["-w", "-n", "-L", "DOCKER-USER"]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// A host port no process uses, derived from the pid so parallel runs differ.
fn free_host_port(offset: u16) -> u16 {
    let used = common::listening_ports().unwrap();
    (0..500u16)
        .map(|i| 42000 + ((pid() as u16 % 500 + offset + i) % 3000))
        .find(|p| !used.contains(&(Protocol::Tcp, *p)) && !used.contains(&(Protocol::Udp, *p)))
        .expect("a free port")
}

#[test]
fn cutover_moves_new_connections_and_keeps_established_ones() {
    let fw = NftFirewall::new();
    let p = pid();
    let table = format!("cutover_nat_test_{p}_traffic");
    let x = (20 + p % 200) as u8;
    let subnet = [10, 231, x];
    let mut cleanup = Cleanup::default();
    guard_table(&mut cleanup, &table);

    // Forwarding must be on for the client namespace to reach releases via the host
    // (Docker turns it on; restore whatever it was).
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    if fwd.trim() != "1" {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        cleanup.call(move || {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", fwd);
        });
    }

    let client = add_link(&mut cleanup, format!("cutover-nat-{p}-c"), format!("cnc{p}"), subnet, 0);
    let rel_a = add_link(&mut cleanup, format!("cutover-nat-{p}-a"), format!("cna{p}"), subnet, 4);
    let rel_b = add_link(&mut cleanup, format!("cutover-nat-{p}-b"), format!("cnb{p}"), subnet, 8);
    let _a = Release::start(&rel_a.ns, "A");
    let _b = Release::start(&rel_b.ns, "B");

    // The releases answer directly from the host (OUTPUT, not FORWARD).
    assert_eq!(who_from(None, SocketAddrV4::new(rel_a.ns_ip, RELEASE_PORT)).unwrap(), "A");
    assert_eq!(who_from(None, SocketAddrV4::new(rel_b.ns_ip, RELEASE_PORT)).unwrap(), "B");

    let port = free_host_port(0);
    let front = SocketAddrV4::new(client.host_ip, port);
    let to_a = vec![target(port, Protocol::Tcp, rel_a.ns_ip, RELEASE_PORT), target(port, Protocol::Udp, rel_a.ns_ip, RELEASE_PORT)];
    let rs = plan::ruleset(&Desired { table: table.clone(), mark: MARK, targets: to_a, bridges: vec![] });
    fw.sync(&rs).unwrap();

    // Docker's FORWARD policy is DROP: DNAT'd traffic between our namespaces is dropped
    // until ensure_forward_accept lets the marked packets through.
    let docker = docker_user_exists();
    let comment = format!("cutover:{table}");
    if docker {
        let t = table.clone();
        cleanup.call(move || {
            if let Err(e) = NftFirewall::new().remove_forward_accept(&t, MARK) {
                eprintln!("cleanup DOCKER-USER: {e}");
            }
        });
        let err = who_from(Some(&client.ns), front).expect_err("Docker's FORWARD DROP stops DNAT'd traffic without the accept");
        assert!(matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{err}");
        fw.ensure_forward_accept(&table, MARK).unwrap();
        fw.ensure_forward_accept(&table, MARK).unwrap();
        assert_eq!(docker_user_rules(&comment), 1, "ensure_forward_accept is idempotent");
        let (ours, jump) = forward_rules(&comment);
        assert_eq!(ours.len(), 1, "one copy at the end of FORWARD");
        assert!(jump.is_some_and(|j| j < ours[0]), "the copy comes after Docker's jump to DOCKER-USER: {ours:?} {jump:?}");
        // At the top: above every rule that is not another cutover daemon's (tests running
        // beside this one insert theirs at the top too).
        let listing = sh(&["iptables", "-w", "-S", "DOCKER-USER"]);
        let first_other = listing.lines().skip(1).position(|l| !l.contains("--comment \"cutover:"));
        let ours = listing.lines().skip(1).position(|l| l.contains(&comment));
        assert!(ours.is_some() && ours < first_other, "the accept is at the top:\n{listing}");

        // Real behaviour worth knowing: the mark is set in a nat chain, so only the first
        // packet of a connection carries it. On a Docker bridge Docker's own
        // `-o <bridge> --ctstate RELATED,ESTABLISHED -j ACCEPT` and `-i <bridge> -j ACCEPT`
        // pass the rest; our plain veths have no such rules, so the handshake still fails.
        assert!(who_from(Some(&client.ns), front).is_err(), "the mark alone only passes the first packet");
        // Stand in for Docker's per-bridge ESTABLISHED accept, for our interface only.
        for dir in ["-i", "-o"] {
            let spec = [
                dir, client.host_if.as_str(), "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                "-m", "comment", "--comment", "cutover-nat-test", "-j", "ACCEPT",
            ];
            // Right below cutover's accept, above Docker's RETURN.
            sh(&[&["iptables", "-w", "-I", "DOCKER-USER", "2"][..], &spec[..]].concat());
            cleanup.cmd(&[&["iptables", "-w", "-D", "DOCKER-USER"][..], &spec[..]].concat());
        }
    } else {
        eprintln!("no DOCKER-USER chain: ensure_forward_accept is a no-op here");
        fw.ensure_forward_accept(&table, MARK).unwrap();
    }

    // Release A serves; hold one connection open across the switch.
    let (mut held, who) = connect_from(Some(&client.ns), front).unwrap();
    assert_eq!(who, "A");
    let udp = {
        let ns = client.ns.clone();
        in_netns(&ns, move || {
            let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            s.set_read_timeout(Some(FAIL_TIMEOUT)).unwrap();
            s.connect(front).unwrap();
            s
        })
        .join()
        .unwrap()
    };
    let udp_who = |s: &UdpSocket| -> String {
        s.send(b"who").unwrap();
        let mut buf = [0u8; 16];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(udp_who(&udp), "A");
    // Each packet of the flow is counted once, both directions, under the UDP port's
    // service: a "who" (3 bytes) and its answer (1 byte), each with 28 bytes of headers.
    let udp_service = format!("svc{port}udp");
    let udp_traffic = || fw.counters(&table).unwrap().get(&udp_service).copied().unwrap_or_default();
    let before = udp_traffic();
    assert_eq!(udp_who(&udp), "A");
    let after = udp_traffic();
    assert_eq!((after.packets - before.packets, after.bytes - before.bytes), (2, 31 + 29), "{before:?} -> {after:?}");
    assert!(fw.counters(&table).unwrap()[&format!("svc{port}tcp")].packets >= 5, "the TCP connection so far was counted");

    // The cutover.
    let ops = plan::element_ops(
        &rs.elements,
        &plan::elements(&[target(port, Protocol::Tcp, rel_b.ns_ip, RELEASE_PORT), target(port, Protocol::Udp, rel_b.ns_ip, RELEASE_PORT)]),
    );
    assert_eq!(ops.len(), 4);
    fw.apply_ops(&table, plan::DNAT_MAP, &ops).unwrap();

    assert_eq!(who_from(Some(&client.ns), front).unwrap(), "B", "new connections go to B");
    assert_eq!(ask(&mut held).unwrap(), "A", "the established connection stays on A");
    // UDP: the flow's conntrack entry keeps it on A until it is deleted.
    assert_eq!(udp_who(&udp), "A");
    let deleted = host::delete_conntrack(Protocol::Udp, port, rel_a.ns_ip).unwrap();
    assert!(deleted >= 1, "deleted {deleted}");
    assert_eq!(udp_who(&udp), "B");
    assert_eq!(host::delete_conntrack(Protocol::Udp, port, rel_a.ns_ip).unwrap(), 0);
    drop(held);

    // Host clients via 127.0.0.1 need route_localnet on the interface toward the release
    // (and the loopback masquerade in the table). Set it ourselves and restore it.
    let all = common::route_localnet("all");
    let previous = host::set_route_localnet(&rel_b.host_if, false).unwrap();
    let ifname = rel_b.host_if.clone();
    cleanup.call(move || {
        let _ = host::set_route_localnet(&ifname, previous);
    });
    let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    if all {
        eprintln!("net.ipv4.conf.all.route_localnet=1 on this host: cannot show the failure without it");
    } else {
        assert!(who_from(None, lo).is_err(), "127.0.0.1 must not work without route_localnet");
    }
    assert!(!host::set_route_localnet(&rel_b.host_if, true).unwrap());
    assert!(common::route_localnet(&rel_b.host_if));
    assert_eq!(who_from(None, lo).unwrap(), "B");
    // A host client over loopback: the request is counted at output, the answer at
    // prerouting, each once.
    let before = udp_traffic();
    let local = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
    local.set_read_timeout(Some(FAIL_TIMEOUT)).unwrap();
    local.connect(lo).unwrap();
    assert_eq!(udp_who(&local), "B");
    let after = udp_traffic();
    assert_eq!((after.packets - before.packets, after.bytes - before.bytes), (2, 31 + 29), "{before:?} -> {after:?}");

    // The host port is not a listening socket of the host (only a DNAT).
    assert!(!common::listening_ports().unwrap().contains(&(Protocol::Tcp, port)));

    if docker {
        fw.remove_forward_accept(&table, MARK).unwrap();
        fw.remove_forward_accept(&table, MARK).unwrap();
        assert_eq!(docker_user_rules(&comment), 0);
        assert_eq!(forward_rules(&comment).0, Vec::<usize>::new(), "the FORWARD copy is removed too");
        assert!(who_from(Some(&client.ns), front).is_err(), "without the accept Docker drops it again");
    }
}

#[test]
fn listening_ports_sees_a_real_listener() {
    let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let u = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
    let ports = common::listening_ports().unwrap();
    assert!(ports.contains(&(Protocol::Tcp, l.local_addr().unwrap().port())));
    assert!(ports.contains(&(Protocol::Udp, u.local_addr().unwrap().port())));
}
