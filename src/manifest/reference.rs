//! Image references: their syntax as Docker accepts it and the registry they name.
//! Pure; the pull itself is `docker::registry`'s.

/// Docker Hub: the registry of references that name no host.
pub const DOCKER_HUB: &str = "docker.io";


/// The registry host of an image reference (`docker.io` when it names none), as Docker
/// decides: the first path component is a host if it has a `.` or a `:`, or is
/// `localhost`.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first,
        _ => DOCKER_HUB,
    }
}

/// `name[:tag][@digest]` split into what the pull API takes: the name and the tag (or
/// digest); `latest` when neither is given.
pub fn split_reference(image: &str) -> (String, String) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name.to_string(), digest.to_string());
    }
    // A `:` after the last `/` is the tag; one before it is a registry port.
    let last_slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    match image[last_slash..].rfind(':') {
        Some(i) => (image[..last_slash + i].to_string(), image[last_slash + i + 1..].to_string()),
        None => (image.to_string(), "latest".to_string()),
    }
}

/// The syntax Docker accepts for a reference: lowercase path components, an optional
/// tag and an optional digest. Checked before a release number is spent.
pub fn check_reference(image: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`{image}` is not an image reference: {why}"));
    if image.is_empty() || image.len() > 4096 {
        return bad("empty or too long");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it contains white space");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| !alg.is_empty() && hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return bad("the digest is not ALGORITHM:HEX");
        }
    }
    let (name, tag) = split_reference(rest);
    let tagged = digest.is_none() || rest.rfind(':') > rest.rfind('/');
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !tag.starts_with(['.', '-']);
    if tagged && !tag_ok {
        return bad("the tag may have letters, digits, '_', '.' and '-' (at most 128)");
    }
    let registry = registry_of(&name);
    let path = if registry == DOCKER_HUB && !name.starts_with("docker.io/") { name.as_str() } else { name.split_once('/').map(|(_, p)| p).unwrap_or("") };
    if path.is_empty() {
        return bad("no repository name");
    }
    for component in path.split('/') {
        let ok = !component.is_empty()
            && component.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && component.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            return bad("repository names are lowercase letters, digits and separators (., _, -)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_of_references() {
        assert_eq!(registry_of("nginx:1.25"), DOCKER_HUB);
        assert_eq!(registry_of("library/nginx"), DOCKER_HUB);
        assert_eq!(registry_of("127.0.0.1:5000/web:v2"), "127.0.0.1:5000");
        assert_eq!(registry_of("registry.example.com/team/web"), "registry.example.com");
        assert_eq!(registry_of("localhost/web"), "localhost");
        assert_eq!(split_reference("127.0.0.1:5000/web:v2"), ("127.0.0.1:5000/web".into(), "v2".into()));
        assert_eq!(split_reference("127.0.0.1:5000/web"), ("127.0.0.1:5000/web".into(), "latest".into()));
        assert_eq!(split_reference("web@sha256:abc"), ("web".into(), "sha256:abc".into()));
    }

    #[test]
    fn reference_syntax() {
        for ok in ["web", "web:1.0", "team/web:v2", "127.0.0.1:5000/web:v2", "cutover-test/x_y.z:tag-1", "docker.io/library/nginx"] {
            assert!(check_reference(ok).is_ok(), "{ok}: {:?}", check_reference(ok));
        }
        for bad in ["", "Web:1", "web:", "web:bad tag", "web::1", "/web", "web:-x", "web@sha256:zz"] {
            assert!(check_reference(bad).is_err(), "{bad} accepted");
        }
    }

}
