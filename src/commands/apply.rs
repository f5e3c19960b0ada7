//! `cutover apply FILE...`: validate locally (exit 2 before anything is sent), then ask
//! the daemon to register or update each service.

use std::path::Path;

use crate::api::{ManifestText, Request};
use crate::cli::ApplyArgs;
use crate::commands::{print_outcomes, Exit, Failure};
use crate::manifest::Manifest;

pub async fn run(socket: &Path, args: ApplyArgs) -> anyhow::Result<()> {
    let mut manifests = Vec::new();
    // Absolute paths, so the daemon resolves env files and `./` mounts where this CLI does.
    let inputs = super::compose::read(&args.files, &args.compose)?;
    for (file, text) in inputs.manifests {
        let mut m = Manifest::parse(&file, &text).map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
        m.resolve(&file, &text).map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
        manifests.push(ManifestText { file: file.display().to_string(), text });
    }
    if let Some(project) = &inputs.project {
        eprint!("{}", super::compose::describe(project));
        // The daemon gets manifests it already understands, resolved here.
        for t in &project.taken {
            let text = serde_norway::to_string(&t.manifest)
                .map_err(|e| Failure::new(Exit::Invalid, format!("{}: {}: {e}", project.file.display(), t.compose_name)))?;
            manifests.push(ManifestText { file: project.file.display().to_string(), text });
        }
    }
    let data = crate::client::call_with(socket, &Request::Apply { manifests, pull: args.pull }, args.json).await?;
    print_outcomes(&data, args.json)?;
    Ok(())
}
