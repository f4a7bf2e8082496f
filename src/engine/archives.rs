//! The images directory: which file provides which intent (by name, or by digest for K3s's
//! aliases), and what a new inventory changes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::{Action, Digest, Engine, IntentState, Name, Now, Output, Provided};

impl Engine {
    /// Whether a file of the images directory provides `name`. True while no inventory is
    /// known yet: no archive is called gone before the directory was read.
    pub(super) fn is_provided(&mut self, name: &str) -> bool {
        self.provided.is_none() || self.source_of(name).is_some()
    }

    /// The file that provides `name`: by name, or (for K3s's aliases) by sharing its digest
    /// with a provided name.
    pub(super) fn source_of(&mut self, name: &str) -> Option<PathBuf> {
        self.source_with(name, None)
    }

    /// [`Engine::source_of`], for an image whose digest is `digest` when given (else the
    /// intent's).
    pub(super) fn source_with(&mut self, name: &str, digest: Option<&str>) -> Option<PathBuf> {
        let provided = self.provided.as_ref()?;
        if let Some(path) = provided.get(name) {
            return Some(path.into_owned());
        }
        let digest = match digest {
            Some(d) => Digest::new(d),
            None => self.intents.get(name)?.digest.clone()?,
        };
        // Only K3s's own digest alias (`<repo>@<digest>`, FACTS.md section 2, import item 4)
        // belongs to the archive and is re-pinned by K3s with it. Any other name that only
        // shares the digest (another tag, an operator's `ctr tag`) is pinned by nobody after
        // the sweep: it is restored at once, not after the start-up settles.
        if name.rsplit_once('@').is_none_or(|(_, d)| !digest.is(d)) {
            return None;
        }
        let intents = &self.intents;
        let by_digest = self.provided_digests.get_or_insert_with(|| {
            provided
                .iter()
                .filter_map(|(n, path)| {
                    let d = intents.get(n)?.digest.clone()?;
                    Some((d, path.into_owned()))
                })
                .collect()
        });
        by_digest.get(&digest).cloned()
    }

    pub(super) fn on_inventory(&mut self, now: Now, provided: Provided, out: &mut Vec<Output>) {
        // Held intents a file provided until now (none before the first inventory).
        let was_provided: BTreeSet<Name> = if self.provided.is_some() {
            let held: Vec<Name> = self
                .intents
                .values()
                .filter(|i| i.state == IntentState::Held)
                .map(|i| i.name.clone())
                .collect();
            held.into_iter()
                .filter(|name| self.source_of(name).is_some())
                .collect()
        } else {
            BTreeSet::new()
        };
        self.provided = Some(provided);
        self.provided_digests = None;
        // Images swept in this episode and left to K3s because their archive was there (or
        // not read yet): those whose archive this inventory shows gone are restored now, not
        // at the verification. (Intents swept before a restart of pinkeeper wait for the
        // listing, which shows whether their record is still there.)
        let left_to_k3s: Vec<Name> = match &self.episode {
            Some(ep) => self
                .awaiting_k3s
                .iter()
                .filter(|n| ep.is_open(n))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        for name in left_to_k3s {
            if self.source_of(&name).is_none() {
                self.settle(&name, now, out);
            }
        }
        let names: Vec<Name> = self.intents.keys().cloned().collect();
        for name in names {
            if let Some(source) = self.source_of(&name) {
                self.update_intent(&name, out, |i| i.source = Some(source));
            } else if was_provided.contains(&name) {
                // Deleted while K3s runs: K3s unpins nothing now, its next start's sweep
                // will (FACTS.md section 2, item 7). The pin stays; `source` keeps the file.
                let file = self.intents[name.as_str()].source.as_ref().map_or_else(
                    || "its archive".to_string(),
                    |f| crate::escape::path(f).to_string(),
                );
                let detail = format!(
                    "archive of {name} is gone ({file}); its pin stays, and is restored when K3s's start-up sweep removes it"
                );
                self.history(now, &name, Action::ArchiveGone, detail, out);
            }
        }
    }
}
