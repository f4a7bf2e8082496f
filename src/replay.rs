//! Replaying image event streams through the engine, offline, against an in-memory containerd.
//!
//! A replay fixture is a JSON-lines file. Most lines are containerd event envelopes exactly as
//! `shared/fixtures/containerd-events/` records them (`timestamp`, `namespace`, `topic`,
//! `type_url`, `payload` with `name` and `labels`); the other lines are directives, one key
//! each (plus an optional `timestamp`):
//!
//! - on an envelope, `"deliver_only": true` delivers it without committing it (a duplicate or a
//!   late, reordered delivery) and `"store_only": true` commits it without delivering it;
//! - `{"images": {NAME: {"labels": {..}, "digest": ".."}}}`: the store's records now, without
//!   events: they replace every record (the state before the story starts, or what a listing
//!   found after a reconnection);
//! - `{"digests": {NAME: DIGEST}}`: target digests of records the events create;
//! - `{"files": {FILE: [NAME, ..]}}`: the images directory now (replaces the previous one);
//!   while connected, pinkeeper reads it at once (the daemon's watch of the directory);
//! - `{"connect": true}`: pinkeeper (re)subscribes: inventory, then a listing;
//! - `{"disconnect": true}`: the stream breaks; events until the next `connect` are missed;
//! - `{"restart": true}`: pinkeeper is killed and started again from its ledger (disconnected);
//! - `{"advance_ms": N}`: time passes, timers fire;
//! - `{"expect": {"labels": {NAME: {..} | null}, "intents": {NAME: "held"|"swept"|"released"|null},
//!   "pins_written": N}}`: assertions, checked by [`Replay::run`].
//!
//! The in-memory store ([`MemoryStore`]) commits each envelope as containerd did and delivers
//! it to the engine when connected; the daemon's own executor carries out the engine's outputs
//! against it (a pin is a per-key label update that publishes its own `/images/update`), and
//! the ledger is kept in memory ([`MemoryLedger`]).
//!
//! `pinkeeper record` (src/record.rs) writes such files from a live containerd; [`describe`] and
//! [`decision_json`] say what the engine decided, for `pinkeeper replay`.
//!
//! It owns no files and no sockets; the caller reads the fixture.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::daemon::executor::{run_ready, Executor, FixedClock};
use crate::engine::{
    Config, Engine, EventKind, HistoryEntry, ImageEvent, ImageRecord, Input, Intent, IntentState,
    Labels, ListCause, Millis, Name, Now, Output,
};
use crate::ledger::MemoryLedger;
use crate::store::{ImageStore, MemoryEvents, MemoryStore};

/// A failure while replaying: the line number (1-based) and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ReplayError {
    /// Line of the fixture.
    pub line: usize,
    /// What went wrong.
    pub message: String,
}

/// The engine and the executor wired to a [`MemoryStore`], with the ledger kept in memory.
#[derive(Debug)]
pub struct Replay {
    /// The engine, with the executor that carries out its outputs (the daemon's own).
    pub exec: Executor<MemoryLedger, FixedClock>,
    /// The fake containerd.
    pub store: MemoryStore,
    /// The subscription, while pinkeeper is connected.
    events: Option<MemoryEvents>,
    /// The images directory: file -> names.
    pub files: BTreeMap<String, Vec<String>>,
    /// Every output, in order, with when (for `pinkeeper replay` and debugging).
    pub decisions: Vec<(Now, Output)>,
    /// Current time, on the monotonic clock the engine's timers run on.
    pub now: Millis,
    /// The wall clock less the monotonic one: 0 unless a story steps the wall clock.
    pub wall_offset: i64,
    /// Pins written so far (name, time).
    pub pins_written: Vec<(Name, Millis)>,
}

