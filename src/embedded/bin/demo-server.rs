//! The demo/test release: a small HTTP/1.1 server (plus an optional UDP echo) that the
//! demo and test images are built from (`FROM scratch`, so this is std only and linked
//! fully static by `build.rs`).
//!
//! It is configured only by environment variables, so an image can bake a release:
//!
//! - `RELEASE`: the text every answer carries (default `unknown`).
//! - `LISTEN`: comma-separated TCP addresses (default `0.0.0.0:80`). Ignored when
//!   systemd socket activation hands over listeners (`LISTEN_FDS`, `LISTEN_PID`).
//! - `NOTIFY_SOCKET`: systemd readiness; `READY=1` is sent once listening (`@name` is an
//!   abstract address).
//! - `START_DELAY_MS`: sleep before binding (a slow starting release).
//! - `HEALTH=fail`: `/healthz` answers 503 forever.
//! - `HEALTH=switch`: `GET /health?set=fail` makes `/healthz` answer 503 from then on
//!   (while `/` keeps answering), `GET /health?set=ok` makes it answer 200 again (a release
//!   that stops passing its health check while it runs).
//! - `CRASH_AFTER_MS`: exit(1) that long after becoming ready.
//! - `UDP_LISTEN`: comma-separated UDP addresses; each datagram is answered with
//!   `<RELEASE> <payload>`.
//! - `INSPECT=1`: the routes that show what the container was given (for tests and
//!   examples of volumes, env files and users): `GET /id` (the `Uid:`, `Gid:` and
//!   `Groups:` lines of /proc/self/status), `GET /env?name=N`, `GET /file?path=P`,
//!   `GET /write?path=P&body=B` (writes B to P). Off by default.
//!
//! Routes: `GET /` (body `<RELEASE>\n`), `GET /healthz`, `GET /slow?ms=N`. Every answer
//! has `X-Release` and `Content-Length`. Keep-alive is the HTTP/1.1 default.
//!
//! SIGTERM/SIGINT: accept what is already queued, close the listeners, let in-flight
//! requests finish, answer every request from then on with `Connection: close`, close
//! keep-alive connections still idle 1 s after the stop, exit 0 when none is left or after
//! 30 s. That is the behaviour cutover's drain phase relies on. The second of grace is
//! there because closing an idle keep-alive connection races with a client that is just
//! sending on it (that client sees a reset or an empty answer); a client that sends within
//! the grace gets its answer and a clean close instead.
//!
//! `demo-server probe http://IP:PORT/path` is a client for Docker's HEALTHCHECK in a
//! scratch image (no shell, no curl): exit 0 on a 2xx answer, 1 otherwise. Static glibc
//! cannot resolve names, so only IP literals are accepted.

use std::collections::HashMap;
use std::env;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Hand-written libc declarations: the program must stay std only (no crates), and std
/// has no signal handling or poll.
mod sys {
    use std::os::raw::{c_int, c_short, c_ulong, c_void};

    pub type SigHandler = extern "C" fn(c_int);

    #[repr(C)]
    pub struct PollFd {
        pub fd: c_int,
        pub events: c_short,
        pub revents: c_short,
    }

    extern "C" {
        pub fn signal(signum: c_int, handler: SigHandler) -> usize;
        pub fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
        pub fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
        pub fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
    }

    pub const SIGINT: c_int = 2;
    pub const SIGTERM: c_int = 15;
    pub const POLLIN: c_short = 0x1;
    pub const O_CLOEXEC: c_int = 0o2_000_000;
    pub const O_NONBLOCK: c_int = 0o4_000;
    /// `SIG_ERR` is `(sighandler_t) -1`.
    pub const SIG_ERR: usize = usize::MAX;
}

/// How long a keep-alive connection may sit idle before the server closes it; without a
/// limit a forgotten client would hold a release's drain open until the 30 s cap.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a connection accepted during the stop may take to send its request.
const STOPPING_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after the stop an idle keep-alive connection may still bring a request (answered
/// with `Connection: close`) before the server closes it.
const STOP_IDLE_GRACE: Duration = Duration::from_secs(1);
/// The longest a stopping server waits for in-flight requests (same as kamal-proxy's drain).
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Request line and header lines longer than this are refused (400).
const MAX_LINE: u64 = 8 * 1024;
const MAX_HEADERS: usize = 100;

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Write end of the self-pipe that wakes the accept loop; -1 until installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_signum: std::os::raw::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; `byte` lives for the call and the length
        // is 1. The pipe is non-blocking, so a full pipe (already woken) cannot block the
        // handler; the result is irrelevant for the same reason.
        unsafe {
            sys::write(fd, (&byte as *const u8).cast(), 1);
        }
    }
}

