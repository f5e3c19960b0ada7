//! `cutover remove NAME`: rules and containers gone.

use std::path::Path;

use crate::api::Request;
use crate::cli::RemoveArgs;

pub async fn run(socket: &Path, args: RemoveArgs) -> anyhow::Result<()> {
    let data = crate::client::call(socket, &Request::Remove { service: args.name.clone(), volumes: args.volumes }).await?;
    if args.json {
        println!("{data}");
    } else {
        let volumes: Vec<String> = data
            .get("volumes_removed")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        match (args.volumes, volumes.is_empty()) {
            (true, false) => println!("{}: removed (rules, containers and volumes {})", args.name, volumes.join(", ")),
            (true, true) => println!("{}: removed (rules and containers; it had no volumes of cutover's)", args.name),
            (false, _) => println!("{}: removed (rules and containers; named volumes kept, `--volumes` deletes them)", args.name),
        }
    }
    Ok(())
}
