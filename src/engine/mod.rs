//! The engine: every rule of pinkeeper's contract (DESIGN.md section 2), and nothing else.
//!
//! It owns the view of the images pinkeeper cares about (the ledger's intents with the labels
//! last seen), the inventory of the images directory, the sweep episode and the timers. It is
//! pure and deterministic in the style of `quinn-proto`: no I/O and no clock. Every input
//! carries its own instant on a monotonic and on the wall clock ([`Now`], [`Engine::handle`]):
//! timers run on the first, what is shown or stored carries the second. Every effect is
//! returned as an [`Output`] value for the daemon (or a replay test) to carry out, and
//! [`Engine::next_wakeup`] says when (monotonic) to call again with [`Input::Tick`].
//!
//! It must not touch containerd, the disk or the clock; `src/containerd/`, `src/ledger/` and
//! `src/daemon/` do that with its outputs (`src/engine/reading.rs` reads what containerd says).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

/// Why an intent is released when its CRI pin is removed outside the sweep.
const UNPIN: &str = "its CRI pin was removed, and not by K3s's startup sweep (an operator's unpin)";

/// Why an intent is released when its record is gone for good.
const DELETED: &str = "its image record was deleted";

/// Why an intent is released by `pinkeeper unpin`.
const OPERATOR_UNPIN: &str = "an operator ran `pinkeeper unpin`";

/// Why an intent is released at once when first seen with K3s's label and no CRI pin.
const K3S_LABEL_ONLY: &str =
    "seen with K3s's pin label but without the CRI pin: someone had unpinned it (K3s always sets both)";

/// A sweep in progress.
#[derive(Debug, Default, Clone)]
struct Episode {
    /// When it started and how it was seen; the counts are made from `swept` when it ends
    /// ([`Episode::summary`]).
    started: Millis,
    seen_live: bool,
    /// Images swept in this episode, each once (a name costs one entry: a repair of 100,000
    /// holds as many), with how each was settled (the last reading wins: the summary counts
    /// each image once, by its last outcome). Events from before a listing can be applied
    /// after it (`daemon::Daemon::resync` drops those published before it, but an event is
    /// published a little after its change), so a sweep and K3s's re-pin can be read twice,
    /// or an older pin read after the sweep that removed it.
    swept: BTreeMap<Name, Swept>,
}

/// An image swept in an [`Episode`].
#[derive(Debug, Clone, Copy, Default)]
struct Swept {
    /// Swept and not settled since.
    open: bool,
    /// How it was last settled.
    outcome: Option<Outcome>,
}

/// How a swept image was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Restored(RestoreReason),
    RepinnedByK3s,
}

impl Episode {
    fn sweep(&mut self, name: &Name) {
        match self.swept.get_mut(name.as_str()) {
            Some(entry) => entry.open = true,
            None => {
                let entry = Swept {
                    open: true,
                    outcome: None,
                };
                self.swept.insert(name.clone(), entry);
            }
        }
    }

    /// Whether `name` was swept and not settled since.
    fn is_open(&self, name: &str) -> bool {
        self.swept.get(name).is_some_and(|e| e.open)
    }

    /// `name` is no longer waiting (released), unsettled.
    fn close(&mut self, name: &str) {
        if let Some(entry) = self.swept.get_mut(name) {
            entry.open = false;
        }
    }

    /// Settles `name` if it was waiting (swept, and not settled since).
    fn settle(&mut self, name: &str, outcome: Outcome) {
        if let Some(entry) = self.swept.get_mut(name).filter(|e| e.open) {
            *entry = Swept {
                open: false,
                outcome: Some(outcome),
            };
        }
    }

    fn summary(&self) -> SweepSummary {
        let count = |o: Outcome| self.swept.values().filter(|v| v.outcome == Some(o)).count();
        SweepSummary {
            started: self.started,
            seen_live: self.seen_live,
            swept: self.swept.len(),
            restored_archive_gone: count(Outcome::Restored(RestoreReason::ArchiveGone)),
            restored_not_repinned: count(Outcome::Restored(RestoreReason::NotRepinned)),
            repinned_by_k3s: count(Outcome::RepinnedByK3s),
            restored_policy: count(Outcome::Restored(RestoreReason::Policy)),
        }
    }
}

