//! `cutover deploy NAME --image REF`.

use std::path::Path;

use crate::api::Request;
use crate::cli::DeployArgs;
use crate::commands::print_outcomes;

pub async fn run(socket: &Path, args: DeployArgs) -> anyhow::Result<()> {
    let data = crate::client::call_with(socket, &Request::Deploy { service: args.name, image: args.image, pull: args.pull }, args.json).await?;
    print_outcomes(&data, args.json)?;
    Ok(())
}
