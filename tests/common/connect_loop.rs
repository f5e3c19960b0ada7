//! A client that only connects, again and again, and counts how each attempt ended: the
//! proof that a listener was never closed ("connection refused") while something
//! happened to the processes behind it. Clients may wait (the accept queue holds them);
//! they must never be refused.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Default, Clone)]
pub struct ConnectTally {
    pub connected: u64,
    pub refused: u64,
    /// Other failures (timeouts...), with their messages.
    pub other: Vec<String>,
}

/// Connects to `addr` every few milliseconds until stopped.
pub struct ConnectLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ConnectTally>>,
}

impl ConnectLoop {
    pub fn start(addr: SocketAddr) -> ConnectLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut t = ConnectTally::default();
            while !s.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                    // Closed at once: the server sees a connection that sends nothing.
                    Ok(_) => t.connected += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => t.refused += 1,
                    Err(e) => t.other.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            t
        });
        ConnectLoop { stop, thread: Some(thread) }
    }

    #[track_caller]
    pub fn stop(mut self) -> ConnectTally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().unwrap_or_else(|_| panic!("the connect loop panicked"))).unwrap_or_default()
    }
}

impl Drop for ConnectLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
