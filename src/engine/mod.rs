//! The engine: every rule of pinkeeper's contract (DESIGN.md section 2), and nothing else.
//!
//! It owns the view of the images pinkeeper cares about (the ledger's intents with the labels
//! last seen), the inventory of the images directory, the sweep episode and the timers. It is
//! pure and deterministic in the style of `quinn-proto`: no I/O and no clock. Every input
//! carries its own timestamp ([`Engine::handle`]), every effect is returned as an [`Output`]
//! value for the daemon (or a replay test) to carry out, and [`Engine::next_wakeup`] says when
//! to call again with [`Input::Tick`].
//!
//! It must not touch containerd, the disk or the clock; `src/containerd/`, `src/ledger/` and
//! `src/daemon.rs` do that with its outputs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as given by the caller. The engine never reads a clock.
pub type Millis = u64;

/// A containerd label map.
pub type Labels = BTreeMap<String, String>;

/// containerd CRI's pin label (note the hyphen; FACTS.md section 1). The only label pinkeeper
/// ever writes.
pub const CRI_PIN: &str = "io.cri-containerd.pinned";
/// The value both pin labels carry.
pub const PINNED: &str = "pinned";
/// K3s's own pin label (`io.cattle.<program>.pinned`). Never written by pinkeeper: an image
/// carrying it is enrolled in K3s's next sweep (FACTS.md section 2).
pub const K3S_PIN: &str = "io.cattle.k3s.pinned";

/// Why an intent is released when its CRI pin is removed outside the sweep.
const UNPIN: &str = "its CRI pin was removed, and not by K3s's startup sweep (an operator's unpin)";

/// Why an intent is released when its record is gone for good.
const DELETED: &str = "its image record was deleted";

/// Why an intent is released by `pinkeeper unpin`.
const OPERATOR_UNPIN: &str = "an operator ran `pinkeeper unpin`";

/// Why an intent is released at once when first seen with K3s's label and no CRI pin.
const K3S_LABEL_ONLY: &str =
    "seen with K3s's pin label but without the CRI pin: someone had unpinned it (K3s always sets both)";

/// Tunables of the engine. Times are in milliseconds.
#[derive(Debug, Clone)]
pub struct Config {
    /// The label K3s (or RKE2) pins with and sweeps away at start: `io.cattle.k3s.pinned`.
    pub program_label: String,
    /// Quiet time after the last image event of a start-up burst before pinkeeper checks that
    /// K3s re-pinned what it should have (contract rule 3). K3s imports archives one after
    /// another, so this only needs to outlast the gap between two image events.
    pub settle: Millis,
    /// Upper bound on how long a verification can be put off by a steady stream of events.
    pub settle_max: Millis,
    /// How long a deleted record may stay away before its intent is released: K3s re-tags an
    /// alias by deleting and creating it again at once (FACTS.md section 2, `forceCreateTag`).
    pub churn_window: Millis,
    /// How long a released intent stays in the engine (for `pinkeeper list`, `status` and the
    /// rules that look at what it was released with), counted from its release
    /// ([`Intent::since`]). Then it is forgotten ([`Output::Forget`]); its history stays.
    pub retention: Millis,
}

/// [`Config::retention`] by default: an hour. Forgetting changes no decision
/// ([`Engine::forget_at`]), so this only says how long `pinkeeper list --all` and `status`
/// still show a release (the ledger's history keeps it for good). An hour is far beyond any
/// K3s start-up or alias churn (seconds) and bounds memory to an hour of releases: a node
/// creating and deleting pinned images all day (20,000 cycles, issue 9) holds no more.
pub const DEFAULT_RETENTION: Millis = 60 * 60 * 1000;

impl Default for Config {
    fn default() -> Self {
        Config {
            program_label: K3S_PIN.to_string(),
            settle: 3_000,
            settle_max: 120_000,
            churn_window: 3_000,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// One image record as containerd lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image name (a reference such as `docker.io/library/app:1`).
    pub name: String,
    /// The full label map.
    #[serde(default)]
    pub labels: Labels,
    /// The target descriptor's digest, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What an image event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// `/images/create`
    Create,
    /// `/images/update`
    Update,
    /// `/images/delete`
    Delete,
}

/// An image event, decoded from containerd's envelope. Create and update carry the full label
/// map after the change; delete carries none (FACTS.md section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEvent {
    /// Which topic.
    pub kind: EventKind,
    /// The image name.
    pub name: String,
    /// The labels after the change (empty for a delete).
    pub labels: Labels,
}

/// Why a listing was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListCause {
    /// After (re)subscribing: events are not replayed, so anything may have happened.
    Connected,
    /// The engine asked for it with [`Output::Verify`] once a start-up burst settled.
    Verify,
}

/// Why a write to containerd failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The image record no longer exists.
    NotFound,
    /// Anything else (containerd down, refused, ...).
    Failed(String),
}

/// An observation fed to the engine.
#[derive(Debug, Clone)]
pub enum Input {
    /// An image event from the stream.
    Event(ImageEvent),
    /// A complete listing of the namespace.
    Listing {
        /// Every image record.
        images: Vec<ImageRecord>,
        /// Why it was taken.
        cause: ListCause,
    },
    /// What the images directory provides now: image name -> file.
    Inventory(BTreeMap<String, PathBuf>),
    /// The answer to an [`Output::Fetch`]: the record, or `None` if it is gone.
    Fetched {
        /// The name asked for.
        name: String,
        /// The record, if it exists.
        record: Option<ImageRecord>,
    },
    /// The outcome of an [`Output::Pin`].
    Pinned {
        /// The image written.
        name: String,
        /// What happened.
        result: Result<(), ApplyError>,
    },
    /// The event stream broke; a [`ListCause::Connected`] listing follows the next subscription.
    Disconnected,
    /// An operator ran `pinkeeper pin` on this record (as containerd has it now): record an
    /// intent and set the CRI pin if it is missing.
    OperatorPin {
        /// The record.
        record: ImageRecord,
    },
    /// An operator ran `pinkeeper unpin NAME`: release the intent and remove the CRI pin.
    OperatorUnpin {
        /// The image name.
        name: String,
        /// The record as containerd has it now (`None`: it does not exist).
        record: Option<ImageRecord>,
    },
    /// Time passed (see [`Engine::next_wakeup`]).
    Tick,
}

