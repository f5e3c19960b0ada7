//! Acceptance of the daemon's Prometheus endpoint (issue 4, item 5), as root against the
//! real Docker engine and nftables: a scraper polls `GET /metrics` over TCP from another
//! thread while a release is deployed, as Prometheus would, and finds the switch; the
//! per-service packet and byte counters grow with real clients' traffic (another host,
//! the host itself) and survive a deploy and a whole-table rewrite. With
//! `CUTOVER_TEST_BACKEND=iptables` the same runs against the iptables backend.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;


/// One scrape: the body of `GET /metrics`, or why there was none.
fn scrape(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| format!("read: {e}"))?;
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {reply:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("status: {head}"));
    }
    if !head.lines().any(|l| l.eq_ignore_ascii_case("Content-Type: text/plain; version=0.0.4; charset=utf-8")) {
        return Err(format!("content type: {head}"));
    }
    Ok(body.to_string())
}

/// A sample: metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// Parses the text exposition format (0.0.4) strictly: every line is `# HELP`, `# TYPE`
/// or a sample `name{label="value",...} value`; a sample's family was TYPEd before it.
fn parse(text: &str) -> Result<BTreeMap<Series, f64>, String> {
    let is_name = |s: &str| {
        let mut c = s.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    };
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut w = rest.trim_start().splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("HELP"), Some(name), _) if is_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind))
                    if is_name(name) && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) =>
                {
                    if typed.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(bad("a second TYPE line"));
                    }
                }
                _ => return Err(bad("not a HELP or TYPE comment")),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(bad("no value")),
        };
        if !is_name(name) {
            return Err(bad("metric name"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(mut r) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = r.find("=\"").ok_or_else(|| bad("label without =\""))?;
                let key = &r[..eq];
                if !is_name(key) || key.contains(':') {
                    return Err(bad("label name"));
                }
                let mut value = String::new();
                let mut chars = r[eq + 2..].char_indices();
                let end = loop {
                    match chars.next() {
                        Some((i, '"')) => break eq + 2 + i + 1,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            _ => return Err(bad("bad escape in a label value")),
                        },
                        Some((_, c)) => value.push(c),
                        None => return Err(bad("unterminated label value")),
                    }
                };
                if labels.insert(key.to_string(), value).is_some() {
                    return Err(bad("repeated label"));
                }
                r = &r[end..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
        }
        let mut fields = rest.split_whitespace();
        let value = match fields.next() {
            Some("+Inf") => f64::INFINITY,
            Some("-Inf") => f64::NEG_INFINITY,
            Some(v) => v.parse::<f64>().map_err(|_| bad("value"))?,
            None => return Err(bad("no value")),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| bad("timestamp"))?;
        }
        if fields.next().is_some() || !rest.starts_with(' ') {
            return Err(bad("trailing text"));
        }
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| typed.contains_key(*f))
            .unwrap_or(name);
        let family = if typed.contains_key(name) { name } else { family };
        if !typed.contains_key(family) {
            return Err(bad("sample before its TYPE line"));
        }
        if samples.insert((name.to_string(), labels), value).is_some() {
            return Err(bad("duplicate series"));
        }
    }
    Ok(samples)
}

