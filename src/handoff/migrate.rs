//! Live connection migration for Rust servers (the MOSN / socket-takeover technique):
//! the next generation connects to the current one's takeover endpoint, takes its
//! listeners, asks it to drain, and receives its established connections, each with an
//! opaque state blob, and resumes them. No connection is closed or refused.
//!
//! The pieces a server uses, in order:
//! - listeners: [`listeners::from_env`](super::listeners::from_env) (socket activation),
//!   [`broker::fetch_listeners`](super::broker::fetch_listeners), [`Successor::listeners`]
//!   (from the previous generation), or [`Listener::bind`];
//! - report ready: [`notify::sd_notify`](super::notify::sd_notify)`("READY=1")`;
//! - current generation: [`Endpoint::takeover_requested`] resolves when a drain is asked;
//!   then [`Takeover::hand_over`] sends the connections in acknowledged batches of at
//!   most 253 fds, reports progress, and returns every connection it could not hand over
//!   (the sender keeps serving those);
//! - next generation: [`Successor::take_over`] receives and resumes them.
//!
//! This module moves fds and bytes; what a state blob means is the server's business.
//! A server must stop reading from a connection before handing it over, and put any
//! bytes it already read but did not process into the state blob.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use super::broker::{Decision, Policy};
use super::fds::{self, AsyncSeqPacket, PeerCred, SocketName};
use super::listeners::Listener;
use super::protocol::{self, ErrorCode, Message, CONNECTIONS_HEADER, MAX_BODY, MAX_FDS};
use super::HandoffError;

/// How long either side waits for the other's next frame during a handover (a property
/// of the framed channel, so `fds` owns it).
pub use super::fds::STEP_TIMEOUT;

/// An established connection and the state the next generation needs to resume it.
#[derive(Debug)]
pub struct Connection {
    pub fd: OwnedFd,
    pub state: Vec<u8>,
}

/// Progress of a handover, reported after every acknowledged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub handed_over: usize,
    pub total: usize,
    pub batches: u32,
}

/// The result of [`Takeover::hand_over`].
#[derive(Debug)]
pub struct HandoverReport {
    pub handed_over: usize,
    pub batches: u32,
    pub elapsed: Duration,
    /// Connections that were not handed over (too large a state, or the successor failed):
    /// still owned by the sender, which should keep serving them.
    pub kept: Vec<Connection>,
    /// Why the handover stopped early, if it did.
    pub error: Option<HandoffError>,
}

/// The current generation's takeover endpoint.
pub struct Endpoint {
    socket: AsyncSeqPacket,
    name: SocketName,
    listeners: Vec<Listener>,
    policy: Policy,
}

impl Endpoint {
    /// Serves `listeners` and takeover requests on `name` to peers the policy allows
    /// (e.g. `Policy::new().allow_uid(own uid)`). Call inside a tokio runtime.
    pub fn bind(name: &SocketName, listeners: Vec<Listener>, policy: Policy) -> Result<Endpoint, HandoffError> {
        let fd = fds::listen(name)?;
        let socket = AsyncSeqPacket::new(fd).map_err(|e| HandoffError::io("register", name.to_string(), e))?;
        Ok(Endpoint { socket, name: name.clone(), listeners, policy })
    }

    pub fn name(&self) -> &SocketName {
        &self.name
    }

