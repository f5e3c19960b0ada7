//! A small HTTP/1.1 load generator: the demo's (and the tests') witness that a cutover
//! refuses no request.
//!
//! Two kinds of clients run against one address at full speed:
//! - *fresh* workers open a new TCP connection for every request, so each request is a
//!   new flow that the NAT map decides (they send `Connection: close`, which lets the
//!   server close first and keeps the TIME_WAIT sockets off the host's port range);
//! - *keep-alive* connections stay open and issue requests in a loop, so they stay on
//!   the release they first reached until that release closes them.
//!
//! A request counts as failed only when it gets no valid answer. A keep-alive connection
//! that the server closed between two requests (a stopping release answers with
//! `Connection: close`, and closes connections that stay idle) is reopened
//! and the request sent again once, as every HTTP client does for a request that got
//! no byte of answer on a reused connection; only if that retry fails is it counted.
//!
//! Owns nothing but its sockets and counters; speaks only to the address it is given.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Longest status or header line read; the demo server's lines are far shorter.
const MAX_LINE: u64 = 8 * 1024;
/// Longest body read; the demo server answers with a release name.
const MAX_BODY: u64 = 64 * 1024;
/// Distinct release names counted one by one; anything beyond is lumped together so a
/// misbehaving server cannot grow the counters without bound.
const MAX_RELEASES: usize = 32;
const OTHER_RELEASE: &str = "(other)";
/// Pause after a failed request: a refused port would otherwise spin a core, and the
/// count of failures matters, not their rate.
const FAILURE_BACKOFF: Duration = Duration::from_millis(5);

/// What to load and how hard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Request target, e.g. `/`.
    pub path: String,
    /// Workers that open a new connection per request.
    pub fresh_workers: usize,
    /// Long-lived keep-alive connections.
    pub keepalive_connections: usize,
    /// Connect timeout, and the time a request may take to be answered.
    pub timeout: Duration,
}

/// Why a request got no valid answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// The connection could not be opened (refused, unreachable, timed out).
    Connect,
    /// The connection broke or the answer was cut or malformed.
    Read,
    /// An answer came, but its status was not 2xx.
    Status,
    /// No complete answer within the timeout.
    Timeout,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureKind::Connect => "connect",
            FailureKind::Read => "read",
            FailureKind::Status => "status",
            FailureKind::Timeout => "timeout",
        })
    }
}

/// A request that got no valid answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} failure: {detail}")]
pub struct RequestFailure {
    pub kind: FailureKind,
    pub detail: String,
}

impl RequestFailure {
    fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        RequestFailure { kind, detail: detail.into() }
    }
}

/// A valid answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `X-Release` if present, else the body without surrounding white space.
    pub release: String,
    /// The server will close the connection after this answer.
    pub close: bool,
}

/// Counters of a load run, or of a stretch of one (see [`Tally::since`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub requests: u64,
    pub ok: u64,
    pub failures: BTreeMap<FailureKind, u64>,
    /// Answers per release name.
    pub releases: BTreeMap<String, u64>,
    /// Keep-alive connections reopened because the server closed them.
    pub reconnects: u64,
    /// The first few failures, for a report.
    pub examples: Vec<RequestFailure>,
    pub latency: Histogram,
}

impl Tally {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// What happened between `earlier` (a snapshot of the same run) and `self`.
    pub fn since(&self, earlier: &Tally) -> Tally {
        fn sub_map<K: Ord + Clone>(now: &BTreeMap<K, u64>, then: &BTreeMap<K, u64>) -> BTreeMap<K, u64> {
            now.iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(then.get(k).copied().unwrap_or(0))))
                .filter(|(_, v)| *v > 0)
                .collect()
        }
        Tally {
            requests: self.requests.saturating_sub(earlier.requests),
            ok: self.ok.saturating_sub(earlier.ok),
            failures: sub_map(&self.failures, &earlier.failures),
            releases: sub_map(&self.releases, &earlier.releases),
            reconnects: self.reconnects.saturating_sub(earlier.reconnects),
            examples: self.examples.iter().skip(earlier.examples.len()).cloned().collect(),
            latency: self.latency.since(&earlier.latency),
        }
    }

    fn record(&mut self, result: &Result<Answer, RequestFailure>, took: Duration) {
        self.requests += 1;
        self.latency.record(took);
        match result {
            Ok(a) => {
                self.ok += 1;
                let known = self.releases.len() < MAX_RELEASES || self.releases.contains_key(&a.release);
                let name = if known { a.release.clone() } else { OTHER_RELEASE.to_string() };
                *self.releases.entry(name).or_default() += 1;
            }
            Err(f) => {
                *self.failures.entry(f.kind).or_default() += 1;
                if self.examples.len() < 5 {
                    self.examples.push(f.clone());
                }
            }
        }
    }
}

