//! The engine's vocabulary: the clocks, the labels, its tunables, its inputs and outputs, and
//! the ledger's records.

use std::borrow::Cow;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Digest, Name, Provided};

/// Milliseconds, as given by the caller: of the wall clock (since the Unix epoch) or of a
/// monotonic clock (any origin), as each use says. The engine never reads a clock.
pub type Millis = u64;

/// The instant of an input, on both clocks ([`Engine::handle`]).
///
/// Every timer of the engine (the alias-churn window, the verification after a start-up, the
/// retention of released intents) runs on `mono`, and [`Engine::next_wakeup`] answers in it, so
/// that a step of the wall clock (NTP setting the time of a node without a real-time clock, by
/// years, during K3s's start-up) neither fires them early nor puts them off. `wall` is only
/// shown or stored: [`HistoryEntry::at`], [`Intent::since`], [`Intent::last_restored`],
/// [`SweepSummary::started`].
///
/// [`Engine::handle`]: super::Engine::handle
/// [`Engine::next_wakeup`]: super::Engine::next_wakeup
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock: any origin, never stepped (the daemon: `std::time::Instant` since
    /// it started).
    pub mono: Millis,
    /// The wall clock, milliseconds since the Unix epoch.
    pub wall: Millis,
}

impl From<Millis> for Now {
    /// The same value on both clocks (tests, replays: a wall clock that is never stepped).
    fn from(ms: Millis) -> Self {
        Now { mono: ms, wall: ms }
    }
}

use super::labels::Labels;

/// containerd CRI's pin label (note the hyphen; FACTS.md section 1). The only label pinkeeper
/// ever writes.
pub const CRI_PIN: &str = "io.cri-containerd.pinned";
/// The value both pin labels carry.
pub const PINNED: &str = "pinned";
/// K3s's own pin label (`io.cattle.<program>.pinned`). Never written by pinkeeper: an image
/// carrying it is enrolled in K3s's next sweep (FACTS.md section 2).
pub const K3S_PIN: &str = "io.cattle.k3s.pinned";

/// Which pins a label map carries ([`pins`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    /// K3s's (or RKE2's) own pin label, [`Config::program_label`].
    pub program: bool,
    /// CRI's pin, [`CRI_PIN`]: the one kubelet's image GC respects, and the only one
    /// pinkeeper writes.
    pub cri: bool,
}

impl Pins {
    /// Either pin.
    pub fn any(self) -> bool {
        self.program || self.cri
    }
}

/// The one rule for "is it pinned": which pins `labels` carries, K3s's read from
/// `program_label` ([`Config::program_label`]). A pin label counts only with the value
/// [`PINNED`]; look-alike keys (`io.cri.containerd.pinned`) and other values do nothing
/// (FACTS.md section 1).
pub fn pins(labels: &Labels, program_label: &str) -> Pins {
    Pins {
        program: carries(labels, program_label),
        cri: cri_pinned(labels),
    }
}

/// [`pins`]`(labels, _).cri`, for callers that need no program label: whether the label map
/// carries CRI's pin (`io.cri-containerd.pinned=pinned`).
pub fn cri_pinned(labels: &Labels) -> bool {
    carries(labels, CRI_PIN)
}

fn carries(labels: &Labels, key: &str) -> bool {
    labels.get(key).map(String::as_str) == Some(PINNED)
}

/// Tunables of the engine. Times are in milliseconds, counted on the monotonic clock.
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
    /// rules that look at what it was released with), counted on the monotonic clock from its
    /// release. Then it is forgotten ([`Output::Forget`]); its history stays. For a released
    /// intent read from the ledger, what is left of it at the first input is counted from
    /// [`Intent::since`] by the wall clock, clamped to `0..=retention` (a `since` in the future,
    /// written before the clock was stepped back, counts as a release just now).
    pub retention: Millis,
    /// The config's `keep` patterns (contract rule 9): an image whose name matches one is
    /// pinned whenever it appears and after every sweep, archive or not.
    pub keep: super::Keep,
}

/// [`Config::retention`] by default: an hour. Forgetting changes no decision
/// (`Engine::forget_at`), so this only says how long `pinkeeper list --all` and `status`
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
            keep: super::Keep::default(),
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
    /// What the images directory provides now: image name -> file (the first in import
    /// order).
    Inventory(Provided),
    /// The answer to an [`Output::Fetch`]: the record, or `None` if it is gone.
    Fetched {
        /// The name asked for.
        name: String,
        /// The record, if it exists.
        record: Option<ImageRecord>,
    },
    /// An [`Output::Fetch`] failed (containerd busy or going away): what it was to settle
    /// is settled by a listing instead, which is as good as a Get.
    FetchFailed {
        /// The name asked for.
        name: String,
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
    /// Time passed (see [`Engine::next_wakeup`](super::Engine::next_wakeup)).
    Tick,
    /// The config was read again (SIGHUP): these are the `keep` patterns now. Intents only a
    /// removed pattern held are released and their CRI pin removed; images a new pattern
    /// matches are found by a listing.
    Keep(super::Keep),
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
    /// A `keep` pattern of the config matches its name (contract rule 9).
    Policy,
}