    /// Serves successors until one asks to take over: that is the drain request. Peers
    /// the policy refuses, and broken peers, get an error frame and are dropped.
    pub async fn takeover_requested(&self) -> Result<Takeover, HandoffError> {
        loop {
            let fd = match self.socket.accept().await {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(endpoint = %self.name, "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.serve_successor(fd).await {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => {}
                Err(e) => tracing::warn!(endpoint = %self.name, "successor: {e}"),
            }
        }
    }

    async fn serve_successor(&self, fd: OwnedFd) -> Result<Option<Takeover>, HandoffError> {
        let peer = fds::peer_credentials(fd.as_fd()).map_err(|e| HandoffError::io("read the credentials of", "the successor", e))?;
        let conn = AsyncSeqPacket::new(fd).map_err(|e| HandoffError::io("register", "the successor", e))?;
        if let Decision::Refused(reason) = self.policy.decide(&peer) {
            tracing::warn!(endpoint = %self.name, pid = peer.pid, uid = peer.uid, "refused a successor: {reason}");
            let msg = Message::Error { code: ErrorCode::NotPermitted, message: format!("refused: {reason}") };
            let _ = conn.send_message(&msg, &[]).await;
            return Ok(None);
        }
        loop {
            let next = tokio::time::timeout(STEP_TIMEOUT, conn.recv_message()).await;
            let Ok(received) = next else { return Ok(None) };
            match received {
                Ok((Message::RequestListeners { names }, _)) => {
                    let chosen: Vec<&Listener> =
                        self.listeners.iter().filter(|l| names.is_empty() || names.contains(&l.name)).collect();
                    let msg = Message::Listeners { names: chosen.iter().map(|l| l.name.clone()).collect() };
                    let fds: Vec<_> = chosen.iter().map(|l| l.fd.as_fd()).collect();
                    conn.send_message(&msg, &fds).await?;
                }
                Ok((Message::Takeover, _)) => {
                    let fd = conn.into_blocking().map_err(|e| HandoffError::io("prepare", "the takeover connection", e))?;
                    return Ok(Some(Takeover { conn: fd, peer }));
                }
                Ok((other, _)) => {
                    let msg = Message::Error { code: ErrorCode::Unexpected, message: format!("unexpected {:?}", other.kind()) };
                    let _ = conn.send_message(&msg, &[]).await;
                    return Ok(None);
                }
                Err(HandoffError::Closed) => return Ok(None),
                Err(e) => {
                    let code = match &e {
                        HandoffError::Frame(f) => f.code(),
                        _ => ErrorCode::Malformed,
                    };
                    let _ = conn.send_message(&Message::Error { code, message: e.to_string() }, &[]).await;
                    return Err(e);
                }
            }
        }
    }
}

/// A successor asked to take over; the current generation hands its connections over.
pub struct Takeover {
    conn: OwnedFd,
    peer: PeerCred,
}

impl Takeover {
    /// The successor's credentials.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// Sends `connections` in batches of at most 253 fds (and one frame's worth of
    /// state), waiting for each batch's acknowledgement. Blocking: run it on a blocking
    /// thread (`tokio::task::spawn_blocking`).
    pub fn hand_over(self, connections: Vec<Connection>, mut progress: impl FnMut(Progress)) -> HandoverReport {
        let started = Instant::now();
        let total = connections.len();
        let mut pending: VecDeque<Connection> = connections.into();
        let mut kept = Vec::new();
        let mut handed_over = 0;
        let mut batches = 0u32;
        let mut error = None;
        while !pending.is_empty() {
            let batch = take_batch(&mut pending, &mut kept);
            if batch.is_empty() {
                continue;
            }
            match send_batch(self.conn.as_fd(), batches, &batch) {
                Ok(accepted) => {
                    let mut batch = batch;
                    let sent = batch.len();
                    // The successor owns the first `accepted`; closing ours is the handover.
                    kept.extend(batch.drain(accepted.min(sent)..));
                    handed_over += batch.len();
                    batches += 1;
                    progress(Progress { handed_over, total, batches });
                    if accepted < sent {
                        // A successor that took only part of a batch is full: keep the rest.
                        break;
                    }
                }
                Err(e) => {
                    kept.extend(batch);
                    error = Some(e);
                    break;
                }
            }
        }
        kept.extend(pending);
        if error.is_none() {
            if let Err(e) = finish(self.conn.as_fd(), handed_over as u64) {
                error = Some(e);
            }
        }
        HandoverReport { handed_over, batches, elapsed: started.elapsed(), kept, error }
    }
}

/// The next batch: at most 253 connections whose states fit one frame. A connection
/// whose state cannot fit any frame goes to `kept`.
fn take_batch(pending: &mut VecDeque<Connection>, kept: &mut Vec<Connection>) -> Vec<Connection> {
    let mut batch = Vec::new();
    let mut size = CONNECTIONS_HEADER;
    while let Some(c) = pending.front() {
        let cost = protocol::connection_cost(c.state.len());
        if CONNECTIONS_HEADER + cost > MAX_BODY {
            if let Some(c) = pending.pop_front() {
                tracing::warn!("a connection's state is {} bytes, more than one frame carries; keeping it", c.state.len());
                kept.push(c);
            }
            continue;
        }
        if batch.len() == MAX_FDS || size + cost > MAX_BODY {
            break;
        }
        size += cost;
        if let Some(c) = pending.pop_front() {
            batch.push(c);
        }
    }
    batch
}

fn send_batch(conn: std::os::fd::BorrowedFd<'_>, number: u32, batch: &[Connection]) -> Result<usize, HandoffError> {
    let msg = Message::Connections { batch: number, states: batch.iter().map(|c| c.state.clone()).collect() };
    let fds: Vec<_> = batch.iter().map(|c| c.fd.as_fd()).collect();
    fds::send_message(conn, &msg, &fds)?;
    match fds::recv_message(conn)? {
        (Message::Ack { batch, accepted }, _) if batch == number => Ok(accepted as usize),
        (Message::Error { code, message }, _) => Err(HandoffError::Refused { code, message }),
        (other, _) => Err(HandoffError::Unexpected { got: other.kind(), expected: "Ack of the batch just sent" }),
    }
}

fn finish(conn: std::os::fd::BorrowedFd<'_>, total: u64) -> Result<(), HandoffError> {
    fds::send_message(conn, &Message::Done { total }, &[])?;
    match fds::recv_message(conn)? {
        (Message::DoneAck { .. }, _) => Ok(()),
        (other, _) => Err(HandoffError::Unexpected { got: other.kind(), expected: "DoneAck" }),
    }
}

/// The next generation's side of a takeover (blocking calls).
pub struct Successor {
    conn: OwnedFd,
}

impl Successor {
    /// Connects to the current generation's endpoint.
    pub fn connect(endpoint: &SocketName) -> Result<Successor, HandoffError> {
        let conn = fds::connect(endpoint)?;
        fds::set_timeouts(conn.as_fd(), STEP_TIMEOUT).map_err(|e| HandoffError::io("set timeouts on", endpoint.to_string(), e))?;
        Ok(Successor { conn })
    }

