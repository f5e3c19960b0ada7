#![allow(clippy::unwrap_used, clippy::expect_used)]
//! 10 000 long-lived connections, each with state, migrated from generation 1 of the
//! example server (examples/migrating_server.rs) to generation 2, a separate process:
//! none dropped, every state intact, time measured.
//!
//! The example is compiled into this test binary and run by re-executing the binary
//! (`migrating_server_process`), so the test does not depend on `cargo build --examples`.

#[path = "../examples/migrating_server.rs"]
#[allow(dead_code)]
mod migrating_server;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ARGS_ENV: &str = "CUTOVER_TEST_MIGRATING_SERVER_ARGS";
const CONNECTIONS: usize = 10_000;

/// Not a test of its own: the entry point of the server processes the real test starts.
#[test]
fn migrating_server_process() {
    if let Ok(args) = std::env::var(ARGS_ENV) {
        let args: Vec<String> = args.split(' ').map(str::to_string).collect();
        let code = match migrating_server::run(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("migrating_server: {e}");
                1
            }
        };
        std::process::exit(code);
    }
}

struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start(args: &str) -> Server {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["migrating_server_process", "--exact", "--nocapture", "--test-threads=1"])
            .env(ARGS_ENV, args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The harness prints `test NAME ... ` before the first line.
                if let Some(i) = line.find("migrating_server: ") {
                    let _ = tx.send(line[i + "migrating_server: ".len()..].to_string());
                }
            }
        });
        Server { child, lines }
    }

    fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!("the server never said `{prefix}…`"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn inc(s: &mut TcpStream) -> String {
    s.write_all(b"INC\n").unwrap();
    read_line(s)
}

fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => return String::from_utf8_lossy(&line).into_owned(),
            Ok(1) => line.push(b[0]),
            Ok(_) => panic!("the server closed a connection (after `{}`)", String::from_utf8_lossy(&line)),
            Err(e) => panic!("reading a reply: {e}"),
        }
    }
}

#[test]
fn ten_thousand_connections_with_state_migrate_to_the_next_generation() {
    migrating_server::raise_fd_limit(4 * CONNECTIONS as u64 + 1024);
    let tag = format!("cutover-test/{}/migrate", std::process::id());
    let gen1 = Server::start(&format!("--generation 1 --listen tcp://127.0.0.1:0 --endpoint @{tag}/1"));
    let listening = gen1.wait_for("generation 1 listening on ", Duration::from_secs(30));
    let addr: SocketAddr = listening.rsplit(' ').next().unwrap().parse().unwrap();
    gen1.wait_for("generation 1 ready", Duration::from_secs(30));

    // Open every connection and give each some state: connection i has counter i % 7 + 1.
    let t = Instant::now();
    let mut clients: Vec<TcpStream> = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        for k in 0..(i % 7 + 1) {
            assert_eq!(inc(&mut s), format!("{} gen=1", k + 1));
        }
        clients.push(s);
    }
    println!("opened {CONNECTIONS} connections with state in {:?}", t.elapsed());

    // Some requests in flight while the connections move: they must be answered once,
    // by whichever generation holds the connection, with the counter intact.
    for s in clients.iter_mut().step_by(100) {
        s.write_all(b"INC\n").unwrap();
    }

    let gen2 = Server::start(&format!("--generation 2 --takeover @{tag}/1 --endpoint @{tag}/2"));
    let handed = gen1.wait_for("handed over ", Duration::from_secs(120));
    let took = gen2.wait_for("took over ", Duration::from_secs(120));
    println!("generation 1: {handed}");
    println!("generation 2: {took}");
    assert!(handed.starts_with(&format!("handed over {CONNECTIONS} of {CONNECTIONS} connections")), "{handed}");
    assert!(handed.contains("kept 0"), "{handed}");
    assert!(took.starts_with(&format!("took over {CONNECTIONS} connections")), "{took}");

    // Every connection is alive, on generation 2, with its own counter.
    for (i, s) in clients.iter_mut().enumerate() {
        let mut expected = (i % 7 + 1) as u64;
        if i % 100 == 0 {
            let reply = read_line(s);
            expected += 1;
            assert!(reply.starts_with(&format!("{expected} gen=")), "connection {i}: in-flight reply {reply}");
        }
        assert_eq!(inc(s), format!("{} gen=2", expected + 1), "connection {i}");
    }
    // Generation 1 is gone; new connections reach generation 2.
    let mut gen1 = gen1;
    let status = wait_exit(&mut gen1.child, Duration::from_secs(30));
    assert_eq!(status, Some(0), "generation 1 did not exit cleanly");
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(inc(&mut fresh), "1 gen=2");
    drop(gen2);
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
