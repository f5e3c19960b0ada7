//! Exit codes of the `cutover` binary, chosen once: every command returns a [`Failure`]
//! (or an error `main` treats as refused), and [`exit_code`] turns it into the status.
//!
//! Owns the meaning of the codes documented in README (0 done, 1 refused or failed
//! safely, 2 invalid input, 3 daemon unreachable) and the mapping of the wire's typed
//! error codes to them. Sits below `commands` and `client`, which both return
//! failures; must not depend on either, nor on the daemon or the release code.

use std::fmt;

use crate::api::ErrorCode;

/// Process exit codes, documented in README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The operation was refused or failed safely (the old release still serves).
    Refused = 1,
    /// Invalid input (manifest, arguments).
    Invalid = 2,
    /// The daemon is not reachable.
    Unreachable = 3,
}

/// The daemon's typed error code as the CLI's exit: only invalid input is not a refusal.
impl From<ErrorCode> for Exit {
    fn from(code: ErrorCode) -> Exit {
        match code {
            ErrorCode::Invalid => Exit::Invalid,
            ErrorCode::Refused | ErrorCode::Busy | ErrorCode::Denied => Exit::Refused,
        }
    }
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure { exit, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code for an error returned by a command: a [`Failure`]'s own, anything else
/// is a refusal.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<Failure>().map(|f| f.exit as u8).unwrap_or(Exit::Refused as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_and_failures_map_to_the_documented_exit_codes() {
        assert_eq!(Exit::from(ErrorCode::Invalid) as u8, 2);
        for code in [ErrorCode::Refused, ErrorCode::Busy, ErrorCode::Denied] {
            assert_eq!(Exit::from(code) as u8, 1);
        }
        assert_eq!(exit_code(&anyhow::Error::new(Failure::new(Exit::Unreachable, "gone"))), 3);
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
    }
}
