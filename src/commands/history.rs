use std::path::Path;
pub async fn run(_socket: &Path, _args: crate::cli::HistoryArgs) -> anyhow::Result<()> { todo!() }
