//! Images kept by policy (contract rule 9): the config's `keep` patterns, globs over the image
//! name as containerd stores it (`docker.io/library/nginx:1.27`, `repo@sha256:...`).
//!
//! `*` matches any run of characters, `/` and `:` included; `?` matches one character; every
//! other character matches itself (the `wildmatch` crate). A pattern is checked once, when the
//! config is read ([`check_pattern`]), so the engine only ever holds valid ones.

use std::fmt;
use std::sync::Arc;

use wildmatch::WildMatch;

use std::collections::BTreeSet;

use super::{Engine, IntentState, Labels, Name, Now, Origin, Output, CRI_PIN};

/// The longest pattern accepted: containerd's own limit on a name is 255 bytes per component,
/// and a pattern longer than any name could match nothing useful.
pub(super) const MAX_PATTERN: usize = 4096;

/// The `keep` patterns, in the config's order: the first that matches a name is the one
/// `pinkeeper list` names.
#[derive(Clone, Default)]
pub struct Keep {
    patterns: Arc<[(String, WildMatch)]>,
}

impl Keep {
    /// The patterns given, each already checked with [`check_pattern`] (one that is not is
    /// skipped: the config refuses it first). Duplicates are kept once.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Keep {
        let mut kept: Vec<(String, WildMatch)> = Vec::new();
        for p in patterns.iter().map(AsRef::as_ref) {
            if check_pattern(p).is_ok() && !kept.iter().any(|(q, _)| q == p) {
                kept.push((p.to_string(), WildMatch::new(p)));
            }
        }
        Keep {
            patterns: kept.into(),
        }
    }

    /// The first pattern that matches `name`, if any.
    pub fn matching(&self, name: &str) -> Option<&str> {
        self.patterns
            .iter()
            .find(|(_, m)| m.matches(name))
            .map(|(p, _)| p.as_str())
    }

    /// The patterns, in order.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(|(p, _)| p.as_str())
    }

    /// No pattern at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

impl fmt::Debug for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.patterns()).finish()
    }
}

impl PartialEq for Keep {
    fn eq(&self, other: &Keep) -> bool {
        self.patterns().eq(other.patterns())
    }
}

/// Why an intent only a removed pattern held is released.
pub(super) const PATTERN_REMOVED: &str = "no keep pattern of the config matches it any more";

impl Engine {
    /// The config was read again: `keep` holds from now on. What changed is applied by a
    /// verification's listing, which reads every record ([`Engine::observe_policy`]): images
    /// a new pattern matches are pinned, and intents only a removed pattern held are released.
    ///
    /// Only a reload releases: a start with fewer patterns keeps what the ledger says the
    /// policy held (the ledger may be older than the record: an operator's `pinkeeper pin`
    /// whose commit a full disk lost looks the same), and shows it as kept by a pattern since
    /// removed, for the operator to unpin.
    pub(super) fn on_keep(&mut self, now: Now, keep: Keep) {
        if keep == self.config.keep {
            return;
        }
        self.config.keep = keep;
        let unkept: BTreeSet<Name> = self
            .intents
            .values()
            .filter(|i| i.state != IntentState::Released && i.origin == Origin::Policy)
            .filter(|i| self.config.keep.matching(&i.name).is_none())
            .map(|i| i.name.clone())
            .collect();
        self.unkept = unkept;
        self.schedule_verify(now.mono);
    }

    /// An intent the policy held that a reload's patterns no longer match
    /// ([`Engine::on_keep`]), now seen with `labels`: released (on disk first) and its CRI
    /// pin removed, unless K3s's label is on it now, which then holds it as seen pinned (K3s
    /// pinning it while the policy held it made it so already). Returns
    /// true when it was released.
    pub(super) fn observe_policy(
        &mut self,
        now: Now,
        name: &str,
        labels: &Labels,
        out: &mut Vec<Output>,
    ) -> bool {
        if !self.unkept.remove(name) {
            return false;
        }
        let Some(intent) = self.intents.get(name) else {
            return false;
        };
        if intent.origin != Origin::Policy
            || intent.state == IntentState::Released
            || self.kept_by(name).is_some()
        {
            return false;
        }
        let new = self.pins(labels);
        if new.program {
            self.update_intent(name, out, |i| i.origin = Origin::SeenPinned);
            return false;
        }
        // A pin still in flight lands on the record: it is removed too.
        let in_flight = self.pins_in_flight.remove(name).is_some();
        let mut after = labels.clone();
        after.remove(CRI_PIN);
        self.release(now, name, PATTERN_REMOVED, Some(after), out);
        // `release` committed it: the unpin goes after (as an operator's does).
        if new.cri || in_flight {
            out.push(Output::Unpin {
                name: self.shared(name),
            });
        }
        true
    }
}