impl Replay {
    /// A replay with an empty store, directory and ledger.
    pub fn new(config: Config) -> Self {
        let mut exec = Executor::new(
            Engine::new(config, []),
            MemoryLedger::immediate(),
            FixedClock::at(0),
        );
        exec.trace = Some(Vec::new());
        Replay {
            exec,
            store: MemoryStore::new(),
            events: None,
            files: BTreeMap::new(),
            decisions: Vec::new(),
            now: 0,
            wall_offset: 0,
            pins_written: Vec::new(),
        }
    }

    /// Now, on both clocks.
    pub fn clock(&self) -> Now {
        Now {
            mono: self.now,
            wall: (self.now as i64).saturating_add(self.wall_offset).max(0) as Millis,
        }
    }

    /// Whether pinkeeper is subscribed.
    pub fn connected(&self) -> bool {
        self.events.is_some()
    }

    /// The ledger's records, as the engine saved them.
    pub fn ledger(&self) -> &BTreeMap<Name, Intent> {
        &self.exec.journal.intents
    }

    /// The ledger's history.
    pub fn history(&self) -> &[HistoryEntry] {
        &self.exec.journal.history
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.exec.engine
    }

    fn provided(&self) -> BTreeMap<String, PathBuf> {
        let mut provided = BTreeMap::new();
        for (file, names) in &self.files {
            for name in names {
                provided
                    .entry(name.clone())
                    .or_insert_with(|| PathBuf::from(file));
            }
        }
        provided
    }

    /// Events committed since the last delivery (by the story's writes), taken from the
    /// subscription without delivering them; none while disconnected.
    pub fn take_published(&mut self) -> Vec<ImageEvent> {
        let mut taken = Vec::new();
        if let Some(events) = self.events.as_mut() {
            while let Some(Ok(event)) = events.try_next() {
                taken.push(event);
            }
        }
        taken
    }

    /// Feeds one input and carries out everything it leads to with the executor, like the
    /// daemon: a verification reads the directory and lists, and the events pinkeeper's own
    /// writes publish reach the engine next.
    pub fn feed(&mut self, input: Input) {
        let mut inputs = vec![input];
        while !inputs.is_empty() {
            self.exec.clock.set(self.clock());
            let store = self.events.is_some().then_some(&self.store);
            // The in-memory store and ledger answer every call at once.
            let report = run_ready(self.exec.process(store, std::mem::take(&mut inputs)))
                .unwrap_or_default();
            for (at, output) in self
                .exec
                .trace
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default()
            {
                if let Output::Pin { name, .. } = &output {
                    self.pins_written.push((name.clone(), at.mono));
                }
                self.decisions.push((at, output));
            }
            if report.verify && self.connected() {
                inputs.push(Input::Inventory(self.provided().into()));
                inputs.push(Input::Listing {
                    images: self.store.images().into_values().collect(),
                    cause: ListCause::Verify,
                });
            }
            inputs.extend(self.take_published().into_iter().map(Input::Event));
        }
    }

    /// Delivers everything published so far.
    pub fn deliver(&mut self) {
        for event in self.take_published() {
            self.feed(Input::Event(event));
        }
    }

    /// pinkeeper subscribes: inventory, then a full listing.
    pub fn connect(&mut self) {
        self.events = run_ready(self.store.subscribe()).and_then(Result::ok);
        self.feed(Input::Inventory(self.provided().into()));
        let images = self.store.images().into_values().collect();
        self.feed(Input::Listing {
            images,
            cause: ListCause::Connected,
        });
    }

    /// The stream breaks.
    pub fn disconnect(&mut self) {
        self.events = None;
        self.feed(Input::Disconnected);
    }

    /// pinkeeper is killed and starts again from what its ledger holds.
    pub fn restart(&mut self) {
        self.events = None;
        let config = self.exec.engine.config().clone();
        let intents = self.exec.journal.intents.values().cloned();
        self.exec.engine = Engine::new(config, intents);
    }

    /// Lets time pass to `until`, firing every timer on the way.
    pub fn advance_to(&mut self, until: Millis) {
        while let Some(at) = self.exec.engine.next_wakeup() {
            if at > until {
                break;
            }
            self.now = self.now.max(at);
            self.feed(Input::Tick);
        }
        self.now = self.now.max(until);
    }

