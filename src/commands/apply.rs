//! `cutover apply FILE...`: validate locally (exit 2 before anything is sent), then ask
//! the daemon to register or update each service.

use std::path::Path;

use crate::api::{ManifestText, Request};
use crate::cli::ApplyArgs;
use crate::commands::{print_outcomes, Exit, Failure};
use crate::manifest::Manifest;

pub async fn run(socket: &Path, args: ApplyArgs) -> anyhow::Result<()> {
    let mut manifests = Vec::new();
    for file in &args.files {
        // Absolute, so the daemon resolves env files and `./` mounts where this CLI does.
        let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        let text = crate::manifest::read_bounded(&file, crate::manifest::MAX_MANIFEST)
            .map_err(|e| Failure::new(Exit::Invalid, format!("{}: cannot read the manifest: {e}", file.display())))?;
        let mut m = Manifest::parse(&file, &text).map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
        m.resolve(&file, &text).map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
        manifests.push(ManifestText { file: file.display().to_string(), text });
    }
    let data = crate::client::call(socket, &Request::Apply { manifests, pull: args.pull }).await?;
    print_outcomes(&data, args.json);
    Ok(())
}
