//! The benchmark's own HTTP client, for what wrk cannot express: an open-loop load of one
//! new connection per request at a fixed rate, plus long-lived keep-alive connections
//! across a release switch, with every request recorded on a timeline.
//!
//!     bench_load run --target IP:PORT --rate 500 --keepalive 20 --ka-interval-ms 100 \
//!         --duration-s 10 --timeout-ms 2000 --out requests.csv
//!     bench_load probe --target IP:PORT --expect v2 --interval-ms 5 --timeout-s 60
//!
//! `run` writes one CSV line per request, `kind,sched_us,sent_us,lat_us,outcome,body`:
//! - kind `new` (own connection, `Connection: close`) or `ka` (a keep-alive connection);
//! - sched_us: unix time in microseconds the request was due (new) or sent (ka); the
//!   latency of `new` requests counts from the due time, so a client that falls behind
//!   does not hide the stall (no coordinated omission); sent_us: when it really started
//!   (later than due when the machine is saturated);
//! - outcome `ok`, `connect`, `write`, `read`, `timeout`, `status` (non-2xx), or
//!   `ka_closed` (a request sent on a keep-alive connection that the server had closed:
//!   no byte came back; clients retry those, but it is counted as failed here). Like real
//!   connection pools, a connection seen closed while idle is not reused but replaced
//!   (counted in the summary as `ka_idle_closed_reconnects`, not as a failure);
//! - body: the response body without trailing whitespace (the release name).
//!
//! At the end it prints one JSON line: totals, its own CPU use and how far the sender
//! lagged behind the schedule (the precondition "the client is not saturated").
//! `probe` prints the unix time (us) of the first answer with body `--expect`.
//! `unix-command --socket PATH --command LINE` sends one line to a unix socket (HAProxy's
//! runtime API) and prints the answer.
//!
//! Runs on one thread (current-thread runtime) to leave the other core to the servers.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
struct Record {
    kind: &'static str,
    sched_us: u64,
    sent_us: u64,
    lat_us: u64,
    outcome: &'static str,
    body: String,
}

/// Keep-alive connections the server closed while idle, noticed before reuse (reconnected,
/// not a failure).
static IDLE_CLOSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> Result<T, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| format!("{name} needs a value"))?
            .parse()
            .map_err(|_| format!("{name}: bad value `{}`", args[i + 1])),
        None => default.ok_or_else(|| format!("{name} is required")),
    }
}

/// One parsed response.
struct Response {
    status: u16,
    body: String,
    close: bool,
}

/// Reads one response from `s` (status line, headers, Content-Length body). `Err(kind)`
/// says how it failed; `got_any` tells a connection closed before any byte apart.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Response, (&'static str, bool)> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) => return Err(("read", !buf.is_empty())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(("read", !buf.is_empty())),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).ok_or(("read", true))?;
    let mut len = 0usize;
    let mut close = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| ("read", true))?;
            } else if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    while buf.len() < head_end + len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(("read", true)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).trim_end().to_string();
    Ok(Response { status, body, close })
}

fn classify(r: Response) -> (&'static str, String) {
    if (200..300).contains(&r.status) {
        ("ok", r.body)
    } else {
        ("status", format!("{} {}", r.status, r.body))
    }
}

/// One request on its own connection; the server closes (Connection: close).
async fn one_shot(target: SocketAddr, req: &[u8]) -> (&'static str, String) {
    let mut s = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => return ("connect", String::new()),
    };
    let _ = s.set_nodelay(true);
    if s.write_all(req).await.is_err() {
        return ("write", String::new());
    }
    let mut buf = Vec::with_capacity(512);
    match read_response(&mut s, &mut buf).await {
        Ok(r) => classify(r),
        Err((kind, _)) => (kind, String::new()),
    }
}

