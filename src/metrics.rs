//! The daemon's Prometheus endpoint (`cutover daemon --metrics ADDR`): a registry the
//! release state machine records into, and a minimal HTTP/1.1 server answering
//! `GET /metrics` in the text exposition format (version 0.0.4).
//!
//! Owns the series and their rendering. Recording is in-process and cheap (one mutex,
//! no allocation beyond the first sample of a series), so the state machine calls it
//! inline; what is a fact of the state (which release is active) is read at scrape time
//! through [`Scrape`] instead of being mirrored here. It must not touch the kernel, the
//! engine or the state file: the caller of [`serve`] hands in what a scrape needs.
//!
//! Series:
//! - `cutover_releases_total{service,kind,outcome}` counter: finished operations
//!   (`switched`, `refused`, `failed`, `reverted`, `undone`, `finished_after_restart`);
//! - `cutover_switch_seconds{service}` histogram: the kernel transaction of a switch;
//! - `cutover_health_wait_seconds{service}`, `cutover_drain_seconds{service}` histograms;
//! - `cutover_active_release{service}` gauge: the active release number (0: none);
//! - `cutover_active_down{service}` gauge: 1 while the active release is lost and no
//!   release serves (`status` shows DOWN), read from the state at scrape time;
//! - `cutover_active_lost_total{service,reason}` counter: active releases lost while no
//!   operation ran (`died`, `oom`, `killed`, `removed`, `disconnected`, `unhealthy`);
//! - `cutover_open_connections{service,release}` gauge: the last connection count of the
//!   release that drained last (one series per service, so stopped releases do not pile up);
//! - `cutover_packets_total{service}`, `cutover_bytes_total{service}` counters: packets
//!   and bytes (IP packet lengths) of the service's forwarded connections, both
//!   directions, counted by the kernel's counting rules (see `plan`) and read at scrape
//!   time; carried across whole-table syncs, so they only grow while the daemon runs and
//!   the service exists (deploy and rollback do not touch them);
//! - `cutover_build_info{version}` gauge, always 1.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::plan::Traffic;
use crate::state::{OperationKind, State};

/// The Content-Type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds (seconds) of the switch histogram: from 100 µs (one map-element
/// transaction on an idle host) up to a second (a whole-table sync on a loaded one).
pub const SWITCH_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Bucket bounds (seconds) of the health wait and drain histograms.
pub const WAIT_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0];