fn main() {
    let args: Vec<String> = env::args().collect();
    if args.get(1).map(String::as_str) == Some("probe") {
        let code = match args.get(2) {
            Some(url) => match probe(url) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("probe {url}: {e}");
                    1
                }
            },
            None => {
                eprintln!("usage: demo-server probe http://IP:PORT/path");
                2
            }
        };
        process::exit(code);
    }
    match serve() {
        Ok(()) => process::exit(0),
        Err(e) => {
            eprintln!("demo-server: {e}");
            process::exit(1);
        }
    }
}

// ---------------------------------------------------------------- configuration

struct Config {
    release: String,
    health_fail: bool,
    listen: Vec<SocketAddr>,
    udp_listen: Vec<SocketAddr>,
    start_delay: Option<Duration>,
    crash_after: Option<Duration>,
}

fn env_nonempty(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_addrs(name: &str, value: &str) -> io::Result<Vec<SocketAddr>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>()
                .map_err(|e| invalid(format!("{name}: {s:?} is not an IP:port address: {e}")))
        })
        .collect()
}

fn parse_ms(name: &str) -> io::Result<Option<Duration>> {
    match env_nonempty(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(|ms| Some(Duration::from_millis(ms)))
            .map_err(|e| invalid(format!("{name}: {v:?} is not a number of milliseconds: {e}"))),
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Config {
    fn from_env() -> io::Result<Config> {
        let listen = env_nonempty("LISTEN").unwrap_or_else(|| "0.0.0.0:80".to_string());
        Ok(Config {
            release: env_nonempty("RELEASE").unwrap_or_else(|| "unknown".to_string()),
            health_fail: env::var("HEALTH").is_ok_and(|v| v.trim().eq_ignore_ascii_case("fail")),
            listen: parse_addrs("LISTEN", &listen)?,
            udp_listen: match env_nonempty("UDP_LISTEN") {
                Some(v) => parse_addrs("UDP_LISTEN", &v)?,
                None => Vec::new(),
            },
            start_delay: parse_ms("START_DELAY_MS")?,
            crash_after: parse_ms("CRASH_AFTER_MS")?,
        })
    }
}

// ---------------------------------------------------------------- lifecycle

fn install_stop_signals() -> io::Result<File> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { sys::pipe2(fds.as_mut_ptr(), sys::O_CLOEXEC | sys::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so fds[0] is a new descriptor nobody else owns.
    let read_end = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // The write end stays open for the process lifetime: the handler may run at any time.
    WAKE_FD.store(fds[1], Ordering::SeqCst);
    for signum in [sys::SIGTERM, sys::SIGINT] {
        // SAFETY: the handler only touches atomics and calls write(2), both
        // async-signal-safe. glibc's signal() installs it with BSD semantics (persistent,
        // SA_RESTART), and poll(2) still returns EINTR, which the accept loop expects.
        if unsafe { sys::signal(signum, on_stop_signal) } == sys::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(File::from(read_end))
}

/// Sleeps for `total` unless a stop signal arrives first; returns false if stopped.
fn sleep_unless_stopped(total: Duration) -> bool {
    let deadline = Instant::now() + total;
    while !STOP_REQUESTED.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
    false
}

/// Listeners handed over by systemd-style socket activation (fds 3..3+LISTEN_FDS), or
/// None if this process was not socket-activated.
fn activated_listeners() -> io::Result<Option<Vec<TcpListener>>> {
    let Some(count) = env_nonempty("LISTEN_FDS") else {
        return Ok(None);
    };
    if let Some(pid) = env_nonempty("LISTEN_PID") {
        // The variables were meant for another process (inherited through a fork).
        if pid.trim().parse::<u32>().ok() != Some(process::id()) {
            return Ok(None);
        }
    }
    let count: RawFd = count
        .trim()
        .parse()
        .map_err(|e| invalid(format!("LISTEN_FDS: {count:?} is not a number: {e}")))?;
    let mut listeners = Vec::new();
    for fd in 3..3 + count {
        // SAFETY: by the socket activation protocol, fds 3..3+LISTEN_FDS are open and
        // handed to this process; nothing else in this program uses them.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listener = TcpListener::from(owned);
        // Proves the fd really is a bound TCP socket before we serve on it.
        let addr = listener
            .local_addr()
            .map_err(|e| io::Error::new(e.kind(), format!("LISTEN_FDS: fd {fd} is not a socket: {e}")))?;
        eprintln!("demo-server: using activated listener fd {fd} on {addr}");
        listeners.push(listener);
    }
    Ok(Some(listeners))
}

fn notify_ready() -> io::Result<()> {
    let Some(path) = env_nonempty("NOTIFY_SOCKET") else {
        return Ok(());
    };
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let addr = match path.strip_prefix('@') {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes())?,
        None => UnixAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(b"READY=1", &addr)
        .map_err(|e| io::Error::new(e.kind(), format!("NOTIFY_SOCKET {path}: {e}")))?;
    Ok(())
}

fn serve() -> io::Result<()> {
    let config = Config::from_env()?;
    let wake = install_stop_signals()?;
    if let Some(delay) = config.start_delay {
        eprintln!("demo-server: slow start, waiting {delay:?}");
        if !sleep_unless_stopped(delay) {
            return Ok(());
        }
    }
    let listeners = match activated_listeners()? {
        Some(l) => l,
        None => config
            .listen
            .iter()
            .map(|a| {
                TcpListener::bind(a).map_err(|e| io::Error::new(e.kind(), format!("bind {a}: {e}")))
            })
            .collect::<io::Result<Vec<_>>>()?,
    };
    if listeners.is_empty() {
        return Err(invalid("no TCP listener configured".to_string()));
    }
    for l in &listeners {
        // The accept loop polls all listeners and the wake pipe; accept must not block.
        l.set_nonblocking(true)?;
    }
    let shared = Arc::new(Shared {
        release: config.release.clone(),
        health_fail: config.health_fail,
        health_switch: env::var("HEALTH").is_ok_and(|v| v.trim().eq_ignore_ascii_case("switch")),
        health_failing: AtomicBool::new(false),
        inspect: env::var("INSPECT").is_ok_and(|v| v.trim() == "1"),
        conns: Mutex::new(Conns::default()),
        drained: Condvar::new(),
    });
    for addr in &config.udp_listen {
        let sock = UdpSocket::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("bind udp {addr}: {e}")))?;
        let release = config.release.clone();
        thread::Builder::new()
            .name("udp".into())
            .spawn(move || udp_echo(sock, release))?;
    }
    let addrs: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.to_string()))
        .collect();
    eprintln!("demo-server: release {} listening on {}", config.release, addrs.join(","));
    if let Err(e) = notify_ready() {
        // Readiness is advisory for this server; a supervisor that wanted it will time out.
        eprintln!("demo-server: readiness notification failed: {e}");
    }
    if let Some(after) = config.crash_after {
        thread::Builder::new().name("crash".into()).spawn(move || {
            thread::sleep(after);
            eprintln!("demo-server: CRASH_AFTER_MS elapsed, exiting with status 1");
            process::exit(1);
        })?;
    }

    accept_loop(&listeners, &wake, &shared)?;

    // Stop accepting: connections still queued were accepted by accept_loop, so closing
    // the listeners now refuses only clients that arrive after the stop.
    drop(listeners);
    let deadline = Instant::now() + DRAIN_LIMIT;
    if shared.wait_drained(Instant::now() + STOP_IDLE_GRACE) > 0 {
        shared.close_idle();
    }
    let left = shared.wait_drained(deadline);
    if left > 0 {
        eprintln!("demo-server: stopping with {left} connection(s) still busy after {DRAIN_LIMIT:?}");
    } else {
        eprintln!("demo-server: drained, exiting");
    }
    Ok(())
}

