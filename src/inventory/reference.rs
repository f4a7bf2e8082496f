//! Image reference normalisation, as containerd does it when it names the images of a
//! docker-save archive and as CRI does it when it pulls a `.txt` list entry.
//!
//! Both go through `distribution/reference.ParseDockerRef` (containerd
//! `core/images/archive/reference.go` `normalizeReference`; CRI's pull path): parse with
//! `ParseNormalizedNamed` (default domain `docker.io`, `library/` for official images,
//! `index.docker.io` rewritten), then `TagNameOnly` (a bare name gets `:latest`), and a
//! reference with both a tag and a digest keeps only the digest.
//!
//! The grammar below follows `distribution/reference` `regexp.go` and go-digest's
//! `Digest.Validate` (only sha256, sha384 and sha512 are available in containerd).

use thiserror::Error;

/// Why a reference is not one containerd (or CRI) would accept.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReferenceError {
    /// Nothing to parse.
    #[error("image reference is empty; write a name such as docker.io/library/busybox:1.36")]
    Empty,
    /// A 64-hex-digit image ID, which is not a name.
    #[error(
        "invalid image reference {0:?}: a bare 64-hex-digit string is an image ID, not a name; \
         write repository@sha256:<digest> instead"
    )]
    IdentifierOnly(String),
    /// The repository path has uppercase letters.
    #[error(
        "invalid image reference {reference:?}: repository name {repository:?} must be lowercase"
    )]
    Uppercase {
        /// The reference as given.
        reference: String,
        /// The offending repository part.
        repository: String,
    },
    /// Does not match the reference grammar.
    #[error(
        "invalid image reference {0:?}: expected [registry[:port]/]path[:tag][@algorithm:hex] \
         with a lowercase path"
    )]
    InvalidFormat(String),
    /// The tag is malformed.
    #[error("invalid image reference {0:?}: the tag must be 1-128 characters of [A-Za-z0-9_.-], not starting with . or -")]
    InvalidTag(String),
    /// The digest is malformed.
    #[error("invalid image reference {0:?}: the digest is malformed (expected sha256:<64 lowercase hex digits>)")]
    InvalidDigest(String),
    /// The digest algorithm is not one containerd has.
    #[error("invalid image reference {0:?}: unsupported digest algorithm (containerd knows sha256, sha384, sha512)")]
    UnsupportedDigest(String),
    /// The repository path is over 255 characters.
    #[error("invalid image reference {0:?}: the repository path is longer than 255 characters")]
    NameTooLong(String),
}

const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
const OFFICIAL_REPO_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const REPOSITORY_NAME_MAX: usize = 255;

/// Normalises an image reference the way containerd's importer and CRI's pull do
/// (`reference.ParseDockerRef`): `busybox` -> `docker.io/library/busybox:latest`,
/// `busybox:1` -> `docker.io/library/busybox:1`, `foo/bar:1` -> `docker.io/foo/bar:1`,
/// `localhost:5000/x:1` and `registry.example.com/team/web:2.3` unchanged,
/// `name:tag@sha256:…` -> `name@sha256:…`.
pub fn normalize_reference(reference: &str) -> Result<String, ReferenceError> {
    if reference.is_empty() {
        return Err(ReferenceError::Empty);
    }
    if is_identifier(reference) {
        return Err(ReferenceError::IdentifierOnly(reference.to_owned()));
    }
    let (domain, remainder) = split_docker_domain(reference);
    let repository = match remainder.find(':') {
        Some(i) => &remainder[..i],
        None => remainder.as_str(),
    };
    if repository.to_lowercase() != repository {
        return Err(ReferenceError::Uppercase {
            reference: reference.to_owned(),
            repository: repository.to_owned(),
        });
    }
    let full = format!("{domain}/{remainder}");
    let parsed = parse(&full).map_err(|kind| kind.into_error(reference))?;
    Ok(match (parsed.tag, parsed.digest) {
        (_, Some(digest)) => format!("{}@{}", parsed.name, digest),
        (Some(tag), None) => format!("{}:{}", parsed.name, tag),
        (None, None) => format!("{}:{}", parsed.name, DEFAULT_TAG),
    })
}

