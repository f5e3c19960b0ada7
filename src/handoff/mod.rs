//! fd handoff: passing listening sockets, and even established connections, from one
//! generation of a server to the next over unix sockets, so the kernel never refuses a
//! connection during a release.
//!
//! - [`protocol`]: the versioned wire format (pure; documented in docs/handoff-protocol.md);
//! - [`fds`]: SOCK_SEQPACKET + SCM_RIGHTS transport;
//! - [`listeners`]: binding listeners, and taking them from the socket-activation environment;
//! - [`procs`]: starting a generation with its fds, process groups, the process tree;
//! - [`notify`]: the sd_notify server (for supervised servers) and client;
//! - [`supervisor`]: `cutover run`, generations of an unmodified socket-activation server;
//! - [`probe`]: its optional readiness probe; [`record`]: the serving generation on disk,
//!   for adoption by a supervisor started again;
//! - [`broker`]: named listeners served on `@cutover/NAME` with peer-credential checks;
//! - [`brokers`]: the daemon's broker per handoff-mode service, with its readiness socket;
//! - [`adopt`]: taking listeners back from a running release (pidfd_getfd) after a restart;
//! - [`migrate`]: live connection migration for Rust servers.
//!
//! This module does not touch nftables or Docker; the daemon composes it with them.

pub mod adopt;
pub mod broker;
pub mod brokers;
pub mod fds;
pub mod listeners;
pub mod migrate;
pub mod notify;
pub mod probe;
pub mod procs;
pub mod protocol;
pub mod record;
pub mod supervisor;

use std::io;

use thiserror::Error;

pub use broker::{Broker, Namespace, Policy};
pub use fds::{PeerCred, SocketName};
pub use listeners::{Listener, ListenSpec};

/// Errors of the handoff transport and its users.
#[derive(Debug, Error)]
pub enum HandoffError {
    #[error("cannot {op} {target}: {source}")]
    Io {
        op: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot send a {kind:?} frame: {source}")]
    Send {
        kind: protocol::Kind,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive a frame: {source}")]
    Recv {
        #[source]
        source: io::Error,
    },
    #[error("the peer closed the handoff connection")]
    Closed,
    #[error("bad frame: {0}")]
    Frame(#[from] protocol::FrameError),
    #[error("the frame's fds were cut off by the kernel (MSG_CTRUNC, {received} arrived); the sender attached more than one message can carry")]
    FdsTruncated { received: usize },
    #[error("a {kind:?} frame announced {announced} fds but {received} arrived")]
    FdCount { kind: protocol::Kind, announced: usize, received: usize },
    #[error("the peer refused ({code:?}): {message}")]
    Refused { code: protocol::ErrorCode, message: String },
    #[error("the peer sent a {got:?} frame where {expected} was expected")]
    Unexpected { got: protocol::Kind, expected: &'static str },
    #[error("listener `{0}`: {1}")]
    Listener(String, String),
    #[error("the socket-activation environment is invalid: {0}")]
    Environment(String),
}

impl HandoffError {
    pub fn io(op: &'static str, target: impl Into<String>, source: io::Error) -> Self {
        HandoffError::Io { op, target: target.into(), source }
    }
}
