//! How the engine reads what containerd says about a name: an event, a listing's record, or
//! a Get's answer. Each change of labels is read here as a pin, an unpin, K3s's sweep, a
//! deletion, or a late or duplicate delivery to be confirmed first (FACTS.md section 3).
//!
//! It decides only; the bookkeeping it calls (`record`, `release`, `update_intent`, `settle`)
//! lives in `mod.rs`.

use super::*;

impl Engine {
    pub(super) fn on_event(&mut self, now: Now, event: ImageEvent, out: &mut Vec<Output>) {
        // The start-up burst goes on while pins change: K3s sweeping, importing (a record
        // it creates or re-pins carries both pins) and re-creating its aliases (a held name
        // deleted and created again). CRI's own bookkeeping (it labels every image it
        // manages, pinned or not) changes no pin, and must not put the verification off, by
        // up to `settle_max`.
        let pins = self.pins(&event.labels);
        let changes_pins = match event.kind {
            EventKind::Delete => self.holds(&event.name),
            EventKind::Create if self.deleted.contains_key(event.name.as_str()) => true,
            _ => self
                .intents
                .get(event.name.as_str())
                .map_or(pins.any(), |i| i.pins != pins),
        };
        if changes_pins {
            self.note_activity(now.mono);
        }
        match event.kind {
            EventKind::Delete => {
                if self.holds(&event.name) {
                    // Released at `churn_window` unless K3s creates it again (forceCreateTag).
                    let name = self.shared(&event.name);
                    self.deleted
                        .entry(name)
                        .or_insert(Some(now.mono + self.config.churn_window));
                    // A delete may be delivered after the create that followed it (FACTS.md
                    // section 3): a Get tells.
                    out.push(Output::Fetch {
                        name: self.shared(&event.name),
                    });
                } else {
                    self.record_gone(&event.name, out);
                }
            }
            EventKind::Create => {
                let recreated = self.deleted.remove(event.name.as_str()).is_some();
                let kept = self.kept_by(&event.name).is_some();
                if recreated && !self.pins(&event.labels).any() && !kept {
                    // K3s re-creates its aliases with both pins; this is someone else's record
                    // (a kept one is pinned by the policy, whoever made it).
                    self.release(
                        now,
                        &event.name,
                        "its record was deleted and created again without a pin",
                        Some(event.labels),
                        out,
                    );
                    return;
                }
                let new_target = self.observe(now, &event.name, event.labels, None, out);
                if new_target {
                    // A (re)created record may have a new target: events carry no digest.
                    out.push(Output::Fetch {
                        name: self.shared(&event.name),
                    });
                }
            }
            EventKind::Update => {
                self.observe(now, &event.name, event.labels, None, out);
            }
        }
    }

    /// True while an intent holds for `name` (not released).
    pub(super) fn holds(&self, name: &str) -> bool {
        self.intents
            .get(name)
            .is_some_and(|i| i.state != IntentState::Released)
    }

