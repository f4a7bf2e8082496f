//! What kubelet sees (contract rule 10): a pin counts when CRI reports the image pinned. The
//! daemon reads CRI's `ListImages` (`src/containerd/cri.rs`); here it is compared with the
//! intents.

use std::collections::HashMap;

use super::{Engine, IntentState, Name};

/// CRI's view of the intents held ([`Engine::cri_view`]), each list in name order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CriView {
    /// Held intents whose image CRI reports unpinned: kubelet's image GC may delete it.
    pub unpinned: Vec<Name>,
    /// Held intents whose record exists (as last seen) and that CRI does not list under that
    /// name (CRI has not caught up with a new record yet, or does not manage it).
    pub unlisted: Vec<Name>,
    /// Held intents CRI reports pinned.
    pub pinned: Vec<Name>,
}

impl CriView {
    /// What it says of `name`: `pinned`, `unpinned`, `unlisted`, or `None` (not held then).
    pub fn of(&self, name: &str) -> Option<&'static str> {
        let has = |v: &[Name]| v.binary_search_by(|n| (**n).cmp(name)).is_ok();
        if has(&self.unpinned) {
            Some("unpinned")
        } else if has(&self.unlisted) {
            Some("unlisted")
        } else if has(&self.pinned) {
            Some("pinned")
        } else {
            None
        }
    }
}

impl Engine {
    /// Compares CRI's images with the intents held (swept ones included): `images` gives, for
    /// every name of every image CRI lists (its tags and its digest names), whether CRI
    /// reports that image pinned. CRI pins an image, not a name (any name of it carrying the
    /// label pins them all, FACTS.md section 4), and reports it once with all its names.
    /// Released intents and records known to be gone are left out.
    pub fn cri_view<'a>(&self, images: impl IntoIterator<Item = (&'a str, bool)>) -> CriView {
        let mut by_name: HashMap<&str, bool> = HashMap::new();
        for (name, pinned) in images {
            *by_name.entry(name).or_default() |= pinned;
        }
        let mut view = CriView::default();
        for intent in self.intents.values() {
            if intent.state == IntentState::Released || !self.exists(&intent.name, intent) {
                continue;
            }
            match by_name.get(&*intent.name) {
                Some(true) => view.pinned.push(intent.name.clone()),
                Some(false) => view.unpinned.push(intent.name.clone()),
                None => view.unlisted.push(intent.name.clone()),
            }
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Input, Labels, ListCause, CRI_PIN, K3S_PIN, PINNED};
    use super::*;
    use crate::engine::ImageRecord;

    fn record(name: &str, pins: &[&str]) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            labels: pins
                .iter()
                .map(|k| (k.to_string(), PINNED.to_string()))
                .collect::<Labels>(),
            digest: Some("sha256:aaaa".into()),
        }
    }

    #[test]
    fn cri_pins_images_not_names_and_unlisted_names_are_told_apart() {
        let mut e = Engine::new(Config::default(), []);
        e.handle(
            0,
            Input::Listing {
                images: vec![
                    record("docker.io/library/app:1", &[K3S_PIN, CRI_PIN]),
                    record("docker.io/library/app@sha256:aaaa", &[K3S_PIN, CRI_PIN]),
                    record("docker.io/library/web:1", &[CRI_PIN]),
                    record("docker.io/library/new:1", &[CRI_PIN]),
                    record("docker.io/library/nobody:1", &[]),
                ],
                cause: ListCause::Connected,
            },
        );
        // CRI lists app under both names, pinned (it reports an image, with every name of
        // it); web unpinned (CRI has not seen the label, containerd 1.6.22-1.6.24); new not
        // yet; nobody has no intent. A name listed twice is pinned if either says so.
        let cri = [
            ("docker.io/library/app:1", true),
            ("docker.io/library/app@sha256:aaaa", false),
            ("docker.io/library/app@sha256:aaaa", true),
            ("docker.io/library/web:1", false),
            ("docker.io/library/nobody:1", false),
        ];
        let view = e.cri_view(cri);
        assert_eq!(view.pinned.len(), 2);
        assert_eq!(view.of("docker.io/library/app:1"), Some("pinned"));
        assert_eq!(view.of("docker.io/library/web:1"), Some("unpinned"));
        assert_eq!(view.of("docker.io/library/new:1"), Some("unlisted"));
        assert_eq!(view.of("docker.io/library/nobody:1"), None);
        assert_eq!(view.unpinned, [Name::from("docker.io/library/web:1")]);
        assert_eq!(view.unlisted, [Name::from("docker.io/library/new:1")]);
        assert_eq!(e.cri_view([]).unlisted.len(), 4);
    }
}