impl RestoreReason {
    /// Its wire form (the same as serde's): `archive-gone`, `not-repinned`, `operator`; the
    /// metrics' `reason` label and `pinkeeper replay`'s output.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreReason::ArchiveGone => "archive-gone",
            RestoreReason::NotRepinned => "not-repinned",
            RestoreReason::Operator => "operator",
            RestoreReason::Policy => "policy",
        }
    }

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
            RestoreReason::Policy => "a keep pattern of the config matches its name",
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
        name: Name,
        /// Why.
        reason: RestoreReason,
    },
    /// Remove `io.cri-containerd.pinned` from the image with a per-key update (an operator's
    /// `pinkeeper unpin`). Its outcome needs no report: the record's next event or listing
    /// shows it.
    Unpin {
        /// The image.
        name: Name,
    },
    /// `Images.Get` the image (events carry no digest) and report back with [`Input::Fetched`].
    Fetch {
        /// The image.
        name: Name,
    },
    /// Rescan the images directory ([`Input::Inventory`]), then list all images
    /// ([`Input::Listing`] with [`ListCause::Verify`]).
    Verify,
    /// Write this ledger record. `new` is true when the intent did not exist (or was released)
    /// before: it must be durable before any [`Output::Pin`] of the same batch is applied.
    Save {
        /// The full record (boxed: outputs are many at once, and the others are small).
        intent: Box<Intent>,
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
        name: Name,
    },
    /// A sweep episode ended (after its verification): one log line for the operator.
    SweepSummary(SweepSummary),
    /// A durability barrier: every [`Output::Save`], [`Output::Forget`] and
    /// [`Output::History`] before this one (in this call and earlier ones) is on disk before
    /// any effect after it ([`Output::Pin`], [`Output::Unpin`]) is carried out. The engine
    /// emits it after recording or releasing an intent, and before an operator's unpin
    /// is answered or carried out; other changes may be written in the background.
    Commit,
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

impl IntentState {
    /// Its wire form (the same as serde's): `held`, `swept`, `released`; the control API's
    /// and the metrics' word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            IntentState::Held => "held",
            IntentState::Swept => "swept",
            IntentState::Released => "released",
        }
    }

    /// Held or swept: pinkeeper means to keep the image pinned (an intent not released).
    pub fn keeps_pinned(self) -> bool {
        self != IntentState::Released
    }
}

/// How an intent came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The record carried a pin label when pinkeeper saw it.
    SeenPinned,
    /// An operator ran `pinkeeper pin`.
    Operator,
    /// A `keep` pattern of the config matched its name, which had no CRI pin: pinkeeper put it
    /// on. Removing the pattern releases it ([`Input::Keep`]).
    Policy,
}

/// One image name pinkeeper means to keep pinned: the ledger's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The image name.
    pub name: Name,
    /// Target digest, from `Images.Get` or a listing.
    #[serde(default)]
    pub digest: Option<Digest>,
    /// The file of the images directory that provides (or last provided) the image: any
    /// bytes, stored losslessly (a string when UTF-8).
    #[serde(default, with = "crate::escape::path_bytes::option")]
    pub source: Option<PathBuf>,
    /// The pins last seen on the record (the rest of its labels decides nothing, so it is not
    /// kept: an intent costs a few hundred bytes, not a label map).
    #[serde(default)]
    pub pins: Pins,
    /// Ledgers before 0.x kept the record's whole label map instead of `pins`:
    /// [`Engine::new`] reads it into `pins` (it knows the program's label) and drops it.
    #[serde(default, rename = "labels", skip_serializing)]
    pub legacy_labels: Option<Box<Labels>>,
    /// Where the intent stands.
    pub state: IntentState,
    /// How it came to be.
    pub origin: Origin,
    /// When it was recorded (or last re-recorded after a release); for a released intent, when
    /// it was released (ledgers written before 0.x hold the time it was recorded). Wall clock:
    /// shown, and read back after a restart only to derive what is left of a release's
    /// retention ([`Config::retention`], clamped, so a clock step since moves no decision).
    pub since: Millis,
    /// How many times pinkeeper restored the pin.
    #[serde(default)]
    pub restores: u32,
    /// When pinkeeper last restored the pin (wall clock).
    #[serde(default)]
    pub last_restored: Option<Millis>,
    /// Why it was released, when it was.
    #[serde(default)]
    pub released_because: Option<String>,
    /// K3s has pinned this name (its label was seen on the record): K3s may import it again
    /// and sweep it, unseen while pinkeeper is away (ledgers before 0.x: false).
    #[serde(default)]
    pub k3s_pinned: bool,
}