async fn new_connections(target: SocketAddr, rate: f64, until: Instant, timeout: Duration, base: (Instant, u64), tx: mpsc::UnboundedSender<Record>) -> Vec<u64> {
    let req = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\nUser-Agent: cutover-bench\r\n\r\n").into_bytes();
    let req: &'static [u8] = Box::leak(req.into_boxed_slice());
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut lags = Vec::new();
    let mut due = base.0;
    while due < until {
        tokio::time::sleep_until(due.into()).await;
        lags.push(due.elapsed().as_micros() as u64);
        let sched_us = base.1 + due.duration_since(base.0).as_micros() as u64;
        let tx = tx.clone();
        let started = due;
        tokio::spawn(async move {
            let sent_us = unix_us();
            let (outcome, body) = match tokio::time::timeout(timeout, one_shot(target, req)).await {
                Ok(r) => r,
                Err(_) => ("timeout", String::new()),
            };
            let _ = tx.send(Record { kind: "new", sched_us, sent_us, lat_us: started.elapsed().as_micros() as u64, outcome, body });
        });
        due += period;
    }
    lags
}

async fn keep_alive(target: SocketAddr, interval: Duration, offset: Duration, until: Instant, timeout: Duration, tx: mpsc::UnboundedSender<Record>) {
    let req = format!("GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: cutover-bench-ka\r\n\r\n").into_bytes();
    tokio::time::sleep(offset).await;
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(512);
    let mut next = Instant::now();
    while next < until {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let sched_us = unix_us();
        let t = Instant::now();
        // Like the connection pools of real clients (urllib3's is_connection_dropped, Go's
        // net/http background reader), do not reuse a connection the server has already
        // closed while it sat idle.
        if conn.as_ref().is_some_and(|s| !idle_connection_alive(s)) {
            conn = None;
            IDLE_CLOSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let reused = conn.is_some();
        let attempt = async {
            if conn.is_none() {
                match TcpStream::connect(target).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        conn = Some(s);
                    }
                    Err(_) => return ("connect", String::new(), true),
                }
            }
            let Some(s) = conn.as_mut() else { return ("connect", String::new(), true) };
            if s.write_all(&req).await.is_err() {
                return (if reused { "ka_closed" } else { "write" }, String::new(), true);
            }
            match read_response(s, &mut buf).await {
                Ok(r) => {
                    let close = r.close;
                    let (o, b) = classify(r);
                    (o, b, close)
                }
                // Nothing at all came back on a reused connection: the server had closed it.
                Err((_, false)) if reused => ("ka_closed", String::new(), true),
                Err((kind, _)) => (kind, String::new(), true),
            }
        };
        let (outcome, body, drop_conn) = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => ("timeout", String::new(), true),
        };
        if drop_conn {
            conn = None;
        }
        let _ = tx.send(Record { kind: "ka", sched_us, sent_us: sched_us, lat_us: t.elapsed().as_micros() as u64, outcome, body });
    }
}

/// Asks the kernel, not tokio's cached readiness (stale when the machine is saturated and
/// the reactor has not polled yet), whether an idle connection is still open: a peek that
/// would block means open; EOF, data the server should not have sent, or an error mean
/// the connection is gone.
fn idle_connection_alive(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: recv writes at most 1 byte into the local buffer; the fd is owned by `s`,
    // which outlives the call; MSG_DONTWAIT makes it non-blocking.
    let n = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n < 0 && matches!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN))
}

fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes into the zeroed struct, which outlives the call.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: getrusage returned 0, so it filled the struct.
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