/// `splitDockerDomain`: the first path component is a registry when it is `localhost`,
/// contains `.` or `:`, or has an uppercase letter; otherwise the image is on Docker Hub.
fn split_docker_domain(name: &str) -> (String, String) {
    let (domain, mut remote) = match name.split_once('/') {
        None => {
            return (
                DEFAULT_DOMAIN.to_owned(),
                format!("{OFFICIAL_REPO_PREFIX}{name}"),
            )
        }
        Some((maybe_domain, rest)) => {
            if maybe_domain == "localhost" {
                (maybe_domain.to_owned(), rest.to_owned())
            } else if maybe_domain == LEGACY_DEFAULT_DOMAIN {
                (DEFAULT_DOMAIN.to_owned(), rest.to_owned())
            } else if maybe_domain.contains(['.', ':'])
                || maybe_domain.to_lowercase() != maybe_domain
            {
                (maybe_domain.to_owned(), rest.to_owned())
            } else {
                (DEFAULT_DOMAIN.to_owned(), name.to_owned())
            }
        }
    };
    if domain == DEFAULT_DOMAIN && !remote.contains('/') {
        remote = format!("{OFFICIAL_REPO_PREFIX}{remote}");
    }
    (domain, remote)
}

struct Parsed<'a> {
    name: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

enum ParseFailure {
    Format,
    Tag,
    Digest,
    UnsupportedDigest,
    TooLong,
    Uppercase,
}

impl ParseFailure {
    fn into_error(self, reference: &str) -> ReferenceError {
        let r = reference.to_owned();
        match self {
            ParseFailure::Format => ReferenceError::InvalidFormat(r),
            ParseFailure::Tag => ReferenceError::InvalidTag(r),
            ParseFailure::Digest => ReferenceError::InvalidDigest(r),
            ParseFailure::UnsupportedDigest => ReferenceError::UnsupportedDigest(r),
            ParseFailure::TooLong => ReferenceError::NameTooLong(r),
            ParseFailure::Uppercase => ReferenceError::Uppercase {
                repository: r.clone(),
                reference: r,
            },
        }
    }
}

/// `reference.Parse`: `name[:tag][@digest]`, anchored.
fn parse(s: &str) -> Result<Parsed<'_>, ParseFailure> {
    let parsed = match_reference(s);
    let Some(parsed) = parsed else {
        // Parse reports uppercase separately when the lowercased string would match.
        if match_reference(&s.to_lowercase()).is_some() {
            return Err(ParseFailure::Uppercase);
        }
        return Err(classify_failure(s));
    };
    let path = split_name(parsed.name).1;
    if path.len() > REPOSITORY_NAME_MAX {
        return Err(ParseFailure::TooLong);
    }
    if let Some(digest) = parsed.digest {
        validate_digest(digest)?;
    }
    Ok(parsed)
}

/// A best guess at which part failed, for the error message only.
fn classify_failure(s: &str) -> ParseFailure {
    let (before_digest, digest) = match s.split_once('@') {
        Some((b, d)) => (b, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        if !is_digest_pattern(d) {
            return ParseFailure::Digest;
        }
    }
    let last_slash = before_digest.rfind('/');
    if let Some(colon) = before_digest.rfind(':') {
        if last_slash.is_none_or(|slash| colon > slash) && !is_tag(&before_digest[colon + 1..]) {
            return ParseFailure::Tag;
        }
    }
    ParseFailure::Format
}

/// Matches `ReferenceRegexp` = `^(namePat)(?::(tag))?(?:@(digestPat))?$`.
///
/// No part of the grammar but the digest contains `@`, and a `:` after the last `/` can only
/// start the tag (a port needs a `/` after it), so the split is unambiguous.
fn match_reference(s: &str) -> Option<Parsed<'_>> {
    let (before_digest, digest) = match s.split_once('@') {
        Some((b, d)) => (b, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        if !is_digest_pattern(d) {
            return None;
        }
    }
    let last_slash = before_digest.rfind('/');
    let (name, tag) = match before_digest.rfind(':') {
        Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
            (&before_digest[..colon], Some(&before_digest[colon + 1..]))
        }
        _ => (before_digest, None),
    };
    if let Some(t) = tag {
        if !is_tag(t) {
            return None;
        }
    }
    if !is_name(name) {
        return None;
    }
    Some(Parsed { name, tag, digest })
}