#[cfg(test)]
impl Intent {
    /// An intent with nothing known but its name, state and origin (for the tests).
    pub(crate) fn bare(name: &str, state: IntentState, origin: Origin) -> Intent {
        Intent {
            name: name.into(),
            digest: None,
            source: None,
            pins: Pins::default(),
            legacy_labels: None,
            state,
            origin,
            since: 0,
            restores: 0,
            last_restored: None,
            released_because: None,
            k3s_pinned: false,
        }
    }
}

/// One line of the ledger's history: what pinkeeper decided and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When (wall clock).
    pub at: Millis,
    /// The image (shared with its intent: a repair of 100,000 writes 200,000 entries).
    pub name: Name,
    /// What happened.
    pub action: Action,
    /// Why, in words an operator understands. Most are fixed sentences, borrowed rather than
    /// copied: a reconcile of 10,000 images writes 20,000 entries at once.
    pub detail: Cow<'static, str>,
}

/// What a [`HistoryEntry`] says happened.
///
/// Its wire form, [`Action::as_str`] (`recorded`, `restore-failed`, ...), is what the ledger
/// stores, the control API sends, `pinkeeper history` and `replay` show, and the log's
/// `action=` field carries; serde reads and writes it as that string. A word this version does
/// not know (a ledger written by another version) reads as [`Action::Other`], kept as it was,
/// so an old or newer ledger stays readable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// An intent was recorded: the record was seen pinned, or an operator pinned it.
    Recorded,
    /// K3s's startup sweep removed the pins of an intent's image.
    Swept,
    /// pinkeeper restored the CRI pin of a swept image.
    Restored,
    /// Writing a pin failed; it is tried again.
    RestoreFailed,
    /// The intent was released (an operator's unpin, the record's deletion).
    Released,
    /// K3s's import pinned a swept image again.
    Repinned,
    /// pinkeeper set the CRI pin for an operator's `pinkeeper pin`.
    Pinned,
    /// No file of the images directory provides the image any more.
    ArchiveGone,
    /// An operator ran `pinkeeper pin` on an image already held.
    OperatorPin,
    /// The daemon repaired its ledger at start (written by the daemon, not the engine).
    LedgerRecovered,
    /// A word this version does not know, as stored.
    Other(String),
}

impl Action {
    const KNOWN: [Action; 10] = [
        Action::Recorded,
        Action::Swept,
        Action::Restored,
        Action::RestoreFailed,
        Action::Released,
        Action::Repinned,
        Action::Pinned,
        Action::ArchiveGone,
        Action::OperatorPin,
        Action::LedgerRecovered,
    ];

    /// The wire and display form.
    pub fn as_str(&self) -> &str {
        match self {
            Action::Recorded => "recorded",
            Action::Swept => "swept",
            Action::Restored => "restored",
            Action::RestoreFailed => "restore-failed",
            Action::Released => "released",
            Action::Repinned => "repinned",
            Action::Pinned => "pinned",
            Action::ArchiveGone => "archive-gone",
            Action::OperatorPin => "operator-pin",
            Action::LedgerRecovered => "ledger-recovered",
            Action::Other(word) => word,
        }
    }
}

impl From<&str> for Action {
    /// Never fails: a word not known is [`Action::Other`].
    fn from(word: &str) -> Self {
        Action::KNOWN
            .into_iter()
            .find(|a| a.as_str() == word)
            .unwrap_or_else(|| Action::Other(word.to_string()))
    }
}

impl std::str::FromStr for Action {
    type Err = std::convert::Infallible;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        Ok(Action::from(word))
    }
}

impl From<Action> for String {
    fn from(action: Action) -> Self {
        match action {
            Action::Other(word) => word,
            known => known.as_str().to_string(),
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let word = String::deserialize(deserializer)?;
        Ok(Action::from(word.as_str()))
    }
}

/// The outcome of one sweep episode, logged once when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepSummary {
    /// When the first swept image was seen (wall clock).
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
    /// Of those, restored because a `keep` pattern holds them (archive or not).
    #[serde(default)]
    pub restored_policy: usize,
}

impl SweepSummary {
    /// Restored by pinkeeper, whatever the reason.
    pub fn restored(&self) -> usize {
        self.restored_archive_gone + self.restored_not_repinned + self.restored_policy
    }

    /// `, N kept by policy` when there are any (the words of the log line, `status` and
    /// `pinkeeper replay`).
    pub fn policy_words(&self) -> String {
        if self.restored_policy == 0 {
            String::new()
        } else {
            format!(", {} kept by policy", self.restored_policy)
        }
    }
}
