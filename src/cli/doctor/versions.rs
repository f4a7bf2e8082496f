//! containerd's version and the pin's version gates (FACTS.md section 4).

use super::*;

// ---------------------------------------------------------------------------------------------
// containerd versions and the pin's version gates (FACTS.md section 4)

/// A containerd release number, as far as the pin's gates need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContainerdVersion {
    /// Major.
    pub major: u64,
    /// Minor (0 if absent).
    pub minor: u64,
    /// Patch (0 if absent).
    pub patch: u64,
    /// An alpha, beta, rc or dev build *before* that release.
    pub prerelease: bool,
}

impl ContainerdVersion {
    /// Whether this is `major.minor.patch` or later (a prerelease of it is earlier).
    pub(crate) fn at_least(&self, major: u64, minor: u64, patch: u64) -> bool {
        (self.major, self.minor, self.patch, !self.prerelease) >= (major, minor, patch, true)
    }
}

/// Parses what containerd's Version call (or `containerd --version`) reports: `v1.7.24`,
/// `1.6.20~ds1` (Debian), `2.1.9+unknown`, `v2.0.0-rc.1`, `v1.7.23-k3s2` (K3s's build).
/// A whole line such as `containerd github.com/containerd/containerd v1.7.24 abc` works too: its
/// first token that reads as a version is taken. `None` if nothing does.
pub(crate) fn parse_version(text: &str) -> Option<ContainerdVersion> {
    let text = text.trim();
    parse_one(text).or_else(|| text.split_whitespace().find_map(parse_one))
}

pub(super) fn parse_one(token: &str) -> Option<ContainerdVersion> {
    let s = token.strip_prefix(['v', 'V']).unwrap_or(token);
    let core_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (core, rest) = s.split_at(core_end);
    // Only a separator may follow the numbers: `~` (Debian), `+` (build metadata), `-` (a
    // prerelease or a distribution's own build) or a space.
    if !(rest.is_empty() || rest.starts_with(['~', '+', '-', ' '])) {
        return None;
    }
    let mut numbers = core.split('.').map(|p| p.parse::<u64>().ok());
    let major = numbers.next()??;
    let minor = numbers.next().unwrap_or(Some(0))?;
    let patch = numbers.next().unwrap_or(Some(0))?;
    // A fourth number is not containerd's scheme; refuse rather than guess.
    if numbers.next().is_some() {
        return None;
    }
    // Semver makes anything after `-` a prerelease, but builds of a release carry suffixes
    // too: K3s's `-k3s2`, `git describe`'s `-15-gabc123` (commits *after* the tag), Ubuntu's
    // `-0ubuntu1`. Only the markers containerd's own prereleases use count as one.
    let prerelease = rest.strip_prefix('-').is_some_and(|suffix| {
        let suffix = suffix.to_ascii_lowercase();
        ["alpha", "beta", "rc", "pre", "dev"]
            .iter()
            .any(|marker| suffix.starts_with(marker))
    });
    Some(ContainerdVersion {
        major,
        minor,
        patch,
        prerelease,
    })
}

/// How much of the pin a containerd honours (FACTS.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinSupport {
    /// Below 1.6.22 / 1.7.3: CRI ignores `io.cri-containerd.pinned` altogether.
    Ignored,
    /// 1.6.22 to 1.6.24, 1.7.3 to 1.7.9: CRI reads the label when it loads an image, but a
    /// label-only change does not reach its cache until containerd restarts.
    AfterRestart,
    /// 1.6.25+, 1.7.10+, 2.x: a label change is seen at once.
    Full,
}

/// The gate a version falls under.
pub(crate) fn pin_support(v: &ContainerdVersion) -> PinSupport {
    let gate = |honoured: (u64, u64, u64), live: (u64, u64, u64)| {
        if v.at_least(live.0, live.1, live.2) {
            PinSupport::Full
        } else if v.at_least(honoured.0, honoured.1, honoured.2) {
            PinSupport::AfterRestart
        } else {
            PinSupport::Ignored
        }
    };
    match (v.major, v.minor) {
        // Every 2.x (its prereleases too) came after both fixes.
        (major, _) if major >= 2 => PinSupport::Full,
        (1, 6) => gate((1, 6, 22), (1, 6, 25)),
        (1, 7) => gate((1, 7, 3), (1, 7, 10)),
        // There was no 1.8: containerd went from 1.7 to 2.0. Anything later has both fixes.
        (1, minor) if minor > 7 => PinSupport::Full,
        _ => PinSupport::Ignored,
    }
}

/// The kubelet half of the gate, which the doctor cannot check from here.
pub(super) const KUBELET_NOTE: &str =
    "kubelet skips pinned images in its GC from Kubernetes 1.29 (or with a \
     backport of kubernetes PR #119986); pinkeeper cannot check kubelet's version, see `kubectl \
     get nodes -o wide`";

/// The status, detail and fix for containerd `version` (as reported) at `socket`.
pub(super) fn version_verdict(version: &str, source: &str) -> (Status, String, String) {
    let Some(parsed) = parse_version(version) else {
        return (
            Status::Warn,
            format!(
                "{source} reports version {version:?}, which pinkeeper cannot read: it cannot \
                 tell whether CRI honours io.cri-containerd.pinned (from 1.6.22 / 1.7.3) and \
                 sees a label-only change at once (from 1.6.25 / 1.7.10). {KUBELET_NOTE}."
            ),
            "check `containerd --version` (K3s: `k3s ctr version`): 1.6.25+, 1.7.10+ or 2.x is \
             needed for a restored pin to protect the image at once"
                .into(),
        );
    };
    match pin_support(&parsed) {
        PinSupport::Full => (
            Status::Ok,
            format!(
                "{source}: version {version}, which honours io.cri-containerd.pinned and sees a \
                 label-only change at once (1.6.25+ / 1.7.10+ / 2.x). {KUBELET_NOTE}."
            ),
            String::new(),
        ),
        PinSupport::AfterRestart => (
            Status::Warn,
            format!(
                "{source}: version {version}, below 1.6.25 / 1.7.10: CRI honours \
                 io.cri-containerd.pinned, but a label-only change does not reach CRI's image \
                 cache, so a pin pinkeeper restores only takes effect after containerd restarts \
                 (with the next K3s restart); until then kubelet's image GC may still delete \
                 that image. {KUBELET_NOTE}."
            ),
            "upgrade containerd to 1.6.25+, 1.7.10+ or 2.x (with K3s: upgrade K3s, its \
             containerd is built in); until then, after pinkeeper restored pins, restart K3s \
             (`systemctl restart k3s` or `k3s-agent`) so that CRI loads them"
                .into(),
        ),
        PinSupport::Ignored => (
            Status::Fail,
            format!(
                "{source}: version {version}, below 1.6.22 / 1.7.3: CRI does not honour \
                 io.cri-containerd.pinned at all, so kubelet's image GC may delete any image, \
                 pinned or not, and a pin pinkeeper restores protects nothing. {KUBELET_NOTE}."
            ),
            "upgrade containerd to 1.6.25+, 1.7.10+ or 2.x (with K3s: upgrade K3s, its \
             containerd is built in)"
                .into(),
        ),
    }
}
