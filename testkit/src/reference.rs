//! Docker image reference normalisation, the subset containerd's importer and K3s use.
//!
//! containerd's docker-save importer names images from `RepoTags` through
//! `reference/docker.ParseDockerRef` (`busybox:1` -> `docker.io/library/busybox:1`, a missing
//! tag becomes `:latest`); K3s's `retagImages` parses names with `ParseNormalizedNamed` and needs
//! a tag (`name.Name()`, `docker.Path(name)`, `name.Tag()`).

use anyhow::{bail, Result};

const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
const OFFICIAL_REPO_PREFIX: &str = "library/";

/// A parsed, normalised reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry domain, `docker.io` by default.
    pub domain: String,
    /// Path inside the registry (`library/busybox`).
    pub path: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest (`sha256:...`), if any.
    pub digest: Option<String>,
}

impl Reference {
    /// `domain/path`, what Go's `reference.Named.Name()` returns.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The full normalised string (`docker.io/library/busybox:1`, `...@sha256:...`).
    pub fn full(&self) -> String {
        let mut s = self.name();
        if let Some(tag) = &self.tag {
            s.push(':');
            s.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            s.push('@');
            s.push_str(digest);
        }
        s
    }
}

/// Parses and normalises like Go's `reference.ParseNormalizedNamed` (no `:latest` added).
pub fn parse_normalized(input: &str) -> Result<Reference> {
    if input.is_empty() {
        bail!("empty image reference");
    }
    if input.chars().any(|c| c.is_ascii_whitespace()) {
        bail!("invalid image reference {input:?}: contains whitespace");
    }
    let (rest, digest) = match input.split_once('@') {
        Some((rest, digest)) => {
            if !digest.contains(':') {
                bail!("invalid image reference {input:?}: bad digest");
            }
            (rest, Some(digest.to_string()))
        }
        None => (input, None),
    };
    // A tag is after the last ':' that comes after the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (
            &rest[..last_slash + i],
            Some(rest[last_slash + i + 1..].to_string()),
        ),
        None => (rest, None),
    };
    if name.is_empty() || tag.as_deref() == Some("") {
        bail!("invalid image reference {input:?}");
    }
    let (mut domain, mut path) = match name.split_once('/') {
        Some((first, remainder))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), remainder.to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
    };
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        bail!("invalid image reference {input:?}: repository name must be lowercase");
    }
    if domain == LEGACY_DEFAULT_DOMAIN {
        domain = DEFAULT_DOMAIN.to_string();
    }
    if domain == DEFAULT_DOMAIN && !path.contains('/') {
        path = format!("{OFFICIAL_REPO_PREFIX}{path}");
    }
    Ok(Reference {
        domain,
        path,
        tag,
        digest,
    })
}

/// Normalises a docker-save `RepoTags` entry like containerd's importer
/// (`ParseDockerRef`: adds `:latest` when there is neither tag nor digest).
pub fn normalize_repo_tag(input: &str) -> Result<String> {
    let mut reference = parse_normalized(input)?;
    if reference.tag.is_none() && reference.digest.is_none() {
        reference.tag = Some("latest".to_string());
    }
    Ok(reference.full())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_containerd() -> Result<()> {
        assert_eq!(
            normalize_repo_tag("busybox:1")?,
            "docker.io/library/busybox:1"
        );
        assert_eq!(
            normalize_repo_tag("busybox")?,
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalize_repo_tag("foo/bar:1")?, "docker.io/foo/bar:1");
        assert_eq!(
            normalize_repo_tag("registry.x:5000/a:1")?,
            "registry.x:5000/a:1"
        );
        assert_eq!(normalize_repo_tag("localhost/a:2")?, "localhost/a:2");
        assert_eq!(
            normalize_repo_tag("index.docker.io/library/busybox:1")?,
            "docker.io/library/busybox:1"
        );
        let r = parse_normalized("registry.x:5000/team/app:1.2")?;
        assert_eq!(r.domain, "registry.x:5000");
        assert_eq!(r.path, "team/app");
        assert_eq!(r.tag.as_deref(), Some("1.2"));
        assert!(parse_normalized("Upper/Case:1").is_err());
        Ok(())
    }
}