/// A request head larger than this is refused: a scraper sends a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client that has not sent its request head by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection, request and answer together, never lasts longer (a client that does
/// not read its answer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Scrapes open at once, in all and per client address. A scraper holds one; more from
/// one address is a flood, and each would cost the daemon an fd.
pub const CAPS: crate::limits::Caps = crate::limits::Caps { total: 32, per_peer: 4 };

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Cumulative histogram with fixed bounds, as Prometheus exposes it.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more than `bounds` for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, seconds: f64) {
        let i = self.bounds.iter().position(|b| seconds <= *b).unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct Registry {
    /// (service, kind, outcome) -> count.
    releases: BTreeMap<(String, &'static str, String), u64>,
    switch: BTreeMap<String, Histogram>,
    health_wait: BTreeMap<String, Histogram>,
    drain: BTreeMap<String, Histogram>,
    /// service -> (release, open connections) of its last drain.
    draining: BTreeMap<String, (u32, u64)>,
    /// (service, reason) -> active releases lost.
    lost: BTreeMap<(String, &'static str), u64>,
}

/// What the daemon's metrics record. Shared by the state machine (writer) and the
/// endpoint (reader).
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
}

fn kind_label(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::Deploy => "deploy",
        OperationKind::Rollback => "rollback",
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// A panic while recording must not take the endpoint down with it: the registry
    /// holds plain numbers, valid after any partial update.
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An operation on `service` finished with `outcome` (as recorded in its history).
    pub fn release(&self, service: &str, kind: OperationKind, outcome: &str) {
        *self.registry().releases.entry((service.to_string(), kind_label(kind), outcome.to_string())).or_default() += 1;
    }

    /// The new release became healthy after `took`.
    pub fn health_wait(&self, service: &str, took: Duration) {
        self.registry().health_wait.entry(service.to_string()).or_insert_with(|| Histogram::new(WAIT_BUCKETS)).observe(took.as_secs_f64());
    }

    /// The kernel took `took` to point the host ports at the new release.
    pub fn switched(&self, service: &str, took: Duration) {
        self.registry().switch.entry(service.to_string()).or_insert_with(|| Histogram::new(SWITCH_BUCKETS)).observe(took.as_secs_f64());
    }

    /// The old release drained (or its drain timeout passed) after `took`.
    pub fn drained(&self, service: &str, took: Duration) {
        self.registry().drain.entry(service.to_string()).or_insert_with(|| Histogram::new(WAIT_BUCKETS)).observe(took.as_secs_f64());
    }

    /// `release` of `service` still holds `open` connections while it drains (`None`:
    /// they could not be counted, and the last count stays).
    pub fn draining(&self, service: &str, release: u32, open: Option<usize>) {
        let mut r = self.registry();
        match open {
            Some(n) => {
                r.draining.insert(service.to_string(), (release, u64::try_from(n).unwrap_or(u64::MAX)));
            }
            None => {
                if r.draining.get(service).is_some_and(|(rel, _)| *rel != release) {
                    r.draining.remove(service);
                }
            }
        }
    }

    /// The active release of `service` was lost while no operation ran, for `reason`
    /// (one of [`LOSS_REASONS`]).
    pub fn active_lost(&self, service: &str, reason: &'static str) {
        *self.registry().lost.entry((service.to_string(), reason)).or_default() += 1;
    }

    /// The exposition text of every series, with `scrape` for what is read at scrape time.
    pub fn render(&self, scrape: &Scrape) -> String {
        let r = self.registry();
        let mut out = String::with_capacity(4096);
        header(&mut out, "cutover_build_info", "gauge", "The version of the cutover daemon serving these metrics.");
        sample(&mut out, "cutover_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);

        header(&mut out, "cutover_releases_total", "counter", "Release operations finished, by service, kind and outcome.");
        for ((service, kind, outcome), n) in &r.releases {
            sample(&mut out, "cutover_releases_total", &[("service", service), ("kind", kind), ("outcome", outcome)], *n as f64);
        }
        histogram(&mut out, "cutover_switch_seconds", "Time the kernel took to switch a service's host ports to a new release.", &r.switch);
        histogram(&mut out, "cutover_health_wait_seconds", "Time from a new release's start to its first passing health check.", &r.health_wait);
        histogram(&mut out, "cutover_drain_seconds", "Time the old release took to drain after a switch.", &r.drain);

        header(&mut out, "cutover_open_connections", "gauge", "Connections the last draining release of a service held at its last count.");
        for (service, (release, open)) in &r.draining {
            sample(&mut out, "cutover_open_connections", &[("service", service), ("release", &release.to_string())], *open as f64);
        }
        header(&mut out, "cutover_active_lost_total", "counter", "Active releases lost while no operation ran, by service and reason.");
        for ((service, reason), n) in &r.lost {
            sample(&mut out, "cutover_active_lost_total", &[("service", service), ("reason", reason)], *n as f64);
        }
        drop(r);

        header(&mut out, "cutover_active_release", "gauge", "The active release number of a service (0: none).");
        for (service, active) in &scrape.active {
            sample(&mut out, "cutover_active_release", &[("service", service)], f64::from(active.unwrap_or(0)));
        }
        header(&mut out, "cutover_active_down", "gauge", "1 while a service's active release is lost and no release serves it, else 0.");
        for (service, down) in &scrape.down {
            sample(&mut out, "cutover_active_down", &[("service", service)], if *down { 1.0 } else { 0.0 });
        }

        header(&mut out, "cutover_packets_total", "counter", "Packets of a service's forwarded connections, both directions, counted by the kernel.");
        for (service, t) in &scrape.traffic {
            sample(&mut out, "cutover_packets_total", &[("service", service)], t.packets as f64);
        }
        header(&mut out, "cutover_bytes_total", "counter", "Bytes (IP packet lengths) of a service's forwarded connections, both directions, counted by the kernel.");
        for (service, t) in &scrape.traffic {
            sample(&mut out, "cutover_bytes_total", &[("service", service)], t.bytes as f64);
        }
        out
    }
}

/// What a scrape reads from the daemon's state and the kernel at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// service -> its active release.
    pub active: BTreeMap<String, Option<u32>>,
    /// service -> its traffic (NAT-mode services only).
    pub traffic: BTreeMap<String, Traffic>,
    /// service -> its active release is down (`status` shows DOWN).
    pub down: BTreeMap<String, bool>,
}

impl Scrape {
    pub fn of_state(state: &State) -> Scrape {
        Scrape {
            active: state.services.iter().map(|(name, svc)| (name.clone(), svc.active)).collect(),
            traffic: BTreeMap::new(),
            down: state.services.iter().map(|(name, svc)| (name.clone(), svc.down.is_some())).collect(),
        }
    }
}

/// The `reason` label values of `cutover_active_lost_total`.
pub const LOSS_REASONS: &[&str] = &["died", "oom", "killed", "removed", "disconnected", "unhealthy"];

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escaped as the format requires: backslash, double quote, newline.
fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(value));
}

