pub async fn run(_socket: std::path::PathBuf, _args: crate::cli::DaemonArgs) -> anyhow::Result<()> { todo!() }