    /// Lets time pass until no timer is pending (bounded).
    pub fn settle(&mut self) {
        for _ in 0..1000 {
            match self.exec.engine.next_wakeup() {
                Some(at) => self.advance_to(at.max(self.now)),
                None => return,
            }
        }
    }

    /// Runs a fixture; `expect` lines are checked as they come.
    pub fn run(&mut self, fixture: &str) -> Result<(), ReplayError> {
        for (index, text) in fixture.lines().enumerate() {
            let line = index + 1;
            let text = text.trim();
            if text.is_empty() || text.starts_with("//") {
                continue;
            }
            let parsed: Line = serde_json::from_str(text).map_err(|e| ReplayError {
                line,
                message: format!("not a replay line: {e}"),
            })?;
            self.step(parsed)
                .map_err(|message| ReplayError { line, message })?;
        }
        Ok(())
    }

    fn step(&mut self, line: Line) -> Result<(), String> {
        if let Some(ts) = &line.timestamp {
            let at = parse_timestamp(ts)?;
            self.advance_to(at);
        }
        if let Some(topic) = &line.topic {
            let payload = line.payload.unwrap_or_default();
            let kind = match topic.as_str() {
                "/images/create" => EventKind::Create,
                "/images/update" => EventKind::Update,
                "/images/delete" => EventKind::Delete,
                other => return Err(format!("unknown topic {other}")),
            };
            if line.namespace.as_deref().unwrap_or("k8s.io") != "k8s.io" {
                return Ok(());
            }
            let event = ImageEvent {
                kind,
                name: payload.name,
                labels: payload.labels,
            };
            if line.deliver_only == Some(true) {
                if self.connected() {
                    self.feed(Input::Event(event));
                }
            } else {
                self.store.apply(event);
                if line.store_only == Some(true) {
                    self.take_published();
                } else {
                    self.deliver();
                }
            }
        }
        if let Some(images) = line.images {
            // A listing: records it does not show are gone (deleted while disconnected).
            let records: Vec<ImageRecord> = images
                .into_iter()
                .map(|(name, record)| ImageRecord {
                    digest: record.digest.or_else(|| Some(self.store.digest_for(&name))),
                    name,
                    labels: record.labels,
                })
                .collect();
            self.store.replace_all(records);
        }
        for (name, digest) in line.digests.unwrap_or_default() {
            self.store.set_digest(&name, &digest);
        }
        if let Some(files) = line.files {
            self.files = files;
            if self.connected() {
                // The daemon reads the directory again as soon as its watch says it changed.
                self.feed(Input::Inventory(self.provided().into()));
            }
        }
        if line.restart == Some(true) {
            self.restart();
        }
        if line.disconnect == Some(true) {
            self.disconnect();
        }
        if line.connect == Some(true) {
            self.connect();
        }
        if let Some(ms) = line.advance_ms {
            self.advance_to(self.now + ms);
        }
        if let Some(expect) = line.expect {
            self.check(&expect)?;
        }
        Ok(())
    }