/// The engine. See the module documentation. A clone answers "what if" (`pinkeeper reconcile
/// --dry-run`) without touching the original.
#[derive(Debug, Clone)]
pub struct Engine {
    config: Config,
    /// Every intent, released ones included, by image name.
    intents: BTreeMap<Name, Intent>,
    /// Image name -> providing file, from the last inventory; `None` before the first one,
    /// when no archive can be called gone.
    provided: Option<Provided>,
    /// Digest -> providing file for the provided names whose digest is known: K3s's aliases
    /// (`repo@digest`, extra registries) share the target of the image they alias, so they
    /// belong to the same archive. Rebuilt lazily.
    provided_digests: Option<HashMap<Digest, PathBuf>>,
    /// Digest -> K3s's aliases (`name@digest`) of that digest whose file was not known when
    /// their digest was: the answers to concurrent Gets come in any order, so an alias can
    /// learn its digest before the name it aliases does. They learn their file when that name
    /// learns its digest ([`Engine::tie_aliases`]); stale entries are checked then.
    untied_aliases: HashMap<Digest, BTreeSet<Name>>,
    /// Names whose record was deleted, with the time their intent is released unless a create
    /// comes first (alias churn). `None` once that time has come and a Get is asked whether
    /// the record is really gone: its create may be delivered late (seeds 213520, 700118).
    deleted: BTreeMap<Name, Option<Millis>>,
    /// Pins written and not yet answered, with why: never write the same pin twice at once.
    pins_in_flight: BTreeMap<Name, RestoreReason>,
    /// Intents whose CRI pin an event says was removed (not by the sweep): released once a Get
    /// confirms it.
    unpins_to_confirm: BTreeSet<Name>,
    /// Held intents an event showed losing K3s's label but keeping the CRI pin, which K3s never
    /// does: most likely a late delivery of pinkeeper's own restore. A Get tells.
    labels_to_confirm: BTreeSet<Name>,
    /// Swept images whose archive is still present: K3s should re-pin them; checked at verify.
    awaiting_k3s: BTreeSet<Name>,
    /// When the verification of a start-up is due.
    verify_due: Option<Millis>,
    /// Latest time a verification may be put off to.
    verify_deadline: Option<Millis>,
    /// A verification was asked for and its listing has not come yet.
    verify_in_flight: bool,
    /// Disconnected since the last [`Input::Disconnected`], until a listing: a verification
    /// due meanwhile waits for the connection (its listing could not be taken).
    away: bool,
    /// A verification listing is being applied: unpinned intents are restored, not deferred.
    verifying: bool,
    episode: Option<Episode>,
    /// Released intents to forget, by when ([`Engine::forget_at`]): the earliest is the head.
    forget: BTreeSet<(Millis, Name)>,
    /// Released intent -> the monotonic time its retention ends (set at its release, or at the
    /// first input for those read from the ledger); forgotten then unless its labels carry a
    /// pin ([`Engine::forget_at`]).
    retained_until: HashMap<Name, Millis>,
    /// Intents the policy held that the patterns of a reload no longer match: released when
    /// next seen ([`Engine::on_keep`]).
    unkept: BTreeSet<Name>,
    /// Released intents read from the ledger have no `retained_until` yet: the first input
    /// gives the clocks to derive it ([`Engine::anchor`]).
    anchor_pending: bool,
}