fn value(samples: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (name.to_string(), labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    samples.get(&key).copied().unwrap_or(0.0)
}

#[test]
fn a_scrape_during_a_deploy_finds_the_switch() {
    let ids = Ids::new("a_scrape_during_a_deploy_finds_the_switch");
    let net = nat_network(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let v2 = demo_image(&ids, "v2", &[]);
    let metrics_addr = format!("127.0.0.1:{}", ids.port());
    let daemon = Daemon::start_with(&ids, &["--metrics", &metrics_addr]);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "15s"));
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(get_ok(At::Host, &url).trim(), "v1");

    let service = ids.service.as_str();
    let switched = [("service", service), ("kind", "deploy"), ("outcome", "switched")];
    let before = parse(&scrape(&metrics_addr).unwrap_or_else(|e| panic!("scrape before the deploy: {e}")))
        .unwrap_or_else(|e| panic!("exposition before the deploy: {e}"));
    let switched_before = value(&before, "cutover_releases_total", &switched);
    let switches_before = value(&before, "cutover_switch_seconds_count", &[("service", service)]);
    assert_eq!(switched_before, 1.0, "the first release (apply) is a switched deploy: {before:?}");
    assert_eq!(value(&before, "cutover_active_release", &[("service", service)]), 1.0);

    // A request in flight on v1 keeps the old release draining for a few seconds, so
    // scrapes land between the switch and the end of the deploy.
    let slow = SlowRequest::start(&ids, At::Host, &format!("{url}slow?ms=3000"), Duration::from_secs(30));
    slow.wait_established(Duration::from_secs(10));

    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, addr) = (stop.clone(), metrics_addr.clone());
        std::thread::spawn(move || {
            let mut scrapes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                scrapes.push((Instant::now(), scrape(&addr)));
                std::thread::sleep(Duration::from_millis(100));
            }
            scrapes
        })
    };
    let started = Instant::now();
    let out = daemon.cli_ok(&["deploy", service, "--image", &v2]);
    let finished = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().unwrap_or_else(|_| panic!("the scraper thread panicked"));
    assert!(out.stdout.contains("release 2"), "{out:?}");
    let (status, body) = slow.wait().unwrap_or_else(|e| panic!("the slow request: {e:?}"));
    assert_eq!((status, body.trim()), (200, "v1"));

    // Every scrape answered, and every line of every answer is the exposition format.
    let mut during = Vec::new();
    for (at, result) in &scrapes {
        let text = result.as_ref().unwrap_or_else(|e| panic!("a scrape during the deploy failed: {e}"));
        let samples = parse(text).unwrap_or_else(|e| panic!("not the exposition format: {e}\n{text}"));
        if *at > started && *at < finished {
            during.push(samples);
        }
    }
    assert!(during.len() >= 5, "{} scrapes during a deploy that took {:?}", during.len(), finished - started);
    // While the old release drained, a scrape already saw the switch and the new release.
    assert!(
        during.iter().any(|s| {
            value(s, "cutover_switch_seconds_count", &[("service", service)]) >= switches_before + 1.0
                && value(s, "cutover_active_release", &[("service", service)]) == 2.0
                && value(s, "cutover_releases_total", &switched) == switched_before
        }),
        "no scrape during the deploy saw the switch before the deploy finished"
    );

    let after = parse(&scrape(&metrics_addr).unwrap_or_else(|e| panic!("scrape after the deploy: {e}")))
        .unwrap_or_else(|e| panic!("exposition after the deploy: {e}"));
    assert_eq!(value(&after, "cutover_releases_total", &switched), switched_before + 1.0, "{after:?}");
    let switches = value(&after, "cutover_switch_seconds_count", &[("service", service)]);
    assert!(switches >= 1.0 && switches == switches_before + 1.0, "switch histogram count {switches}");
    assert_eq!(
        value(&after, "cutover_switch_seconds_bucket", &[("service", service), ("le", "+Inf")]),
        switches,
        "+Inf bucket equals the count"
    );
    assert!(value(&after, "cutover_switch_seconds_sum", &[("service", service)]) > 0.0);
    assert_eq!(value(&after, "cutover_health_wait_seconds_count", &[("service", service)]), 2.0);
    assert_eq!(value(&after, "cutover_drain_seconds_count", &[("service", service)]), 1.0);
    assert!(
        value(&after, "cutover_drain_seconds_sum", &[("service", service)]) >= 2.0,
        "the drain waited for the slow request: {after:?}"
    );
    assert_eq!(value(&after, "cutover_active_release", &[("service", service)]), 2.0);
    assert_eq!(value(&after, "cutover_open_connections", &[("service", service), ("release", "1")]), 0.0);
    assert!(
        during.iter().any(|s| value(s, "cutover_open_connections", &[("service", service), ("release", "1")]) >= 1.0),
        "a scrape during the drain counted the slow request's connection"
    );
}

