//! Clock steps (issue 10, item 4): every timer runs on the monotonic clock, so stepping the
//! wall clock, forward or back, by seconds or years, moves no decision. Only the wall-clock
//! times shown or stored (history, `since`, `last_restored`, a sweep's start) follow it.

use std::path::PathBuf;

use proptest::prelude::*;

use super::*;
use crate::replay::Replay;

const APP: &str = "docker.io/library/app:1";
const ALIAS: &str = "docker.io/library/app@sha256:aaaa";
const WEB: &str = "registry.example.com/team/web:2.3";
const OTHER: &str = "docker.io/library/other:7";
const NAMES: [&str; 4] = [APP, ALIAS, WEB, OTHER];

const SECOND: u64 = 1_000;
const YEAR: u64 = 365 * 24 * 3600 * SECOND;
/// A wall clock of 2026 (so that a step back by years stays after 1970).
const WALL: u64 = 56 * YEAR;

fn both() -> Labels {
    [K3S_PIN, CRI_PIN]
        .iter()
        .map(|k| (k.to_string(), PINNED.to_string()))
        .collect()
}

fn record(name: &str, labels: Labels) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        labels,
        digest: Some("sha256:aaaa".into()),
    }
}

fn update(name: &str, labels: Labels) -> Input {
    Input::Event(ImageEvent {
        kind: EventKind::Update,
        name: name.into(),
        labels,
    })
}

fn create(name: &str, labels: Labels) -> Input {
    Input::Event(ImageEvent {
        kind: EventKind::Create,
        name: name.into(),
        labels,
    })
}

fn delete(name: &str) -> Input {
    Input::Event(ImageEvent {
        kind: EventKind::Delete,
        name: name.into(),
        labels: Labels::new(),
    })
}

fn at(mono: Millis, wall: Millis) -> Now {
    Now { mono, wall }
}

/// What an output decides, with the wall-clock times it carries (history, `since`,
/// `last_restored`, a sweep's start) masked.
fn decision(output: &Output) -> Output {
    let mut output = output.clone();
    match &mut output {
        Output::History(entry) => entry.at = 0,
        Output::Save { intent, .. } => {
            intent.since = 0;
            intent.last_restored = intent.last_restored.map(|_| 0);
        }
        Output::SweepSummary(summary) => summary.started = 0,
        _ => {}
    }
    output
}

/// APP (provided by app.tar, both pins) and its alias ALIAS (both pins), seen at `now`.
fn engine_at(now: Now) -> Engine {
    let mut e = Engine::new(Config::default(), []);
    e.handle(
        now,
        Input::Inventory([(APP.to_string(), PathBuf::from("app.tar"))].into()),
    );
    e.handle(
        now,
        Input::Listing {
            images: vec![record(APP, both()), record(ALIAS, both())],
            cause: ListCause::Connected,
        },
    );
    e
}

/// A start-up burst: K3s sweeps APP (its file is there: a verification is due 3 s after the
/// burst's last event, at 4_002) and starts re-tagging ALIAS (deleted: released at 4_001 unless
/// created again).
fn burst(e: &mut Engine, now: impl Fn(Millis) -> Now) {
    assert_eq!(
        pins(&e.handle(now(1_000), update(APP, Labels::new()))),
        Vec::<String>::new()
    );
    e.handle(now(1_001), delete(ALIAS));
    // An event of the same burst (K3s importing another image) pushes the verification back.
    e.handle(now(1_002), update("busy", both()));
    assert_eq!(e.next_wakeup(), Some(4_001));
}