/// Why pinkeeper restores a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreReason {
    /// The sweep removed the pins and no file in the images directory provides the image.
    ArchiveGone,
    /// The start-up settled and K3s did not pin the image again although a file provides it
    /// (failed import, `.cache.json` bug k3s-io/k3s#14265, aliases K3s no longer re-pins).
    NotRepinned,
    /// An operator ran `pinkeeper pin`.
    Operator,
}

impl RestoreReason {
    /// A short human explanation.
    pub fn explain(self) -> &'static str {
        match self {
            RestoreReason::ArchiveGone => {
                "K3s's startup sweep removed its pins and no file in the images directory provides it any more"
            }
            RestoreReason::NotRepinned => {
                "K3s's startup sweep removed its pins and K3s did not pin it again after the start-up settled"
            }
            RestoreReason::Operator => "an operator ran `pinkeeper pin`",
        }
    }
}

/// An effect for the caller to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Set `io.cri-containerd.pinned=pinned` on the image with a per-key update
    /// (`labels.io.cri-containerd.pinned`), then report back with [`Input::Pinned`].
    Pin {
        /// The image.
        name: String,
        /// Why.
        reason: RestoreReason,
    },
    /// Remove `io.cri-containerd.pinned` from the image with a per-key update (an operator's
    /// `pinkeeper unpin`). Its outcome needs no report: the record's next event or listing
    /// shows it.
    Unpin {
        /// The image.
        name: String,
    },
    /// `Images.Get` the image (events carry no digest) and report back with [`Input::Fetched`].
    Fetch {
        /// The image.
        name: String,
    },
    /// Rescan the images directory ([`Input::Inventory`]), then list all images
    /// ([`Input::Listing`] with [`ListCause::Verify`]).
    Verify,
    /// Write this ledger record. `new` is true when the intent did not exist (or was released)
    /// before: it must be durable before any [`Output::Pin`] of the same batch is applied.
    Save {
        /// The full record.
        intent: Intent,
        /// A newly recorded intent.
        new: bool,
    },
    /// Append this to the ledger's history.
    History(HistoryEntry),
    /// Delete the ledger's record of this intent: it was released more than
    /// [`Config::retention`] ago and the engine has forgotten it. Its history stays. Should
    /// the name be seen pinned again, it is recorded again like any new name.
    Forget {
        /// The image.
        name: String,
    },
    /// A sweep episode ended (after its verification): one log line for the operator.
    SweepSummary(SweepSummary),
}

/// The state of an intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntentState {
    /// The image should stay pinned; the pin was there when last seen, or will be restored.
    Held,
    /// K3s's sweep removed the pins; a restore or K3s's re-import is due.
    Swept,
    /// Released by an operator's unpin or the record's deletion; kept for history.
    Released,
}

/// How an intent came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The record carried a pin label when pinkeeper saw it.
    SeenPinned,
    /// An operator ran `pinkeeper pin`.
    Operator,
}

/// One image name pinkeeper means to keep pinned: the ledger's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The image name.
    pub name: String,
    /// Target digest, from `Images.Get` or a listing.
    #[serde(default)]
    pub digest: Option<String>,
    /// The file of the images directory that provides (or last provided) the image: any
    /// bytes, stored losslessly (a string when UTF-8).
    #[serde(default, with = "crate::escape::path_bytes::option")]
    pub source: Option<PathBuf>,
    /// The labels last seen on the record.
    #[serde(default)]
    pub labels: Labels,
    /// Where the intent stands.
    pub state: IntentState,
    /// How it came to be.
    pub origin: Origin,
    /// When it was recorded (or last re-recorded after a release); for a released intent, when
    /// it was released (ledgers written before 0.x hold the time it was recorded).
    pub since: Millis,
    /// How many times pinkeeper restored the pin.
    #[serde(default)]
    pub restores: u32,
    /// When pinkeeper last restored the pin.
    #[serde(default)]
    pub last_restored: Option<Millis>,
    /// Why it was released, when it was.
    #[serde(default)]
    pub released_because: Option<String>,
}

/// One line of the ledger's history: what pinkeeper decided and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at: Millis,
    /// The image.
    pub name: String,
    /// What happened: `recorded`, `swept`, `restored`, `restore-failed`, `released`, ...
    pub action: String,
    /// Why, in words an operator understands.
    pub detail: String,
}

/// The outcome of one sweep episode, logged once when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepSummary {
    /// When the first swept image was seen.
    pub started: Millis,
    /// Whether the sweep was seen live on the event stream or found by a listing afterwards.
    pub seen_live: bool,
    /// Images with intent whose pins the sweep removed.
    pub swept: usize,
    /// Of those, restored by pinkeeper because their archive is gone.
    pub restored_archive_gone: usize,
    /// Of those, restored because K3s had not re-pinned them once the start-up settled.
    pub restored_not_repinned: usize,
    /// Of those, pinned again by K3s itself.
    pub repinned_by_k3s: usize,
}