/// `namePat` = `(?:domainAndPort/)?remoteName`.
fn is_name(name: &str) -> bool {
    if is_remote_name(name) {
        return true;
    }
    match name.split_once('/') {
        Some((domain, rest)) => is_domain_and_port(domain) && is_remote_name(rest),
        None => false,
    }
}

/// `anchoredNameRegexp` with leftmost-first preference: the first component is the domain
/// when it can be one.
fn split_name(name: &str) -> (&str, &str) {
    if let Some((domain, rest)) = name.split_once('/') {
        if is_domain_and_port(domain) && is_remote_name(rest) {
            return (domain, rest);
        }
    }
    ("", name)
}

fn is_remote_name(s: &str) -> bool {
    !s.is_empty() && s.split('/').all(is_path_component)
}

/// `pathComponent` = `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`.
fn is_path_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &s[sep_start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
}

/// `domainAndPort` = `(?:domainName|\[ipv6\])(?::[0-9]+)?`.
fn is_domain_and_port(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let inner = &rest[..end];
        if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return false;
        }
        (None, &rest[end + 1..])
    } else {
        match s.find(':') {
            Some(i) => (Some(&s[..i]), &s[i..]),
            None => (Some(s), ""),
        }
    };
    if let Some(host) = host {
        if !host.split('.').all(is_domain_component) {
            return false;
        }
    }
    match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// `domainNameComponent` = `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn is_domain_component(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// `tag` = `[\w][\w.-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// `digestPat` = `[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][[:xdigit:]]{32,}`.
fn is_digest_pattern(s: &str) -> bool {
    let Some((algorithm, hex)) = s.split_once(':') else {
        return false;
    };
    if hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    algorithm.split(['-', '_', '+', '.']).all(|part| {
        let b = part.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    })
}

/// go-digest `Digest.Validate` with the algorithms containerd links in.
fn validate_digest(d: &str) -> Result<(), ParseFailure> {
    let Some((algorithm, encoded)) = d.split_once(':') else {
        return Err(ParseFailure::Digest);
    };
    let len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(ParseFailure::UnsupportedDigest),
    };
    if encoded.len() != len
        || !encoded
            .bytes()
            .all(|b| matches!(b, b'a'..=b'f' | b'0'..=b'9'))
    {
        return Err(ParseFailure::Digest);
    }
    Ok(())
}

/// Whether `d` is a digest containerd accepts for an image target (go-digest `Validate`).
pub(crate) fn is_valid_digest(d: &str) -> bool {
    validate_digest(d).is_ok()
}

