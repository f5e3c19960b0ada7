//! Images from registries: which registry an image reference names, the credentials
//! `docker login` stored for it, and the pull itself with progress and a bound on how
//! long a silent registry may keep a release waiting.
//!
//! Credentials are read the way Docker's CLI reads them: `$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json` of the daemon's user; an `auths` entry (base64 `auth`,
//! `username`/`password`, `identitytoken`), or a credential helper named by
//! `credHelpers` (per registry) or `credsStore` (all), run as `docker-credential-NAME get`.
//! Secrets are never logged or put in an error message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptions;
use bollard::Docker;
use futures_util::StreamExt;
use serde::Deserialize;

use super::DockerError;
pub use crate::manifest::reference::{check_reference, registry_of, split_reference, DOCKER_HUB};
use crate::manifest::PullPolicy;

/// Docker Hub's key in config.json.
const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";


/// How long a pull may go without any word from the engine before it is given up.
pub const PULL_SILENCE: Duration = Duration::from_secs(30);

/// Where the image of a release came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    /// It was on the host already.
    Local,
    /// It was pulled for this release.
    Pulled,
}

/// A progress callback: one human line per step of a pull.
pub type ProgressFn<'a> = Box<dyn FnMut(String) + Send + 'a>;

/// Why a pull failed, in the operator's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullFailure {
    #[error("the registry {registry} refused the credentials{}: {detail}", hint(.registry))]
    Unauthorized { registry: String, detail: String },
    #[error("the registry {registry} has no such image: {detail}")]
    NotFound { registry: String, detail: String },
    #[error("the registry {registry} cannot be reached: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("the registry {registry} did not answer within {}s", .after.as_secs())]
    Silent { registry: String, after: Duration },
    #[error("{detail}")]
    Other { detail: String },
    #[error("cannot read the registry credentials: {0}")]
    Credentials(String),
}

fn hint(registry: &str) -> String {
    format!(" (run `docker login {registry}` as the daemon's user, or fix its credential helper)")
}

/// Docker's client configuration, the part that holds credentials.
#[derive(Debug, Default, Deserialize)]
struct ClientConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The folder of Docker's client config: `$DOCKER_CONFIG`, else `$HOME/.docker`.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(&h).join(".docker"))
}

/// The key forms a registry may have in `auths`: `host`, `https://host`, `http://host`
/// (with an optional `/v1/` or `/v2/` suffix); Docker Hub's is its index URL.
fn auth_keys_match(key: &str, registry: &str) -> bool {
    if registry == DOCKER_HUB {
        return key == DOCKER_HUB_AUTH_KEY || key == DOCKER_HUB || key == "index.docker.io" || key == "https://index.docker.io/v1";
    }
    let k = key.trim_start_matches("https://").trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    k == registry
}

/// The credentials for `registry` from the client config in `dir` (none: anonymous).
pub fn credentials_in(dir: &Path, registry: &str) -> Result<Option<DockerCredentials>, PullFailure> {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PullFailure::Credentials(format!("{}: {e}", path.display()))),
    };
    let config: ClientConfig =
        serde_json::from_str(&text).map_err(|e| PullFailure::Credentials(format!("{}: {e}", path.display())))?;
    let server = if registry == DOCKER_HUB { DOCKER_HUB_AUTH_KEY.to_string() } else { registry.to_string() };
    if let Some(helper) = config.cred_helpers.get(registry).or(config.creds_store.as_ref()) {
        if let Some(creds) = from_helper(helper, &server)? {
            return Ok(Some(creds));
        }
    }
    let Some(entry) = config.auths.iter().find(|(k, _)| auth_keys_match(k, registry)).map(|(_, v)| v) else {
        return Ok(None);
    };
    let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64_decode(auth).ok_or_else(|| {
            PullFailure::Credentials(format!("{}: the `auth` of {registry} is not base64", path.display()))
        })?;
        let text = String::from_utf8_lossy(&decoded).into_owned();
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| PullFailure::Credentials(format!("{}: the `auth` of {registry} is not USER:PASSWORD", path.display())))?;
        username = Some(u.to_string());
        password = Some(p.to_string());
    }
    Ok(Some(DockerCredentials {
        username,
        password,
        identitytoken: entry.identitytoken.clone().filter(|t| !t.is_empty()),
        serveraddress: Some(server),
        ..Default::default()
    }))
}