    /// Checks an `expect` directive against the store and the ledger.
    pub fn check(&self, expect: &Expect) -> Result<(), String> {
        let mut problems = Vec::new();
        for (name, want) in &expect.labels {
            let got = self.store.labels(name);
            if got != *want {
                problems.push(format!("labels of {name}: want {want:?}, got {got:?}"));
            }
        }
        for (name, want) in &expect.intents {
            let got = self.ledger().get(name.as_str()).map(|i| i.state);
            if got != *want {
                problems.push(format!("intent of {name}: want {want:?}, got {got:?}"));
            }
        }
        if let Some(want) = expect.pins_written {
            if want != self.pins_written.len() {
                problems.push(format!(
                    "pins written: want {want}, got {:?}",
                    self.pins_written
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// One fixture line: an envelope or a directive.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    timestamp: Option<String>,
    namespace: Option<String>,
    topic: Option<String>,
    #[allow(dead_code)]
    type_url: Option<String>,
    payload: Option<Payload>,
    /// The envelope reaches pinkeeper but changes nothing in the store (a duplicate or late
    /// delivery of an earlier commit).
    deliver_only: Option<bool>,
    /// The envelope's change is committed but its event is not delivered yet.
    store_only: Option<bool>,
    images: Option<BTreeMap<String, RecordLine>>,
    digests: Option<BTreeMap<String, String>>,
    files: Option<BTreeMap<String, Vec<String>>>,
    connect: Option<bool>,
    disconnect: Option<bool>,
    restart: Option<bool>,
    advance_ms: Option<u64>,
    expect: Option<Expect>,
}

#[derive(Debug, Default, Deserialize)]
struct Payload {
    name: String,
    #[serde(default)]
    labels: Labels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine {
    #[serde(default)]
    labels: Labels,
    digest: Option<String>,
}

/// Assertions of an `expect` line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Image -> exact labels (`null`: no such record).
    #[serde(default)]
    pub labels: BTreeMap<String, Option<Labels>>,
    /// Image -> intent state (`null`: no intent recorded).
    #[serde(default)]
    pub intents: BTreeMap<String, Option<IntentState>>,
    /// How many pins pinkeeper has written so far.
    #[serde(default)]
    pub pins_written: Option<usize>,
}

/// Parses an RFC 3339 timestamp (`2026-11-26T06:33:56.573199093Z`) to milliseconds.
pub fn parse_timestamp(text: &str) -> Result<Millis, String> {
    let bad =
        || format!("bad timestamp {text:?}: want RFC 3339 in UTC, like 2026-11-26T06:33:56.573Z");
    let at: jiff::Timestamp = text.parse().map_err(|_| bad())?;
    u64::try_from(at.as_millisecond()).map_err(|_| bad())
}

/// Formats a time as RFC 3339 in UTC with nanoseconds (`2026-11-26T06:33:56.573199093Z`), as
/// containerd's envelopes carry it; [`parse_timestamp`] reads it back.
pub fn format_timestamp(at: SystemTime) -> String {
    let at = jiff::Timestamp::try_from(at.max(UNIX_EPOCH)).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!("{at:.9}")
}

/// Formats the engine's milliseconds as RFC 3339 in UTC (`2026-11-26T06:33:56.573Z`); a time
/// past the year 9999 as the milliseconds themselves.
pub fn format_millis(at: Millis) -> String {
    match i64::try_from(at).map(jiff::Timestamp::from_millisecond) {
        Ok(Ok(at)) => format!("{at:.3}"),
        _ => format!("{at} ms since the epoch"),
    }
}

/// One decision of the engine as a line for an operator (`pinkeeper replay`), starting with
/// its time. `None` for bookkeeping (ledger saves, `Images.Get`s): the history entries that
/// come with them say what changed.
pub fn describe(at: Millis, output: &Output) -> Option<String> {
    let at = format_millis(at);
    Some(match output {
        Output::Pin { name, reason } => {
            format!(
                "{at} pin {name} ({}: {})",
                reason.as_str(),
                reason.explain()
            )
        }
        Output::Unpin { name } => format!("{at} unpin {name} (an operator ran `pinkeeper unpin`)"),
        Output::History(h) => format!("{at} {} {}: {}", h.action, h.name, h.detail),
        Output::Verify => format!(
            "{at} verify: the start-up settled; reading the images directory and listing every \
             image to check K3s pinned again what it should have"
        ),
        Output::SweepSummary(s) => format!(
            "{at} sweep: {} pinned image(s) swept ({}), {} restored by pinkeeper ({} archive \
             gone, {} not re-pinned{}), {} pinned again by K3s",
            s.swept,
            if s.seen_live {
                "seen live"
            } else {
                "found after reconnecting"
            },
            s.restored(),
            s.restored_archive_gone,
            s.restored_not_repinned,
            s.policy_words(),
            s.repinned_by_k3s
        ),
        Output::Fetch { .. } | Output::Save { .. } | Output::Forget { .. } | Output::Commit => {
            return None
        }
    })
}

/// The same decisions as [`describe`], as one JSON object each (`pinkeeper replay --json`):
/// `at` (RFC 3339), `at_ms`, `decision` (`pin`, `unpin`, `history`, `verify`, `sweep-summary`)
/// and the decision's fields.
pub fn decision_json(at: Millis, output: &Output) -> Option<serde_json::Value> {
    use serde_json::json;
    let time = format_millis(at);
    Some(match output {
        Output::Pin { name, reason } => json!({
            "at": time, "at_ms": at, "decision": "pin", "name": name,
            "reason": reason.as_str(), "explain": reason.explain(),
        }),
        Output::History(h) => json!({
            "at": time, "at_ms": at, "decision": "history", "action": h.action,
            "name": h.name, "detail": h.detail,
        }),
        Output::Unpin { name } => json!({
            "at": time, "at_ms": at, "decision": "unpin", "name": name,
        }),
        Output::Verify => json!({"at": time, "at_ms": at, "decision": "verify"}),
        Output::SweepSummary(s) => json!({
            "at": time, "at_ms": at, "decision": "sweep-summary", "started": s.started,
            "seen_live": s.seen_live, "swept": s.swept,
            "restored_archive_gone": s.restored_archive_gone,
            "restored_not_repinned": s.restored_not_repinned,
            "restored_policy": s.restored_policy,
            "repinned_by_k3s": s.repinned_by_k3s,
        }),
        Output::Fetch { .. } | Output::Save { .. } | Output::Forget { .. } | Output::Commit => {
            return None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Action, RestoreReason};
    use std::time::Duration;

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, 951_782_400_123, 1_795_674_836_573, 4_102_444_799_999] {
            let text = format_millis(ms);
            assert_eq!(parse_timestamp(&text), Ok(ms), "{text}");
            let at = UNIX_EPOCH + Duration::from_millis(ms) + Duration::from_nanos(456);
            assert_eq!(parse_timestamp(&format_timestamp(at)), Ok(ms));
        }
        assert_eq!(format_millis(1_795_674_836_573), "2026-11-26T06:33:56.573Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn describes_decisions_in_words_and_json() {
        let pin = Output::Pin {
            name: "docker.io/library/x:1".into(),
            reason: RestoreReason::ArchiveGone,
        };
        let line = describe(1_795_674_836_573, &pin).unwrap_or_default();
        assert!(
            line.starts_with("2026-11-26T06:33:56.573Z pin docker.io/library/x:1 (archive-gone: "),
            "{line}"
        );
        let json = decision_json(0, &pin).unwrap_or_default();
        assert_eq!(json["decision"], "pin");
        assert_eq!(json["reason"], "archive-gone");
        let fetch = Output::Fetch { name: "x".into() };
        assert_eq!(describe(0, &fetch), None);
        assert_eq!(decision_json(0, &fetch), None);
    }

    #[test]
    fn a_listing_replaces_the_records_and_files_reach_a_connected_engine() {
        let mut replay = Replay::new(Config::default());
        let fixture = r#"
{"images": {"a:1": {"labels": {"io.cattle.k3s.pinned": "pinned", "io.cri-containerd.pinned": "pinned"}}, "b:1": {}}}
{"files": {"a.tar": ["a:1"]}}
{"connect": true}
{"files": {}}
{"images": {"a:1": {"labels": {"io.cattle.k3s.pinned": "pinned", "io.cri-containerd.pinned": "pinned"}}}}
"#;
        if let Err(e) = replay.run(fixture) {
            panic!("{e}");
        }
        assert!(replay.store.images().contains_key("a:1"));
        assert!(!replay.store.images().contains_key("b:1"));
        assert!(
            replay
                .history()
                .iter()
                .any(|h| h.action == Action::ArchiveGone),
            "{:?}",
            replay.history()
        );
    }
}