/// Where the archive of an intent stands (`pinkeeper list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveState {
    /// A file of the images directory provides the image.
    Present,
    /// A file provided it and none does any more.
    Gone,
    /// No file ever provided it (pulled, or pinned by an operator).
    None,
    /// The images directory has not been read yet.
    Unknown,
}

impl ArchiveState {
    /// The word `pinkeeper list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveState::Present => "present",
            ArchiveState::Gone => "gone",
            ArchiveState::None => "none",
            ArchiveState::Unknown => "unknown",
        }
    }
}

/// An intent as an operator sees it: the ledger's record and what pinkeeper knows now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentView {
    /// The ledger's record.
    pub intent: Intent,
    /// Its archive.
    pub archive: ArchiveState,
    /// The record carries `io.cri-containerd.pinned=pinned` (as last seen).
    pub pinned_now: bool,
    /// The record exists (as last seen).
    pub exists: bool,
}

impl IntentView {
    /// An intent held and its image unpinned or gone: kubelet's GC may delete it.
    pub fn at_risk(&self) -> bool {
        at_risk(self.intent.state, self.pinned_now, self.exists)
    }
}

fn at_risk(state: IntentState, pinned_now: bool, exists: bool) -> bool {
    state != IntentState::Released && !(pinned_now && exists)
}

/// The intents counted by state, and those at risk ([`IntentView::at_risk`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Intents held.
    pub held: usize,
    /// Intents swept.
    pub swept: usize,
    /// Intents released.
    pub released: usize,
    /// Intents not released whose image is unpinned or gone now.
    pub at_risk: usize,
}

/// What `pinkeeper status` shows of the intents, gathered without copying them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The intents by state, and how many are at risk.
    pub tally: Tally,
    /// The names at risk ([`IntentView::at_risk`]).
    pub at_risk: Vec<String>,
    /// Pins restored so far, over every intent.
    pub restores: u64,
    /// Intents not released whose archive is gone ([`ArchiveState::Gone`]).
    pub archives_gone: usize,
}

/// Which pins a label map carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pins {
    program: bool,
    cri: bool,
}

impl Pins {
    fn any(self) -> bool {
        self.program || self.cri
    }
}

/// A sweep in progress.
#[derive(Debug, Default, Clone)]
struct Episode {
    summary: SweepSummary,
    /// Images swept in this episode and not yet settled one way or another.
    open: BTreeSet<String>,
}

/// The engine. See the module documentation. A clone answers "what if" (`pinkeeper reconcile
/// --dry-run`) without touching the original.
#[derive(Debug, Clone)]
pub struct Engine {
    config: Config,
    /// Every intent, released ones included, by image name.
    intents: BTreeMap<String, Intent>,
    /// Image name -> providing file, from the last inventory; `None` before the first one,
    /// when no archive can be called gone.
    provided: Option<BTreeMap<String, PathBuf>>,
    /// Digest -> providing file for the provided names whose digest is known: K3s's aliases
    /// (`repo@digest`, extra registries) share the target of the image they alias, so they
    /// belong to the same archive. Rebuilt lazily.
    provided_digests: Option<HashMap<String, PathBuf>>,
    /// Digest -> K3s's aliases (`name@digest`) of that digest whose file was not known when
    /// their digest was: the answers to concurrent Gets come in any order, so an alias can
    /// learn its digest before the name it aliases does. They learn their file when that name
    /// learns its digest ([`Engine::tie_aliases`]); stale entries are checked then.
    untied_aliases: HashMap<String, BTreeSet<String>>,
    /// Names whose record was deleted, with the time their intent is released unless a create
    /// comes first (alias churn).
    deleted: BTreeMap<String, Millis>,
    /// Pins written and not yet answered, with why: never write the same pin twice at once.
    pins_in_flight: BTreeMap<String, RestoreReason>,
    /// Intents whose CRI pin an event says was removed (not by the sweep): released once a Get
    /// confirms it.
    unpins_to_confirm: BTreeSet<String>,
    /// Held intents an event showed losing K3s's label but keeping the CRI pin, which K3s never
    /// does: most likely a late delivery of pinkeeper's own restore. A Get tells.
    labels_to_confirm: BTreeSet<String>,
    /// Swept images whose archive is still present: K3s should re-pin them; checked at verify.
    awaiting_k3s: BTreeSet<String>,
    /// When the verification of a start-up is due.
    verify_due: Option<Millis>,
    /// Latest time a verification may be put off to.
    verify_deadline: Option<Millis>,
    /// A verification was asked for and its listing has not come yet.
    verify_in_flight: bool,
    /// A verification listing is being applied: unpinned intents are restored, not deferred.
    verifying: bool,
    episode: Option<Episode>,
    /// Released intents to forget, by when ([`Engine::forget_at`]): the earliest is the head.
    forget: BTreeSet<(Millis, String)>,
}