fn histogram(out: &mut String, name: &str, help: &str, per_service: &BTreeMap<String, Histogram>) {
    header(out, name, "histogram", help);
    let bucket = format!("{name}_bucket");
    for (service, h) in per_service {
        let mut cumulative = 0u64;
        for (i, n) in h.counts.iter().enumerate() {
            cumulative += n;
            let le = h.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| format_value(*b));
            sample(out, &bucket, &[("service", service), ("le", &le)], cumulative as f64);
        }
        sample(out, &format!("{name}_sum"), &[("service", service)], h.sum);
        sample(out, &format!("{name}_count"), &[("service", service)], h.count as f64);
    }
}

/// Listen on `addr` (before the daemon reports ready, so a taken port fails the start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })
}

/// Serve `GET /metrics` on `listener` until `shutdown` completes. `scrape` reads what is
/// taken from the state at scrape time. One request per connection.
pub async fn serve<F, Fut>(listener: TcpListener, metrics: Arc<Metrics>, scrape: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Scrape> + Send + 'static,
{
    let scrape = Arc::new(scrape);
    let limiter = crate::limits::Limiter::new(CAPS);
    let over_cap_log = crate::limits::LogThrottle::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let permit = match limiter.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(over) => {
                            // Closed at once (dropped): it costs no task and no buffer.
                            if let Some(held_back) = over_cap_log.allow() {
                                tracing::warn!(%peer, held_back, "metrics connection closed at once: {over}");
                            }
                            continue;
                        }
                    };
                    let (metrics, scrape) = (metrics.clone(), scrape.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, &metrics, scrape.as_ref())).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request"),
                            Err(_) => tracing::debug!(%peer, "metrics connection took longer than {CONNECTION_TIMEOUT:?}; closed"),
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
}

/// The request line of a request head, once the head is complete.
fn request_line(head: &[u8]) -> Option<&str> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| head.windows(2).position(|w| w == b"\n\n"))?;
    let line = head.get(..end)?.split(|b| *b == b'\n').next()?;
    std::str::from_utf8(line).ok().map(str::trim_end)
}