/// Latencies in microseconds, in log-linear buckets (16 per power of two, so any
/// quantile is within about 6 % of the true value) with an exact maximum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
}

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: vec![0; Histogram::index(u64::MAX) + 1], count: 0, max_us: 0 }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        let msb = 63 - us.leading_zeros();
        let group = u64::from(msb - (SUB_BITS - 1));
        let sub = (us >> (msb - SUB_BITS)) & (SUB - 1);
        (group * SUB + sub) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let (group, sub) = (i / SUB, i % SUB);
        let shift = group - 1;
        let lower = (SUB | sub) << shift;
        lower.saturating_add((1u64 << shift) - 1)
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = self.buckets.get_mut(Histogram::index(us)) {
            *b += 1;
        }
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The latency below which a fraction `q` (0..=1) of the requests fell.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(Histogram::upper(i).min(self.max_us)));
            }
        }
        Some(Duration::from_micros(self.max_us))
    }

    /// The maximum; exact over a whole run, an upper bound over a stretch of one.
    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.max_us))
    }

    fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets: Vec<u64> =
            self.buckets.iter().zip(earlier.buckets.iter().chain(std::iter::repeat(&0))).map(|(a, b)| a.saturating_sub(*b)).collect();
        let top = buckets.iter().rposition(|n| *n > 0).map(Histogram::upper).unwrap_or(0);
        Histogram { buckets, count: self.count.saturating_sub(earlier.count), max_us: top.min(self.max_us) }
    }
}

/// A running load. Dropping it stops the clients (their tasks are aborted).
pub struct Load {
    tally: Arc<Mutex<Tally>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Load {
    /// Start the clients described by `spec` on the current tokio runtime.
    pub fn start(spec: &LoadSpec) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for _ in 0..spec.fresh_workers {
            tasks.spawn(fresh_worker(spec.clone(), tally.clone(), stopped.clone()));
        }
        for _ in 0..spec.keepalive_connections {
            tasks.spawn(keepalive_worker(spec.clone(), tally.clone(), stopped.clone()));
        }
        Load { tally, stop, tasks }
    }

    /// The counters so far.
    pub fn snapshot(&self) -> Tally {
        lock(&self.tally).clone()
    }

    /// Let every client finish its current request, then return the final counters.
    pub async fn stop(mut self) -> Tally {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.snapshot()
    }
}

/// A poisoned lock only means a client task panicked mid-update of plain counters;
/// they are still the best numbers there are.
fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn fresh_worker(spec: LoadSpec, tally: Arc<Mutex<Tally>>, stopped: watch::Receiver<bool>) {
    while !*stopped.borrow() {
        let started = Instant::now();
        let result = get_once(spec.target, &spec.path, spec.timeout).await;
        lock(&tally).record(&result, started.elapsed());
        if result.is_err() {
            tokio::time::sleep(FAILURE_BACKOFF).await;
        }
    }
}

async fn keepalive_worker(spec: LoadSpec, tally: Arc<Mutex<Tally>>, stopped: watch::Receiver<bool>) {
    let mut conn: Option<Connection> = None;
    while !*stopped.borrow() {
        let started = Instant::now();
        let reused = conn.is_some();
        let mut result = exchange_on(&mut conn, &spec, false).await;
        if reused && matches!(&result, Err(Exchange::NoAnswer(_))) {
            // The server closed the connection before this request reached it: send it
            // again on a new connection, as an HTTP client does.
            lock(&tally).reconnects += 1;
            result = exchange_on(&mut conn, &spec, false).await;
        }
        let result = result.map_err(Exchange::into_failure);
        match &result {
            Ok(a) if a.close => {
                conn = None;
                lock(&tally).reconnects += 1;
            }
            Ok(_) => {}
            Err(_) => conn = None,
        }
        let failed = result.is_err();
        lock(&tally).record(&result, started.elapsed());
        if failed {
            tokio::time::sleep(FAILURE_BACKOFF).await;
        }
    }
}

/// One request on a new connection (closed afterwards). For the load and for asking
/// which release answers now.
pub async fn get_once(target: SocketAddr, path: &str, timeout: Duration) -> Result<Answer, RequestFailure> {
    let spec = LoadSpec { target, path: path.to_string(), fresh_workers: 0, keepalive_connections: 0, timeout };
    exchange_on(&mut None, &spec, true).await.map_err(Exchange::into_failure)
}

type Connection = BufReader<TcpStream>;

/// How one exchange went wrong; `NoAnswer` is retryable on a reused connection.
enum Exchange {
    Connect(String),
    /// Not one byte of answer came back: the server closed or reset the connection.
    NoAnswer(String),
    Read(String),
    Status(String),
    Timeout,
}

impl Exchange {
    fn into_failure(self) -> RequestFailure {
        match self {
            Exchange::Connect(d) => RequestFailure::new(FailureKind::Connect, d),
            Exchange::NoAnswer(d) => RequestFailure::new(FailureKind::Read, format!("no answer: {d}")),
            Exchange::Read(d) => RequestFailure::new(FailureKind::Read, d),
            Exchange::Status(d) => RequestFailure::new(FailureKind::Status, d),
            Exchange::Timeout => RequestFailure::new(FailureKind::Timeout, "no answer in time"),
        }
    }
}

