//! `cutover demo`: a zero-downtime release shown end to end on this Docker host. The
//! scenario, its lab and its report live apart from the product, in `crate::demo`.

use crate::cli::DemoArgs;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    crate::demo::run(args).await
}