/// `docker-credential-<helper> get`, given the server on stdin: `{"Username", "Secret"}`;
/// a username of `<token>` means the secret is an identity token. A helper that knows
/// no credentials for the server answers an error: anonymous then.
fn from_helper(helper: &str, server: &str) -> Result<Option<DockerCredentials>, PullFailure> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    if helper.is_empty() || !helper.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return Err(PullFailure::Credentials(format!("`{helper}` is not a credential helper name")));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| PullFailure::Credentials(format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(server.as_bytes()).map_err(|e| PullFailure::Credentials(format!("{program}: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| PullFailure::Credentials(format!("{program}: {e}")))?;
    if !out.status.success() {
        return Ok(None);
    }
    let answer: Answer = serde_json::from_slice(&out.stdout)
        .map_err(|e| PullFailure::Credentials(format!("{program} answered something that is not its JSON: {e}")))?;
    let creds = if answer.username == "<token>" {
        DockerCredentials { identitytoken: Some(answer.secret), serveraddress: Some(server.to_string()), ..Default::default() }
    } else {
        DockerCredentials {
            username: Some(answer.username),
            password: Some(answer.secret),
            serveraddress: Some(server.to_string()),
            ..Default::default()
        }
    };
    Ok(Some(creds))
}

/// Standard base64 with or without padding; `None` if malformed.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Classify an engine error message of a pull.
pub fn classify(registry: &str, message: &str) -> PullFailure {
    let m = message.to_ascii_lowercase();
    let detail = message.trim().to_string();
    let registry = registry.to_string();
    if m.contains("unauthorized") || m.contains("authentication required") || m.contains("denied") || m.contains("401") {
        PullFailure::Unauthorized { registry, detail }
    } else if m.contains("not found") || m.contains("manifest unknown") || m.contains("does not exist") {
        PullFailure::NotFound { registry, detail }
    } else if m.contains("connection refused")
        || m.contains("no such host")
        || m.contains("timeout")
        || m.contains("i/o timeout")
        || m.contains("network is unreachable")
        || m.contains("dial tcp")
        || m.contains("deadline exceeded")
        || m.contains("request canceled")
        || m.contains("eof")
    {
        PullFailure::Unreachable { registry, detail }
    } else {
        PullFailure::Other { detail }
    }
}

/// Is `image` on the host?
pub async fn present(docker: &Docker, image: &str) -> Result<bool, DockerError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
        Err(source) => Err(DockerError::Api { action: "inspect image", target: image.to_string(), source }),
    }
}

/// Make `image` available as `policy` says.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    policy: PullPolicy,
    mut progress: ProgressFn<'_>,
) -> Result<ImageSource, DockerError> {
    let here = present(docker, image).await?;
    match (policy, here) {
        (PullPolicy::Never, true) | (PullPolicy::Missing, true) => return Ok(ImageSource::Local),
        (PullPolicy::Never, false) => return Err(DockerError::NoImage(image.to_string())),
        _ => {}
    }
    let registry = registry_of(image).to_string();
    let pull_err = |reason: PullFailure| DockerError::Pull { image: image.to_string(), reason };
    let creds = match config_dir() {
        Some(dir) => credentials_in(&dir, &registry).map_err(pull_err)?,
        None => None,
    };
    let (name, tag) = split_reference(image);
    progress(format!(
        "pulling {image} from {registry}{}",
        if creds.is_some() { " (with stored credentials)" } else { "" }
    ));
    let opts = CreateImageOptions { from_image: Some(name), tag: Some(tag), ..Default::default() };
    let mut stream = docker.create_image(Some(opts), None, creds);
    let mut layers: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let next = match tokio::time::timeout(PULL_SILENCE, stream.next()).await {
            Ok(next) => next,
            Err(_) => return Err(pull_err(PullFailure::Silent { registry, after: PULL_SILENCE })),
        };
        let Some(item) = next else { break };
        let info = match item {
            Ok(info) => info,
            Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                return Err(pull_err(classify(&registry, &message)))
            }
            Err(bollard::errors::Error::DockerStreamError { error }) => return Err(pull_err(classify(&registry, &error))),
            // The engine dropped the pull's connection without a word: it gave up on a
            // registry that did not answer (its own timeouts), or it went away itself.
            Err(e @ (bollard::errors::Error::HyperLegacyError { .. } | bollard::errors::Error::IOError { .. })) => {
                return Err(pull_err(PullFailure::Unreachable {
                    registry,
                    detail: format!("the engine ended the pull without an answer ({e}); is the registry up, and is dockerd?"),
                }))
            }
            Err(e) => return Err(pull_err(classify(&registry, &e.to_string()))),
        };
        if let Some(detail) = info.error_detail.as_ref().and_then(|d| d.message.clone()) {
            return Err(pull_err(classify(&registry, &detail)));
        }
        // One line per layer and state change (not per progress tick).
        if let (Some(id), Some(status)) = (info.id.as_ref(), info.status.as_ref()) {
            if layers.get(id) != Some(status) {
                let bytes = info
                    .progress_detail
                    .as_ref()
                    .and_then(|p| p.total.filter(|t| *t > 0))
                    .map(|t| format!(" ({:.1} MB)", t as f64 / 1e6))
                    .unwrap_or_default();
                progress(format!("layer {id}: {status}{bytes}"));
                layers.insert(id.clone(), status.clone());
            }
        } else if let Some(status) = info.status.as_ref() {
            progress(status.clone());
        }
    }
    if !present(docker, image).await? {
        return Err(pull_err(PullFailure::Other { detail: "the engine finished the pull but has no such image".into() }));
    }
    Ok(ImageSource::Pulled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_auths_in_every_form() {
        let dir = tempfile::tempdir().unwrap();
        // "user:pa:ss" in base64.
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths": {
                "127.0.0.1:5000": {"auth": "dXNlcjpwYTpzcw=="},
                "https://registry.example.com/v1/": {"username": "u2", "password": "p2"},
                "https://index.docker.io/v1/": {"identitytoken": "tok"}
            }}"#,
        )
        .unwrap();
        let c = credentials_in(dir.path(), "127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((c.username.as_deref(), c.password.as_deref()), (Some("user"), Some("pa:ss")));
        let c = credentials_in(dir.path(), "registry.example.com").unwrap().unwrap();
        assert_eq!(c.username.as_deref(), Some("u2"));
        let c = credentials_in(dir.path(), DOCKER_HUB).unwrap().unwrap();
        assert_eq!(c.identitytoken.as_deref(), Some("tok"));
        assert!(credentials_in(dir.path(), "other.example.com").unwrap().is_none());
        let empty = tempfile::tempdir().unwrap();
        assert!(credentials_in(empty.path(), "127.0.0.1:5000").unwrap().is_none(), "no config: anonymous");
    }

    #[test]
    fn a_missing_helper_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"credsStore": "cutover-test-none"}"#).unwrap();
        let err = credentials_in(dir.path(), "127.0.0.1:5000").unwrap_err().to_string();
        assert!(err.contains("docker-credential-cutover-test-none"), "{err}");
    }

    #[test]
    fn engine_messages_are_classified() {
        let r = "127.0.0.1:5000";
        assert!(matches!(classify(r, "Head \"http://127.0.0.1:5000/v2/web/manifests/v2\": no basic auth credentials; unauthorized"), PullFailure::Unauthorized { .. }));
        assert!(matches!(classify(r, "manifest for 127.0.0.1:5000/web:v9 not found: manifest unknown"), PullFailure::NotFound { .. }));
        assert!(matches!(classify(r, "Get \"http://127.0.0.1:5000/v2/\": dial tcp 127.0.0.1:5000: connect: connection refused"), PullFailure::Unreachable { .. }));
        // The engine's own timeouts for a registry that never answers, in their wordings.
        assert!(matches!(classify(r, "Get \"http://127.0.0.1:5000/v2/\": context deadline exceeded"), PullFailure::Unreachable { .. }));
        assert!(matches!(
            classify(r, "Get \"http://127.0.0.1:5000/v2/\": net/http: request canceled (Client.Timeout exceeded while awaiting headers)"),
            PullFailure::Unreachable { .. }
        ));
        let msg = PullFailure::Unauthorized { registry: r.into(), detail: "x".into() }.to_string();
        assert!(msg.contains("docker login 127.0.0.1:5000"), "{msg}");
    }
}
