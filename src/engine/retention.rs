//! Forgetting released intents once their retention is over ([`Config::retention`]), on the
//! monotonic clock.
//!
//! [`Config::retention`]: super::Config::retention

use super::{Engine, Intent, IntentState, Millis, Name, Now, Output};

impl Engine {
    /// Starts the retention of the released intents read from the ledger, at the first input:
    /// what is left of it is the retention less the wall-clock time since their release,
    /// clamped to `0..=retention`. A clock stepped since then moves only this (those past it
    /// are forgotten at once, a `since` in the future counts as just now); from here on,
    /// retention runs on the monotonic clock.
    pub(super) fn anchor(&mut self, now: Now) {
        self.anchor_pending = false;
        let retention = self.config.retention;
        let released: Vec<(Name, Millis)> = self
            .intents
            .values()
            .filter(|i| i.state == IntentState::Released)
            .map(|i| {
                let elapsed = now.wall.saturating_sub(i.since).min(retention);
                (i.name.clone(), now.mono.saturating_add(retention - elapsed))
            })
            .collect();
        for (name, until) in released {
            let before = self.forget_key(&name);
            self.retained_until.insert(name.clone(), until);
            self.reindex(&name, before);
        }
    }

    /// Starts the retention of `name`, released at `now`. Called before its intent is changed,
    /// so that [`Engine::reindex`] sees the new time.
    pub(super) fn retain(&mut self, name: &str, now: Now) {
        let until = now.mono.saturating_add(self.config.retention);
        let name = self.shared(name);
        self.retained_until.insert(name, until);
    }

    /// When a released intent is forgotten (monotonic): the retention after its release, and
    /// only while the labels it was last seen with carry no pin. Forgetting then changes no
    /// decision: a record seen again without a pin is ignored either way, and one seen with a
    /// pin is recorded either way (contract rule 1). One left with K3s's label (an operator
    /// removed only the CRI pin) is kept until its record is gone, or it would be recorded
    /// and released again at every listing.
    pub(super) fn forget_at(&self, intent: &Intent) -> Option<Millis> {
        if intent.state != IntentState::Released || intent.pins.any() {
            return None;
        }
        self.retained_until.get(intent.name.as_str()).copied()
    }

    /// Keeps [`Engine::forget`] in step after the intent `name` changed from `before`.
    pub(super) fn reindex(&mut self, name: &str, before: Option<Millis>) {
        let after = self.intents.get(name).and_then(|i| self.forget_at(i));
        if before != after {
            let name = self.shared(name);
            if let Some(at) = before {
                self.forget.remove(&(at, name.clone()));
            }
            if let Some(at) = after {
                self.forget.insert((at, name));
            }
        }
    }

    /// The forget time of the intent `name` as it stands, for [`Engine::reindex`].
    pub(super) fn forget_key(&self, name: &str) -> Option<Millis> {
        self.intents.get(name).and_then(|i| self.forget_at(i))
    }

    /// The record of a released intent is gone: what it showed is no longer there (so that
    /// the intent can be forgotten in time, [`Engine::forget_at`]).
    pub(super) fn record_gone(&mut self, name: &str, out: &mut Vec<Output>) {
        if self
            .intents
            .get(name)
            .is_some_and(|i| i.state == IntentState::Released && i.pins.any())
        {
            self.update_intent(name, out, |i| i.pins = super::Pins::default());
        }
    }

    /// Drops the released intents whose retention is over.
    pub(super) fn forget_due(&mut self, now: Millis, out: &mut Vec<Output>) {
        while let Some((at, name)) = self.forget.first().cloned() {
            if at > now {
                break;
            }
            self.forget.pop_first();
            let Some(gone) = self.intents.remove(&name) else {
                continue;
            };
            if let Some(aliases) = gone.digest.and_then(|d| self.untied_aliases.get_mut(&d)) {
                aliases.remove(&name);
            }
            self.retained_until.remove(&name);
            // A released intent is in none of these; a late answer about it finds nothing.
            self.deleted.remove(&name);
            self.awaiting_k3s.remove(&name);
            self.unpins_to_confirm.remove(&name);
            self.labels_to_confirm.remove(&name);
            self.provided_digests = None;
            out.push(Output::Forget { name });
        }
    }
}
