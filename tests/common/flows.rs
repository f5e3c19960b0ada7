//! Clients that open a NEW flow for every exchange, from inside a client namespace: a
//! fresh-socket UDP query (the kit's [`UdpClient`]) and a fresh TCP connection with one
//! HTTP/1.0 GET, timed. New flows are NAT'd to whatever release the map points at
//! right now, so they show at once whether that release is reachable: a lost query or a
//! connection that took a SYN retransmission (about a second) is a client that saw
//! downtime.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::udp::{lost, summary, Answer, UdpClient};

/// One TCP connection: when it started, how long connect + answer took, who answered.
#[derive(Debug, Clone)]
pub struct Connect {
    pub sent: Instant,
    pub took: Duration,
    pub release: Option<String>,
}

/// Longer than any connect on a working path here, shorter than a SYN retransmission.
pub const STALL: Duration = Duration::from_millis(500);

/// Fresh-socket UDP queries and fresh TCP connections, every 50 ms each (or as often as
/// [`NewFlows::start_every`] says), until finished.
pub struct NewFlows {
    t0: Instant,
    udp: Option<UdpClient>,
    stop: Arc<AtomicBool>,
    tcp: Option<JoinHandle<Vec<Connect>>>,
}

/// What [`NewFlows`] saw.
pub struct NewFlowsSeen {
    pub t0: Instant,
    pub queries: Vec<Answer>,
    pub connects: Vec<Connect>,
}

impl NewFlows {
    /// Queries to `udp` and connections to `tcp` from namespace `netns`, every 50 ms.
    pub fn start(netns: &str, udp: SocketAddr, tcp: SocketAddr) -> NewFlows {
        NewFlows::start_every(netns, udp, tcp, Duration::from_millis(50))
    }

    /// [`NewFlows::start`], a new query and a new connection every `every` each.
    pub fn start_every(netns: &str, udp: SocketAddr, tcp: SocketAddr, every: Duration) -> NewFlows {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("/run/netns/{netns}");
        let tcp = thread::spawn(move || {
            cutover::netns::in_netns_path(path, move || run_connects(tcp, every, &flag))
                .unwrap_or_else(|e| panic!("enter the client namespace: {e:?}"))
        });
        NewFlows { t0, udp: Some(UdpClient::start(netns, udp, every, true)), stop, tcp: Some(tcp) }
    }

    pub fn finish(mut self) -> NewFlowsSeen {
        self.stop.store(true, Ordering::Relaxed);
        let connects = match self.tcp.take() {
            Some(t) => t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Vec::new(),
        };
        let queries = self.udp.take().map(UdpClient::finish).unwrap_or_default();
        NewFlowsSeen { t0: self.t0, queries, connects }
    }
}

impl Drop for NewFlows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run_connects(to: SocketAddr, every: Duration, stop: &AtomicBool) -> Vec<Connect> {
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let release = get(to);
        seen.push(Connect { sent, took: sent.elapsed(), release });
        thread::sleep(every.saturating_sub(sent.elapsed()));
    }
    seen
}

/// `GET /` over a new connection: the body's release, `None` on any failure.
fn get(to: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some(body.trim().to_string())
}

impl NewFlowsSeen {
    /// Both timelines and the slow connects, for assertion messages.
    pub fn context(&self) -> String {
        let ms = |i: Instant| i.duration_since(self.t0).as_millis();
        let mut out = format!("UDP queries:\n{}TCP connects:\n", summary(&self.queries, self.t0));
        let mut last: Option<&Option<String>> = None;
        for c in &self.connects {
            if last != Some(&c.release) || c.took > STALL {
                out.push_str(&format!("{:>6} ms: {} ({} ms)\n", ms(c.sent), c.release.as_deref().unwrap_or("(failed)"), c.took.as_millis()));
                last = Some(&c.release);
            }
        }
        out
    }

    /// Every new flow was answered (a UDP query within its 300 ms, a connection within
    /// [`STALL`]), and the ones started after `after` by `release`.
    #[track_caller]
    pub fn assert_all_answered(&self, what: &str, after: Instant, release: &str) {
        let context = self.context();
        assert_eq!(lost(&self.queries), 0, "{what}: IPv6 UDP queries lost\n{context}");
        let stalled: Vec<_> = self.connects.iter().filter(|c| c.release.is_none() || c.took > STALL).collect();
        assert!(stalled.is_empty(), "{what}: {} IPv6 TCP connections failed or stalled\n{context}", stalled.len());
        assert!(self.queries.len() > 10 && self.connects.len() > 10, "{what}: the clients kept sending\n{context}");
        let late_queries = self.queries.iter().filter(|a| a.sent > after);
        let late_connects = self.connects.iter().filter(|c| c.sent > after);
        assert!(
            late_queries.clone().count() > 5 && late_queries.clone().all(|a| a.release.as_deref() == Some(release)),
            "{what}: queries answered by {release}\n{context}"
        );
        assert!(
            late_connects.clone().count() > 5 && late_connects.clone().all(|c| c.release.as_deref() == Some(release)),
            "{what}: connections answered by {release}\n{context}"
        );
    }
}
