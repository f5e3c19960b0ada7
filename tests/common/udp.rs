//! UDP clients of the tests: datagrams sent from inside a client namespace, each answer
//! recorded with the release that sent it (the demo server answers `<release> <payload>`).
//!
//! Family follows the destination: an IPv6 destination gets a socket bound to `[::]`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// One datagram a client sent and what came back (`None`: no answer within the timeout).
#[derive(Debug, Clone)]
pub struct Answer {
    pub sent: Instant,
    pub release: Option<String>,
}

/// Clients sending datagrams from inside a namespace until stopped.
pub struct UdpClient {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Answer>>>,
}

impl UdpClient {
    /// `fresh_socket`: a new socket (source port) per datagram, as DNS resolvers do;
    /// otherwise one connected socket for the whole run, a single long-lived flow.
    pub fn start(netns: &str, to: SocketAddr, every: Duration, fresh_socket: bool) -> UdpClient {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("/run/netns/{netns}");
        let thread = thread::spawn(move || {
            cutover::netns::in_netns_path(path, move || run_client(to, every, fresh_socket, &flag))
                .unwrap_or_else(|e| panic!("enter the client namespace: {e:?}"))
        });
        UdpClient { stop, thread: Some(thread) }
    }

    pub fn finish(mut self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        // Only `finish` takes the thread, and it consumes the client.
        let Some(thread) = self.thread.take() else { return Vec::new() };
        // The client thread's own panic (e.g. a socket it could not bind) is the test's.
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for UdpClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The unspecified address of `to`'s family, port `port` (0: any).
fn local_for(to: SocketAddr, port: u16) -> SocketAddr {
    let ip = match to.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, port)
}

fn socket(to: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(local_for(to, 0)).unwrap_or_else(|e| panic!("bind a client socket: {e:?}"));
    s.connect(to).unwrap_or_else(|e| panic!("connect the client socket: {e:?}"));
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap_or_else(|e| panic!("read timeout: {e:?}"));
    s
}

fn run_client(to: SocketAddr, every: Duration, fresh_socket: bool, stop: &AtomicBool) -> Vec<Answer> {
    let mut answers = Vec::new();
    let mut long_lived = (!fresh_socket).then(|| socket(to));
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let payload = format!("q{n}");
        let fresh;
        let s = match long_lived.as_mut() {
            Some(s) => &*s,
            None => {
                fresh = socket(to);
                &fresh
            }
        };
        let sent = Instant::now();
        let release = ask_on(s, &payload, Duration::from_millis(300));
        answers.push(Answer { sent, release });
        thread::sleep(every.saturating_sub(sent.elapsed()));
    }
    answers
}

/// Send `payload` on `socket` (connected) and wait up to `within` for its answer: the
/// release that answered, `None` if none did (or the socket's read timeout ran out, or an
/// ICMP port unreachable came from a stopped release). A late answer to an earlier
/// datagram may arrive first: it is skipped.
pub fn ask_on(socket: &UdpSocket, payload: &str, within: Duration) -> Option<String> {
    let sent = Instant::now();
    socket.send(payload.as_bytes()).ok()?;
    let mut buf = [0u8; 512];
    while sent.elapsed() < within {
        let len = socket.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..len]);
        if let Some((release, p)) = text.split_once(' ') {
            if p == payload {
                return Some(release.to_string());
            }
        }
    }
    None
}

/// One datagram from local port `from_port` (so a later call is the same flow, with the
/// same conntrack entry) inside `netns`: the release that answered, `None` if none did
/// within a second.
pub fn ask_from_port(netns: &str, from_port: u16, to: SocketAddr) -> Option<String> {
    let path = format!("/run/netns/{netns}");
    cutover::netns::in_netns_path(path, move || {
        let s = UdpSocket::bind(local_for(to, from_port)).unwrap_or_else(|e| panic!("bind the fixed client port: {e:?}"));
        s.connect(to).unwrap_or_else(|e| panic!("connect: {e:?}"));
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap_or_else(|e| panic!("timeout: {e:?}"));
        s.send(b"again").ok()?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n]).split_once(' ').map(|(r, _)| r.to_string())
    })
    .unwrap_or_else(|e| panic!("enter the client namespace: {e:?}"))
}

/// The answers as a timeline: one line per change of the answering release.
pub fn summary(answers: &[Answer], t0: Instant) -> String {
    let mut out = String::new();
    let mut last: Option<&Option<String>> = None;
    for a in answers {
        if last != Some(&a.release) {
            out.push_str(&format!(
                "{:>6} ms: {}\n",
                a.sent.duration_since(t0).as_millis(),
                a.release.as_deref().unwrap_or("(lost)")
            ));
            last = Some(&a.release);
        }
    }
    out
}

