//! `cutover run`: supervise a socket-activation server (see `handoff::supervisor`).

use crate::cli::RunArgs;

pub async fn run(_args: RunArgs) -> anyhow::Result<()> {
    Err(super::Failure::new(super::Exit::Refused, "cutover run is not built yet").into())
}