impl Engine {
    /// Starts from the intents in the ledger.
    pub fn new(config: Config, intents: impl IntoIterator<Item = Intent>) -> Self {
        let intents: BTreeMap<String, Intent> =
            intents.into_iter().map(|i| (i.name.clone(), i)).collect();
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
            verifying: false,
            episode: None,
            forget: BTreeSet::new(),
        };
        // Those already past their retention go at the first tick, which `next_wakeup` asks
        // for at once (the engine has no clock to read here).
        let forget = engine
            .intents
            .values()
            .filter_map(|i| Some((engine.forget_at(i)?, i.name.clone())))
            .collect();
        engine.forget = forget;
        engine
    }

    /// When a released intent is forgotten: [`Config::retention`] after its release, and only
    /// while the labels it was last seen with carry no pin. Forgetting then changes no
    /// decision: a record seen again without a pin is ignored either way, and one seen with a
    /// pin is recorded either way (contract rule 1). One left with K3s's label (an operator
    /// removed only the CRI pin) is kept until its record is gone, or it would be recorded and
    /// released again at every listing.
    fn forget_at(&self, intent: &Intent) -> Option<Millis> {
        (intent.state == IntentState::Released && !self.pins(&intent.labels).any())
            .then(|| intent.since.saturating_add(self.config.retention))
    }

    /// Keeps [`Engine::forget`] in step after the intent `name` changed from `before`.
    fn reindex(&mut self, name: &str, before: Option<Millis>) {
        let after = self.intents.get(name).and_then(|i| self.forget_at(i));
        if before != after {
            if let Some(at) = before {
                self.forget.remove(&(at, name.to_string()));
            }
            if let Some(at) = after {
                self.forget.insert((at, name.to_string()));
            }
        }
    }

    /// The forget time of the intent `name` as it stands, for [`Engine::reindex`].
    fn forget_key(&self, name: &str) -> Option<Millis> {
        self.intents.get(name).and_then(|i| self.forget_at(i))
    }

    /// The intents, released ones included.
    pub fn intents(&self) -> impl Iterator<Item = &Intent> {
        self.intents.values()
    }

    /// One intent by name.
    pub fn intent(&self, name: &str) -> Option<&Intent> {
        self.intents.get(name)
    }

    /// One intent with what pinkeeper knows of it now.
    pub fn view(&mut self, name: &str) -> Option<IntentView> {
        let intent = self.intents.get(name)?.clone();
        let read = self.provided.is_some();
        let archive = match (read, self.source_of(name)) {
            (false, _) => ArchiveState::Unknown,
            (true, Some(_)) => ArchiveState::Present,
            (true, None) if intent.source.is_some() => ArchiveState::Gone,
            (true, None) => ArchiveState::None,
        };
        let exists = self.exists(name, &intent);
        Some(IntentView {
            pinned_now: self.pins(&intent.labels).cri,
            exists,
            archive,
            intent,
        })
    }

    /// Whether the image record of an intent exists (as last seen).
    fn exists(&self, name: &str, intent: &Intent) -> bool {
        !self.deleted.contains_key(name) && intent.released_because.as_deref() != Some(DELETED)
    }

    /// What counting [`Engine::views`] gives, without building them: no copy, no archive
    /// lookup (the daemon's metrics, with 10,000 intents, several times a minute).
    pub fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        for (name, intent) in &self.intents {
            match intent.state {
                IntentState::Held => tally.held += 1,
                IntentState::Swept => tally.swept += 1,
                IntentState::Released => tally.released += 1,
            }
            let pinned_now = self.pins(&intent.labels).cri;
            if at_risk(intent.state, pinned_now, self.exists(name, intent)) {
                tally.at_risk += 1;
            }
        }
        tally
    }

    /// Every intent (released ones included) with what pinkeeper knows of it now.
    pub fn views(&mut self) -> Vec<IntentView> {
        self.views_of(|_| true)
    }

    /// The intents `keep` accepts, with what pinkeeper knows of them now: only those are
    /// copied and have their archive looked up.
    pub fn views_of(&mut self, keep: impl Fn(&Intent) -> bool) -> Vec<IntentView> {
        let names: Vec<String> = self
            .intents
            .values()
            .filter(|i| keep(i))
            .map(|i| i.name.clone())
            .collect();
        names.iter().filter_map(|n| self.view(n)).collect()
    }

    /// [`Engine::tally`] with the names at risk, the pins restored and the archives gone.
    pub fn summary(&mut self) -> Summary {
        let tally = self.tally();
        let mut summary = Summary {
            tally,
            ..Summary::default()
        };
        let mut had_archive = Vec::new();
        for (name, intent) in &self.intents {
            summary.restores += u64::from(intent.restores);
            if intent.state == IntentState::Released {
                continue;
            }
            if at_risk(
                intent.state,
                self.pins(&intent.labels).cri,
                self.exists(name, intent),
            ) {
                summary.at_risk.push(name.clone());
            }
            if intent.source.is_some() {
                had_archive.push(name.clone());
            }
        }
        if self.provided.is_some() {
            summary.archives_gone = had_archive
                .iter()
                .filter(|n| self.source_of(n).is_none())
                .count();
        }
        summary
    }

    /// The file of the images directory that provides `name` now (by name, or by digest for
    /// K3s's aliases), if the directory was read.
    pub fn archive_of(&mut self, name: &str) -> Option<PathBuf> {
        self.source_of(name)
    }

    /// Whether a start-up verification is due or asked for and not yet applied.
    pub fn verification_pending(&self) -> bool {
        self.verify_due.is_some() || self.verify_in_flight
    }

    /// The engine's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the engine next needs an [`Input::Tick`], if ever.
    pub fn next_wakeup(&self) -> Option<Millis> {
        let churn = self.deleted.values().min().copied();
        let forget = self.forget.first().map(|(at, _)| *at);
        [churn, self.verify_due, forget].into_iter().flatten().min()
    }

    /// Feeds one observation made at `now`; returns what to do.
    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Event(event) => self.on_event(now, event, &mut out),
            Input::Listing { images, cause } => self.on_listing(now, images, cause, &mut out),
            Input::Inventory(provided) => self.on_inventory(now, provided, &mut out),
            Input::Fetched { name, record } => {
                let record = record.filter(|r| r.name == name);
                self.on_fetched(now, &name, record, &mut out)
            }
            Input::Pinned { name, result } => self.on_pinned(now, name, result, &mut out),
            Input::Disconnected => {
                self.pins_in_flight.clear();
                self.labels_to_confirm.clear();
                self.verify_in_flight = false;
            }
            Input::Tick => self.on_tick(now, &mut out),
            Input::OperatorPin { record } => self.on_operator_pin(now, record, &mut out),
            Input::OperatorUnpin { name, record } => {
                let record = record.filter(|r| r.name == name);
                self.on_operator_unpin(now, &name, record, &mut out)
            }
        }
        out
    }

    fn pins(&self, labels: &Labels) -> Pins {
        let has = |key: &str| labels.get(key).map(String::as_str) == Some(PINNED);
        Pins {
            program: has(&self.config.program_label),
            cri: has(CRI_PIN),
        }
    }

    fn on_event(&mut self, now: Millis, event: ImageEvent, out: &mut Vec<Output>) {
        self.note_activity(now);
        match event.kind {
            EventKind::Delete => {
                if self.holds(&event.name) {
                    // Released at `churn_window` unless K3s creates it again (forceCreateTag).
                    self.deleted
                        .entry(event.name.clone())
                        .or_insert(now + self.config.churn_window);
                    // A delete may be delivered after the create that followed it (FACTS.md
                    // section 3): a Get tells.
                    out.push(Output::Fetch { name: event.name });
                } else {
                    self.record_gone(&event.name, out);
                }
            }
            EventKind::Create => {
                let recreated = self.deleted.remove(&event.name).is_some();
                if recreated && !self.pins(&event.labels).any() {
                    // K3s re-creates its aliases with both pins; this is someone else's record.
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
                    out.push(Output::Fetch { name: event.name });
                }
            }
            EventKind::Update => {
                self.observe(now, &event.name, event.labels, None, out);
            }
        }
    }

    /// True while an intent holds for `name` (not released).
    fn holds(&self, name: &str) -> bool {
        self.intents
            .get(name)
            .is_some_and(|i| i.state != IntentState::Released)
    }

    /// Applies the labels now seen on `name`: from an event (`listed` is `None`) or from a
    /// listing (`Some(digest)`, the record's target digest if any). Returns true when the name
    /// holds an intent afterwards.
    fn observe(
        &mut self,
        now: Millis,
        name: &str,
        labels: Labels,
        listed: Option<Option<String>>,
        out: &mut Vec<Output>,
    ) -> bool {
        let live = listed.is_none();
        if let Some(Some(digest)) = &listed {
            if self.holds(name) {
                self.update_intent(name, out, |i| i.digest = Some(digest.clone()));
            }
        }
        let new = self.pins(&labels);
        let Some(intent) = self
            .intents
            .get(name)
            .filter(|i| i.state != IntentState::Released)
        else {
            // A released intent comes back only when the CRI pin is put on again (K3s
            // re-importing the archive, someone pinning it): K3s's label alone, as an operator
            // leaves it when removing the CRI pin, is no reason to undo the unpin.
            let before = self.intents.get(name).map(|i| self.pins(&i.labels));
            match before {
                None if new.cri => {
                    self.record(now, name, labels, listed.flatten(), Origin::SeenPinned, out)
                }
                None if new.program => {
                    let digest = listed.flatten();
                    self.record(now, name, labels.clone(), digest, Origin::SeenPinned, out);
                    self.release(now, name, K3S_LABEL_ONLY, Some(labels), out);
                }
                Some(old) if new.cri && !old.cri => {
                    self.record(now, name, labels, listed.flatten(), Origin::SeenPinned, out)
                }
                Some(old) if old != new => self.update_intent(name, out, |i| i.labels = labels),
                _ => {}
            }
            return false;
        };
        if self.unpins_to_confirm.contains(name) {
            if live {
                // Decided by the Get under way; later events must not read as a sweep.
                return true;
            }
            // A listing is as good as the Get: the unpin came first.
            self.unpins_to_confirm.remove(name);
            if !new.cri {
                self.release(now, name, UNPIN, Some(labels), out);
                return false;
            }
        }
        let old = self.pins(&intent.labels);
        let was_swept = intent.state == IntentState::Swept;
        let labels_changed = intent.labels != labels;
        if live && new.cri && old.program && !new.program && !was_swept {
            // K3s's label gone and the CRI pin kept: K3s never does that, and pinkeeper's own
            // restore (CRI pin only) delivered after K3s pinned the image again looks exactly
            // like it. Believed, it would make the next sweep read as an operator's unpin; the
            // record itself says which it is.
            if self.labels_to_confirm.insert(name.to_string()) {
                out.push(Output::Fetch {
                    name: name.to_string(),
                });
            }
            return true;
        }
        if new.cri {
            if was_swept && !self.pins_in_flight.contains_key(name) {
                self.awaiting_k3s.remove(name);
                if let Some(ep) = self.episode.as_mut() {
                    if ep.open.remove(name) {
                        ep.summary.repinned_by_k3s += 1;
                    }
                }
                self.history(now, name, "repinned", "pinned again by K3s's import", out);
            }
            self.update_intent(name, out, |i| {
                i.labels = labels;
                i.state = IntentState::Held;
            });
            return true;
        }
        // The CRI pin is absent now. K3s writes both pins at once and its sweep removes both,
        // so a record left with K3s's label alone, or a pin pinkeeper restored (CRI pin only)
        // now gone, was unpinned by someone else: contract rule 6.
        if new.program || (old.cri && !old.program) {
            // An event may be a late or duplicate delivery (FACTS.md section 3): a live one is
            // confirmed with a Get before the intent is released.
            if live {
                self.unpins_to_confirm.insert(name.to_string());
                out.push(Output::Fetch {
                    name: name.to_string(),
                });
            } else {
                self.release(now, name, UNPIN, Some(labels), out);
            }
            return false;
        }
        if old.program && !was_swept {
            // The sweep's signature: both pins removed at once from an image with K3s's label.
            self.update_intent(name, out, |i| {
                i.labels = labels;
                i.state = IntentState::Swept;
            });
            let how = if live {
                "K3s's startup sweep removed both pins"
            } else {
                "both pins were removed while pinkeeper was not watching (a missed K3s sweep)"
            };
            self.history(now, name, "swept", how, out);
            let ep = self.episode.get_or_insert_with(|| Episode {
                summary: SweepSummary {
                    started: now,
                    seen_live: live,
                    ..SweepSummary::default()
                },
                ..Episode::default()
            });
            ep.summary.swept += 1;
            ep.open.insert(name.to_string());
            // The episode ends with a verification, whatever the archives.
            self.schedule_verify(now);
            self.settle(name, now, out);
        } else if labels_changed {
            self.update_intent(name, out, |i| i.labels = labels);
        }
        true
    }

    /// Decides what a swept (or otherwise unpinned) intent needs now: a restore at once when
    /// no file provides it, else a verification once the start-up has settled.
    fn settle(&mut self, name: &str, now: Millis, out: &mut Vec<Output>) {
        if self.pins_in_flight.contains_key(name) {
            return;
        }
        if !self.is_provided(name) {
            self.awaiting_k3s.remove(name);
            self.pin(name, RestoreReason::ArchiveGone, out);
        } else if self.verifying {
            self.awaiting_k3s.remove(name);
            self.pin(name, RestoreReason::NotRepinned, out);
        } else {
            self.awaiting_k3s.insert(name.to_string());
            self.schedule_verify(now);
        }
    }

    fn pin(&mut self, name: &str, reason: RestoreReason, out: &mut Vec<Output>) {
        if !self.pins_in_flight.contains_key(name) {
            self.pins_in_flight.insert(name.to_string(), reason);
            if let Some(ep) = self.episode.as_mut() {
                if ep.open.remove(name) {
                    match reason {
                        RestoreReason::ArchiveGone => ep.summary.restored_archive_gone += 1,
                        RestoreReason::NotRepinned => ep.summary.restored_not_repinned += 1,
                        RestoreReason::Operator => {}
                    }
                }
            }
            out.push(Output::Pin {
                name: name.to_string(),
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

    /// Any image event pushes a pending verification back: the burst is not over.
    fn note_activity(&mut self, now: Millis) {
        if self.verify_due.is_some() {
            self.schedule_verify(now);
        }
    }

    fn record(
        &mut self,
        now: Millis,
        name: &str,
        labels: Labels,
        digest: Option<String>,
        origin: Origin,
        out: &mut Vec<Output>,
    ) {
        let previous = self.intents.get(name);
        let mut intent = Intent {
            name: name.to_string(),
            digest: digest
                .clone()
                .or_else(|| previous.and_then(|p| p.digest.clone())),
            source: previous.and_then(|p| p.source.clone()),
            labels,
            state: IntentState::Held,
            origin,
            since: now,
            restores: previous.map_or(0, |p| p.restores),
            last_restored: previous.and_then(|p| p.last_restored),
            released_because: None,
        };
        let before = self.forget_key(name);
        self.intents.insert(name.to_string(), intent.clone());
        self.reindex(name, before);
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
        } else if intent.labels.contains_key(CRI_PIN) {
            "seen carrying io.cri-containerd.pinned=pinned"
        } else {
            "seen carrying K3s's pin label"
        };
        out.push(Output::Save { intent, new: true });
        self.history(now, name, "recorded", detail, out);
        if digest.is_none() {
            out.push(Output::Fetch {
                name: name.to_string(),
            });
        }
    }

    /// Releases the intent on `name`. `seen` is what the record carries now (none if it is
    /// gone): a released intent comes back only when a pin is put on again, so its labels must
    /// be the ones it was released with, not older ones (or K3s's next re-pin goes unnoticed).
    fn release(
        &mut self,
        now: Millis,
        name: &str,
        why: &str,
        seen: Option<Labels>,
        out: &mut Vec<Output>,
    ) {
        self.deleted.remove(name);
        self.awaiting_k3s.remove(name);
        if let Some(ep) = self.episode.as_mut() {
            ep.open.remove(name);
        }
        if !self.holds(name) {
            return;
        }
        self.update_intent(name, out, |i| {
            i.state = IntentState::Released;
            i.since = now;
            i.released_because = Some(why.to_string());
            if let Some(labels) = seen {
                i.labels = labels;
            }
        });
        self.history(now, name, "released", why, out);
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
                intent: intent.clone(),
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
        if name.rsplit_once('@').is_some_and(|(_, d)| d == digest) {
            if intent.source.is_none() {
                self.untied_aliases
                    .entry(digest)
                    .or_default()
                    .insert(name.to_string());
            }
            return;
        }
        let Some(source) = self.provided.as_ref().and_then(|p| p.get(name)).cloned() else {
            return;
        };
        let Some(aliases) = self.untied_aliases.remove(&digest) else {
            return;
        };
        for alias in aliases {
            let untied = self
                .intents
                .get(&alias)
                .is_some_and(|i| i.source.is_none() && i.digest.as_ref() == Some(&digest));
            if untied {
                let source = source.clone();
                self.update_intent(&alias, out, |i| i.source = Some(source));
            }
        }
    }

    fn history(&self, now: Millis, name: &str, action: &str, detail: &str, out: &mut Vec<Output>) {
        out.push(Output::History(HistoryEntry {
            at: now,
            name: name.to_string(),
            action: action.to_string(),
            detail: detail.to_string(),
        }));
    }

    /// Whether a file of the images directory provides `name`. True while no inventory is
    /// known yet: no archive is called gone before the directory was read.
    fn is_provided(&mut self, name: &str) -> bool {
        self.provided.is_none() || self.source_of(name).is_some()
    }

    /// The file that provides `name`: by name, or (for K3s's aliases) by sharing its digest
    /// with a provided name.
    fn source_of(&mut self, name: &str) -> Option<PathBuf> {
        let provided = self.provided.as_ref()?;
        if let Some(path) = provided.get(name) {
            return Some(path.clone());
        }
        let digest = self.intents.get(name)?.digest.as_ref()?;
        // Only K3s's own digest alias (`<repo>@<digest>`, FACTS.md section 2, import item 4)
        // belongs to the archive and is re-pinned by K3s with it. Any other name that only
        // shares the digest (another tag, an operator's `ctr tag`) is pinned by nobody after
        // the sweep: it is restored at once, not after the start-up settles.
        if name.rsplit_once('@').is_none_or(|(_, d)| d != digest) {
            return None;
        }
        let intents = &self.intents;
        let by_digest = self.provided_digests.get_or_insert_with(|| {
            provided
                .iter()
                .filter_map(|(n, path)| {
                    let d = intents.get(n)?.digest.clone()?;
                    Some((d, path.clone()))
                })
                .collect()
        });
        by_digest.get(digest).cloned()
    }

    fn on_inventory(
        &mut self,
        now: Millis,
        provided: BTreeMap<String, PathBuf>,
        out: &mut Vec<Output>,
    ) {
        // Held intents a file provided until now (none before the first inventory).
        let was_provided: BTreeSet<String> = if self.provided.is_some() {
            let held: Vec<String> = self
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
        let left_to_k3s: Vec<String> = match &self.episode {
            Some(ep) => self
                .awaiting_k3s
                .iter()
                .filter(|n| ep.open.contains(*n))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        for name in left_to_k3s {
            if self.source_of(&name).is_none() {
                self.settle(&name, now, out);
            }
        }
        let names: Vec<String> = self.intents.keys().cloned().collect();
        for name in names {
            if let Some(source) = self.source_of(&name) {
                self.update_intent(&name, out, |i| i.source = Some(source));
            } else if was_provided.contains(&name) {
                // Deleted while K3s runs: K3s unpins nothing now, its next start's sweep
                // will (FACTS.md section 2, item 7). The pin stays; `source` keeps the file.
                let file = self.intents[&name].source.as_ref().map_or_else(
                    || "its archive".to_string(),
                    |f| crate::escape::path(f).to_string(),
                );
                let detail = format!(
                    "archive of {name} is gone ({file}); its pin stays, and is restored when K3s's start-up sweep removes it"
                );
                self.history(now, &name, "archive-gone", &detail, out);
            }
        }
    }

    fn on_fetched(
        &mut self,
        now: Millis,
        name: &str,
        record: Option<ImageRecord>,
        out: &mut Vec<Output>,
    ) {
        let confirming = self.unpins_to_confirm.remove(name);
        let recheck = self.labels_to_confirm.remove(name) && !confirming;
        let Some(record) = record else {
            // Gone: its delete event (or the next listing) settles the intent.
            return;
        };
        if recheck && self.holds(name) {
            // What the record carries now, read as a listing reads it.
            self.observe(now, name, record.labels, Some(record.digest), out);
            return;
        }
        if self.pins(&record.labels).any() {
            // A delete delivered late: the record exists again, pinned. (Created again without
            // a pin, it is left to the create event or the churn window.)
            self.deleted.remove(name);
        }
        if record.digest.is_some() && self.holds(name) {
            self.update_intent(name, out, |i| i.digest = record.digest.clone());
        }
        if confirming {
            if self.pins(&record.labels).cri {
                // The unpin was a stale delivery: the record is pinned now.
                self.update_intent(name, out, |i| {
                    i.labels = record.labels;
                    i.state = IntentState::Held;
                });
            } else {
                self.release(now, name, UNPIN, Some(record.labels), out);
            }
        }
    }

    fn on_pinned(
        &mut self,
        now: Millis,
        name: String,
        result: Result<(), ApplyError>,
        out: &mut Vec<Output>,
    ) {
        let Some(reason) = self.pins_in_flight.remove(&name) else {
            return;
        };
        match result {
            Ok(()) if reason == RestoreReason::Operator => {
                self.update_intent(&name, out, |i| {
                    i.state = IntentState::Held;
                    i.labels.insert(CRI_PIN.to_string(), PINNED.to_string());
                });
                self.history(now, &name, "pinned", reason.explain(), out);
            }
            Ok(()) => {
                self.update_intent(&name, out, |i| {
                    i.state = IntentState::Held;
                    i.labels.insert(CRI_PIN.to_string(), PINNED.to_string());
                    i.restores += 1;
                    i.last_restored = Some(now);
                });
                self.history(now, &name, "restored", reason.explain(), out);
            }
            Err(ApplyError::NotFound) => {
                // The record went away meanwhile: its delete event settles the intent.
            }
            Err(ApplyError::Failed(why)) => {
                // Tried again at the next verification or the next connection's listing.
                self.awaiting_k3s.insert(name.clone());
                self.history(now, &name, "restore-failed", &why, out);
            }
        }
    }

    fn on_operator_pin(&mut self, now: Millis, record: ImageRecord, out: &mut Vec<Output>) {
        let name = record.name.clone();
        let pinned = self.pins(&record.labels).cri;
        self.deleted.remove(&name);
        self.unpins_to_confirm.remove(&name);
        if self.holds(&name) {
            self.update_intent(&name, out, |i| {
                i.origin = Origin::Operator;
                i.labels = record.labels;
                if record.digest.is_some() {
                    i.digest = record.digest;
                }
            });
            self.history(
                now,
                &name,
                "operator-pin",
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
            self.awaiting_k3s.remove(&name);
            self.pin(&name, RestoreReason::Operator, out);
        }
    }

    fn on_operator_unpin(
        &mut self,
        now: Millis,
        name: &str,
        record: Option<ImageRecord>,
        out: &mut Vec<Output>,
    ) {
        let pinned = record.as_ref().is_some_and(|r| self.pins(&r.labels).cri);
        // What the record carries once the unpin is done: its own event then changes nothing.
        let after = record.as_ref().map(|r| {
            let mut labels = r.labels.clone();
            labels.remove(CRI_PIN);
            labels
        });
        self.unpins_to_confirm.remove(name);
        if self.holds(name) {
            self.release(now, name, OPERATOR_UNPIN, after, out);
        } else if let Some(record) = record {
            // Never held (or released before): keep the decision, so that only a pin put on
            // again brings the intent back.
            let source = self.source_of(name);
            let previous = self.intents.get(name);
            let intent = Intent {
                name: name.to_string(),
                digest: record
                    .digest
                    .or_else(|| previous.and_then(|p| p.digest.clone())),
                source: source.or_else(|| previous.and_then(|p| p.source.clone())),
                labels: after.unwrap_or_default(),
                state: IntentState::Released,
                origin: previous.map_or(Origin::Operator, |p| p.origin),
                since: now,
                restores: previous.map_or(0, |p| p.restores),
                last_restored: previous.and_then(|p| p.last_restored),
                released_because: Some(OPERATOR_UNPIN.to_string()),
            };
            let before = self.forget_key(name);
            self.intents.insert(name.to_string(), intent.clone());
            self.reindex(name, before);
            self.provided_digests = None;
            out.push(Output::Save { intent, new: false });
            self.history(now, name, "released", OPERATOR_UNPIN, out);
        }
        if pinned {
            out.push(Output::Unpin {
                name: name.to_string(),
            });
        }
    }

    /// The record of a released intent is gone: what it showed is no longer there (so that
    /// the intent can be forgotten in time, [`Engine::forget_at`]).
    fn record_gone(&mut self, name: &str, out: &mut Vec<Output>) {
        if self
            .intents
            .get(name)
            .is_some_and(|i| i.state == IntentState::Released && !i.labels.is_empty())
        {
            self.update_intent(name, out, |i| i.labels.clear());
        }
    }

    /// Drops the released intents whose retention is over.
    fn forget_due(&mut self, now: Millis, out: &mut Vec<Output>) {
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
            // A released intent is in none of these; a late answer about it finds nothing.
            self.deleted.remove(&name);
            self.awaiting_k3s.remove(&name);
            self.unpins_to_confirm.remove(&name);
            self.labels_to_confirm.remove(&name);
            self.provided_digests = None;
            out.push(Output::Forget { name });
        }
    }

    fn on_tick(&mut self, now: Millis, out: &mut Vec<Output>) {
        self.forget_due(now, out);
        let due: Vec<String> = self
            .deleted
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            // The record is gone: whatever pin it shows next is a pin put on again.
            let gone = Some(Labels::new());
            self.release(now, &name, DELETED, gone, out);
        }
        if self.verify_due.is_some_and(|at| at <= now) && !self.verify_in_flight {
            self.verify_due = None;
            self.verify_deadline = None;
            self.verify_in_flight = true;
            out.push(Output::Verify);
        }
    }

    fn on_listing(
        &mut self,
        now: Millis,
        images: Vec<ImageRecord>,
        cause: ListCause,
        out: &mut Vec<Output>,
    ) {
        self.verifying = cause == ListCause::Verify;
        if self.verifying {
            self.verify_in_flight = false;
        }
        let mut seen = BTreeSet::new();
        for image in images {
            // A listing is as good as a Get.
            self.labels_to_confirm.remove(&image.name);
            seen.insert(image.name.clone());
            if self.deleted.remove(&image.name).is_some() && !self.pins(&image.labels).any() {
                self.release(
                    now,
                    &image.name,
                    "its record was deleted and created again without a pin",
                    Some(image.labels),
                    out,
                );
                continue;
            }
            self.observe(now, &image.name, image.labels, Some(image.digest), out);
        }
        // Records that are gone were deleted while pinkeeper was not watching. Released after
        // the churn window unless created again (K3s may be in the middle of re-tagging).
        let mut gone = Vec::new();
        for intent in self.intents.values() {
            if seen.contains(&intent.name) {
                continue;
            }
            if intent.state != IntentState::Released {
                self.deleted
                    .entry(intent.name.clone())
                    .or_insert(now + self.config.churn_window);
            } else if !intent.labels.is_empty() {
                gone.push(intent.name.clone());
            }
        }
        for name in gone {
            self.record_gone(&name, out);
        }
        // Swept intents that were waiting (for K3s, or from before pinkeeper restarted).
        let waiting: Vec<String> = self.awaiting_k3s.iter().cloned().collect();
        for name in waiting {
            let unpinned = self
                .intents
                .get(&name)
                .is_some_and(|i| i.state != IntentState::Released && !self.pins(&i.labels).cri);
            if unpinned && seen.contains(&name) {
                self.settle(&name, now, out);
            } else {
                self.awaiting_k3s.remove(&name);
            }
        }
        if self.verifying && self.verify_due.is_none() {
            if let Some(ep) = self.episode.take() {
                out.push(Output::SweepSummary(ep.summary));
            }
        }
        self.verifying = false;
    }
}

#[cfg(test)]
mod tests;
