//! Acceptance of the daemon's Prometheus endpoint (issue 4, item 5), as root against the
//! real Docker engine and nftables: a scraper polls `GET /metrics` over TCP from another
//! thread while a release is deployed, as Prometheus would, and finds the switch.

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
    require_root();
    require_docker();
    let net = DockerNetwork::new(&ids);
    let v1 = demo_image(&ids, "v1", &[]);
    let v2 = demo_image(&ids, "v2", &[]);
    let metrics_addr = format!("127.0.0.1:{}", ids.port());
    let daemon = Daemon::start_with(&ids, &["--metrics", &metrics_addr]);
    let port = ids.port();
    let file = ServiceYaml::http(&ids.service, &v1, port, &net.name).set("drain_timeout", "15s").write(daemon.dir());
    daemon.cli_ok(&["apply", file.to_str().unwrap_or_default()]);
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