async fn run(args: &[String]) -> Result<(), String> {
    let target: SocketAddr = arg(args, "--target", None)?;
    let rate: f64 = arg(args, "--rate", Some(500.0))?;
    let ka: usize = arg(args, "--keepalive", Some(20))?;
    let ka_interval = Duration::from_millis(arg(args, "--ka-interval-ms", Some(100))?);
    let duration = Duration::from_secs_f64(arg(args, "--duration-s", Some(10.0))?);
    let timeout = Duration::from_millis(arg(args, "--timeout-ms", Some(2000))?);
    let out: String = arg(args, "--out", None)?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out).map_err(|e| format!("{out}: {e}"))?);

    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let cpu0 = cpu_seconds();
    let start = Instant::now() + Duration::from_millis(20);
    let base = (start, unix_us() + 20_000);
    let until = start + duration;
    for i in 0..ka {
        let offset = ka_interval.mul_f64(i as f64 / ka.max(1) as f64);
        tokio::spawn(keep_alive(target, ka_interval, offset + Duration::from_millis(20), until, timeout, tx.clone()));
    }
    let sender = tokio::spawn(new_connections(target, rate, until, timeout, base, tx.clone()));
    drop(tx);
    let mut n = 0u64;
    let mut failed = 0u64;
    while let Some(r) = rx.recv().await {
        n += 1;
        failed += u64::from(r.outcome != "ok");
        writeln!(file, "{},{},{},{},{},{}", r.kind, r.sched_us, r.sent_us, r.lat_us, r.outcome, r.body.replace([',', '\n', '\r'], " ")).map_err(|e| format!("{out}: {e}"))?;
    }
    file.flush().map_err(|e| format!("{out}: {e}"))?;
    let mut lags = sender.await.map_err(|e| e.to_string())?;
    lags.sort_unstable();
    let wall = start.elapsed().as_secs_f64();
    let lag_p99 = lags.get(lags.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(0);
    let lag_max = lags.last().copied().unwrap_or(0);
    println!(
        "{{\"requests\":{n},\"failed\":{failed},\"scheduled_new\":{},\"client_cpu_pct\":{:.1},\"send_lag_p99_us\":{lag_p99},\"send_lag_max_us\":{lag_max},\"ka_idle_closed_reconnects\":{},\"wall_s\":{wall:.2}}}",
        lags.len(),
        (cpu_seconds() - cpu0) / wall * 100.0,
        IDLE_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

async fn probe(args: &[String]) -> Result<(), String> {
    let target: SocketAddr = arg(args, "--target", None)?;
    let expect: String = arg(args, "--expect", None)?;
    let interval = Duration::from_millis(arg(args, "--interval-ms", Some(5))?);
    let limit = Instant::now() + Duration::from_secs(arg(args, "--timeout-s", Some(60))?);
    let req = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\nUser-Agent: cutover-bench-probe\r\n\r\n").into_bytes();
    while Instant::now() < limit {
        let t = unix_us();
        if let Ok(("ok", body)) = tokio::time::timeout(Duration::from_millis(500), one_shot(target, &req)).await {
            if body == expect {
                println!("{t}");
                return Ok(());
            }
        }
        tokio::time::sleep(interval).await;
    }
    Err(format!("{target} did not answer `{expect}` in time"))
}

/// One line to a unix stream socket (HAProxy's runtime API), the answer to stdout: a
/// Python or socat start-up would add tens of milliseconds to HAProxy's switch.
fn unix_command(args: &[String]) -> Result<(), String> {
    use std::io::Read as _;
    let path: String = arg(args, "--socket", None)?;
    let line: String = arg(args, "--command", None)?;
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| format!("{path}: {e}"))?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("{path}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("{path}: {e}"))?;
    print!("{out}");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench_load: runtime: {e}");
            std::process::exit(2);
        }
    };
    let r = match args.get(1).map(String::as_str) {
        Some("run") => rt.block_on(run(&args[2..])),
        Some("probe") => rt.block_on(probe(&args[2..])),
        Some("unix-command") => unix_command(&args[2..]),
        _ => Err("usage: bench_load run --target IP:PORT --out FILE [--rate R] [--keepalive K] [--ka-interval-ms MS] [--duration-s S] [--timeout-ms MS] | probe --target IP:PORT --expect BODY | unix-command --socket PATH --command LINE".into()),
    };
    if let Err(e) = r {
        eprintln!("bench_load: {e}");
        std::process::exit(1);
    }
}