/// Status, extra headers, and whether the exposition is the body, for a request line.
fn route(line: &str) -> (&'static str, &'static str, bool) {
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", "", true),
        ("GET" | "HEAD", _) => ("404 Not Found", "", false),
        _ => ("405 Method Not Allowed", "Allow: GET, HEAD\r\n", false),
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, metrics: &Metrics, scrape: &F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Scrape>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let line = loop {
        if let Some(line) = request_line(&head) {
            break line.to_string();
        }
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "text/plain", b"request head too large\n", false).await;
        }
        let n = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request head"))??;
        if n == 0 {
            return Ok(()); // closed before a complete request: nothing to answer
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    };
    let head_only = line.starts_with("HEAD ");
    match route(&line) {
        (status, extra, true) => {
            let body = metrics.render(&scrape().await);
            respond(&mut stream, status, extra, CONTENT_TYPE, body.as_bytes(), head_only).await
        }
        (status, extra, false) => {
            let body = format!("{status}: cutover serves /metrics\n");
            respond(&mut stream, status, extra, "text/plain; charset=utf-8", body.as_bytes(), head_only).await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    extra_headers: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line is a comment (`# HELP`/`# TYPE`) or `name{labels} value`.
    fn assert_exposition(text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                assert!(rest.starts_with("HELP ") || rest.starts_with("TYPE "), "{line}");
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let m = Metrics::new();
        m.switched("web", Duration::from_micros(80));
        m.switched("web", Duration::from_millis(3));
        m.switched("web", Duration::from_secs(5));
        let text = m.render(&Scrape::default());
        assert_exposition(&text);
        assert!(text.contains("cutover_switch_seconds_bucket{service=\"web\",le=\"0.0001\"} 1\n"), "{text}");
        assert!(text.contains("cutover_switch_seconds_bucket{service=\"web\",le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("cutover_switch_seconds_bucket{service=\"web\",le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("cutover_switch_seconds_bucket{service=\"web\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("cutover_switch_seconds_count{service=\"web\"} 3\n"), "{text}");
    }

    #[test]
    fn outcomes_count_per_service_kind_and_outcome() {
        let m = Metrics::new();
        m.release("web", OperationKind::Deploy, "switched");
        m.release("web", OperationKind::Deploy, "switched");
        m.release("web", OperationKind::Rollback, "reverted");
        m.release("api", OperationKind::Deploy, "refused");
        let text = m.render(&Scrape { active: BTreeMap::from([("web".into(), Some(3)), ("api".into(), None)]), ..Scrape::default() });
        assert_exposition(&text);
        assert!(text.contains("cutover_releases_total{service=\"web\",kind=\"deploy\",outcome=\"switched\"} 2\n"), "{text}");
        assert!(text.contains("cutover_releases_total{service=\"web\",kind=\"rollback\",outcome=\"reverted\"} 1\n"), "{text}");
        assert!(text.contains("cutover_releases_total{service=\"api\",kind=\"deploy\",outcome=\"refused\"} 1\n"), "{text}");
        assert!(text.contains("cutover_active_release{service=\"web\"} 3\n"), "{text}");
        assert!(text.contains("cutover_active_release{service=\"api\"} 0\n"), "{text}");
    }

    #[test]
    fn lost_active_releases_count_by_reason_and_down_is_a_gauge() {
        let m = Metrics::new();
        m.active_lost("web", "unhealthy");
        m.active_lost("web", "unhealthy");
        m.active_lost("web", "disconnected");
        let scrape = Scrape { down: BTreeMap::from([("web".into(), true), ("api".into(), false)]), ..Scrape::default() };
        let text = m.render(&scrape);
        assert_exposition(&text);
        assert!(text.contains("cutover_active_lost_total{service=\"web\",reason=\"unhealthy\"} 2\n"), "{text}");
        assert!(text.contains("cutover_active_lost_total{service=\"web\",reason=\"disconnected\"} 1\n"), "{text}");
        assert!(text.contains("cutover_active_down{service=\"web\"} 1\n"), "{text}");
        assert!(text.contains("cutover_active_down{service=\"api\"} 0\n"), "{text}");
    }

    #[test]
    fn one_open_connections_series_per_service() {
        let m = Metrics::new();
        m.draining("web", 1, Some(7));
        m.draining("web", 1, Some(2));
        m.draining("web", 1, None);
        assert!(m.render(&Scrape::default()).contains("cutover_open_connections{service=\"web\",release=\"1\"} 2\n"));
        m.draining("web", 2, Some(0));
        let text = m.render(&Scrape::default());
        assert!(!text.contains("release=\"1\""), "{text}");
        assert!(text.contains("cutover_open_connections{service=\"web\",release=\"2\"} 0\n"), "{text}");
    }

    #[test]
    fn traffic_is_two_counter_families_per_service() {
        let scrape = Scrape {
            traffic: BTreeMap::from([("web".into(), Traffic { packets: 12, bytes: 3456 }), ("api".into(), Traffic::default())]),
            ..Scrape::default()
        };
        let text = Metrics::new().render(&scrape);
        assert_exposition(&text);
        assert!(text.contains("# TYPE cutover_packets_total counter\ncutover_packets_total{service=\"api\"} 0\ncutover_packets_total{service=\"web\"} 12\n"), "{text}");
        assert!(text.contains("# TYPE cutover_bytes_total counter\n"), "{text}");
        assert!(text.contains("cutover_bytes_total{service=\"web\"} 3456\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1").0, "200 OK");
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0").0, "200 OK");
        assert_eq!(route("GET / HTTP/1.1").0, "404 Not Found");
        assert_eq!(route("POST /metrics HTTP/1.1").0, "405 Method Not Allowed");
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some("GET /metrics HTTP/1.1"));
    }

    #[tokio::test]
    async fn serves_the_exposition_over_http() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.release("web", OperationKind::Deploy, "switched");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics, || async { Scrape::default() }, async {
            let _ = stopped.await;
        }));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Type: {CONTENT_TYPE}")), "{head}");
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
        assert_exposition(body);
        assert!(body.contains("outcome=\"switched\"} 1\n"), "{body}");
        drop(stop);
        server.await.unwrap();
    }
}
