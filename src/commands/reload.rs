//! `cutover reload`: ask a `cutover run` supervisor for a new generation.

use super::{Exit, Failure};
use crate::cli::ReloadArgs;
use crate::handoff::supervisor::{request_reload, ReloadOutcome, SupervisorError};

pub async fn run(args: ReloadArgs) -> anyhow::Result<()> {
    match request_reload(&args.run_dir, &args.name).await {
        Ok(ReloadOutcome::Switched { generation, pid, previous_generation, .. }) => {
            println!("switched: generation {generation} (pid {pid}) serves {}; generation {previous_generation} is draining", args.name);
            Ok(())
        }
        Ok(ReloadOutcome::Refused { reason, output, .. }) => {
            let mut message = format!("reload refused: {reason}");
            if !output.is_empty() {
                message.push_str("\nits last output:");
                for line in output {
                    message.push_str("\n  ");
                    message.push_str(&line);
                }
            }
            Err(Failure::new(Exit::Refused, message).into())
        }
        // Like daemon commands on an unknown service: invalid input.
        Err(e @ SupervisorError::UnknownName { .. }) => Err(Failure::new(Exit::Invalid, e.to_string()).into()),
        Err(e @ SupervisorError::NotRunning { .. }) => Err(Failure::new(Exit::Unreachable, e.to_string()).into()),
        Err(e) => Err(Failure::new(Exit::Refused, e.to_string()).into()),
    }
}
