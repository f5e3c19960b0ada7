//! Compose files as they are: read, interpolate and merge them as `docker compose` does,
//! pick the services cutover releases, and turn each into a [`Manifest`] the daemon
//! already understands. Owns compose's file rules (merge, `.env`, project name); knows
//! nothing of the daemon or the engine. Reads files only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use crate::manifest::{read_bounded, Manifest, ManifestError, MAX_ENV_FILE, MAX_MANIFEST_BYTES};

pub mod interpolate;
mod mapping;
mod merge;

pub use interpolate::Vars;

/// The compose version cutover writes into the labels compose reads back.
pub const COMPOSE_VERSION_LABEL: &str = "1.29.2";

/// A compose file cutover cannot take as it is.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("{}: cannot read the compose file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}{}: {key}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid { file: PathBuf, line: Option<usize>, key: String, message: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// One compose file as read: its path, text and YAML.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// An error about `key` (a dotted path such as `services.web.ports`), at the line of
    /// its last segment within the service's block when one is named.
    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ComposeError {
        ComposeError::Invalid { file: self.path.clone(), line: self.line_of(key), key: key.to_string(), message: message.into() }
    }

    /// Does this file hold the whole dotted key?
    pub fn has(&self, key: &str) -> bool {
        self.find(key).1
    }

    /// The line of a dotted key: each segment is searched after the previous one's line;
    /// the line of the last segment found.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.find(key).0
    }

    /// The line of the deepest segment found, and whether every segment was.
    fn find(&self, key: &str) -> (Option<usize>, bool) {
        let mut from = 0usize;
        let mut found = None;
        for seg in key.split('.') {
            let seg = seg.split('[').next().unwrap_or(seg);
            let line = self.text.lines().enumerate().skip(from).find(|(_, l)| {
                let t = l.trim_start().trim_start_matches("- ").trim_start();
                let t = t.trim_start_matches(['"', '\'']);
                t.strip_prefix(seg).is_some_and(|r| r.trim_start_matches(['"', '\'']).trim_start().starts_with(':'))
            });
            match line {
                Some((i, _)) => {
                    from = i + 1;
                    found = Some(i + 1);
                }
                None => return (found, false),
            }
        }
        (found, true)
    }
}

/// The files of a project (at least one), later ones overriding earlier ones.
pub struct Sources<'a> {
    all: &'a [Source],
    first: &'a Source,
}

impl<'a> Sources<'a> {
    pub fn new(all: &'a [Source]) -> Option<Sources<'a>> {
        Some(Sources { all, first: all.first()? })
    }

    /// The last file that holds `key` (the override that set it), else the one that holds
    /// most of it, else the first.
    pub fn for_key(&self, key: &str) -> &'a Source {
        self.all
            .iter()
            .rev()
            .find(|s| s.has(key))
            .or_else(|| self.all.iter().rev().find(|s| s.line_of(key).is_some()))
            .unwrap_or(self.first)
    }

    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ComposeError {
        self.for_key(key).invalid(key, message)
    }
}


/// Does this YAML text look like a compose file (a top-level `services:` key)?
pub fn is_compose(text: &str) -> bool {
    matches!(serde_norway::from_str::<Value>(text), Ok(Value::Mapping(m)) if m.contains_key("services"))
}

/// What the operator asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The compose files, the first one defines the project folder.
    pub files: Vec<PathBuf>,
    pub project_name: Option<String>,
    /// Only these compose services (empty: those with `ports:` or `x-cutover:`).
    pub services: Vec<String>,
}

/// A compose service cutover releases.
#[derive(Debug, Clone)]
pub struct Taken {
    pub compose_name: String,
    pub manifest: Manifest,
}

/// The project as cutover sees it.
#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    /// The first compose file: env files and bind sources are relative to its folder.
    pub file: PathBuf,
    pub taken: Vec<Taken>,
    /// Services left to compose.
    pub left: Vec<String>,
    /// Keys ignored, and variables used but unset: said to the operator, harmless.
    pub notes: Vec<String>,
}