    /// Applies the labels now seen on `name`: from an event (`listed` is `None`) or from a
    /// listing (`Some(digest)`, the record's target digest if any). Returns true when the name
    /// holds an intent afterwards.
    pub(super) fn observe(
        &mut self,
        now: Now,
        name: &str,
        labels: Labels,
        listed: Option<Option<String>>,
        out: &mut Vec<Output>,
    ) -> bool {
        let live = listed.is_none();
        if let Some(Some(digest)) = &listed {
            self.learn_digest(name, digest, out);
        }
        let new = self.pins(&labels);
        if !self.holds(name) {
            if !new.cri && self.kept_by(name).is_some() {
                // Kept by policy: pinned whenever it appears, a release undone (contract
                // rule 9). A late delivery pins a record that has the pin already, or is gone:
                // both harmless.
                self.record(now, name, labels, listed.flatten(), Origin::Policy, out);
                self.pin(name, RestoreReason::Policy, out);
                return true;
            }
            // A released intent comes back only when the CRI pin is put on again (K3s
            // re-importing the archive, someone pinning it): K3s's label alone, as an operator
            // leaves it when removing the CRI pin, is no reason to undo the unpin.
            let before = self.intents.get(name).map(|i| i.pins);
            match before {
                None if new.cri => {
                    self.record(now, name, labels, listed.flatten(), Origin::SeenPinned, out)
                }
                None if new.program => {
                    let digest = listed.flatten();
                    self.record(now, name, labels.clone(), digest, Origin::SeenPinned, out);
                    self.release(now, name, K3S_LABEL_ONLY, Some(labels), out);
                }
                // An event may be the late delivery of a pin written before the release
                // (pinkeeper's own restore, or K3s's): the record itself says, so a Get
                // confirms before the intent comes back. Found by the simulation (seed 5776).
                Some(old)
                    if new.cri
                        && !old.cri
                        && live
                        && self.labels_to_confirm.insert(name.into()) =>
                {
                    out.push(Output::Fetch {
                        name: self.shared(name),
                    });
                }
                Some(old) if new.cri && !old.cri && live => {}
                Some(old) if new.cri && !old.cri => {
                    self.record(now, name, labels, listed.flatten(), Origin::SeenPinned, out)
                }
                Some(old) if old != new => self.update_intent(name, out, |i| i.pins = new),
                _ => {}
            }
            return false;
        }
        if self.unpins_to_confirm.contains(name) {
            if live && new.cri {
                // The CRI pin is on again after the unpin seen: that one was a late delivery
                // (an operator's pin, or a restore, came after it). The Get under way reads
                // the record as a listing would instead of confirming an unpin. Found by the
                // simulation (seeds 1766, 2753, 7607).
                self.unpins_to_confirm.remove(name);
                self.labels_to_confirm.insert(self.shared(name));
                self.update_intent(name, out, |i| {
                    i.pins = new;
                    i.state = IntentState::Held;
                });
                return true;
            }
            if live {
                // Decided by the Get under way; later events must not read as a sweep.
                return true;
            }
            // A listing is as good as the Get: it is read below as any listing is (an unpin,
            // or the sweep that ran since: seeds 148119, 546224).
            self.unpins_to_confirm.remove(name);
        }
        if self.observe_policy(now, name, &labels, out) {
            return false;
        }
        let Some(intent) = self.intents.get(name) else {
            return false;
        };
        let old = intent.pins;
        let was_swept = intent.state == IntentState::Swept;
        // Who pinned it first, when it was pinkeeper (an operator's `pinkeeper pin`, or the
        // policy's).
        let first_pin = match intent.origin {
            Origin::Operator => Some(RestoreReason::Operator),
            Origin::Policy => Some(RestoreReason::Policy),
            Origin::SeenPinned => None,
        };
        let k3s_pinned = intent.k3s_pinned || intent.source.is_some();
        let digest = intent.digest.clone();
        let pins_changed = intent.pins != new;
        if new.program && !intent.k3s_pinned {
            // Once per name, and on disk at once: lost to a crash, a later sweep missed while
            // away would read as an operator's unpin.
            self.update_intent(name, out, |i| i.k3s_pinned = true);
            out.push(Output::Commit);
        }
        if new.program && first_pin == Some(RestoreReason::Policy) {
            // K3s pins it too: the policy no longer holds it alone (a pattern removed later
            // leaves it held, as any image K3s pinned).
            self.update_intent(name, out, |i| i.origin = Origin::SeenPinned);
        }
        if live && new.cri && old.program && !new.program && !was_swept {
            // K3s's label gone and the CRI pin kept: K3s never does that, and pinkeeper's own
            // restore (CRI pin only) delivered after K3s pinned the image again looks exactly
            // like it. Believed, it would make the next sweep read as an operator's unpin; the
            // record itself says which it is.
            if self.labels_to_confirm.insert(self.shared(name)) {
                out.push(Output::Fetch {
                    name: self.shared(name),
                });
            }
            return true;
        }
        if new.cri {
            if was_swept && !self.pins_in_flight.contains_key(name) {
                self.awaiting_k3s.remove(name);
                if let Some(ep) = self.episode.as_mut() {
                    ep.settle(name, Outcome::RepinnedByK3s);
                }
                self.history(
                    now,
                    name,
                    Action::Repinned,
                    "pinned again by K3s's import",
                    out,
                );
            }
            self.update_intent(name, out, |i| {
                i.pins = new;
                i.state = IntentState::Held;
            });
            return true;
        }
        // The CRI pin is absent now. K3s writes both pins at once and its sweep removes both,
        // so a record left with K3s's label alone, or a pin pinkeeper restored (CRI pin only)
        // now gone, was unpinned by someone else: contract rule 6. Except when a listing,
        // after events were missed, finds no pin left at all on a CRI-only pin of an image K3s
        // owns (it pinned the name, a file provides it, or K3s pinned another name of the
        // same image, since it pins every name of an archive): K3s may have imported it again
        // and swept it since, unseen. Keeping the image is the side that loses nothing; an
        // unpin made with `ctr` while pinkeeper was not watching is taken for that (README:
        // use `pinkeeper unpin`). Found by the simulation (seeds 32, 202280).
        let missed_sweep = !live
            && !new.program
            && old.cri
            && !old.program
            && !was_swept
            && (k3s_pinned || self.digest_pinned_by_k3s(digest.as_ref()));
        // Both pins gone from a record K3s pinned (or a missed sweep): K3s's sweep.
        let sweep = !new.program && (old.program || missed_sweep) && !was_swept;
        if !sweep && self.kept_by(name).is_some() {
            // A `keep` pattern holds it, and it is seen without the CRI pin: someone removed
            // it, or a pin of pinkeeper's failed (and pinkeeper may have restarted since).
            // Put back: the policy decides (contract rule 9; `pinkeeper unpin` refuses it,
            // naming the pattern). The sweep's signature is read as a sweep below.
            if pins_changed {
                self.update_intent(name, out, |i| i.pins = new);
            }
            self.pin(name, RestoreReason::Policy, out);
            return true;
        }
        if new.program || (old.cri && !old.program && !missed_sweep) {
            // An event may be a late or duplicate delivery (FACTS.md section 3): a live one is
            // confirmed with a Get before the intent is released.
            if live {
                self.unpins_to_confirm.insert(self.shared(name));
                out.push(Output::Fetch {
                    name: self.shared(name),
                });
            } else {
                self.release(now, name, UNPIN, Some(labels), out);
            }
            return false;
        }
        if sweep {
            // The sweep's signature: both pins removed at once from an image with K3s's label.
            self.update_intent(name, out, |i| {
                i.pins = new;
                i.state = IntentState::Swept;
            });
            let how = if live {
                "K3s's startup sweep removed both pins"
            } else {
                "both pins were removed while pinkeeper was not watching (a missed K3s sweep)"
            };
            self.history(now, name, Action::Swept, how, out);
            let shared = self.shared(name);
            let ep = self.episode.get_or_insert_with(|| Episode {
                started: now.wall,
                seen_live: live,
                ..Episode::default()
            });
            ep.sweep(&shared);
            // The episode ends with a verification, whatever the archives.
            self.schedule_verify(now.mono);
            self.settle(name, now, out);
        } else if let Some(reason) = first_pin.filter(|_| !live && !old.cri && !was_swept) {
            // An operator's `pinkeeper pin` (or the policy's pin) recorded and never seen
            // carried out (pinkeeper was killed between the commit and the write, or the write
            // failed): the intent says pinned, so it is done now. Found by the simulation
            // (seeds 883, and 3272 for a pattern removed before the pin was done).
            if pins_changed {
                self.update_intent(name, out, |i| i.pins = new);
            }
            self.pin(name, reason, out);
        } else if pins_changed {
            self.update_intent(name, out, |i| i.pins = new);
        }
        true
    }
    /// Records the target digest of a held intent when it changed. Left alone when it is the
    /// same: a listing of 10,000 records would otherwise replace 10,000 strings the engine
    /// keeps, in the middle of the listing's own short-lived allocations, and the heap could
    /// not give those pages back.
    fn learn_digest(&mut self, name: &str, digest: &str, out: &mut Vec<Output>) {
        let known = self
            .intents
            .get(name)
            .is_some_and(|i| i.digest.as_ref().is_some_and(|d| d.is(digest)));
        if !known && self.holds(name) {
            self.update_intent(name, out, |i| i.digest = Some(Digest::new(digest)));
        }
    }

