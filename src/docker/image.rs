//! Building the demo/test release image: `FROM scratch` plus the embedded static demo
//! server, with the release name and extra settings baked in as environment variables.
//!
//! No registry is reachable where cutover is tested, so the image is built from an
//! in-memory build context by the engine's classic builder, which needs nothing but the
//! context for `FROM scratch`. This module only builds images; running and removing
//! containers belongs elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::io;

use bollard::query_parameters::BuildImageOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

use crate::embedded::DEMO_SERVER;

/// Where the demo server sits in the image, and the HEALTHCHECK that uses its probe mode
/// (a scratch image has no shell or curl to probe with).
const SERVER_PATH: &str = "/demo-server";
/// Every demo image has an empty `/data` owned by uid and gid 1000, like real images that
/// run as a non-root user prepare their data folder: a named volume mounted there starts
/// with that owner. (The file keeps the folder in the build context.)
const DATA_DIR: &str = "/data";
const DATA_KEEP: &str = "data/.keep";
const HEALTH_URL: &str = "http://127.0.0.1:80/healthz";
/// Label put on every demo image so they can be found and removed in bulk.
pub const DEMO_LABEL: &str = "io.cutover.demo-release";

/// A demo release image to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoImage {
    /// The image reference to tag the result with, e.g. `cutover-demo:v2`.
    pub tag: String,
    /// Baked as `RELEASE`: the text the server answers with.
    pub release: String,
    /// Further variables baked into the image (see the demo server's docs: `LISTEN`,
    /// `HEALTH`, `START_DELAY_MS`, ...). They come after `RELEASE` and may override it.
    pub env: BTreeMap<String, String>,
    /// Adds a Docker HEALTHCHECK (every second) that GETs `/healthz` on port 80.
    pub healthcheck: bool,
}

/// Failures building a demo image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {tag}: {name:?} is not a valid environment variable name")]
    InvalidEnvName { tag: String, name: String },
    #[error("image {tag}: the value of {name} contains a line break, which a Dockerfile ENV cannot carry")]
    InvalidEnvValue { tag: String, name: String },
    #[error("assemble the build context for image {tag}: {source}")]
    Context {
        tag: String,
        #[source]
        source: io::Error,
    },
    #[error("build image {tag} through the Docker API: {source}")]
    Api {
        tag: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the engine failed to build image {tag}: {message} (last output: {output})")]
    Build { tag: String, message: String, output: String },
}

/// Builds and tags the demo release image described by `spec`.
pub async fn build_demo_image(docker: &Docker, spec: &DemoImage) -> Result<(), ImageError> {
    let dockerfile = dockerfile(spec)?;
    let context = build_context(&dockerfile, DEMO_SERVER)
        .map_err(|source| ImageError::Context { tag: spec.tag.clone(), source })?;
    let labels = HashMap::from([(DEMO_LABEL.to_string(), spec.release.clone())]);
    let options = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(&spec.tag)
        .rm(true)
        .forcerm(true)
        .labels(&labels)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    // The build only finishes when its stream is read to the end; an error shows up as an
    // item in it, not as the HTTP status. The last lines explain a failed step.
    let mut recent: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(line) = info.stream.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
                    tracing::debug!(tag = %spec.tag, "{line}");
                    if recent.len() == 5 {
                        recent.remove(0);
                    }
                    recent.push(line.to_string());
                }
            }
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                return Err(ImageError::Build { tag: spec.tag.clone(), message: error, output: recent.join(" | ") });
            }
            Err(source) => return Err(ImageError::Api { tag: spec.tag.clone(), source }),
        }
    }
    Ok(())
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A Dockerfile ENV value in double quotes: `\`, `"` and `$` escaped so the builder
/// neither ends the string nor substitutes variables.
fn quote_env_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The Dockerfile for `spec` (pure, so it is unit-tested without an engine).
fn dockerfile(spec: &DemoImage) -> Result<String, ImageError> {
    let mut env = vec![("RELEASE", spec.release.as_str())];
    env.extend(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut lines = vec![
        "FROM scratch".to_string(),
        format!("COPY demo-server {SERVER_PATH}"),
        format!("COPY --chown=1000:1000 data {DATA_DIR}"),
    ];
    for (name, value) in env {
        if !valid_env_name(name) {
            return Err(ImageError::InvalidEnvName { tag: spec.tag.clone(), name: name.to_string() });
        }
        if value.contains(['\n', '\r']) {
            return Err(ImageError::InvalidEnvValue { tag: spec.tag.clone(), name: name.to_string() });
        }
        lines.push(format!("ENV {name}={}", quote_env_value(value)));
    }
    if spec.healthcheck {
        lines.push(format!(
            "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"{SERVER_PATH}\",\"probe\",\"{HEALTH_URL}\"]"
        ));
    }
    // SIGTERM is the default STOPSIGNAL; named anyway because the graceful stop depends on it.
    lines.push("STOPSIGNAL SIGTERM".to_string());
    lines.push(format!("ENTRYPOINT [\"{SERVER_PATH}\"]"));
    Ok(lines.join("\n") + "\n")
}

/// The build context: a tar holding the Dockerfile and the server binary.
fn build_context(dockerfile: &str, server: &[u8]) -> io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data, mode) in
        [("Dockerfile", dockerfile.as_bytes(), 0o644), ("demo-server", server, 0o755), (DATA_KEEP, &b""[..], 0o644)]
    {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, path, data)?;
    }
    tar.into_inner()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn spec() -> DemoImage {
        DemoImage {
            tag: "t:1".into(),
            release: "v1".into(),
            env: BTreeMap::from([("HEALTH".to_string(), "fail".to_string())]),
            healthcheck: true,
        }
    }

    #[test]
    fn dockerfile_bakes_release_env_and_healthcheck() {
        let df = dockerfile(&spec()).unwrap();
        assert!(df.starts_with("FROM scratch\n"), "{df}");
        assert!(df.contains("ENV RELEASE=\"v1\"\n"), "{df}");
        assert!(df.contains("ENV HEALTH=\"fail\"\n"), "{df}");
        assert!(df.contains(
            "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"/demo-server\",\"probe\",\"http://127.0.0.1:80/healthz\"]"
        ));
        assert!(df.contains("ENTRYPOINT [\"/demo-server\"]"));
        let no_hc = DemoImage { healthcheck: false, ..spec() };
        assert!(!dockerfile(&no_hc).unwrap().contains("HEALTHCHECK"));
    }

    #[test]
    fn env_values_are_quoted_and_names_checked() {
        assert_eq!(quote_env_value(r#"a "b" $HOME \n"#), r#""a \"b\" \$HOME \\n""#);
        let bad = DemoImage { env: BTreeMap::from([("1X".into(), "y".into())]), ..spec() };
        assert!(matches!(dockerfile(&bad), Err(ImageError::InvalidEnvName { .. })));
        let bad = DemoImage { release: "a\nFROM evil".into(), ..spec() };
        assert!(matches!(dockerfile(&bad), Err(ImageError::InvalidEnvValue { .. })));
    }

    #[test]
    fn context_holds_dockerfile_and_executable_server() {
        let bytes = build_context("FROM scratch\n", b"\x7fELF").unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let entries: Vec<(String, u32, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap(), e.size())
            })
            .collect();
        assert_eq!(
            entries,
            vec![("Dockerfile".into(), 0o644, 13), ("demo-server".into(), 0o755, 4), ("data/.keep".into(), 0o644, 0)]
        );
    }
}