fn accept_loop(listeners: &[TcpListener], mut wake: &File, shared: &Arc<Shared>) -> io::Result<()> {
    let mut fds: Vec<sys::PollFd> = listeners
        .iter()
        .map(|l| l.as_raw_fd())
        .chain(std::iter::once(wake.as_raw_fd()))
        .map(|fd| sys::PollFd { fd, events: sys::POLLIN, revents: 0 })
        .collect();
    loop {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            shared.stop();
            // Take what the kernel already completed the handshake for: those clients
            // sent their request before the stop and deserve an answer.
            for l in listeners {
                accept_ready(l, shared);
            }
            let mut sink = [0u8; 64];
            while matches!(wake.read(&mut sink), Ok(n) if n > 0) {}
            return Ok(());
        }
        // SAFETY: `fds` is a live, exclusively borrowed slice of PollFd (repr(C), same
        // layout as struct pollfd) and its length is passed alongside.
        let n = unsafe { sys::poll(fds.as_mut_ptr(), fds.len() as _, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        for (i, l) in listeners.iter().enumerate() {
            if fds[i].revents != 0 {
                accept_ready(l, shared);
            }
        }
    }
}

/// Accepts every connection the listener has queued and starts a thread for each.
fn accept_ready(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        match listener.accept() {
            Ok((stream, _peer)) => start_connection(stream, shared),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ECONNABORTED, EMFILE and friends: this connection is lost, the listener
                // is not; poll again rather than spin.
                eprintln!("demo-server: accept: {e}");
                return;
            }
        }
    }
}