/// Send one request on `conn` (opening it first if it is `None`) and read the answer.
/// The connection is left in `conn` only if it can carry another request.
async fn exchange_on(conn: &mut Option<Connection>, spec: &LoadSpec, close: bool) -> Result<Answer, Exchange> {
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut c = match conn.take() {
        Some(c) => c,
        None => match tokio::time::timeout_at(deadline, TcpStream::connect(spec.target)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                BufReader::new(s)
            }
            Ok(Err(e)) => return Err(Exchange::Connect(e.to_string())),
            Err(_) => return Err(Exchange::Connect("connect timed out".into())),
        },
    };
    let answer = match tokio::time::timeout_at(deadline, exchange(&mut c, spec, close)).await {
        Ok(r) => r?,
        Err(_) => return Err(Exchange::Timeout),
    };
    if !answer.close && !close {
        *conn = Some(c);
    }
    Ok(answer)
}

async fn exchange(c: &mut Connection, spec: &LoadSpec, close: bool) -> Result<Answer, Exchange> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cutover-loadgen\r\n{}\r\n",
        spec.path,
        spec.target,
        if close { "Connection: close\r\n" } else { "" }
    );
    c.get_mut().write_all(request.as_bytes()).await.map_err(|e| Exchange::NoAnswer(e.to_string()))?;
    let mut line = String::new();
    match c.take(MAX_LINE).read_line(&mut line).await {
        Ok(0) => return Err(Exchange::NoAnswer("connection closed".into())),
        Ok(_) => {}
        Err(e) => return Err(Exchange::NoAnswer(e.to_string())),
    }
    let status = parse_status_line(&line).ok_or_else(|| Exchange::Read(format!("bad status line {:?}", line.trim_end())))?;
    let mut length: Option<u64> = None;
    let mut release_header = None;
    let mut close_after = false;
    loop {
        line.clear();
        let n = c.take(MAX_LINE).read_line(&mut line).await.map_err(|e| Exchange::Read(e.to_string()))?;
        if n == 0 || !line.ends_with('\n') {
            return Err(Exchange::Read("answer cut in its headers".into()));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(Exchange::Read(format!("malformed header {header:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| Exchange::Read(format!("bad Content-Length {value:?}")))?);
        } else if name.eq_ignore_ascii_case("x-release") {
            release_header = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("connection") {
            close_after = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
    }
    // Without a length the body ends at EOF, and the connection cannot be reused.
    let limit = length.unwrap_or(MAX_BODY).min(MAX_BODY);
    let mut body = Vec::new();
    c.take(limit).read_to_end(&mut body).await.map_err(|e| Exchange::Read(e.to_string()))?;
    if length.is_some_and(|l| l != body.len() as u64) {
        return Err(Exchange::Read("answer cut in its body".into()));
    }
    let release = release_header.unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    if !(200..300).contains(&status) {
        return Err(Exchange::Status(format!("status {status} from release {release:?}")));
    }
    Ok(Answer { status, release, close: close_after || length.is_none() })
}

fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok().filter(|s| (100..600).contains(s))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_tight() {
        let mut last = None;
        for us in (0..100_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let i = Histogram::index(us);
            assert!(Histogram::upper(i) >= us, "{us} in bucket {i} up to {}", Histogram::upper(i));
            if us < 100_000 {
                if let Some(l) = last {
                    assert!(i == l || i == l + 1, "{us}: {l} -> {i}");
                }
                last = Some(i);
                // Within 1/16 of the value.
                assert!(Histogram::upper(i) - us <= us / SUB + 1, "{us}");
            }
        }
    }

    #[test]
    fn quantiles_and_stretches() {
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_micros() as f64;
        assert!((50_000.0..=53_200.0).contains(&p50), "{p50}");
        assert_eq!(h.max(), Some(Duration::from_millis(100)));
        let before = h.clone();
        h.record(Duration::from_millis(2));
        let d = h.since(&before);
        assert_eq!(d.count(), 1);
        assert!(d.quantile(1.0).unwrap() <= Duration::from_micros(2_100), "{:?}", d.quantile(1.0));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn tally_since_subtracts_and_keeps_new_examples() {
        let mut t = Tally::default();
        let ok = Ok(Answer { status: 200, release: "v1".into(), close: false });
        t.record(&ok, Duration::from_micros(10));
        let earlier = t.clone();
        t.record(&ok, Duration::from_micros(10));
        t.record(&Ok(Answer { status: 200, release: "v2".into(), close: false }), Duration::from_micros(10));
        t.record(&Err(RequestFailure::new(FailureKind::Connect, "refused")), Duration::from_micros(10));
        let d = t.since(&earlier);
        assert_eq!((d.requests, d.ok, d.failed()), (3, 2, 1));
        assert_eq!(d.releases, BTreeMap::from([("v1".into(), 1), ("v2".into(), 1)]));
        assert_eq!(d.examples.len(), 1);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line("HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line("HTTP/1.1 abc\r\n"), None);
    }
}
