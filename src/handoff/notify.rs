//! sd_notify: the server side (a NOTIFY_SOCKET a supervised generation reports
//! `READY=1` on) and the client side (the supervisor reporting to systemd, and Rust
//! servers reporting to whoever started them).

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram as StdDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

use super::fds::{recv_raw, PeerCred};
use super::HandoffError;

/// One notification datagram: `KEY=VALUE` lines, with the sender's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub sender: Option<PeerCred>,
    pub fields: Vec<(String, String)>,
}

impl Notification {
    pub fn parse(sender: Option<PeerCred>, bytes: &[u8]) -> Notification {
        let text = String::from_utf8_lossy(bytes);
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Notification { sender, fields }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn is_ready(&self) -> bool {
        self.get("READY") == Some("1")
    }
}

/// A NOTIFY_SOCKET served for one generation. The socket file is removed on drop.
pub struct NotifyServer {
    socket: UnixDatagram,
    path: PathBuf,
    /// False for an abstract socket: there is no file to remove.
    is_file: bool,
}

impl NotifyServer {
    /// Binds a datagram socket at `path` with SO_PASSCRED, so every datagram carries the
    /// sender's pid. The file is world-writable (servers that drop privileges must still
    /// be able to report); who sent a datagram is checked by the caller from its pid.
    pub fn bind(path: &Path) -> Result<NotifyServer, HandoffError> {
        let _ = std::fs::remove_file(path);
        let std = StdDatagram::bind(path).map_err(|e| HandoffError::io("bind the notify socket", path.display().to_string(), e))?;
        socket::setsockopt(&std, sockopt::PassCred, &true)
            .map_err(|e| HandoffError::io("set SO_PASSCRED on", path.display().to_string(), e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| HandoffError::io("set the mode of", path.display().to_string(), e))?;
        std.set_nonblocking(true).map_err(|e| HandoffError::io("make non-blocking", path.display().to_string(), e))?;
        let socket = UnixDatagram::from_std(std).map_err(|e| HandoffError::io("register", path.display().to_string(), e))?;
        Ok(NotifyServer { socket, path: path.to_path_buf(), is_file: true })
    }

    /// Binds the abstract datagram socket `@NAME` inside `namespace` (abstract names
    /// belong to a network namespace, so processes sharing that namespace reach it
    /// without any mounted file). Call inside a tokio runtime. Anyone in the namespace
    /// can send to it: the caller must judge each datagram by its sender's pid.
    pub fn bind_abstract_in(namespace: &super::Namespace, name: &str) -> Result<NotifyServer, HandoffError> {
        let label = format!("@{name}");
        let std = super::broker::in_namespace(namespace, {
            let name = name.to_string();
            move || -> std::io::Result<StdDatagram> {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                StdDatagram::bind_addr(&addr)
            }
        })
        .map_err(|e| HandoffError::io("enter the namespace of the notify socket", label.clone(), std::io::Error::other(e.to_string())))?
        .map_err(|e| HandoffError::io("bind the notify socket", label.clone(), e))?;
        socket::setsockopt(&std, sockopt::PassCred, &true)
            .map_err(|e| HandoffError::io("set SO_PASSCRED on", label.clone(), e.into()))?;
        std.set_nonblocking(true).map_err(|e| HandoffError::io("make non-blocking", label.clone(), e))?;
        let socket = UnixDatagram::from_std(std).map_err(|e| HandoffError::io("register", label.clone(), e))?;
        Ok(NotifyServer { socket, path: PathBuf::from(label), is_file: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next notification.
    pub async fn recv(&self) -> Result<Notification, HandoffError> {
        let mut buf = vec![0u8; 4096];
        let r = self
            .socket
            .async_io(Interest::READABLE, || recv_raw(self.socket.as_fd(), &mut buf))
            .await
            .map_err(|source| HandoffError::Recv { source })?;
        // Nobody should pass fds here; they are closed when `r` drops.
        Ok(Notification::parse(r.creds, &buf[..r.len.min(buf.len())]))
    }
}

impl Drop for NotifyServer {
    fn drop(&mut self) {
        if !self.is_file {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to $NOTIFY_SOCKET. Ok(false) when
/// no NOTIFY_SOCKET is set (not started by a supervisor that listens).
pub fn sd_notify(state: &str) -> Result<bool, HandoffError> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    let sock = StdDatagram::unbound().map_err(|e| HandoffError::io("create a socket for", target.clone(), e))?;
    let sent = match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(|e| HandoffError::io("address", target.clone(), e))?;
            sock.send_to_addr(state.as_bytes(), &addr)
        }
        None => sock.send_to(state.as_bytes(), &target),
    };
    sent.map_err(|e| HandoffError::io("notify", target, e))?;
    Ok(true)
}

/// [`sd_notify`] for callers that must not fail on it (the daemon, the supervisor): a
/// no-op when not started by a service manager; a failure is logged.
pub fn notify_service_manager(state: &str) {
    if let Err(e) = sd_notify(state) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse_like_systemd() {
        let n = Notification::parse(None, b"READY=1\nSTATUS=booted\nbad line\nMAINPID=42\n");
        assert!(n.is_ready());
        assert_eq!(n.get("STATUS"), Some("booted"));
        assert_eq!(n.get("MAINPID"), Some("42"));
        assert!(!Notification::parse(None, b"READY=0").is_ready());
    }

    #[tokio::test]
    async fn the_server_sees_the_senders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let server = NotifyServer::bind(&path).unwrap();
        let client = StdDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        let n = server.recv().await.unwrap();
        assert!(n.is_ready());
        assert_eq!(n.sender.map(|c| c.pid), Some(std::process::id() as i32));
    }
}