/// `anchoredIdentifierRegexp` = `^[a-f0-9]{64}$`.
fn is_identifier(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'a'..=b'f' | b'0'..=b'9'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Expectations follow distribution/reference `normalize_test.go` / `reference_test.go`
    /// and containerd's importer tests (`alpine:latest` -> `docker.io/library/alpine:latest`).
    #[test]
    fn normalisation_table() {
        let cases: Vec<(String, &str)> = vec![
            ("busybox".into(), "docker.io/library/busybox:latest"),
            ("busybox:1".into(), "docker.io/library/busybox:1"),
            ("busybox:1.36.1-musl".into(), "docker.io/library/busybox:1.36.1-musl"),
            ("foo/bar:1".into(), "docker.io/foo/bar:1"),
            ("foo/bar".into(), "docker.io/foo/bar:latest"),
            ("docker.io/busybox".into(), "docker.io/library/busybox:latest"),
            ("docker.io/library/busybox:1".into(), "docker.io/library/busybox:1"),
            ("index.docker.io/busybox:1".into(), "docker.io/library/busybox:1"),
            ("index.docker.io/foo/bar".into(), "docker.io/foo/bar:latest"),
            ("localhost/x".into(), "localhost/x:latest"),
            ("localhost:5000/x:1".into(), "localhost:5000/x:1"),
            ("registry.example.com/team/web:2.3".into(), "registry.example.com/team/web:2.3"),
            ("registry.example.com:443/a/b/c".into(), "registry.example.com:443/a/b/c:latest"),
            ("Registry.Example.com/x:1".into(), "Registry.Example.com/x:1"),
            ("[::1]:5000/x:1".into(), "[::1]:5000/x:1"),
            ("rancher/mirrored-pause:3.6".into(), "docker.io/rancher/mirrored-pause:3.6"),
            ("a__b/c-----d/e.f_g:T_a.g-1".into(), "docker.io/a__b/c-----d/e.f_g:T_a.g-1"),
            // `localhost:5000` with no path is Docker Hub's library/localhost, tag 5000
            ("localhost:5000".into(), "docker.io/library/localhost:5000"),
            (format!("busybox@{D}"), "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"),
            // tag and digest: the tag is dropped
            (format!("quay.io/x/y:1@{D}"), "quay.io/x/y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize_reference(&input).as_deref(),
                Ok(want),
                "input {input}"
            );
        }
    }

    type Check = fn(&ReferenceError) -> bool;

    #[test]
    fn rejections() {
        let long = format!("a/{}", "b".repeat(300));
        let cases: Vec<(String, Check)> = vec![
            ("".into(), |e| matches!(e, ReferenceError::Empty)),
            (
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
                |e| matches!(e, ReferenceError::IdentifierOnly(_)),
            ),
            ("Busybox".into(), |e| {
                matches!(e, ReferenceError::Uppercase { .. })
            }),
            ("docker.io/Foo/bar".into(), |e| {
                matches!(e, ReferenceError::Uppercase { .. })
            }),
            ("busybox:".into(), |e| {
                matches!(e, ReferenceError::InvalidTag(_))
            }),
            ("busybox:-x".into(), |e| {
                matches!(e, ReferenceError::InvalidTag(_))
            }),
            (format!("busybox:{}", "t".repeat(129)), |e| {
                matches!(e, ReferenceError::InvalidTag(_))
            }),
            ("busybox@sha256:abc".into(), |e| {
                matches!(e, ReferenceError::InvalidDigest(_))
            }),
            (format!("busybox@md5:{}", "a".repeat(32)), |e| {
                matches!(e, ReferenceError::UnsupportedDigest(_))
            }),
            (format!("busybox@sha256:{}", "A".repeat(64)), |e| {
                matches!(e, ReferenceError::InvalidDigest(_))
            }),
            ("foo..bar".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("foo___bar".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("-foo".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("foo/".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("foo//bar".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("-reg.io/x".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("reg.io:port/x".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("# a comment".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("busybox latest".into(), |e| {
                matches!(e, ReferenceError::InvalidFormat(_))
            }),
            ("a@b@c".into(), |e| {
                matches!(e, ReferenceError::InvalidDigest(_))
            }),
            (long, |e| matches!(e, ReferenceError::NameTooLong(_))),
        ];
        for (input, check) in cases {
            let got = normalize_reference(&input);
            match &got {
                Err(e) if check(e) => {}
                other => panic!("input {input:?}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn error_messages_name_the_reference() {
        let e = normalize_reference("Busybox").unwrap_err();
        assert!(e.to_string().contains("\"Busybox\""), "{e}");
    }
}