fn pins(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Pin { name, .. } => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_step_forward_of_five_years_in_a_burst_fires_nothing_early() {
    let mut e = engine_at(at(0, WALL));
    burst(&mut e, |ms| at(ms, WALL + ms));
    // NTP steps the wall clock 5 years forward, 500 ms after the burst.
    let jump = WALL + 5 * YEAR;
    let out = e.handle(at(1_500, jump + 1_500), Input::Tick);
    assert_eq!(out, [], "no verification, no release before their time");
    assert_eq!(e.next_wakeup(), Some(4_001));
    // K3s creates the alias again within the churn window (by the monotonic clock).
    e.handle(at(3_500, jump + 3_500), create(ALIAS, both()));
    assert_eq!(e.intent(ALIAS).unwrap().state, IntentState::Held);
    // Its event put the verification off to 3 s after it.
    assert_eq!(e.next_wakeup(), Some(6_500));
    assert_eq!(e.handle(at(6_499, jump + 6_499), Input::Tick), []);
    assert_eq!(
        e.handle(at(6_500, jump + 6_500), Input::Tick),
        [Output::Verify]
    );
    assert_eq!(e.intent(ALIAS).unwrap().state, IntentState::Held);
}

#[test]
fn a_step_back_of_a_year_postpones_nothing() {
    let mut e = engine_at(at(0, WALL));
    burst(&mut e, |ms| at(ms, WALL + ms));
    let back = WALL - YEAR;
    let out = super::tests::tick_gone(&mut e, at(4_001, back + 4_001));
    let released: Vec<&str> = out
        .iter()
        .filter_map(|o| match o {
            Output::History(h) if h.action == Action::Released => Some(h.name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(released, [ALIAS], "the churn window ends on time: {out:?}");
    // The history shows the wall clock as it is now.
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::History(h) if h.at == back + 4_001)));
    let out = e.handle(at(4_002, back + 4_002), Input::Tick);
    assert_eq!(out, [Output::Verify]);
}

#[test]
fn retention_runs_on_the_monotonic_clock() {
    let retention = Config::default().retention;
    let mut e = engine_at(at(0, WALL));
    e.handle(at(10, WALL + 10), delete(ALIAS));
    let gone = 10 + Config::default().churn_window;
    super::tests::tick_gone(&mut e, at(gone, WALL + gone));
    assert_eq!(e.intent(ALIAS).unwrap().state, IntentState::Released);
    assert_eq!(e.intent(ALIAS).unwrap().since, WALL + gone);
    // Ten years forward: still kept for its full retention.
    let later = WALL + 10 * YEAR;
    assert_eq!(e.handle(at(gone + 1, later), Input::Tick), []);
    assert_eq!(e.next_wakeup(), Some(gone + retention));
    let out = e.handle(at(gone + retention - 1, later), Input::Tick);
    assert_eq!(out, []);
    let out = e.handle(at(gone + retention, 0), Input::Tick);
    assert_eq!(out, [Output::Forget { name: ALIAS.into() }]);
}

fn released(name: &str, since: Millis) -> Intent {
    Intent {
        since,
        released_because: Some(DELETED.to_string()),
        ..Intent::bare(name, IntentState::Released, Origin::SeenPinned)
    }
}

#[test]
fn retention_of_intents_read_from_the_ledger_is_clamped_at_the_first_input() {
    let retention = Config::default().retention;
    let ledger = [
        released(APP, WALL - retention / 4),   // three quarters left
        released(WEB, WALL + YEAR),            // the future: the clock was stepped back
        released(OTHER, WALL - 3 * retention), // long over: forgotten at once
        released(ALIAS, WALL - retention),     // just over
    ];
    let mut e = Engine::new(Config::default(), ledger);
    assert_eq!(
        e.next_wakeup(),
        Some(0),
        "the first input starts the retention"
    );
    let mono = 77;
    e.handle(at(mono, WALL), Input::Inventory(Default::default()));
    assert_eq!(e.next_wakeup(), Some(mono));
    let out = e.handle(at(mono, WALL), Input::Tick);
    let forgotten: Vec<String> = out
        .iter()
        .filter_map(|o| match o {
            Output::Forget { name } => Some(name.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(forgotten, [ALIAS, OTHER]);
    assert_eq!(e.next_wakeup(), Some(mono + retention - retention / 4));
    let out = e.handle(at(mono + retention * 3 / 4, 0), Input::Tick);
    assert_eq!(out, [Output::Forget { name: APP.into() }]);
    assert_eq!(e.next_wakeup(), Some(mono + retention));
    let out = e.handle(at(mono + retention, 0), Input::Tick);
    assert_eq!(out, [Output::Forget { name: WEB.into() }]);
    assert_eq!(e.next_wakeup(), None);
}

/// One thing that happens in a story. Names and files are indexes into [`NAMES`].
#[derive(Debug, Clone)]
enum Act {
    /// K3s's sweep: both pins removed at once (whole-map write).
    Sweep(usize),
    /// K3s pins the name (creating its record if missing).
    K3sPin(usize),
    /// K3s re-tags an alias: delete, then create with both pins.
    Churn(usize),
    /// Someone deletes the record.
    Delete(usize),
    /// Someone removes the CRI pin (per-key, like `ctr`).
    Unpin(usize),
    /// `pinkeeper pin`.
    CliPin(usize),
    /// `pinkeeper unpin`.
    CliUnpin(usize),
    /// A file providing the name appears or disappears.
    ToggleFile(usize),
    /// pinkeeper subscribes again: inventory, then a listing.
    Reconnect,
    /// Time passes (the monotonic clock, and the wall clock with it), timers fire.
    Advance(u64),
    /// The wall clock alone is stepped (by NTP), by a signed amount: ignored by the run that
    /// keeps both clocks together.
    Step(i64),
}

/// The engine on the daemon's executor against an in-memory containerd ([`Replay`]).
struct Sim {
    replay: Replay,
    /// Whether `Act::Step` steps the wall clock.
    stepping: bool,
    /// Every decision (masked, [`decision`]) with its monotonic time, and every wakeup asked
    /// for, in order.
    log: Vec<String>,
    /// How many of the replay's decisions are in the log.
    logged: usize,
}

impl Sim {
    fn new(stepping: bool) -> Self {
        let retention = Config::default().retention;
        // The ledger after a restart: what it says is read at the first input, with both
        // clocks as the two runs share them then.
        let ledger = [
            released(WEB, WALL - retention / 2),
            released("docker.io/library/old:1", WALL - 2 * retention),
        ];
        let mut replay = Replay::new(Config::default());
        replay.exec.engine = Engine::new(Config::default(), ledger);
        replay.wall_offset = WALL as i64;
        replay.store.set_digest(APP, "sha256:aaaa");
        replay.store.put(record(APP, both()));
        replay.files = [("app.tar".to_string(), vec![APP.to_string()])].into();
        Sim {
            replay,
            stepping,
            log: Vec::new(),
            logged: 0,
        }
    }

    /// Logs the decisions made since the last call, and the wakeup asked for.
    fn note(&mut self) {
        for (at, output) in &self.replay.decisions[self.logged..] {
            self.log
                .push(format!("{}: {:?}", at.mono, decision(output)));
        }
        self.logged = self.replay.decisions.len();
        self.log
            .push(format!("wakeup {:?}", self.replay.engine().next_wakeup()));
    }

    fn feed(&mut self, input: Input) {
        self.replay.feed(input);
        self.note();
    }

    fn reconnect(&mut self) {
        self.replay.connect();
        self.note();
    }

    fn act(&mut self, act: &Act) {
        let name = |i: &usize| NAMES[i % NAMES.len()].to_string();
        let store = self.replay.store.clone();
        match act {
            Act::Sweep(i) => {
                let name = name(i);
                if let Some(mut labels) = store.labels(&name) {
                    labels.remove(K3S_PIN);
                    labels.remove(CRI_PIN);
                    store.replace_labels(&name, labels);
                }
            }
            Act::K3sPin(i) => {
                let name = name(i);
                if !store.replace_labels(&name, both()) {
                    store.apply(ImageEvent {
                        kind: EventKind::Create,
                        name,
                        labels: both(),
                    });
                }
            }
            Act::Churn(i) => {
                let name = name(i);
                store.delete(&name);
                self.replay.deliver();
                store.apply(ImageEvent {
                    kind: EventKind::Create,
                    name,
                    labels: both(),
                });
            }
            Act::Delete(i) => {
                store.delete(&name(i));
            }
            Act::Unpin(i) => {
                store.set_label(&name(i), CRI_PIN, "");
            }
            Act::CliPin(i) => {
                if let Some(record) = store.record(&name(i)) {
                    self.feed(Input::OperatorPin { record });
                }
            }
            Act::CliUnpin(i) => {
                let name = name(i);
                let record = store.record(&name);
                self.feed(Input::OperatorUnpin { name, record });
            }
            Act::ToggleFile(i) => {
                let name = name(i);
                let mut found = false;
                for names in self.replay.files.values_mut() {
                    let before = names.len();
                    names.retain(|n| *n != name);
                    found |= names.len() != before;
                }
                if !found {
                    self.replay
                        .files
                        .entry("some.tar".into())
                        .or_default()
                        .push(name);
                }
                let provided = self
                    .replay
                    .files
                    .iter()
                    .flat_map(|(file, names)| {
                        names.iter().map(move |n| (n.clone(), PathBuf::from(file)))
                    })
                    .collect();
                self.feed(Input::Inventory(provided));
            }
            Act::Reconnect => self.reconnect(),
            Act::Advance(ms) => {
                let until = self.replay.now + ms;
                self.replay.advance_to(until);
            }
            Act::Step(by) => {
                if self.stepping {
                    self.replay.wall_offset = self.replay.wall_offset.saturating_add(*by);
                }
            }
        }
        self.replay.deliver();
        self.note();
    }
}

fn act() -> impl Strategy<Value = Act> {
    let step = prop::sample::select(vec![
        SECOND,
        60 * SECOND,
        3_600 * SECOND,
        24 * 3_600 * SECOND,
        YEAR,
        5 * YEAR,
        30 * YEAR,
    ]);
    prop_oneof![
        3 => any::<usize>().prop_map(Act::Sweep),
        3 => any::<usize>().prop_map(Act::K3sPin),
        2 => any::<usize>().prop_map(Act::Churn),
        1 => any::<usize>().prop_map(Act::Delete),
        1 => any::<usize>().prop_map(Act::Unpin),
        1 => any::<usize>().prop_map(Act::CliPin),
        1 => any::<usize>().prop_map(Act::CliUnpin),
        1 => any::<usize>().prop_map(Act::ToggleFile),
        1 => Just(Act::Reconnect),
        3 => prop::sample::select(vec![100u64, 1_000, 2_999, 3_000, 6_000, 120_001])
            .prop_map(Act::Advance),
        1 => Just(Act::Advance(DEFAULT_RETENTION + 1)),
        3 => (step, any::<bool>()).prop_map(|(by, back)| {
            let by = by as i64;
            Act::Step(if back { -by } else { by })
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The same story, played with both clocks together and with the wall clock stepped
    /// forward and back (seconds to decades) at random points, gives the same decisions.
    #[test]
    fn stepping_the_wall_clock_moves_no_decision(
        acts in prop::collection::vec(act(), 1..60)
    ) {
        let play = |stepping: bool| {
            let mut sim = Sim::new(stepping);
            sim.reconnect();
            for act in &acts {
                sim.act(act);
            }
            sim.act(&Act::Advance(2 * DEFAULT_RETENTION));
            sim.log
        };
        let (steady, stepped) = (play(false), play(true));
        let same = steady.iter().zip(&stepped).take_while(|(a, b)| a == b).count();
        prop_assert!(
            steady == stepped,
            "decision {} differs:\n{:?}\nvs\n{:?}",
            same,
            steady.get(same..(same + 3).min(steady.len())),
            stepped.get(same..(same + 3).min(stepped.len())),
        );
    }
}