/// Whether `pattern` can be a `keep` pattern; if not, what is wrong with it, in words for the
/// operator. It must be a full name as containerd stores it: a registry host first (K3s and
/// CRI normalise `nginx:1.27` to `docker.io/library/nginx:1.27`), no spaces or control
/// characters, and not longer than [`MAX_PATTERN`].
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("an empty pattern matches no image; remove it".into());
    }
    if pattern.len() > MAX_PATTERN {
        return Err(format!("longer than {MAX_PATTERN} bytes"));
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "contains {c:?}; image names have no spaces or control characters"
        ));
    }
    // `*...` may match any registry; otherwise the name starts with one.
    let first = pattern.split('/').next().unwrap_or_default();
    let host_like = first.contains(['.', ':', '*', '?']) || first == "localhost";
    let any_registry = pattern.starts_with(['*', '?']);
    if !any_registry && (!pattern.contains('/') || !host_like) {
        return Err(format!(
            "is not a full image name: containerd stores names with their registry, so write \
             it as docker.io/library/{} (or start it with '*')",
            pattern.trim_start_matches("library/")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names_with_star_and_question_mark() {
        let keep = Keep::new(&[
            "registry.local/critical/*",
            "docker.io/library/nginx:1.2?",
            "*@sha256:*",
        ]);
        let kept = |n| keep.matching(n);
        assert_eq!(
            kept("registry.local/critical/app:1"),
            Some("registry.local/critical/*")
        );
        // `*` crosses '/' and ':'.
        assert_eq!(
            kept("registry.local/critical/team/app@sha256:00"),
            Some("registry.local/critical/*")
        );
        assert_eq!(
            kept("docker.io/library/nginx:1.27"),
            Some("docker.io/library/nginx:1.2?")
        );
        assert_eq!(kept("docker.io/library/nginx:1.2"), None);
        assert_eq!(kept("docker.io/library/nginx:1.270"), None);
        assert_eq!(
            kept("docker.io/library/redis@sha256:ab"),
            Some("*@sha256:*")
        );
        // Whole names only: no prefix or suffix match.
        assert_eq!(kept("x.registry.local/critical/app:1"), None);
        assert_eq!(kept("registry.local/critical"), None);
        // Odd bytes are just characters.
        assert_eq!(
            kept("registry.local/critical/\u{1}\u{fffd}"),
            Some("registry.local/critical/*")
        );
    }

    #[test]
    fn the_first_pattern_in_the_config_is_the_one_named() {
        let keep = Keep::new(&["docker.io/*", "docker.io/library/*", "docker.io/*"]);
        assert_eq!(keep.matching("docker.io/library/a:1"), Some("docker.io/*"));
        assert_eq!(keep.patterns().count(), 2);
        assert!(Keep::new::<&str>(&[]).is_empty());
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        let err = check_pattern("nginx:1.27").unwrap_err();
        assert!(err.contains("docker.io/library/nginx:1.27"), "{err}");
        let err = check_pattern("library/nginx:1.27").unwrap_err();
        assert!(err.contains("docker.io/library/nginx:1.27"), "{err}");
        assert!(check_pattern("").is_err());
        assert!(check_pattern("docker.io/a b").is_err());
        assert!(check_pattern("docker.io/a\nb").is_err());
        assert!(check_pattern(&"a".repeat(MAX_PATTERN + 1)).is_err());
        for good in [
            "docker.io/library/nginx:1.27",
            "localhost/app:1",
            "localhost:5000/app:*",
            "*/critical/*",
            "registry.local/*",
            "*@sha256:*",
            "*nginx*",
        ] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        // A bad pattern never reaches the engine.
        assert!(Keep::new(&["nginx"]).is_empty());
    }
}
