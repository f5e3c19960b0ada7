//! The control API between the CLI and the daemon: one JSON request per connection on
//! the unix socket, answered by zero or more progress lines and one final line.
//!
//! Newline-delimited JSON keeps it debuggable with `socat` and implementable from any
//! language. Wire types only (requests, typed replies and error codes): no I/O, and
//! nothing that decides what an error means to a user (that is `exit`). A request line longer than [`MAX_REQUEST`] is refused unread.

use serde::{Deserialize, Serialize};

use crate::manifest::PullPolicy;

/// The largest request line the daemon reads (manifests included).
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestText {
    /// The file name, for messages.
    pub file: String,
    pub text: String,
}

/// The file and the size only: the text holds the service's `env` (secrets), and
/// requests are logged.
impl std::fmt::Debug for ManifestText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestText").field("file", &self.file).field("bytes", &self.text.len()).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping {},
    Apply {
        manifests: Vec<ManifestText>,
        /// Overrides the manifests' `pull` for the releases this apply starts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pull: Option<PullPolicy>,
    },
    Deploy {
        service: String,
        image: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pull: Option<PullPolicy>,
    },
    Rollback {
        service: String,
        #[serde(default)]
        to: Option<u32>,
        /// When the kept container is gone: start its image again, pulled as this says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pull: Option<PullPolicy>,
    },
    Status { #[serde(default)] service: Option<String> },
    History { service: String },
    Remove {
        service: String,
        /// Also delete the named volumes cutover created for the service.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        volumes: bool,
    },
}

impl Request {
    /// The service the request changes, if it changes one.
    pub fn service(&self) -> Option<&str> {
        match self {
            Request::Deploy { service, .. }
            | Request::Rollback { service, .. }
            | Request::Remove { service, .. } => Some(service),
            _ => None,
        }
    }
}

/// A step the daemon reports while it works.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressLine {
    pub service: String,
    pub release: u32,
    pub step: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

/// Why the daemon did not do what was asked, on the wire; the CLI maps it to its exit
/// code (`exit`). An unknown code is a message this CLI does not understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Refused or failed safely.
    Refused,
    /// Another operation on the service runs.
    Busy,
    /// Invalid input.
    Invalid,
    /// Not allowed to talk to the daemon.
    Denied,
}

impl From<&crate::deploy::ReleaseError> for ErrorCode {
    fn from(e: &crate::deploy::ReleaseError) -> ErrorCode {
        use crate::deploy::ReleaseError;
        match e {
            ReleaseError::Busy(_) => ErrorCode::Busy,
            ReleaseError::NotFound(_) | ReleaseError::Invalid(_) => ErrorCode::Invalid,
            _ => ErrorCode::Refused,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Progress(ProgressLine),
    Done { data: serde_json::Value },
    Error { code: ErrorCode, message: String },
}

impl From<crate::deploy::Progress> for ProgressLine {
    fn from(p: crate::deploy::Progress) -> Self {
        ProgressLine {
            service: p.service,
            release: p.release,
            step: p.step.to_string(),
            message: p.message,
            elapsed_ms: p.elapsed_ms,
            limit_ms: p.limit_ms,
            connections: p.connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_refuse_unknown_fields() {
        let r = Request::Rollback { service: "web".into(), to: Some(2), pull: None };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"rollback","service":"web","to":2}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"launch"}"#).is_err());
    }

    #[test]
    fn error_codes_are_typed_on_the_wire() {
        let r = Reply::Error { code: ErrorCode::Busy, message: "m".into() };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"type":"error","code":"busy","message":"m"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Reply>(r#"{"type":"error","code":"later","message":"m"}"#).is_err());
    }
}

/// `status`: one entry per service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    /// `nat` or `handoff`.
    pub mode: String,
    pub active: Option<u32>,
    pub image: Option<String>,
    pub container: Option<String>,
    pub addr: Option<String>,
    /// `8080/tcp -> 80`
    pub ports: Vec<String>,
    /// Stopped releases kept for rollback, newest first.
    pub kept: Vec<u32>,
    /// An operation in progress (`deploy 2: switched`).
    pub operation: Option<String>,
    /// The active release died on its own and does not serve (why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
}

/// `history`: the releases of a service and what happened to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    pub service: String,
    pub active: Option<u32>,
    pub releases: Vec<ReleaseView>,
    pub events: Vec<crate::state::HistoryEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseView {
    pub number: u32,
    pub image: String,
    pub container: String,
    pub status: crate::state::ReleaseStatus,
    pub created_at: u64,
    pub activated_at: Option<u64>,
    pub stopped_at: Option<u64>,
}