/// Datagrams that got no answer.
pub fn lost(answers: &[Answer]) -> usize {
    answers.iter().filter(|a| a.release.is_none()).count()
}

/// What a busy flow (one socket, a datagram every 20 ms) and DNS-like queries (a new
/// source port each, every 50 ms) saw across one deploy.
pub struct DeployUnderDatagrams {
    pub stream: Vec<Answer>,
    pub queries: Vec<Answer>,
    t0: Instant,
    switch_started: Instant,
    deployed: Instant,
}

impl DeployUnderDatagrams {
    /// Both clients send to `to` from `netns` for a second, then across `deploy` (which
    /// returns when the deploy has finished), then for 1.5 s more.
    pub fn run(netns: &str, to: SocketAddr, deploy: impl FnOnce()) -> DeployUnderDatagrams {
        let t0 = Instant::now();
        let stream = UdpClient::start(netns, to, Duration::from_millis(20), false);
        let queries = UdpClient::start(netns, to, Duration::from_millis(50), true);
        thread::sleep(Duration::from_secs(1));
        let switch_started = Instant::now();
        deploy();
        let deployed = Instant::now();
        thread::sleep(Duration::from_millis(1500));
        DeployUnderDatagrams { stream: stream.finish(), queries: queries.finish(), t0, switch_started, deployed }
    }

    /// The timelines of both clients, for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "switch started at {} ms, deploy returned at {} ms\nstream:\n{}queries:\n{}",
            self.switch_started.duration_since(self.t0).as_millis(),
            self.deployed.duration_since(self.t0).as_millis(),
            summary(&self.stream, self.t0),
            summary(&self.queries, self.t0)
        )
    }

    /// The deploy from `old` to `new` as docs/ports-and-families.md promises it for a
    /// busy flow: the old release kept the flow through the whole `drain_timeout`, then
    /// every datagram of both clients reached the new release, new flows moved at once,
    /// and only the documented loss window lost anything.
    #[track_caller]
    pub fn assert_busy_flow_held_then_moved(&self, old: &str, new: &str, drain_timeout: Duration) {
        let context = self.context();
        let (stream, queries) = (&self.stream, &self.queries);
        let answered_by = |a: &Answer, r: &str| a.release.as_deref() == Some(r);
        assert!(stream.iter().any(|a| a.sent < self.switch_started && answered_by(a, old)), "{old} answered before\n{context}");
        // Never idle for udp_idle: the deploy waited for it, and the old release answered
        // it after the switch.
        assert!(self.deployed - self.switch_started >= drain_timeout, "the deploy waited for the busy UDP flow\n{context}");
        assert!(
            stream.iter().any(|a| a.sent > self.switch_started + Duration::from_secs(3) && answered_by(a, old)),
            "the busy flow stayed on {old} during the drain\n{context}"
        );
        // Its conntrack entry was deleted before the old release stopped.
        for (what, answers) in [("stream", stream), ("queries", queries)] {
            let after: Vec<_> = answers.iter().filter(|a| a.sent > self.deployed).collect();
            assert!(after.len() > 10, "{what} kept sending after the deploy\n{context}");
            assert!(after.iter().all(|a| answered_by(a, new)), "{what}: all answered by {new} after the deploy\n{context}");
        }
        // New flows (fresh source ports) go to the new release as soon as the map changed.
        assert!(
            queries.iter().any(|a| a.sent < self.deployed - Duration::from_secs(3) && answered_by(a, new)),
            "new flows reached {new} long before the drain ended\n{context}"
        );
        // A query lost only to the instant the old release stopped; the busy flow may
        // lose the datagrams in flight when its entry is deleted (the old release's answer
        // then has no NAT binding back): at most a couple of 20 ms slots.
        assert!(lost(queries) <= 1, "queries lost: {}\n{context}", lost(queries));
        assert!(lost(stream) <= 2, "stream datagrams lost: {}\n{context}", lost(stream));
    }
}

/// An idle flow (from local port `from_port` of `netns`) does not hold the drain of
/// `deploy` (from `old` to `new`): the deploy takes less than `drain_timeout`, and the
/// flow's next datagram, its conntrack entry deleted, reaches the new release.
#[track_caller]
pub fn assert_idle_flow_moves(netns: &str, from_port: u16, to: SocketAddr, (old, new): (&str, &str), drain_timeout: Duration, deploy: impl FnOnce()) {
    assert_eq!(ask_from_port(netns, from_port, to).as_deref(), Some(old));
    let started = Instant::now();
    deploy();
    let took = started.elapsed();
    assert!(took < drain_timeout, "an idle UDP flow does not hold the drain ({took:?})");
    assert_eq!(
        ask_from_port(netns, from_port, to).as_deref(),
        Some(new),
        "the idle flow's conntrack entry was deleted, so its next datagram reached {new}"
    );
}
