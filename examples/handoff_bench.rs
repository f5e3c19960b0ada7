//! Handoff numbers: connection handover time for 1 000, 10 000 and 100 000 connections,
//! and listener handoff latency through the broker.
//!
//!     cargo run --release --example handoff_bench [-- 1000 10000 100000]
//!
//! Connections are unix stream socketpairs (100 000 TCP connections on loopback would
//! exhaust ephemeral ports); the cost measured is the protocol's: frames, SCM_RIGHTS and
//! acknowledgements between two endpoints over a real SOCK_SEQPACKET socket, with a
//! 16-byte state per connection. Sender and receiver are threads of one process, so the
//! number excludes process start-up and the server's own drain.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use cutover::handoff::broker::{fetch_listeners, Broker, Namespace, Policy};
use cutover::handoff::listeners::ListenSpec;
use cutover::handoff::migrate::{Connection, Endpoint, Successor};
use cutover::handoff::SocketName;

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        // As root, go past the hard limit up to fs.nr_open; otherwise up to the hard limit.
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(lim.rlim_max);
        let raised = libc::rlimit { rlim_cur: nr_open.max(lim.rlim_max), rlim_max: nr_open.max(lim.rlim_max) };
        // SAFETY: setrlimit reads the local struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            lim.rlim_cur = lim.rlim_max;
            // SAFETY: as above.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        }
    }
}

/// `n` connected sockets. The peer ends are closed at once (the handed-over end stays a
/// valid socket), so the bench needs about `n` fds, not `2n`.
fn sockets(n: usize) -> Result<Vec<Connection>, String> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair {i}: {e}: {n} connections need RLIMIT_NOFILE above {n} (raising the hard limit needs CAP_SYS_RESOURCE)"))?;
        let mut state = (i as u64).to_le_bytes().to_vec();
        state.extend_from_slice(&[0xab; 8]);
        conns.push(Connection { fd: a, state });
        drop::<OwnedFd>(b);
    }
    Ok(conns)
}

async fn connections(n: usize, round: usize) -> Result<(Duration, Duration), String> {
    let conns = sockets(n)?;
    let name = SocketName::Abstract(format!("cutover-bench/{}/{n}/{round}", std::process::id()));
    let endpoint = Endpoint::bind(&name, Vec::new(), Policy::new().allow_uid(nix::unistd::getuid().as_raw())).map_err(|e| e.to_string())?;
    let receiver = std::thread::spawn(move || -> Result<(u64, Duration), String> {
        let started = Instant::now();
        // The sender closes its copies as each batch is acknowledged, so sender and
        // receiver together hold about n fds, as two real processes would.
        let mut got = Vec::with_capacity(n);
        let total = Successor::connect(&name).and_then(|s| s.take_over(|c| got.push(c))).map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        drop(got);
        Ok((total, elapsed))
    });
    let takeover = endpoint.takeover_requested().await.map_err(|e| e.to_string())?;
    let report = tokio::task::spawn_blocking(move || takeover.hand_over(conns, |_| {})).await.map_err(|e| e.to_string())?;
    let (total, end_to_end) = receiver.join().map_err(|_| "receiver panicked".to_string())??;
    if let Some(e) = report.error {
        return Err(e.to_string());
    }
    if total as usize != n || report.handed_over != n {
        return Err(format!("moved {total} of {n}"));
    }
    Ok((report.elapsed, end_to_end))
}

async fn listener_latency(iterations: usize) -> Result<Vec<Duration>, String> {
    let svc = format!("bench{}", std::process::id());
    let spec = ListenSpec::parse("http=tcp://127.0.0.1:0", "http")?;
    let broker = Broker::bind_in_namespace(&Namespace::Current, &svc, &[spec], Policy::new()).map_err(|e| e.to_string())?;
    broker.allow_pid(std::process::id() as i32).map_err(|e| e.to_string())?;
    let socket = broker.socket().clone();
    tokio::task::spawn_blocking(move || {
        let mut times = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            let l = fetch_listeners(&socket, &[]).map_err(|e| e.to_string())?;
            times.push(t.elapsed());
            drop(l);
        }
        times.sort();
        Ok(times)
    })
    .await
    .map_err(|e| e.to_string())?
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    raise_fd_limit();
    let sizes: Vec<usize> = {
        let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
        if args.is_empty() { vec![1_000, 10_000, 100_000] } else { args }
    };
    println!("connection handover (state 16 B each, batches of <= 253 fds, each acknowledged)");
    println!("{:>10} {:>14} {:>14} {:>14}", "conns", "sender ms", "end-to-end ms", "us/conn");
    for &n in &sizes {
        let mut best: Option<(Duration, Duration)> = None;
        for round in 0..3 {
            match connections(n, round).await {
                Ok(r) => best = Some(best.map_or(r, |b| if r.1 < b.1 { r } else { b })),
                Err(e) => {
                    eprintln!("{n} connections: {e}");
                    break;
                }
            }
        }
        if let Some((sender, e2e)) = best {
            println!("{n:>10} {:>14.1} {:>14.1} {:>14.2}", ms(sender), ms(e2e), e2e.as_secs_f64() * 1e6 / n as f64);
        }
    }
    match listener_latency(1000).await {
        Ok(t) => println!(
            "listener handoff via the broker (connect, request, SCM_RIGHTS, 1000 runs): p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            t[t.len() / 2].as_secs_f64() * 1e6,
            t[t.len() * 99 / 100].as_secs_f64() * 1e6,
            t[t.len() - 1].as_secs_f64() * 1e6
        ),
        Err(e) => eprintln!("listener latency: {e}"),
    }
}
