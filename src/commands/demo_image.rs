//! `cutover demo-image` (hidden): build a demo server image through the Docker API.

use std::collections::BTreeMap;

use crate::cli::DemoImageArgs;
use crate::commands::{Exit, Failure};
use crate::docker::image::{build_demo_image, DemoImage};
use crate::docker::DockerEngine;

pub async fn run(args: DemoImageArgs) -> anyhow::Result<()> {
    let mut env = BTreeMap::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Failure::new(Exit::Invalid, format!("--env `{kv}`: use KEY=VALUE")))?;
        env.insert(k.to_string(), v.to_string());
    }
    let engine = DockerEngine::connect(&args.docker).await?;
    let spec = DemoImage { tag: args.tag.clone(), release: args.release, env, healthcheck: args.healthcheck };
    build_demo_image(engine.client(), &spec).await?;
    println!("{}", args.tag);
    Ok(())
}
