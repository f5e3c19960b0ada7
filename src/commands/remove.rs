//! `cutover remove NAME`: rules and containers gone.

use std::path::Path;

use crate::api::Request;
use crate::cli::RemoveArgs;

pub async fn run(socket: &Path, args: RemoveArgs) -> anyhow::Result<()> {
    let data = crate::client::call(socket, &Request::Remove { service: args.name.clone() }).await?;
    if args.json {
        println!("{data}");
    } else {
        println!("{}: removed (rules and containers)", args.name);
    }
    Ok(())
}
