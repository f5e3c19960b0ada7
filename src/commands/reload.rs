//! `cutover reload`: ask a `cutover run` supervisor for a new generation.

use crate::cli::ReloadArgs;

pub async fn run(_args: ReloadArgs) -> anyhow::Result<()> {
    Err(super::Failure::new(super::Exit::Refused, "cutover reload is not built yet").into())
}
