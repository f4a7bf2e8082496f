//! The operator's decisions around `pinkeeper unpin`: which names share the image, what
//! `--all-names` unpins, which names keep the image pinned, and when K3s pins it again. Pure:
//! the daemon lists the images, asks [`Engine::unpin_plan`], then feeds one
//! [`Input::OperatorUnpin`](super::Input::OperatorUnpin) per target.

use super::{
    cri_pinned, Action, Digest, Engine, ImageRecord, Intent, IntentState, Now, Origin, Output,
    RestoreReason, CRI_PIN, OPERATOR_UNPIN,
};

/// What `pinkeeper unpin` does ([`Engine::unpin_plan`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpinPlan {
    /// The names to unpin, in order, each with its record as listed (`None`: it does not
    /// exist). The asked name (as its record spells it) first, then with `--all-names` the
    /// other names of the same image. Empty when the name has neither a record nor an intent:
    /// there is nothing to unpin.
    pub targets: Vec<(String, Option<ImageRecord>)>,
    /// Without `--all-names`: the other names of the same image that still carry the CRI pin.
    /// CRI pins an image while any of its names is pinned, so the image stays pinned.
    pub still_pinned_aliases: Vec<String>,
    /// What the operator should know, one sentence each: K3s pins a target again at its next
    /// start (it carries K3s's label and a file of the images directory provides it), and the
    /// image stays pinned through the names above.
    pub warnings: Vec<String>,
}

impl Engine {
    /// The digest of the image `name` names: its record's, else its intent's. The daemon needs
    /// a listing for [`Engine::unpin_plan`] only when there is one (no digest, no other name
    /// can be told to share the image).
    pub fn image_digest(&self, name: &str, record: Option<&ImageRecord>) -> Option<String> {
        record.and_then(|r| r.digest.clone()).or_else(|| {
            self.intents
                .get(name)
                .and_then(|i| i.digest.as_ref().map(ToString::to_string))
        })
    }

    /// Decides what `pinkeeper unpin NAME [--all-names]` does, before anything is done.
    /// `record` is `name`'s record as containerd has it now (`None`: it does not exist);
    /// `listing` is every record of the namespace (may be empty when
    /// [`Engine::image_digest`] is `None`). The names sharing the image are those listed with
    /// the same target digest.
    ///
    /// The daemon then feeds one [`Input::OperatorUnpin`](super::Input::OperatorUnpin) per
    /// target, in order, and answers with the plan's names, aliases and warnings.
    pub fn unpin_plan(
        &mut self,
        name: &str,
        record: Option<&ImageRecord>,
        listing: &[ImageRecord],
        all_names: bool,
    ) -> UnpinPlan {
        // The name as containerd spells it (the daemon may have found it by a shorter one).
        let name = record.map_or(name, |r| r.name.as_str());
        if record.is_none() && !self.intents.contains_key(name) {
            return UnpinPlan::default();
        }
        let digest = self.image_digest(name, record);
        let same_image: Vec<&ImageRecord> = match &digest {
            Some(digest) => listing
                .iter()
                .filter(|r| r.name != name && r.digest.as_ref() == Some(digest))
                .collect(),
            None => Vec::new(),
        };
        let mut targets = vec![(name.to_string(), record.cloned())];
        if all_names {
            targets.extend(
                same_image
                    .iter()
                    .map(|r| (r.name.clone(), Some((*r).clone()))),
            );
        }
        let mut warnings = Vec::new();
        for (target, record) in &targets {
            let Some(record) = record else { continue };
            if !self.pins(&record.labels).program {
                continue;
            }
            // The file that provides it once the unpin is done: a name the engine does not
            // hold is released with its record's digest.
            let held = self
                .intents
                .get(target.as_str())
                .is_some_and(|i| i.state != IntentState::Released);
            let digest = record.digest.as_deref().filter(|_| !held);
            if let Some(file) = self.source_with(target, digest) {
                warnings.push(format!(
                    "K3s pins {target} again at its next start: {} provides it; delete that \
                     file too if the image may be garbage-collected",
                    crate::escape::path(&file)
                ));
            }
        }
        let still_pinned_aliases: Vec<String> = if all_names {
            Vec::new()
        } else {
            same_image
                .iter()
                .filter(|r| cri_pinned(&r.labels))
                .map(|r| r.name.clone())
                .collect()
        };
        if !still_pinned_aliases.is_empty() {
            warnings.push(format!(
                "the image stays pinned: CRI pins an image while any of its names is, and {} \
                 still carry the pin; use --all-names to unpin every name",
                still_pinned_aliases.join(", ")
            ));
        }
        UnpinPlan {
            targets,
            still_pinned_aliases,
            warnings,
        }
    }
}