impl Engine {
    /// Starts from the intents in the ledger.
    pub fn new(config: Config, intents: impl IntoIterator<Item = Intent>) -> Self {
        let intents: BTreeMap<Name, Intent> = intents
            .into_iter()
            .map(|mut i| {
                if let Some(labels) = i.legacy_labels.take() {
                    i.pins = pins(&labels, &config.program_label);
                }
                (i.name.clone(), i)
            })
            .collect();
        // Intents swept before a crash wait for the next listing to be settled again.
        let awaiting_k3s = intents
            .values()
            .filter(|i| i.state == IntentState::Swept)
            .map(|i| i.name.clone())
            .collect();
        let mut engine = Engine {
            config,
            intents,
            provided: None,
            provided_digests: None,
            untied_aliases: HashMap::new(),
            deleted: BTreeMap::new(),
            pins_in_flight: BTreeMap::new(),
            awaiting_k3s,
            unpins_to_confirm: BTreeSet::new(),
            labels_to_confirm: BTreeSet::new(),
            verify_due: None,
            verify_deadline: None,
            verify_in_flight: false,
            away: false,
            verifying: false,
            episode: None,
            forget: BTreeSet::new(),
            retained_until: HashMap::new(),
            unkept: BTreeSet::new(),
            anchor_pending: false,
        };
        // Their retention is derived at the first input, which `next_wakeup` asks for at once
        // (the engine has no clock to read here).
        engine.anchor_pending = engine
            .intents
            .values()
            .any(|i| i.state == IntentState::Released);
        engine
    }

    /// The shared [`Name`] of `name`: the intent's own when there is one (a reference count,
    /// not a copy: a repair of 100,000 names each in several sets at once).
    fn shared(&self, name: &str) -> Name {
        self.intents
            .get_key_value(name)
            .map_or_else(|| Name::from(name), |(k, _)| k.clone())
    }

    /// The intents, released ones included.
    pub fn intents(&self) -> impl Iterator<Item = &Intent> {
        self.intents.values()
    }

    /// One intent by name.
    pub fn intent(&self, name: &str) -> Option<&Intent> {
        self.intents.get(name)
    }

    /// Whether a start-up verification is due or asked for and not yet applied.
    pub fn verification_pending(&self) -> bool {
        self.verify_due.is_some() || self.verify_in_flight
    }

    /// The `keep` pattern that holds `name` (contract rule 9), if any: the first in the
    /// config's order that matches.
    pub fn kept_by(&self, name: &str) -> Option<&str> {
        self.config.keep.matching(name)
    }

    /// The engine's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the engine next needs an [`Input::Tick`], if ever, on the monotonic clock
    /// ([`Now::mono`]). `Some(0)` (at once) before the first input when the ledger holds
    /// released intents, whose retention that input starts.
    pub fn next_wakeup(&self) -> Option<Millis> {
        if self.anchor_pending {
            return Some(0);
        }
        let churn = self.deleted.values().flatten().min().copied();
        let forget = self.forget.first().map(|(at, _)| *at);
        // A verification already asked for cannot be asked again until its listing comes:
        // waking for it would only spin.
        let verify = self
            .verify_due
            .filter(|_| !self.verify_in_flight && !self.away);
        [churn, verify, forget].into_iter().flatten().min()
    }

    /// Feeds one observation made at `now` (both clocks, [`Now`]; a bare [`Millis`] is the
    /// same value on both); returns what to do.
    pub fn handle(&mut self, now: impl Into<Now>, input: Input) -> Vec<Output> {
        self.outputs(now, input).collect()
    }