fn start_connection(stream: TcpStream, shared: &Arc<Shared>) {
    // Linux does not pass O_NONBLOCK from listener to accepted socket, but being explicit
    // costs nothing and the connection code relies on blocking reads.
    // A client taken from the queue during the stop gets little time to send its request:
    // it is counted busy from the start, and a silent one must not hold the drain open.
    let timeout = if shared.stopping() { STOPPING_READ_TIMEOUT } else { IDLE_TIMEOUT };
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(timeout)).is_err() {
        return;
    }
    let Ok(handle) = stream.try_clone() else { return };
    let id = shared.register(handle);
    let shared2 = Arc::clone(shared);
    let spawned = thread::Builder::new().name(format!("conn-{id}")).spawn(move || {
        let _ = handle_connection(stream, id, &shared2);
        shared2.unregister(id);
    });
    if let Err(e) = spawned {
        // The connection closes unanswered: say so, or a client's error has no trace here.
        eprintln!("demo-server: cannot start a thread for connection {id}: {e}");
        shared.unregister(id);
    }
}

// ---------------------------------------------------------------- connection registry

struct Entry {
    /// A second handle on the socket, used to shut an idle connection down from outside
    /// its thread (which is blocked in read).
    handle: TcpStream,
    busy: bool,
    /// At least one answer was sent. Only such a connection is an idle keep-alive one
    /// when it is not busy; a connection accepted but not yet read from has its first
    /// request on the way (with fd handoff the old release accepts until the very
    /// moment it is told to stop), so the stop must answer it, not cut it.
    answered: bool,
}

#[derive(Default)]
struct Conns {
    stopping: bool,
    /// The stop's grace is over: idle keep-alive connections were shut down.
    idle_closed: bool,
    next_id: u64,
    open: HashMap<u64, Entry>,
}

struct Shared {
    release: String,
    health_fail: bool,
    /// `HEALTH=switch`: the `/health?set=` route, and whether it set `/healthz` failing.
    health_switch: bool,
    health_failing: AtomicBool,
    inspect: bool,
    conns: Mutex<Conns>,
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Conns> {
        // panic=abort: a poisoned lock cannot be observed, but recovering is still right.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, handle: TcpStream) -> u64 {
        let mut c = self.lock();
        c.next_id += 1;
        let id = c.next_id;
        // Connections taken from the queue during the stop are busy from the start: their
        // request is already on its way.
        let busy = c.stopping;
        c.open.insert(id, Entry { handle, busy, answered: false });
        id
    }

    fn unregister(&self, id: u64) {
        let mut c = self.lock();
        c.open.remove(&id);
        if c.open.is_empty() {
            self.drained.notify_all();
        }
    }

    /// A request started arriving. False if this connection was idle when the stop's
    /// grace ended: [`Shared::close_idle`] already shut it down.
    fn mark_busy(&self, id: u64) -> bool {
        let mut c = self.lock();
        let idle_closed = c.idle_closed;
        match c.open.get_mut(&id) {
            Some(e) if e.busy => true,
            Some(e) if !idle_closed || !e.answered => {
                e.busy = true;
                true
            }
            _ => false,
        }
    }