impl Engine {
    pub(super) fn on_operator_pin(&mut self, now: Now, record: ImageRecord, out: &mut Vec<Output>) {
        let name = record.name.clone();
        let pins = self.pins(&record.labels);
        let pinned = pins.cri;
        self.deleted.remove(name.as_str());
        self.unpins_to_confirm.remove(name.as_str());
        if self.holds(&name) {
            self.update_intent(&name, out, |i| {
                i.origin = Origin::Operator;
                i.pins = pins;
                if record.digest.is_some() {
                    i.digest = record.digest.as_deref().map(Digest::new);
                }
            });
            self.history(
                now,
                &name,
                Action::OperatorPin,
                RestoreReason::Operator.explain(),
                out,
            );
        } else {
            self.record(
                now,
                &name,
                record.labels,
                record.digest,
                Origin::Operator,
                out,
            );
        }
        if !pinned {
            self.awaiting_k3s.remove(name.as_str());
            self.pin(&name, RestoreReason::Operator, out);
        }
    }

    pub(super) fn on_operator_unpin(
        &mut self,
        now: Now,
        name: &str,
        record: Option<ImageRecord>,
        out: &mut Vec<Output>,
    ) {
        if self.kept_by(name).is_some() {
            // The daemon refuses it first (naming the pattern): the policy decides.
            return;
        }
        let pinned = record.as_ref().is_some_and(|r| self.pins(&r.labels).cri);
        // What the record carries once the unpin is done: its own event then changes nothing.
        let after = record.as_ref().map(|r| {
            let mut labels = r.labels.clone();
            labels.remove(CRI_PIN);
            labels
        });
        let after_pins = after.as_ref().map(|l| self.pins(l)).unwrap_or_default();
        self.unpins_to_confirm.remove(name);
        if self.holds(name) {
            self.release(now, name, OPERATOR_UNPIN, after, out);
        } else if let Some(record) = record {
            // Never held (or released before): keep the decision, so that only a pin put on
            // again brings the intent back.
            let source = self.source_of(name);
            let previous = self.intents.get(name);
            let intent = Intent {
                name: self.shared(name),
                digest: record
                    .digest
                    .as_deref()
                    .map(Digest::new)
                    .or_else(|| previous.and_then(|p| p.digest.clone())),
                source: source.or_else(|| previous.and_then(|p| p.source.clone())),
                pins: after_pins,
                legacy_labels: None,
                state: IntentState::Released,
                origin: previous.map_or(Origin::Operator, |p| p.origin),
                since: now.wall,
                restores: previous.map_or(0, |p| p.restores),
                last_restored: previous.and_then(|p| p.last_restored),
                released_because: Some(OPERATOR_UNPIN.to_string()),
                k3s_pinned: false,
            };
            let before = self.forget_key(name);
            self.retain(name, now);
            self.intents.insert(intent.name.clone(), intent.clone());
            self.reindex(name, before);
            self.provided_digests = None;
            out.push(Output::Save {
                intent: Box::new(intent),
                new: false,
            });
            self.history(now, name, Action::Released, OPERATOR_UNPIN, out);
        }
        // The release is on disk before the operator hears of it and before the pin goes: a
        // crash in between would otherwise read, at the next start, as K3s's sweep of a held
        // intent, and be undone.
        out.push(Output::Commit);
        if pinned {
            out.push(Output::Unpin {
                name: self.shared(name),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::super::{Config, Input, Intent, Labels, Origin, K3S_PIN, PINNED};
    use super::*;

    const APP: &str = "docker.io/library/app:1";
    const ALIAS: &str = "docker.io/library/app@sha256:aaaa";
    const OTHER_TAG: &str = "docker.io/library/app:stable";
    const WEB: &str = "docker.io/library/web:1";

    fn labels(pins: &[&str]) -> Labels {
        pins.iter()
            .map(|k| (k.to_string(), PINNED.to_string()))
            .collect()
    }

    fn record(name: &str, pins: &[&str], digest: &str) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            labels: labels(pins),
            digest: Some(digest.into()),
        }
    }

    /// APP (both pins, provided by app.tar), its K3s alias (both pins), another tag of the same
    /// image pinned with `ctr` (CRI pin only), and WEB (another image).
    fn listing() -> Vec<ImageRecord> {
        vec![
            record(APP, &[K3S_PIN, CRI_PIN], "sha256:aaaa"),
            record(ALIAS, &[K3S_PIN, CRI_PIN], "sha256:aaaa"),
            record(OTHER_TAG, &[CRI_PIN], "sha256:aaaa"),
            record(WEB, &[K3S_PIN, CRI_PIN], "sha256:bbbb"),
        ]
    }

    fn engine() -> Engine {
        let mut e = Engine::new(Config::default(), []);
        let provided = BTreeMap::from([(APP.to_string(), PathBuf::from("app\nx.tar"))]);
        e.handle(0, Input::Inventory(provided.into()));
        e.handle(
            0,
            Input::Listing {
                images: listing(),
                cause: super::super::ListCause::Connected,
            },
        );
        e
    }

    fn names(plan: &UnpinPlan) -> Vec<&str> {
        plan.targets.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn cri_pinned_reads_only_the_cri_label_with_its_value() {
        assert!(cri_pinned(&labels(&[CRI_PIN])));
        assert!(!cri_pinned(&labels(&[K3S_PIN])));
        let odd = Labels::from([(CRI_PIN.to_string(), "yes".to_string())]);
        assert!(!cri_pinned(&odd));
    }

    #[test]
    fn one_name_names_the_other_pinned_names_and_warns_of_k3s() {
        let mut e = engine();
        let list = listing();
        let plan = e.unpin_plan(APP, Some(&list[0]), &list, false);
        assert_eq!(names(&plan), [APP]);
        assert_eq!(plan.targets[0].1.as_ref(), Some(&list[0]));
        assert_eq!(plan.still_pinned_aliases, [ALIAS, OTHER_TAG]);
        assert_eq!(
            plan.warnings,
            [
                "K3s pins docker.io/library/app:1 again at its next start: app\\nx.tar provides \
                 it; delete that file too if the image may be garbage-collected",
                "the image stays pinned: CRI pins an image while any of its names is, and \
                 docker.io/library/app@sha256:aaaa, docker.io/library/app:stable still carry \
                 the pin; use --all-names to unpin every name",
            ]
        );
    }

    #[test]
    fn all_names_unpins_every_name_of_the_image_and_warns_for_each_k3s_pins_again() {
        let mut e = engine();
        let list = listing();
        let plan = e.unpin_plan(APP, Some(&list[0]), &list, true);
        assert_eq!(names(&plan), [APP, ALIAS, OTHER_TAG]);
        assert!(plan.still_pinned_aliases.is_empty());
        // The alias belongs to app.tar (by digest); the ctr tag carries no K3s label.
        assert_eq!(plan.warnings.len(), 2, "{:?}", plan.warnings);
        assert!(plan.warnings[1].starts_with(&format!("K3s pins {ALIAS} again")));
    }

    #[test]
    fn no_warning_when_no_file_provides_it_or_it_lacks_k3s_label() {
        let mut e = engine();
        let list = listing();
        let plan = e.unpin_plan(WEB, Some(&list[3]), &list, false);
        assert_eq!(names(&plan), [WEB]);
        assert!(plan.warnings.is_empty() && plan.still_pinned_aliases.is_empty());
        let plan = e.unpin_plan(OTHER_TAG, Some(&list[2]), &list, false);
        assert_eq!(plan.still_pinned_aliases, [APP, ALIAS]);
        assert_eq!(plan.warnings.len(), 1);
    }

    #[test]
    fn a_name_that_does_not_exist_but_has_an_intent_is_one_target_and_uses_its_digest() {
        let mut e = Engine::new(
            Config::default(),
            [Intent {
                name: "gone:1".into(),
                digest: Some("sha256:aaaa".into()),
                source: None,
                pins: crate::engine::Pins {
                    program: false,
                    cri: true,
                },
                legacy_labels: None,
                state: IntentState::Held,
                origin: Origin::Operator,
                since: 0,
                restores: 0,
                last_restored: None,
                released_because: None,
                k3s_pinned: false,
            }],
        );
        assert_eq!(
            e.image_digest("gone:1", None).as_deref(),
            Some("sha256:aaaa")
        );
        let list = listing();
        let plan = e.unpin_plan("gone:1", None, &list, false);
        assert_eq!(plan.targets, [("gone:1".to_string(), None)]);
        assert_eq!(plan.still_pinned_aliases, [APP, ALIAS, OTHER_TAG]);
    }

    #[test]
    fn nothing_to_unpin_without_record_or_intent() {
        let mut e = engine();
        assert_eq!(e.image_digest("nobody:1", None), None);
        assert_eq!(
            e.unpin_plan("nobody:1", None, &listing(), true),
            UnpinPlan::default()
        );
    }

    #[test]
    fn a_name_never_held_warns_by_its_records_digest() {
        // The alias was never seen pinned, so the engine holds no digest for it: its record's
        // digest ties it to app.tar.
        let mut e = Engine::new(Config::default(), []);
        let provided = BTreeMap::from([(APP.to_string(), PathBuf::from("app.tar"))]);
        e.handle(0, Input::Inventory(provided.into()));
        let app = record(APP, &[K3S_PIN, CRI_PIN], "sha256:aaaa");
        e.handle(0, Input::OperatorPin { record: app });
        let alias = record(ALIAS, &[K3S_PIN], "sha256:aaaa");
        let plan = e.unpin_plan(ALIAS, Some(&alias), std::slice::from_ref(&alias), false);
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
    }
}
