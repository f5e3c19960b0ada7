//! The compose half of `apply` and `plan`: split the files named into cutover manifests
//! and compose files, and turn the compose files into manifests (see `crate::compose`).

use std::path::PathBuf;

use crate::cli::ComposeArgs;
use crate::commands::{Exit, Failure};
use crate::compose::{self, Project};

/// The files of a command line: manifests (path, text) and the compose project, if any.
pub struct Inputs {
    pub manifests: Vec<(PathBuf, String)>,
    pub project: Option<Project>,
}

pub fn read(files: &[PathBuf], args: &ComposeArgs) -> Result<Inputs, Failure> {
    let mut manifests = Vec::new();
    let mut compose_files = Vec::new();
    for file in files {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        let text = crate::manifest::read_bounded(&file, crate::manifest::MAX_MANIFEST_BYTES)
            .map_err(|e| Failure::new(Exit::Invalid, format!("{}: cannot read the manifest: {e}", file.display())))?;
        if compose::is_compose(&text) {
            compose_files.push(file);
        } else {
            manifests.push((file, text));
        }
    }
    compose_files.extend(args.compose_files.iter().cloned());
    if compose_files.is_empty() {
        if args.project_name.is_some() || !args.services.is_empty() {
            return Err(Failure::new(Exit::Invalid, "--project-name and --service need a compose file"));
        }
        return Ok(Inputs { manifests, project: None });
    }
    let req = compose::Request { files: compose_files, project_name: args.project_name.clone(), services: args.services.clone() };
    let project = compose::load(&req, &compose::environ()).map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
    Ok(Inputs { manifests, project: Some(project) })
}

/// What cutover takes of the project and what it leaves, for the operator (stderr).
pub fn describe(p: &Project) -> String {
    let mut out = format!("compose project `{}` ({}):\n", p.name, p.file.display());
    for t in &p.taken {
        let ports: Vec<String> = t
            .manifest
            .ports
            .iter()
            .map(|x| format!("{}{}->{}/{}", x.host_ip.map(|i| format!("{i}:")).unwrap_or_default(), x.host, x.container, x.protocol))
            .collect();
        let named = if t.manifest.name == t.compose_name { String::new() } else { format!(" as `{}`", t.manifest.name) };
        out.push_str(&format!(
            "  cutover releases `{}`{named}: ports {}, network {} (alias {}), health {:?}\n",
            t.compose_name,
            ports.join(", "),
            t.manifest.network,
            t.manifest.network_aliases.join(", "),
            t.manifest.health.kind
        ));
    }
    for s in &p.left {
        out.push_str(&format!("  left to compose: `{s}` (start it with `docker compose up -d {s}`)\n"));
    }
    for n in &p.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}
