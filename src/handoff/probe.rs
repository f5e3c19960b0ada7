//! The optional readiness probe of `cutover run --health`, for servers whose `READY=1`
//! comes before they can serve (gunicorn's master reports ready before its workers
//! imported the app). It must reach the *new* generation only: a private port or health
//! endpoint of its own, never the shared listener, which the old generation answers too.

use std::net::SocketAddr;
use std::time::Duration;

use crate::health::{probe_http, probe_tcp, HealthError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET `path`; any 2xx is ready.
    Http { addr: SocketAddr, path: String },
    /// A TCP connect is accepted.
    Tcp { addr: SocketAddr },
}

impl Probe {
    /// `http://IP:PORT[/PATH]` or `tcp://IP:PORT` (IP literals: no name lookup).
    pub fn parse(s: &str) -> Result<Probe, String> {
        let bad = || format!("`{s}` is not a probe: write http://IP:PORT/PATH or tcp://IP:PORT, e.g. http://127.0.0.1:9000/healthz");
        if let Some(rest) = s.strip_prefix("http://") {
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let addr = host.parse().map_err(|_| bad())?;
            return Ok(Probe::Http { addr, path: path.to_string() });
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return Ok(Probe::Tcp { addr: rest.parse().map_err(|_| bad())? });
        }
        Err(bad())
    }

    pub async fn check(&self, timeout: Duration) -> Result<(), HealthError> {
        match self {
            Probe::Http { addr, path } => probe_http(*addr, path, timeout).await,
            Probe::Tcp { addr } => probe_tcp(*addr, timeout).await,
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Http { addr, path } => write!(f, "http://{addr}{path}"),
            Probe::Tcp { addr } => write!(f, "tcp://{addr}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_and_print_back() {
        for s in ["http://127.0.0.1:9000/healthz", "http://[::1]:80/", "tcp://127.0.0.1:9001"] {
            assert_eq!(Probe::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Probe::parse("http://127.0.0.1:9000").unwrap().to_string(), "http://127.0.0.1:9000/");
        assert!(Probe::parse("http://localhost:80/").is_err());
        assert!(Probe::parse("udp://127.0.0.1:53").is_err());
    }
}