    /// A response that kept the connection open was sent. False once the stop's grace is
    /// over: the connection must close. During the grace it stays open even though the
    /// stop began while the response was on its way: that response promised keep-alive,
    /// so the client may already be sending its next request, which gets the close.
    fn mark_idle(&self, id: u64) -> bool {
        let mut c = self.lock();
        if c.idle_closed {
            return false;
        }
        if let Some(e) = c.open.get_mut(&id) {
            e.busy = false;
            e.answered = true;
        }
        true
    }

    fn stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Starts the stop: from now on connections close after their current answer.
    /// Connections not answered yet keep their first request (bounded by the read timeout
    /// and the drain limit); idle keep-alive ones wait for [`Shared::close_idle`].
    fn stop(&self) {
        self.lock().stopping = true;
    }

    /// Ends the stop's grace: keep-alive connections idle now are closed.
    fn close_idle(&self) {
        let mut c = self.lock();
        c.idle_closed = true;
        for e in c.open.values().filter(|e| !e.busy && e.answered) {
            // Wakes the connection thread's read with EOF; it then exits.
            let _ = e.handle.shutdown(Shutdown::Both);
        }
    }

    /// Waits until every connection finished or the deadline passed; returns how many
    /// were still open.
    fn wait_drained(&self, deadline: Instant) -> usize {
        let mut c = self.lock();
        while !c.open.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            c = match self.drained.wait_timeout(c, deadline - now) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        c.open.len()
    }
}

// ---------------------------------------------------------------- HTTP

struct Request {
    method: String,
    target: String,
    keep_alive: bool,
}

