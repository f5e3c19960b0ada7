pub fn run(_args: crate::cli::PlanArgs) -> anyhow::Result<()> { todo!() }