    /// The current generation's listeners (all of them if `names` is empty). They are
    /// the same sockets: both generations accept from one queue until the drain.
    pub fn listeners(&self, names: &[&str]) -> Result<Vec<Listener>, HandoffError> {
        let request = Message::RequestListeners { names: names.iter().map(|n| n.to_string()).collect() };
        fds::send_message(self.conn.as_fd(), &request, &[])?;
        match fds::recv_message(self.conn.as_fd())? {
            (Message::Listeners { names }, fds) => Ok(names.into_iter().zip(fds).map(|(name, fd)| Listener { name, fd }).collect()),
            (Message::Error { code, message }, _) => Err(HandoffError::Refused { code, message }),
            (other, _) => Err(HandoffError::Unexpected { got: other.kind(), expected: "Listeners" }),
        }
    }

    /// Asks the current generation to drain and receives its connections; `resume` is
    /// called for each as it arrives. Returns how many were received.
    pub fn take_over(self, mut resume: impl FnMut(Connection)) -> Result<u64, HandoffError> {
        fds::send_message(self.conn.as_fd(), &Message::Takeover, &[])?;
        let mut received = 0u64;
        loop {
            match fds::recv_message(self.conn.as_fd())? {
                (Message::Connections { batch, states }, fds) => {
                    let n = states.len();
                    for (state, fd) in states.into_iter().zip(fds) {
                        resume(Connection { fd, state });
                    }
                    received += n as u64;
                    let accepted = u16::try_from(n).unwrap_or(u16::MAX);
                    fds::send_message(self.conn.as_fd(), &Message::Ack { batch, accepted }, &[])?;
                }
                (Message::Done { .. }, _) => {
                    fds::send_message(self.conn.as_fd(), &Message::DoneAck { total: received }, &[])?;
                    return Ok(received);
                }
                (Message::Error { code, message }, _) => return Err(HandoffError::Refused { code, message }),
                (other, _) => return Err(HandoffError::Unexpected { got: other.kind(), expected: "Connections or Done" }),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn conns(n: usize, state_len: usize) -> Vec<Connection> {
        (0..n)
            .map(|i| {
                let (a, _b) = fds::pair().unwrap();
                Connection { fd: a, state: vec![i as u8; state_len] }
            })
            .collect()
    }

    #[test]
    fn batches_hold_at_most_253_fds_and_one_frame_of_state() {
        let mut pending: VecDeque<_> = conns(600, 10).into();
        let mut kept = Vec::new();
        assert_eq!(take_batch(&mut pending, &mut kept).len(), 253);
        let mut pending: VecDeque<_> = conns(10, 20_000).into();
        assert_eq!(take_batch(&mut pending, &mut kept).len(), 3);
        let mut pending: VecDeque<_> = conns(1, MAX_BODY).into();
        assert!(take_batch(&mut pending, &mut kept).is_empty());
        assert_eq!(kept.len(), 1, "a state too large for any frame stays with the sender");
    }

    #[test]
    fn connections_and_states_cross_in_acknowledged_batches() {
        let (a, b) = fds::pair().unwrap();
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            let n = Successor { conn: b }.take_over(|c| got.push(c)).unwrap();
            (n, got)
        });
        // A real Takeover starts with the successor's Takeover frame.
        let (first, _) = fds::recv_message(a.as_fd()).unwrap();
        assert_eq!(first, Message::Takeover);
        let mut seen = Vec::new();
        let report = Takeover { conn: a, peer: PeerCred { pid: 0, uid: 0, gid: 0 } }
            .hand_over(conns(1000, 8), |p| seen.push(p));
        let (n, got) = receiver.join().unwrap();
        assert!(report.error.is_none(), "{:?}", report.error);
        assert_eq!((report.handed_over, n, got.len(), report.kept.len()), (1000, 1000, 1000, 0));
        assert_eq!(report.batches, 4);
        assert_eq!(seen.last().unwrap().handed_over, 1000);
        assert!(got.iter().enumerate().all(|(i, c)| c.state == vec![i as u8; 8]));
    }

    #[test]
    fn the_sender_keeps_what_a_failed_successor_did_not_take() {
        let (a, b) = fds::pair().unwrap();
        drop(b);
        let report = Takeover { conn: a, peer: PeerCred { pid: 0, uid: 0, gid: 0 } }.hand_over(conns(300, 4), |_| {});
        assert!(report.error.is_some());
        assert_eq!(report.handed_over, 0);
        assert_eq!(report.kept.len(), 300);
    }
}