    /// [`Engine::handle`], its outputs given as they are decided: a listing is applied
    /// [`LISTING_PART`] records at a time as the outputs are taken, so a repair of 100,000
    /// images never holds all its outputs at once (issue 12). The outputs, and the engine's
    /// state once they are all taken, are exactly those of [`Engine::handle`]. Dropped before
    /// its end, the rest of the input is applied and its outputs dropped.
    pub fn outputs(&mut self, now: impl Into<Now>, input: Input) -> Outputs<'_> {
        let now = now.into();
        if self.anchor_pending {
            self.anchor(now);
        }
        let mut out = Vec::new();
        let mut listing = None;
        match input {
            Input::Event(event) => self.on_event(now, event, &mut out),
            Input::Listing { images, cause } => {
                self.begin_listing(cause);
                listing = Some(ListingFeed::new(images));
            }
            Input::Inventory(provided) => self.on_inventory(now, provided, &mut out),
            Input::Fetched { name, record } => {
                let record = record.filter(|r| r.name == name);
                self.on_fetched(now, &name, record, &mut out)
            }
            Input::FetchFailed { name } => {
                if let Some(at @ None) = self.deleted.get_mut(name.as_str()) {
                    *at = Some(now.mono + self.config.churn_window);
                }
                // A verification of its own lists every image; the next connection's listing
                // does as well. A confirmation left waiting for a Get that never answers would
                // hold an operator's unpin (or a relabelled record) undecided for good. Found
                // by the simulation (seed 280).
                self.schedule_verify(now.mono);
            }
            Input::Pinned { name, result } => self.on_pinned(now, name, result, &mut out),
            Input::Disconnected => {
                self.pins_in_flight.clear();
                for at in self.deleted.values_mut().filter(|at| at.is_none()) {
                    *at = Some(now.mono + self.config.churn_window);
                }
                self.labels_to_confirm.clear();
                // A verification whose listing never came is asked again once connected.
                if std::mem::take(&mut self.verify_in_flight) {
                    self.verify_due = Some(now.mono);
                }
                self.away = true;
            }
            Input::Tick => self.on_tick(now, &mut out),
            Input::Keep(keep) => self.on_keep(now, keep),
            Input::OperatorPin { record } => self.on_operator_pin(now, record, &mut out),
            Input::OperatorUnpin { name, record } => {
                let record = record.filter(|r| r.name == name);
                self.on_operator_unpin(now, &name, record, &mut out)
            }
        }
        Outputs {
            engine: self,
            now,
            ready: out.into_iter(),
            listing,
        }
    }

    /// [`pins`] with this engine's program label.
    fn pins(&self, labels: &Labels) -> Pins {
        pins(labels, &self.config.program_label)
    }

    /// Decides what a swept (or otherwise unpinned) intent needs now: a restore at once when
    /// no file provides it, else a verification once the start-up has settled.
    fn settle(&mut self, name: &str, now: Now, out: &mut Vec<Output>) {
        if self.pins_in_flight.contains_key(name) {
            return;
        }
        if self.kept_by(name).is_some() {
            // Kept by policy: restored at once, whatever the archives (contract rule 9).
            self.awaiting_k3s.remove(name);
            self.pin(name, RestoreReason::Policy, out);
        } else if !self.is_provided(name) {
            self.awaiting_k3s.remove(name);
            self.pin(name, RestoreReason::ArchiveGone, out);
        } else if self.verifying {
            self.awaiting_k3s.remove(name);
            self.pin(name, RestoreReason::NotRepinned, out);
        } else {
            let name = self.shared(name);
            self.awaiting_k3s.insert(name);
            self.schedule_verify(now.mono);
        }
    }

    fn pin(&mut self, name: &str, reason: RestoreReason, out: &mut Vec<Output>) {
        if !self.pins_in_flight.contains_key(name) {
            let shared = self.shared(name);
            self.pins_in_flight.insert(shared, reason);
            if let Some(ep) = self.episode.as_mut() {
                if reason != RestoreReason::Operator {
                    ep.settle(name, Outcome::Restored(reason));
                }
            }
            out.push(Output::Pin {
                name: self.shared(name),
                reason,
            });
        }
    }

    fn schedule_verify(&mut self, now: Millis) {
        let deadline = *self
            .verify_deadline
            .get_or_insert(now + self.config.settle_max);
        self.verify_due = Some((now + self.config.settle).min(deadline));
    }

    /// An event of the start-up burst pushes a pending verification back: the burst is not
    /// over ([`Engine::on_event`] says which events count).
    fn note_activity(&mut self, now: Millis) {
        if self.verify_due.is_some() {
            self.schedule_verify(now);
        }
    }

    fn record(
        &mut self,
        now: Now,
        name: &str,
        labels: Labels,
        digest: Option<String>,
        origin: Origin,
        out: &mut Vec<Output>,
    ) {
        let previous = self.intents.get(name);
        let pins = self.pins(&labels);
        let mut intent = Intent {
            name: self.shared(name),
            digest: digest
                .as_deref()
                .map(Digest::new)
                .or_else(|| previous.and_then(|p| p.digest.clone())),
            source: previous.and_then(|p| p.source.clone()),
            pins,
            legacy_labels: None,
            state: IntentState::Held,
            origin,
            since: now.wall,
            restores: previous.map_or(0, |p| p.restores),
            last_restored: previous.and_then(|p| p.last_restored),
            released_because: None,
            k3s_pinned: pins.program || previous.is_some_and(|p| p.k3s_pinned),
        };
        let before = self.forget_key(name);
        self.intents.insert(intent.name.clone(), intent.clone());
        self.reindex(name, before);
        self.retained_until.remove(name);
        self.provided_digests = None;
        if let Some(source) = self.source_of(name) {
            intent.source = Some(source.clone());
            if let Some(i) = self.intents.get_mut(name) {
                i.source = Some(source);
            }
        }
        self.tie_aliases(name, out);
        let detail = if origin == Origin::Operator {
            "an operator ran `pinkeeper pin`"
        } else if origin == Origin::Policy {
            RestoreReason::Policy.explain()
        } else if intent.pins.cri {
            "seen carrying io.cri-containerd.pinned=pinned"
        } else {
            "seen carrying K3s's pin label"
        };
        out.push(Output::Save {
            intent: Box::new(intent),
            new: true,
        });
        self.history(now, name, Action::Recorded, detail, out);
        // Contract rule 7: a recorded intent survives `kill -9`, and is on disk before
        // pinkeeper acts on it (its pin, in this batch or the next).
        out.push(Output::Commit);
        if digest.is_none() {
            out.push(Output::Fetch {
                name: self.shared(name),
            });
        }
    }

    /// Releases the intent on `name`. `seen` is what the record carries now (none if it is
    /// gone): a released intent comes back only when a pin is put on again, so its labels must
    /// be the ones it was released with, not older ones (or K3s's next re-pin goes unnoticed).
    fn release(
        &mut self,
        now: Now,
        name: &str,
        why: &'static str,
        seen: Option<Labels>,
        out: &mut Vec<Output>,
    ) {
        self.deleted.remove(name);
        self.awaiting_k3s.remove(name);
        if let Some(ep) = self.episode.as_mut() {
            ep.close(name);
        }
        if !self.holds(name) {
            return;
        }
        self.retain(name, now);
        let seen = seen.map(|labels| self.pins(&labels));
        self.update_intent(name, out, |i| {
            i.state = IntentState::Released;
            i.since = now.wall;
            i.released_because = Some(why.to_string());
            if let Some(pins) = seen {
                i.pins = pins;
            }
        });
        self.history(now, name, Action::Released, why, out);
        // A release is on disk before anything else is done: lost to a crash, it would be
        // undone by the next start if K3s's sweep came meanwhile (the listing would read the
        // pins gone as the sweep's, not as the operator's unpin). Found by the simulation.
        out.push(Output::Commit);
    }

    fn update_intent(
        &mut self,
        name: &str,
        out: &mut Vec<Output>,
        change: impl FnOnce(&mut Intent),
    ) {
        let Some(intent) = self.intents.get_mut(name) else {
            return;
        };
        let before = intent.clone();
        change(intent);
        let new_digest = intent.digest != before.digest;
        let forget_before = self.forget_at(&before);
        self.reindex(name, forget_before);
        if new_digest {
            // The digest ties K3s's aliases to their archive.
            self.provided_digests = None;
            if let Some(source) = self.source_of(name) {
                if let Some(i) = self.intents.get_mut(name) {
                    i.source = Some(source);
                }
            }
        }
        if let Some(intent) = self.intents.get(name).filter(|i| **i != before) {
            out.push(Output::Save {
                intent: Box::new(intent.clone()),
                new: false,
            });
        }
        if new_digest {
            self.tie_aliases(name, out);
        }
    }

    /// `name`'s digest is known now. If `name` is K3s's alias (`<repo>@<digest>`) and no file
    /// is known for it yet, it waits in [`Engine::untied_aliases`]; if a file provides `name`,
    /// the aliases waiting for its digest take that file as theirs (else an archive deleted
    /// before the next read of the directory would not count them as gone).
    fn tie_aliases(&mut self, name: &str, out: &mut Vec<Output>) {
        let Some(intent) = self.intents.get(name) else {
            return;
        };
        let Some(digest) = intent.digest.clone() else {
            return;
        };
        if name.rsplit_once('@').is_some_and(|(_, d)| digest.is(d)) {
            if intent.source.is_none() {
                let name = intent.name.clone();
                self.untied_aliases.entry(digest).or_default().insert(name);
            }
            return;
        }
        let Some(source) = self
            .provided
            .as_ref()
            .and_then(|p| p.get(name))
            .map(Cow::into_owned)
        else {
            return;
        };
        let Some(aliases) = self.untied_aliases.remove(&digest) else {
            return;
        };
        for alias in aliases {
            let untied = self
                .intents
                .get(alias.as_str())
                .is_some_and(|i| i.source.is_none() && i.digest.as_ref() == Some(&digest));
            if untied {
                let source = source.clone();
                self.update_intent(&alias, out, |i| i.source = Some(source));
            }
        }
    }

    fn history(
        &self,
        now: Now,
        name: &str,
        action: Action,
        detail: impl Into<Cow<'static, str>>,
        out: &mut Vec<Output>,
    ) {
        out.push(Output::History(HistoryEntry {
            at: now.wall,
            name: self.shared(name),
            action,
            detail: detail.into(),
        }));
    }

    fn on_pinned(
        &mut self,
        now: Now,
        name: String,
        result: Result<(), ApplyError>,
        out: &mut Vec<Output>,
    ) {
        let Some((name, reason)) = self.pins_in_flight.remove_entry(name.as_str()) else {
            return;
        };
        match result {
            // A first pin, not a restore: an operator's, or the policy's on an image that
            // was not swept (it appeared, or someone else removed its pin).
            Ok(())
                if reason == RestoreReason::Operator
                    || (reason == RestoreReason::Policy
                        && self
                            .intents
                            .get(name.as_str())
                            .is_some_and(|i| i.state == IntentState::Held)) =>
            {
                self.update_intent(&name, out, |i| {
                    i.state = IntentState::Held;
                    i.pins.cri = true;
                });
                self.history(now, &name, Action::Pinned, reason.explain(), out);
            }
            Ok(()) => {
                self.update_intent(&name, out, |i| {
                    i.state = IntentState::Held;
                    i.pins.cri = true;
                    i.restores += 1;
                    i.last_restored = Some(now.wall);
                });
                self.history(now, &name, Action::Restored, reason.explain(), out);
            }
            Err(ApplyError::NotFound) => {
                // The record went away meanwhile: its delete event settles the intent.
            }
            Err(ApplyError::Failed(why)) => {
                // Tried again at a verification of its own (a listing restores every held
                // intent found unpinned), or at the next connection's listing, whichever
                // comes first: a pin that failed once (containerd busy) is not left for the
                // next K3s restart. Found by the simulation (seed 102).
                self.awaiting_k3s.insert(name.clone());
                self.schedule_verify(now.mono);
                self.history(now, &name, Action::RestoreFailed, why, out);
            }
        }
    }

    fn on_tick(&mut self, now: Now, out: &mut Vec<Output>) {
        self.forget_due(now.mono, out);
        let due: Vec<Name> = self
            .deleted
            .iter()
            .filter(|(_, at)| at.is_some_and(|at| at <= now.mono))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            // Released once a Get says the record is gone: a create delivered late (slow
            // delivery) would otherwise leave a re-imported image unprotected.
            self.deleted.insert(name.clone(), None);
            out.push(Output::Fetch { name });
        }
        if self.verify_due.is_some_and(|at| at <= now.mono) && !self.verify_in_flight && !self.away
        {
            self.verify_due = None;
            self.verify_deadline = None;
            self.verify_in_flight = true;
            out.push(Output::Verify);
        }
    }

    fn begin_listing(&mut self, cause: ListCause) {
        self.away = false;
        self.verifying = cause == ListCause::Verify;
        if self.verifying {
            self.verify_in_flight = false;
        }
    }

    /// Applies the next records of a listing ([`Engine::outputs`]).
    fn listing_part(
        &mut self,
        now: Now,
        images: impl Iterator<Item = ImageRecord>,
        seen: &mut BTreeSet<Name>,
        out: &mut Vec<Output>,
    ) {
        for image in images {
            // A listing is as good as a Get.
            self.labels_to_confirm.remove(image.name.as_str());
            // A record deleted and there again is read as any listed record: K3s may have
            // imported it again and swept it since, unseen (seed 700118).
            self.deleted.remove(image.name.as_str());
            self.observe(now, &image.name, image.labels, Some(image.digest), out);
            // Only the names of intents are looked for at the end: those are kept, as the
            // intent's own `Name` (a reference count), and the listing's string is dropped
            // here. A listing of 100,000 names held them all as strings until its end.
            if let Some((name, _)) = self.intents.get_key_value(image.name.as_str()) {
                seen.insert(name.clone());
            }
        }
    }

    /// Once every record of a listing is applied: what was not listed.
    fn end_listing(&mut self, now: Now, seen: BTreeSet<Name>, out: &mut Vec<Output>) {
        // Records that are gone were deleted while pinkeeper was not watching. Released after
        // the churn window unless created again (K3s may be in the middle of re-tagging).
        let mut gone = Vec::new();
        for intent in self.intents.values() {
            if seen.contains(intent.name.as_str()) {
                continue;
            }
            if intent.state != IntentState::Released {
                let at = self.deleted.entry(intent.name.clone()).or_default();
                at.get_or_insert(now.mono + self.config.churn_window);
            } else if intent.pins.any() {
                gone.push(intent.name.clone());
            }
        }
        for name in gone {
            self.record_gone(&name, out);
        }
        // Swept intents that were waiting (for K3s, or from before pinkeeper restarted).
        let waiting: Vec<Name> = self.awaiting_k3s.iter().cloned().collect();
        for name in waiting {
            let unpinned = self
                .intents
                .get(name.as_str())
                .is_some_and(|i| i.state != IntentState::Released && !i.pins.cri);
            if unpinned && seen.contains(name.as_str()) {
                self.settle(&name, now, out);
            } else if !(unpinned && self.deleted.contains_key(name.as_str())) {
                // A record deleted meanwhile keeps waiting: released if it stays gone, settled
                // if K3s imports it again (and sweeps it, unseen). Seed 27270.
                self.awaiting_k3s.remove(name.as_str());
            }
        }
        if self.verifying && self.verify_due.is_none() {
            if let Some(ep) = self.episode.take() {
                out.push(Output::SweepSummary(ep.summary()));
            }
        }
        self.verifying = false;
    }
}

mod archives;
mod digest;
mod feed;
mod kubelet;
mod labels;
mod model;
mod name;
mod operator;
mod policy;
mod provided;
mod reading;
mod retention;
mod views;

pub use digest::Digest;
use feed::ListingFeed;
pub use feed::{Outputs, LISTING_PART};
pub use kubelet::CriView;
pub use labels::Labels;
pub use model::*;
pub use name::Name;
pub use operator::UnpinPlan;
pub use policy::{check_pattern, Keep};
pub use provided::{FileNames, Provided};
pub use views::{risk, ArchiveState, IntentView, Risk, Summary, Tally};

#[cfg(test)]
mod clock_tests;
#[cfg(test)]
mod tests;