enum ReadOutcome {
    Request(Request),
    /// The peer closed (or the idle timeout hit) between requests.
    Closed,
    Bad(&'static str),
}

fn read_line_limited(reader: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<bool> {
    line.clear();
    let n = reader.by_ref().take(MAX_LINE).read_line(line)?;
    Ok(n > 0 && line.ends_with('\n'))
}

fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<ReadOutcome> {
    let mut line = String::new();
    if !read_line_limited(reader, &mut line)? {
        return Ok(if line.is_empty() { ReadOutcome::Closed } else { ReadOutcome::Bad("request line too long or cut") });
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(ReadOutcome::Bad("malformed request line"));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Ok(ReadOutcome::Bad("unsupported HTTP version")),
    };
    let mut keep_alive = http11;
    let mut body_len: u64 = 0;
    for _ in 0..MAX_HEADERS {
        if !read_line_limited(reader, &mut line)? {
            return Ok(ReadOutcome::Bad("header line too long or cut"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            // Discard a request body so the next request on this connection parses.
            if body_len > 0 {
                io::copy(&mut reader.by_ref().take(body_len), &mut io::sink())?;
            }
            return Ok(ReadOutcome::Request(Request { method, target, keep_alive }));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Ok(ReadOutcome::Bad("malformed header"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(n) => body_len = n,
                Err(_) => return Ok(ReadOutcome::Bad("bad Content-Length")),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Ok(ReadOutcome::Bad("request bodies with Transfer-Encoding are not supported"));
        }
    }
    Ok(ReadOutcome::Bad("too many headers"))
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == key => Some(v),
        _ => None,
    })
}

/// Routes one request; returns status and body.
fn respond(req: &Request, shared: &Shared) -> (u16, String) {
    if req.method != "GET" && req.method != "HEAD" {
        return (405, "method not allowed\n".to_string());
    }
    let (path, query) = req.target.split_once('?').unwrap_or((req.target.as_str(), ""));
    match path {
        "/" => (200, format!("{}\n", shared.release)),
        "/healthz" if shared.health_fail || shared.health_failing.load(Ordering::SeqCst) => (503, "unhealthy\n".to_string()),
        "/health" if shared.health_switch => match query_param(query, "set") {
            Some(v) => {
                shared.health_failing.store(v == "fail", Ordering::SeqCst);
                (200, format!("health {}\n", if v == "fail" { "failing" } else { "ok" }))
            }
            None => (400, "set=fail or set=ok\n".to_string()),
        },
        "/healthz" => (200, "ok".to_string()),
        "/slow" => {
            let ms = query_param(query, "ms").and_then(|v| v.parse::<u64>().ok()).unwrap_or(1000);
            thread::sleep(Duration::from_millis(ms));
            (200, format!("{}\n", shared.release))
        }
        "/id" | "/env" | "/file" | "/write" if shared.inspect => inspect(path, query),
        _ => (404, "not found\n".to_string()),
    }
}

/// The `INSPECT=1` routes: what the container sees of its user, environment and files.
fn inspect(path: &str, query: &str) -> (u16, String) {
    let param = |k: &str| query_param(query, k).map(percent_decode);
    match path {
        "/id" => match std::fs::read_to_string("/proc/self/status") {
            Ok(status) => {
                let lines: Vec<&str> =
                    status.lines().filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:")).collect();
                (200, format!("{}\n", lines.join("\n")))
            }
            Err(e) => (500, format!("{e}\n")),
        },
        "/env" => match param("name").and_then(|n| env::var(n).ok()) {
            Some(v) => (200, v),
            None => (404, "no such variable\n".to_string()),
        },
        "/file" => match param("path").map(std::fs::read_to_string) {
            Some(Ok(text)) => (200, text),
            Some(Err(e)) => (404, format!("{e}\n")),
            None => (400, "path= is missing\n".to_string()),
        },
        _ => match (param("path"), param("body")) {
            (Some(p), Some(body)) => match std::fs::write(&p, body) {
                Ok(()) => (200, "written\n".to_string()),
                Err(e) => (500, format!("{e}\n")),
            },
            _ => (400, "path= and body= are needed\n".to_string()),
        },
    }
}

/// `%XX` escapes and `+` of a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() && s.is_char_boundary(i + 1) && s.is_char_boundary(i + 3) => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn write_response(
    stream: &mut TcpStream,
    status: u16,
    body: &str,
    release: &str,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nX-Release: {release}\r\nConnection: {}\r\n",
        reason(status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    // One write: a response split over several segments would invite Nagle delays.
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

fn handle_connection(stream: TcpStream, id: u64, shared: &Shared) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        // Idle until the next request's first bytes arrive (EOF or timeout ends it).
        match reader.fill_buf() {
            Ok([]) => return Ok(()),
            Ok(_) => {}
            // The stop signal may be delivered to this thread. A read on a socket with
            // SO_RCVTIMEO is never restarted after a handler (signal(7)), even with
            // SA_RESTART: it fails with EINTR. Treated as an end, it closed a connection
            // whose request was on its way without an answer: a client's rare read
            // error at a release's stop. Read again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                eprintln!("demo-server: connection {id}: a read was interrupted by a signal; reading again");
                continue;
            }
            Err(_) => return Ok(()),
        }
        if !shared.mark_busy(id) {
            return Ok(());
        }
        let req = match read_request(&mut reader)? {
            ReadOutcome::Closed => return Ok(()),
            ReadOutcome::Bad(why) => {
                write_response(&mut writer, 400, &format!("{why}\n"), &shared.release, false, false)?;
                return Ok(());
            }
            ReadOutcome::Request(r) => r,
        };
        let (status, body) = respond(&req, shared);
        // Tell the client now if this is the last answer, so it does not reuse the
        // connection and race our close.
        let keep_alive = req.keep_alive && !shared.stopping();
        write_response(&mut writer, status, &body, &shared.release, keep_alive, req.method == "HEAD")?;
        if !keep_alive || !shared.mark_idle(id) {
            let _ = writer.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------- UDP

fn udp_echo(sock: UdpSocket, release: String) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut reply = Vec::with_capacity(release.len() + 1 + n);
                reply.extend_from_slice(release.as_bytes());
                reply.push(b' ');
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("demo-server: udp recv: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

// ---------------------------------------------------------------- probe mode

fn parse_probe_url(url: &str) -> io::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid(format!("{url:?}: only http:// URLs are supported")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let addr = match authority.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let ip = authority
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .map_err(|_| invalid(format!("{authority:?}: need an IP literal (no name resolution in a static binary)")))?;
            SocketAddr::new(ip, 80)
        }
    };
    Ok((addr, path))
}

fn probe(url: &str) -> io::Result<()> {
    let (addr, path) = parse_probe_url(url)?;
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: demo-server-probe\r\n\r\n")?;
    let mut status_line = String::new();
    BufReader::new(stream).take(MAX_LINE).read_line(&mut status_line)?;
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("malformed status line {:?}", status_line.trim_end())))?;
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(io::Error::other(format!("status {code}")))
    }
}
