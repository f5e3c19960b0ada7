//! `cutover rollback NAME [--to RELEASE]`.

use std::path::Path;

use crate::api::Request;
use crate::cli::RollbackArgs;
use crate::commands::print_outcomes;

pub async fn run(socket: &Path, args: RollbackArgs) -> anyhow::Result<()> {
    let data = crate::client::call_with(socket, &Request::Rollback { service: args.name, to: args.to, pull: args.pull }, args.json).await?;
    print_outcomes(&data, args.json)?;
    Ok(())
}
