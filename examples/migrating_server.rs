//! A long-connection server that hands its live connections, with their state, to its
//! next generation using `cutover::handoff::migrate`.
//!
//! Protocol: a client sends `INC\n`; the server adds one to the connection's counter (its
//! state) and answers `<counter> gen=<generation>\n`. A client that sees its counter
//! continue across a release knows its connection and its state survived.
//!
//! ```text
//! # generation 1 binds (or takes LISTEN_FDS) and serves its takeover endpoint
//! migrating_server --generation 1 --listen tcp://127.0.0.1:7000 --endpoint @demo/1
//! # generation 2 takes listeners and connections from generation 1, which then exits
//! migrating_server --generation 2 --takeover @demo/1 --endpoint @demo/2
//! ```

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover::handoff::broker::Policy;
use cutover::handoff::listeners::{self, ListenSpec, Listener};
use cutover::handoff::migrate::{Connection, Endpoint, Successor};
use cutover::handoff::notify::sd_notify;
use cutover::handoff::SocketName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

pub struct Args {
    generation: u64,
    listen: Option<String>,
    endpoint: String,
    takeover: Option<String>,
}

pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args { generation: 1, listen: None, endpoint: String::new(), takeover: None };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--generation" => a.generation = value()?.parse().map_err(|e| format!("--generation: {e}"))?,
            "--listen" => a.listen = Some(value()?),
            "--endpoint" => a.endpoint = value()?,
            "--takeover" => a.takeover = Some(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.endpoint.is_empty() {
        return Err("--endpoint @NAME is required (where the next generation finds this one)".into());
    }
    Ok(a)
}

/// Per-connection state: the counter and the bytes read but not yet processed.
struct State {
    counter: u64,
    unprocessed: Vec<u8>,
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.counter.to_le_bytes().to_vec();
        v.extend_from_slice(&self.unprocessed);
        v
    }
    fn decode(b: &[u8]) -> Option<State> {
        let counter = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        Some(State { counter, unprocessed: b[8..].to_vec() })
    }
}

struct Shared {
    generation: u64,
    drain: watch::Receiver<bool>,
    handed: mpsc::UnboundedSender<Connection>,
    live: AtomicUsize,
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "migrating_server: {line}");
    let _ = out.flush();
}

/// Serves one connection until it closes or a drain is asked; then hands it to `handed`.
async fn serve(mut stream: TcpStream, mut state: State, shared: Arc<Shared>) {
    let mut drain = shared.drain.clone();
    let mut buf = std::mem::take(&mut state.unprocessed);
    loop {
        // Answer every complete line first.
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if line.trim_ascii() == b"INC" {
                state.counter += 1;
                let reply = format!("{} gen={}\n", state.counter, shared.generation);
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    shared.live.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => {
                state.unprocessed = buf;
                let fd: Option<OwnedFd> = stream.into_std().ok().map(OwnedFd::from);
                if let Some(fd) = fd {
                    let _ = shared.handed.send(Connection { fd, state: state.encode() });
                }
                shared.live.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            n = stream.read_buf(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    shared.live.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                Ok(_) => {}
            },
        }
    }
}

fn resume(conn: Connection, shared: &Arc<Shared>) {
    let Some(state) = State::decode(&conn.state) else {
        say("a connection arrived with a state that does not decode; closing it");
        return;
    };
    let std = std::net::TcpStream::from(conn.fd);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    if let Ok(stream) = TcpStream::from_std(std) {
        shared.live.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve(stream, state, shared.clone()));
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut drain = shared.drain.clone();
    loop {
        tokio::select! {
            _ = drain.wait_for(|d| *d) => return,
            r = listener.accept() => if let Ok((stream, _)) = r {
                shared.live.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, State { counter: 0, unprocessed: Vec::new() }, shared.clone()));
            },
        }
    }
}

/// Every connection is an fd, twice while it moves: take the hard limit.
pub fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    // As root, the hard limit can be raised up to fs.nr_open.
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(lim.rlim_max);
    let target = want.min(nr_open).max(lim.rlim_cur);
    let raised = libc::rlimit { rlim_cur: target, rlim_max: target.max(lim.rlim_max) };
    // SAFETY: setrlimit reads the local struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let args = parse_args(args)?;
    raise_fd_limit(1 << 20);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(generation(args))
}