    /// Whether K3s has pinned another name of the image with this digest.
    fn digest_pinned_by_k3s(&self, digest: Option<&Digest>) -> bool {
        digest.is_some_and(|d| {
            self.intents
                .values()
                .filter(|i| i.digest.as_ref() == Some(d))
                .any(|i| i.k3s_pinned || i.pins.program)
        })
    }

    pub(super) fn on_fetched(
        &mut self,
        now: Now,
        name: &str,
        record: Option<ImageRecord>,
        out: &mut Vec<Output>,
    ) {
        let confirming = self.unpins_to_confirm.remove(name);
        let recheck = self.labels_to_confirm.remove(name) && !confirming;
        if self.deleted.get(name) == Some(&None) {
            // The churn window of a deletion is over: the record says whether it is gone.
            self.deleted.remove(name);
            match record {
                // The record is gone: whatever pin it shows next is a pin put on again.
                None => self.release(now, name, DELETED, Some(Labels::new()), out),
                Some(record) => {
                    self.observe(now, name, record.labels, Some(record.digest), out);
                }
            }
            return;
        }
        let Some(record) = record else {
            // Gone: its delete event (or the next listing) settles the intent.
            return;
        };
        if recheck && self.intents.contains_key(name) {
            // What the record carries now, read as a listing reads it.
            self.observe(now, name, record.labels, Some(record.digest), out);
            return;
        }
        if self.pins(&record.labels).any() {
            // A delete delivered late: the record exists again, pinned. (Created again without
            // a pin, it is left to the create event or the churn window.)
            self.deleted.remove(name);
        }
        if let Some(digest) = &record.digest {
            self.learn_digest(name, digest, out);
        }
        if confirming {
            let pins = self.pins(&record.labels);
            let had_k3s_label = self.intents.get(name).is_some_and(|i| i.pins.program);
            if pins.cri {
                // The unpin was a stale delivery: the record is pinned now.
                self.update_intent(name, out, |i| {
                    i.pins = pins;
                    i.state = IntentState::Held;
                });
            } else if !pins.program && had_k3s_label {
                // Both pins are gone now from a record held with K3s's label: the sweep's
                // signature. The event (K3s's label without the CRI pin) was a late delivery
                // of an older state, and the sweep has run since; the record is read as a
                // listing reads it. Found by the simulation (seed 15446).
                self.observe(now, name, record.labels, Some(record.digest), out);
            } else {
                self.release(now, name, UNPIN, Some(record.labels), out);
            }
        }
    }
}