/// Read, interpolate, merge and map the compose files of `req`; `environ` is the CLI's
/// environment (it wins over the `.env` file).
pub fn load(req: &Request, environ: &Vars) -> Result<Project, ComposeError> {
    let first = req.files.first().ok_or_else(|| ComposeError::Invalid {
        file: PathBuf::from("-"),
        line: None,
        key: "files".into(),
        message: "name at least one compose file".into(),
    })?;
    let first = std::path::absolute(first).unwrap_or_else(|_| first.clone());
    let dir = first.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let mut vars = Vars::new();
    let dotenv = dir.join(".env");
    if dotenv.exists() {
        let text = read_bounded(&dotenv, MAX_ENV_FILE).map_err(|source| ComposeError::Read { path: dotenv.clone(), source })?;
        let pairs = crate::manifest::parse_env_file(&text).map_err(|message| ComposeError::Invalid {
            file: dotenv.clone(),
            line: None,
            key: ".env".into(),
            message,
        })?;
        vars.extend(pairs);
    }
    vars.extend(environ.iter().map(|(k, v)| (k.clone(), v.clone())));

    let mut notes = Vec::new();
    let mut merged: Option<Mapping> = None;
    let mut sources = Vec::new();
    for path in &req.files {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        let text = read_bounded(&path, MAX_MANIFEST_BYTES).map_err(|source| ComposeError::Read { path: path.clone(), source })?;
        let src = Source { path, text };
        let value: Value = serde_norway::from_str(&src.text).map_err(|e| ComposeError::Invalid {
            file: src.path.clone(),
            line: e.location().map(|l| l.line()),
            key: "yaml".into(),
            message: e.to_string(),
        })?;
        let Value::Mapping(map) = value else {
            return Err(src.invalid("services", "a compose file is a map with a `services:` key"));
        };
        let mut unset = Vec::new();
        let map = interpolate_map(map, &src, "", &vars, &mut unset)?;
        for var in unset {
            notes.push(format!("{}: the variable `{var}` is not set; it is an empty string", src.path.display()));
        }
        merged = Some(match merged {
            None => map,
            Some(base) => merge::merge_files(base, map),
        });
        sources.push(src);
    }
    let merged = merged.unwrap_or_default();
    let name_src = Sources::new(&sources).map(|s| s.for_key("name")).ok_or_else(|| ComposeError::Invalid {
        file: first.clone(),
        line: None,
        key: "files".into(),
        message: "name at least one compose file".into(),
    })?;
    let project = project_name(req.project_name.as_deref(), &vars, &merged, &dir, name_src)?;
    mapping::map_project(&project, &first, &merged, &sources, &req.services, &vars, notes)
}

/// compose's order: `--project-name`, `COMPOSE_PROJECT_NAME`, the `name:` key, the
/// folder's name; lowercased, keeping only a-z, 0-9, '-' and '_'.
fn project_name(flag: Option<&str>, vars: &Vars, top: &Mapping, dir: &Path, src: &Source) -> Result<String, ComposeError> {
    let raw = flag
        .map(str::to_string)
        .or_else(|| vars.get("COMPOSE_PROJECT_NAME").filter(|v| !v.is_empty()).cloned())
        .or_else(|| top.get("name").and_then(Value::as_str).map(str::to_string))
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let name = normalise_project(&raw);
    if name.is_empty() {
        return Err(src.invalid("name", format!(
            "`{raw}` gives no project name (compose keeps a-z, 0-9, '-' and '_'): pass --project-name"
        )));
    }
    Ok(name)
}

/// compose's normalisation of a project name.
pub fn normalise_project(raw: &str) -> String {
    raw.to_lowercase().chars().filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_').collect()
}

/// Interpolate every string value (not keys) of `map`; `path` is the dotted key so far.
fn interpolate_map(map: Mapping, src: &Source, path: &str, vars: &Vars, unset: &mut Vec<String>) -> Result<Mapping, ComposeError> {
    let mut out = Mapping::new();
    for (k, v) in map {
        let key = match &k {
            Value::String(s) => s.clone(),
            other => format!("{other:?}"),
        };
        let here = if path.is_empty() { key } else { format!("{path}.{key}") };
        out.insert(k, interpolate_value(v, src, &here, vars, unset)?);
    }
    Ok(out)
}

fn interpolate_value(v: Value, src: &Source, path: &str, vars: &Vars, unset: &mut Vec<String>) -> Result<Value, ComposeError> {
    Ok(match v {
        Value::String(s) => Value::String(interpolate::interpolate(&s, vars, unset).map_err(|e| src.invalid(path, e.to_string()))?),
        Value::Sequence(seq) => Value::Sequence(
            seq.into_iter().map(|x| interpolate_value(x, src, path, vars, unset)).collect::<Result<_, _>>()?,
        ),
        Value::Mapping(m) => Value::Mapping(interpolate_map(m, src, path, vars, unset)?),
        other => other,
    })
}

/// The CLI's environment as variables.
pub fn environ() -> Vars {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect::<BTreeMap<_, _>>()
}