async fn generation(args: Args) -> Result<(), String> {
    let (drain_tx, drain_rx) = watch::channel(false);
    let (handed_tx, mut handed_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared { generation: args.generation, drain: drain_rx, handed: handed_tx, live: AtomicUsize::new(0) });

    // Listeners: from the previous generation, from socket activation, or bound here.
    let successor = match &args.takeover {
        Some(prev) => Some(Successor::connect(&SocketName::parse(prev)).map_err(|e| format!("{prev}: {e}"))?),
        None => None,
    };
    let listeners: Vec<Listener> = match (&successor, &args.listen) {
        (Some(s), _) => s.listeners(&[]).map_err(|e| e.to_string())?,
        (None, listen) => {
            let from_env = listeners::from_env().map_err(|e| e.to_string())?;
            if !from_env.is_empty() {
                from_env
            } else {
                let spec = ListenSpec::parse(listen.as_deref().unwrap_or("tcp://127.0.0.1:7000"), "main")?;
                vec![Listener::bind(&spec).map_err(|e| e.to_string())?]
            }
        }
    };
    let mut kept_for_successor = Vec::new();
    for l in &listeners {
        kept_for_successor.push(l.try_clone().map_err(|e| e.to_string())?);
        say(&format!("generation {} listening on {}", args.generation, l.local_addr().map_err(|e| e.to_string())?));
        let std = l.try_clone().map_err(|e| e.to_string())?.into_tcp();
        std.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = TcpListener::from_std(std).map_err(|e| e.to_string())?;
        tokio::spawn(accept_loop(listener, shared.clone()));
    }

    // Take over the previous generation's connections, resuming each as it arrives.
    if let Some(successor) = successor {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let resumer = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(c) = rx.recv().await {
                    resume(c, &shared);
                }
            })
        };
        let started = Instant::now();
        let n = tokio::task::spawn_blocking(move || successor.take_over(|c| {
            let _ = tx.send(c);
        }))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("takeover failed: {e}"))?;
        let _ = resumer.await;
        say(&format!("took over {n} connections in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0));
    }
    let _ = sd_notify(&format!("READY=1\nSTATUS=generation {} serving", args.generation));
    say(&format!("generation {} ready", args.generation));

    // Serve until the next generation asks for a takeover: that is the drain request.
    let uid = nix::unistd::getuid().as_raw();
    let endpoint = Endpoint::bind(&SocketName::parse(&args.endpoint), kept_for_successor, Policy::new().allow_uid(uid))
        .map_err(|e| e.to_string())?;
    let takeover = endpoint.takeover_requested().await.map_err(|e| e.to_string())?;
    say(&format!("takeover asked by pid {}; draining", takeover.peer().pid));
    let _ = drain_tx.send(true);
    // Every connection task now either hands its connection over or has closed.
    let mut connections = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(50), handed_rx.recv()).await {
            Ok(Some(c)) => connections.push(c),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    while let Ok(c) = handed_rx.try_recv() {
        connections.push(c);
    }
    let total = connections.len();
    let report = tokio::task::spawn_blocking(move || {
        takeover.hand_over(connections, |p| {
            if p.batches % 10 == 0 || p.handed_over == p.total {
                say(&format!("progress {}/{}", p.handed_over, p.total));
            }
        })
    })
    .await
    .map_err(|e| e.to_string())?;
    say(&format!(
        "handed over {} of {total} connections in {:.1} ms ({} batches), kept {}{}",
        report.handed_over,
        report.elapsed.as_secs_f64() * 1000.0,
        report.batches,
        report.kept.len(),
        report.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
    ));
    if !report.kept.is_empty() {
        // Serve what could not be handed over until those clients leave.
        let (_never, never_rx) = watch::channel(false);
        let (handed, _) = mpsc::unbounded_channel();
        let keep = Arc::new(Shared { generation: args.generation, drain: never_rx, handed, live: AtomicUsize::new(0) });
        for c in report.kept {
            resume(c, &keep);
        }
        while keep.live.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("migrating_server: {e}");
        std::process::exit(1);
    }
}
