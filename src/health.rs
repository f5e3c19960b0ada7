//! Health probes for a new release before traffic is switched to it: an HTTP GET (any 2xx
//! is healthy) or a bare TCP connect, each bounded by one timeout.
//!
//! The HTTP probe speaks just enough HTTP/1.1 itself (one request, `Connection: close`,
//! read the status line) so that it needs no client library and behaves the same against
//! any server. Probes only observe; deciding what a failure means is the deploy's job.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::BoxFuture;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::manifest::{HealthKind, HealthSpec};

/// Why a release was found unhealthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("health check of {addr}{path}: {source}")]
    Io {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("health check of {addr}{path} got no answer within {timeout:?}")]
    Timeout { addr: SocketAddr, path: String, timeout: Duration },
    #[error("health check of {addr}{path} answered status {status}")]
    Status { addr: SocketAddr, path: String, status: u16 },
    #[error("health check of {addr}{path} answered a malformed status line {line:?}")]
    Malformed { addr: SocketAddr, path: String, line: String },
}

/// One health probe of a release's address, as the release code needs it: the seam the
/// state machine's tests replace.
pub trait Probe: Send + Sync + 'static {
    fn probe(&self, health: HealthSpec, addr: SocketAddr) -> BoxFuture<'_, Result<(), HealthError>>;
}

/// The real probe: an HTTP GET for `type: http`, a TCP connect otherwise.
pub struct NetworkProbe;

impl Probe for NetworkProbe {
    fn probe(&self, health: HealthSpec, addr: SocketAddr) -> BoxFuture<'_, Result<(), HealthError>> {
        Box::pin(async move {
            match health.kind {
                HealthKind::Http => probe_http(addr, &health.path, health.timeout).await,
                _ => probe_tcp(addr, health.timeout).await,
            }
        })
    }
}

/// The status line is all the probe reads; a longer first line is not HTTP.
const MAX_STATUS_LINE: u64 = 1024;

/// GETs `path` from `addr` and succeeds on any 2xx status, all within `timeout`.
pub async fn probe_http(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), HealthError> {
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    match tokio::time::timeout(timeout, http_status(addr, &path)).await {
        Err(_) => Err(HealthError::Timeout { addr, path, timeout }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(status)) if (200..300).contains(&status) => Ok(()),
        Ok(Ok(status)) => Err(HealthError::Status { addr, path, status }),
    }
}

async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, HealthError> {
    let io_err = |source| HealthError::Io { addr, path: path.to_string(), source };
    let mut stream = TcpStream::connect(addr).await.map_err(|source| HealthError::Connect { addr, source })?;
    // `SocketAddr`'s Display brackets IPv6 literals, as a Host header needs.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cutover-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(io_err)?;
    let mut line = String::new();
    BufReader::new(stream).take(MAX_STATUS_LINE).read_line(&mut line).await.map_err(io_err)?;
    parse_status_line(&line).ok_or_else(|| HealthError::Malformed {
        addr,
        path: path.to_string(),
        line: line.trim_end().to_string(),
    })
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Succeeds if a TCP connection to `addr` is accepted within `timeout`.
pub async fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<(), HealthError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(HealthError::Timeout { addr, path: String::new(), timeout }),
        Ok(Err(source)) => Err(HealthError::Connect { addr, source }),
        Ok(Ok(_stream)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot HTTP server on loopback port 0 answering every request with `status`;
    /// returns its address and the first request it saw.
    async fn serve(status_line: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
                    break;
                }
                request.push_str(&line);
            }
            let body = "x";
            let answer = format!("{status_line}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
            request
        });
        (addr, task)
    }

    #[tokio::test]
    async fn http_2xx_is_healthy_and_request_is_well_formed() {
        let (addr, server) = serve("HTTP/1.1 204 No Content").await;
        probe_http(addr, "/healthz", Duration::from_secs(2)).await.unwrap();
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /healthz HTTP/1.1\r\n"), "{request}");
        assert!(request.contains(&format!("Host: {addr}\r\n")), "{request}");
        assert!(request.contains("Connection: close\r\n"), "{request}");
    }

    #[tokio::test]
    async fn http_503_reports_status() {
        let (addr, _server) = serve("HTTP/1.1 503 Service Unavailable").await;
        let err = probe_http(addr, "/healthz", Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, HealthError::Status { status: 503, .. }), "{err}");
        assert!(err.to_string().contains("503"));
    }

    #[tokio::test]
    async fn http_garbage_is_malformed() {
        let (addr, _server) = serve("SSH-2.0-OpenSSH").await;
        let err = probe_http(addr, "/", Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, HealthError::Malformed { .. }), "{err}");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel (backlog) but never answered.
        let err = probe_http(addr, "/", Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, HealthError::Timeout { .. }), "{err}");
        drop(listener);
    }

    #[tokio::test]
    async fn tcp_probe_sees_listener_and_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        probe_tcp(addr, Duration::from_secs(1)).await.unwrap();
        drop(listener);
        let err = probe_tcp(addr, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, HealthError::Connect { .. }), "{err}");
        let err = probe_http(addr, "/", Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, HealthError::Connect { .. }), "{err}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line("HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(parse_status_line("HTTP/2 200\r\n"), None);
        assert_eq!(parse_status_line(""), None);
        assert_eq!(parse_status_line("HTTP/1.1 2000 OK"), None);
    }
}