#[test]
fn metrics_address_in_use_fails_the_start() {
    let ids = Ids::new("metrics_address_in_use_fails_the_start");
    require_root();
    require_docker();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = taken.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}")).to_string();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut daemon = std::process::Command::new(CUTOVER);
    daemon
        .args(["daemon", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--table", &ids.table, "--mark", &ids.mark_arg(), "--instance", &ids.tag, "--metrics", &addr]);
    // A daemon that starts anyway would serve forever: bounded, it fails the test.
    let out = common::cmd::run_bounded(&mut daemon, Duration::from_secs(20));
    let stderr = &out.stderr;
    assert!(!out.success(), "the daemon started although {addr} is taken: {stderr}");
    assert!(stderr.contains(&format!("cannot listen for metrics on {addr}")), "{stderr}");
}

/// `cutover_packets_total` and `cutover_bytes_total` of `service` in one scrape; both
/// series must be there.
#[track_caller]
fn traffic(addr: &str, service: &str) -> (f64, f64) {
    let text = scrape(addr).unwrap_or_else(|e| panic!("scrape: {e}"));
    let samples = parse(&text).unwrap_or_else(|e| panic!("not the exposition format: {e}\n{text}"));
    let labels: BTreeMap<String, String> = BTreeMap::from([("service".to_string(), service.to_string())]);
    let get = |name: &str| {
        samples.get(&(name.to_string(), labels.clone())).copied().unwrap_or_else(|| panic!("no {name} for {service} in:\n{text}"))
    };
    (get("cutover_packets_total"), get("cutover_bytes_total"))
}

/// `n` requests, each on a new connection, answered by `release`.
#[track_caller]
fn requests(at: At, url: &str, n: usize, release: &str) {
    for i in 0..n {
        assert_eq!(get_ok(at.clone(), url).trim(), release, "request {i} to {url}");
    }
}

/// A request on a fresh TCP connection is about ten packets in both directions
/// (handshake, request, answer, acks, closing); counted twice, it would be about twenty.
#[track_caller]
fn assert_counted_once(packets: f64, bytes: f64, n: usize, path: &str) {
    let per_request = packets / n as f64;
    assert!((5.0..=15.0).contains(&per_request), "{path}: {per_request} packets per request ({packets} for {n})");
    assert!(bytes >= 40.0 * packets, "{path}: {bytes} bytes for {packets} packets, each has 40 bytes of headers at least");
}

#[test]
fn packet_and_byte_counters_grow_with_a_services_traffic() {
    let ids = Ids::new("packet_and_byte_counters_grow_with_a_services_traffic");
    let TwoReleases { net, v1, v2, client } = two_releases(&ids);
    let metrics_addr = format!("127.0.0.1:{}", ids.port());
    let daemon = Daemon::start_with(&ids, &["--metrics", &metrics_addr]);
    let port = ids.port();
    apply(&daemon, ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "2s"));
    let service = ids.service.as_str();
    const N: usize = 10;

    // Health checks go to the container's own address, not through the host port.
    let (p0, b0) = traffic(&metrics_addr, service);
    assert_eq!((p0, b0), (0.0, 0.0), "nothing has used the host port yet");

    // Clients on another host: both directions pass prerouting.
    let remote = client.url(port);
    requests(client.at(), &remote, N, "v1");
    let (p1, b1) = traffic(&metrics_addr, service);
    assert_counted_once(p1 - p0, b1 - b0, N, "another host");

    // A deploy changes one map element: the counters go on.
    daemon.cli_ok(&["deploy", service, "--image", &v2]);
    let (p2, b2) = traffic(&metrics_addr, service);
    assert!(p2 >= p1 && b2 >= b1, "a deploy does not reset the counters: {p1} -> {p2} packets, {b1} -> {b2} bytes");

    // Clients on the host over loopback: requests pass output, answers prerouting.
    let local = format!("http://127.0.0.1:{port}/");
    requests(At::Host, &local, N, "v2");
    let (p3, b3) = traffic(&metrics_addr, service);
    assert_counted_once(p3 - p2, b3 - b2, N, "the host over loopback");

    // A second service changes the counting rules, so the whole table is rewritten (its
    // counters start at zero in the kernel): what they had counted is carried.
    let other = format!("b-{}", ids.tag);
    apply(&daemon, ServiceYaml::http(&other, &v1, ids.port(), &net.name));
    let (p4, b4) = traffic(&metrics_addr, service);
    assert!(p4 >= p3 && b4 >= b3, "a whole-table sync does not reset the counters: {p3} -> {p4} packets, {b3} -> {b4} bytes");
    assert_eq!(traffic(&metrics_addr, &other), (0.0, 0.0), "the new service is counted from zero, on its own");
    // Docker puts its DOCKER-USER jump first in FORWARD again whenever a network is
    // created; counting must not depend on where that jump is (it accepts marked packets).
    let extra = format!("{}-x", net.name);
    common::docker::create_bridge_network(&ids, &extra, &format!("x{}", &ids.bridge()[1..]));
    run(&mut common::cmd::cmd(DOCKER, ["network", "rm", &extra]));
    requests(client.at(), &remote, N, "v2");
    let (p5, b5) = traffic(&metrics_addr, service);
    assert_counted_once(p5 - p4, b5 - b4, N, "another host, after the rewrite");

    // A rollback, too, leaves them growing.
    daemon.cli_ok(&["rollback", service]);
    requests(client.at(), &remote, 1, "v1");
    let (p6, b6) = traffic(&metrics_addr, service);
    assert!(p6 > p5 && b6 > b5, "{p5} -> {p6} packets, {b5} -> {b6} bytes");
}
