//! Connection caps for every socket the daemon serves (the control socket, the handoff
//! brokers' abstract sockets, the metrics port): at most N connections in all and at most
//! M per peer (a uid from SO_PEERCRED on unix sockets, an address on TCP).
//!
//! Why: each connection costs the daemon an fd and a task. Without caps, an unprivileged
//! local user holding a thousand idle connections exhausts the daemon's fds, and then
//! the root CLI (and a release fetching its listeners) can no longer be accepted. With
//! them, a connection over a cap is accepted and closed at once, so the flood costs the
//! daemon nothing it keeps.
//!
//! Here and not under `daemon/`: the brokers (`handoff`) and `metrics` use it too, and
//! dependencies point down from `daemon`. Pure bookkeeping; no sockets.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// The caps of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections open at once, all peers together.
    pub total: usize,
    /// Connections open at once from one peer.
    pub per_peer: usize,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverCap {
    #[error("{0} connections are open already (the most this socket serves at once)")]
    Total(usize),
    #[error("this peer has {0} connections open already (the most one peer may hold)")]
    PerPeer(usize),
}

#[derive(Debug)]
struct Counts<K> {
    total: usize,
    per_peer: HashMap<K, usize>,
}

/// Counts the open connections of one socket by peer.
#[derive(Debug)]
pub struct Limiter<K: Eq + Hash> {
    caps: Caps,
    counts: Arc<Mutex<Counts<K>>>,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Permit<K: Eq + Hash> {
    key: Option<K>,
    counts: Arc<Mutex<Counts<K>>>,
}

impl<K: Eq + Hash + Clone> Limiter<K> {
    pub fn new(caps: Caps) -> Limiter<K> {
        Limiter { caps, counts: Arc::new(Mutex::new(Counts { total: 0, per_peer: HashMap::new() })) }
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Admit a connection from `peer`, within both caps.
    pub fn admit(&self, peer: K) -> Result<Permit<K>, OverCap> {
        self.admit_inner(Some(peer))
    }

    /// Admit a connection counted only against the total (a peer no per-peer cap
    /// applies to, e.g. root on the control socket).
    pub fn admit_within_total(&self) -> Result<Permit<K>, OverCap> {
        self.admit_inner(None)
    }

    fn admit_inner(&self, peer: Option<K>) -> Result<Permit<K>, OverCap> {
        // The counts are plain integers, consistent after any panic: a poisoned lock is
        // still usable.
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if c.total >= self.caps.total {
            return Err(OverCap::Total(c.total));
        }
        if let Some(k) = &peer {
            let n = c.per_peer.get(k).copied().unwrap_or(0);
            if n >= self.caps.per_peer {
                return Err(OverCap::PerPeer(n));
            }
            c.per_peer.insert(k.clone(), n + 1);
        }
        c.total += 1;
        Ok(Permit { key: peer, counts: self.counts.clone() })
    }

    /// Connections open now (total, from `peer`).
    pub fn open(&self, peer: &K) -> (usize, usize) {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        (c.total, c.per_peer.get(peer).copied().unwrap_or(0))
    }
}

impl<K: Eq + Hash> Drop for Permit<K> {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(k) = self.key.take() {
            if let Some(n) = c.per_peer.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_peer.remove(&k);
                }
            }
        }
    }
}

/// Lets one log line through per second and counts the ones held back, so that a
/// flood of refused connections cannot flood the log (or the disk under it).
#[derive(Debug, Default)]
pub struct LogThrottle {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub const fn new() -> LogThrottle {
        LogThrottle { last_second: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when a line may be logged now (`n` lines were held back since the last
    /// one), `None` when it must be dropped.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let last = self.last_second.load(Ordering::Relaxed);
        if now != last && self.last_second.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_peer_and_in_total_and_places_come_back() {
        let l = Limiter::new(Caps { total: 3, per_peer: 2 });
        let a1 = l.admit(65534u32).unwrap();
        let a2 = l.admit(65534).unwrap();
        assert_eq!(l.admit(65534).unwrap_err(), OverCap::PerPeer(2));
        let b = l.admit(1000).unwrap();
        assert_eq!(l.admit(1001).unwrap_err(), OverCap::Total(3));
        assert_eq!(l.admit_within_total().unwrap_err(), OverCap::Total(3));
        drop(a1);
        assert_eq!(l.open(&65534), (2, 1));
        let root = l.admit_within_total().unwrap();
        drop((a2, b, root));
        assert_eq!(l.open(&65534), (0, 0));
        assert!(l.counts.lock().unwrap().per_peer.is_empty(), "no bookkeeping left for peers that left");
    }

    #[test]
    fn the_throttle_lets_one_line_a_second_through() {
        let t = LogThrottle::new();
        assert_eq!(t.allow(), Some(0));
        let held = (0..100).filter(|_| t.allow().is_none()).count();
        // Unless the second turned over in between, all 100 were held back.
        assert!(held >= 99, "{held}");
    }
}
