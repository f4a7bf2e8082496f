//! pinkeeper's deterministic simulation (issue 10).
//!
//! One seed is one story of a node, played single-threaded on simulated time: K3s restarting
//! (its sweep, then its imports, with and without the `.cache.json` bug), an operator deleting,
//! restoring and half-copying archives, pinning and unpinning, CRI's own label updates, and
//! pinkeeper itself, with the faults a node throws at it: calls that fail, that time out, that
//! succeed after the caller gave up, that answer after later ones (with K3s's sweep going on
//! meanwhile), that never return (pinkeeper killed at that await); the
//! event stream cut with and without containerd restarting; events delayed, duplicated, or
//! lost across a reconnect; a full disk; a ledger lost, emptied or damaged; pinkeeper killed
//! between any two steps; the wall clock stepped by seconds to decades.
//!
//! pinkeeper here is the real engine, the daemon's real executor and operator calls
//! (`pinkeeper::daemon`), its event queue, against [`MemoryStore`] and a [`MemoryLedger`] that
//! keeps only what was made durable. The sequence of the daemon's loop (subscribe, read the
//! directory, list, then follow the stream; a verification reads the directory and lists) is
//! played by [`Sim::pinkeeper_step`].
//!
//! Three seeds in four have `keep` patterns in force (the pulled image, the names under
//! registry.local), and the config is read again now and then with others (SIGHUP).
//!
//! After every step it checks that pinkeeper never wrote K3s's label, never undid an
//! operator's `pinkeeper unpin`, and never carried out one of a kept image. At the end of each
//! round it heals every fault, lets pinkeeper connect and the start-up settle (a bounded
//! simulated time), and checks that no committed intent was lost, that every held intent
//! whose record exists carries the CRI pin, as does every record a pattern keeps, and that
//! the ledger and the engine agree.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use pinkeeper::containerd::queue::EventQueue;
use pinkeeper::daemon::executor::{self, run_ready, Executor, FixedClock, Inbox, Report};
use pinkeeper::daemon::operator;
use pinkeeper::engine::{
    self, cri_pinned, Engine, ImageRecord, Input, IntentState, ListCause, Millis, Now, CRI_PIN,
    K3S_PIN, PINNED,
};
use pinkeeper::ledger::{MemoryLedger, WriteFault};
use pinkeeper::store::memory::{Call, Fault};
use pinkeeper::store::{ImageStore, MemoryEvents, MemoryStore};
use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;

/// A file of the images directory and the image names it provides (all of one image).
struct Archive {
    file: &'static str,
    digest: &'static str,
    names: &'static [&'static str],
    /// A name K3s re-tags by deleting and creating it again at once (`forceCreateTag`).
    churned: Option<&'static str>,
}

const ARCHIVES: [Archive; 3] = [
    Archive {
        file: "app.tar",
        digest: "sha256:aaaa",
        names: &[
            "docker.io/library/app:1",
            "docker.io/library/app@sha256:aaaa",
        ],
        churned: None,
    },
    Archive {
        file: "sub/web.tar.zst",
        digest: "sha256:bbbb",
        names: &["registry.local/team/web:2"],
        churned: None,
    },
    Archive {
        file: "db.tar.gz",
        digest: "sha256:cccc",
        names: &["docker.io/library/db:3", "registry.local/db:3"],
        churned: Some("registry.local/db:3"),
    },
];

/// An image pulled through CRI (no archive), pinned only by an operator.
const PULLED: &str = "docker.io/library/pulled:1";
const PULLED_DIGEST: &str = "sha256:dddd";
/// The `keep` patterns a seed may have in force (contract rule 9): the pulled image, and every
/// name under registry.local (an archive's image, and the alias K3s re-tags).
const KEEP: [&str; 2] = ["docker.io/library/pulled:*", "registry.local/*"];
/// CRI's own bookkeeping label.
const CRI_MANAGED: &str = "io.cri-containerd.image";
const NAMESPACE: &str = "k8s.io";

/// How long after healing every check waits for pinkeeper: past the start-up's longest
/// settle, the alias-churn window and a verification.
fn bound(config: &engine::Config) -> Millis {
    config.settle_max + config.settle + config.churn_window + 10_000
}

/// How a seed is played.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds of chaos, each ended by a heal and a check.
    pub rounds: usize,
    /// Steps per round.
    pub steps: usize,
    /// Keep a line per step, printed with a failure.
    pub trace: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 3,
            steps: 60,
            trace: false,
        }
    }
}

/// What a seed did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Steps played.
    pub steps: u64,
    /// K3s starts (each with a sweep).
    pub k3s_starts: u64,
    /// pinkeeper killed (at a step or at an await).
    pub crashes: u64,
    /// Faults injected into calls and writes.
    pub faults: u64,
    /// Pins pinkeeper restored.
    pub restores: u64,
}

impl Outcome {
    /// Adds another seed's figures.
    pub fn add(&mut self, other: Outcome) {
        self.steps += other.steps;
        self.k3s_starts += other.k3s_starts;
        self.crashes += other.crashes;
        self.faults += other.faults;
        self.restores += other.restores;
    }
}

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// Which step of the story.
    pub step: u64,
    /// What broke.
    pub message: String,
    /// What happened, step by step (with [`Options::trace`]).
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} broke an invariant at step {}: {}",
            self.seed, self.step, self.message
        )?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay it: make simulate SEED={}", self.seed)
    }
}

/// Plays one seed.
pub fn run(seed: u64, options: &Options) -> Result<Outcome, Failure> {
    let mut sim = Sim::new(seed, options.trace);
    let result = (|| {
        for _ in 0..options.rounds {
            for _ in 0..options.steps {
                sim.step()?;
            }
            sim.heal_and_check()?;
        }
        Ok(())
    })();
    sim.outcome.faults = lock(&sim.faults).injected;
    match result {
        Ok(()) => Ok(sim.outcome),
        Err(message) => Err(Failure {
            seed,
            step: sim.outcome.steps,
            message,
            trace: sim.trace,
        }),
    }
}

/// The faults in force, shared with the store's and the ledger's injectors.
struct Faults {
    rng: XorShiftRng,
    /// Chance that a store call fails / is applied and answered with a failure / never
    /// returns.
    fail: f64,
    late: f64,
    hang: f64,
    /// The disk is full.
    full: bool,
    /// A durable write may never return (pinkeeper killed while committing).
    write_hang: f64,
    /// A call or write was told to hang: pinkeeper is killed there.
    hung: bool,
    injected: u64,
    /// Chance that a call that works answers only after others did (pins, Gets and events
    /// interleave in the executor), for the whole seed; drawn from its own generator, so a
    /// seed without it plays the story it played before.
    slow: f64,
    slow_rng: XorShiftRng,
}

impl Faults {
    fn call(&mut self, call: Call<'_>) -> Fault {
        let roll: f64 = self.rng.random();
        let fault = if roll < self.hang {
            Fault::Hang {
                applied: self.rng.random_bool(0.5),
            }
        } else if roll < self.hang + self.fail {
            Fault::Fail
        } else if roll < self.hang + self.fail + self.late && !matches!(call, Call::List) {
            Fault::AppliedThenFail
        } else if self.slow > 0.0 && self.slow_rng.random_bool(self.slow) {
            Fault::Slow {
                polls: self.slow_rng.random_range(1..=4),
            }
        } else {
            Fault::None
        };
        if !matches!(fault, Fault::None | Fault::Slow { .. }) {
            self.injected += 1;
        }
        if matches!(fault, Fault::Hang { .. }) {
            self.hung = true;
        }
        fault
    }

    fn write(&mut self) -> WriteFault {
        if self.full {
            self.injected += 1;
            return WriteFault::Full;
        }
        if self.rng.random::<f64>() < self.write_hang {
            self.injected += 1;
            self.hung = true;
            return WriteFault::Hang {
                applied: self.rng.random_bool(0.5),
            };
        }
        WriteFault::None
    }

    fn calm(&mut self) {
        self.fail = 0.0;
        self.late = 0.0;
        self.hang = 0.0;
        self.full = false;
        self.write_hang = 0.0;
    }
}

/// pinkeeper while it runs.
struct Node {
    exec: Executor<MemoryLedger, FixedClock>,
    /// The subscription, while connected.
    events: Option<MemoryEvents>,
    queue: EventQueue,
    /// A verification was asked for: read the directory and list at the next step.
    verify: bool,
}

/// The subscription and the queue as the executor's inbox, as the daemon's
/// (`src/daemon/mod.rs`): what the stream delivered, through the queue.
///
/// In a seed with slow calls, K3s's sweep also goes on while pinkeeper's calls are in flight:
/// before each take, the next step of K3s's start may run if it is a sweep.
struct StreamInbox<'a> {
    events: Option<&'a mut MemoryEvents>,
    queue: &'a mut EventQueue,
    broken: bool,
    sweeping: Option<Sweeping<'a>>,
}

/// K3s's sweep of one record (`clearLabels`): both pins removed by a whole-map update.
/// Whether the record exists.
fn k3s_sweep(store: &MemoryStore, k3s_labelled: &mut BTreeSet<String>, name: &str) -> bool {
    let Some(mut labels) = store.labels(name) else {
        return false;
    };
    labels.remove(K3S_PIN);
    labels.remove(CRI_PIN);
    store.replace_labels(name, labels);
    k3s_labelled.remove(name);
    true
}

/// What a sweep step in the middle of a drain needs of the world.
struct Sweeping<'a> {
    store: &'a MemoryStore,
    k3s: &'a mut std::collections::VecDeque<K3sOp>,
    k3s_labelled: &'a mut BTreeSet<String>,
    rng: &'a mut XorShiftRng,
    trace: Option<(&'a mut Vec<String>, Millis)>,
}

impl Sweeping<'_> {
    /// Runs K3s's next step if it is a sweep, half the time, as [`Sim::k3s_op`] would.
    fn maybe_sweep(&mut self) {
        if !matches!(self.k3s.front(), Some(K3sOp::Sweep(_))) || !self.rng.random_bool(0.5) {
            return;
        }
        let Some(K3sOp::Sweep(name)) = self.k3s.pop_front() else {
            return;
        };
        if k3s_sweep(self.store, self.k3s_labelled, &name) {
            if let Some((trace, mono)) = self.trace.as_mut() {
                trace.push(format!("t={mono} K3s sweeps {name} (calls in flight)"));
            }
        }
    }
}

impl Inbox for StreamInbox<'_> {
    fn take(&mut self) -> Vec<Input> {
        if let Some(sweeping) = self.sweeping.as_mut() {
            sweeping.maybe_sweep();
        }
        if let Some(events) = self.events.as_mut() {
            while !self.broken {
                match events.try_next() {
                    Some(Ok(event)) => {
                        self.queue.push(event, None);
                    }
                    Some(Err(_)) => self.broken = true,
                    None => break,
                }
            }
        }
        let events = self.queue.drain_up_to(executor::BATCH);
        events.into_iter().map(Input::Event).collect()
    }

    async fn ready(&mut self) {
        std::future::pending().await
    }
}

/// One step of K3s's start-up, in its order (FACTS.md section 2).
#[derive(Debug, Clone)]
enum K3sOp {
    /// The sweep's whole-map update of one pinned record (both pins removed).
    Sweep(String),
    /// Import (or, when `.cache.json` remembers it and the bug is fixed, label) one file.
    Import(usize),
}

/// The world and pinkeeper. See the module documentation.
pub struct Sim {
    rng: XorShiftRng,
    config: engine::Config,
    store: MemoryStore,
    faults: Arc<Mutex<Faults>>,
    /// The ledger while pinkeeper is down (else its executor holds it).
    ledger: Option<MemoryLedger>,
    node: Option<Node>,
    clock: FixedClock,
    mono: Millis,
    /// The wall clock less the monotonic one.
    offset: i64,
    /// Files of the images directory: `true` when whole, `false` while half-copied.
    files: BTreeMap<usize, bool>,
    /// Files K3s imported at an earlier start (what `.cache.json` remembers).
    imported: BTreeSet<usize>,
    k3s: std::collections::VecDeque<K3sOp>,
    /// K3s's start-up has the `.cache.json` bug (k3s-io/k3s#14265).
    cache_bug: bool,
    /// Names K3s pinned since their last sweep (the only names that may carry its label).
    k3s_labelled: BTreeSet<String>,
    /// Whether K3s's sweep steps in while pinkeeper's calls are in flight ([`Sweeping`]).
    interleave_rng: XorShiftRng,
    /// Names pinkeeper held (durably) at some point and that nothing has released on
    /// purpose since: they must still be held.
    must_hold: BTreeSet<String>,
    /// Names released on purpose (an operator's unpin, a deleted image, a lost ledger) and
    /// not pinned again since (by K3s or an operator): pinkeeper may let them go.
    let_go: BTreeSet<String>,
    /// The durable intent of each name when it was let go: still read back unchanged (its
    /// release not yet written, a full disk), it is no new commitment.
    stale: BTreeMap<String, engine::Intent>,
    /// Names whose history a lost ledger took: re-learned from a CRI pin alone, they cannot
    /// be told from an operator's `ctr` pin (rule 6 wins) until K3s or an operator pins them
    /// again.
    amnesia: BTreeSet<String>,
    /// Names an operator unpinned with `pinkeeper unpin` (answered) and nobody pinned since.
    unpinned: BTreeSet<String>,
    /// Draws the `keep` patterns of a seed and of its reloads, apart from the story's own
    /// generator.
    keep_rng: XorShiftRng,
    /// A broken invariant found inside a step (reported by the next check).
    broken: Option<String>,
    outcome: Outcome,
    trace: Vec<String>,
    tracing: bool,
}

fn world_rng(seed: u64, salt: u64) -> XorShiftRng {
    XorShiftRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt)
}

impl Sim {
    /// A node with every archive present, before anything was imported.
    pub fn new(seed: u64, tracing: bool) -> Self {
        let store = MemoryStore::new();
        for archive in &ARCHIVES {
            for name in archive.names {
                store.set_digest(name, archive.digest);
            }
        }
        store.set_digest(PULLED, PULLED_DIGEST);
        let faults = Arc::new(Mutex::new(Faults {
            rng: world_rng(seed, 1),
            fail: 0.0,
            late: 0.0,
            hang: 0.0,
            full: false,
            write_hang: 0.0,
            hung: false,
            injected: 0,
            slow: 0.0,
            slow_rng: world_rng(seed, 2),
        }));
        {
            let mut faults = lock(&faults);
            if faults.slow_rng.random_bool(0.5) {
                faults.slow = [0.2, 0.6][faults.slow_rng.random_range(0..2)];
            }
        }
        let shared = faults.clone();
        store.inject(move |call| lock(&shared).call(call));
        let mut rng = world_rng(seed, 0);
        let offset = rng.random_range(0..60 * 365 * 24 * 3_600_000i64);
        let mut keep_rng = world_rng(seed, 4);
        let config = engine::Config {
            keep: engine::Keep::new(&draw_keep(&mut keep_rng)),
            ..engine::Config::default()
        };
        let mut sim = Sim {
            rng,
            config,
            keep_rng,
            broken: None,
            store,
            faults,
            ledger: Some(MemoryLedger::default()),
            node: None,
            clock: FixedClock::at(0),
            mono: 0,
            offset,
            files: (0..ARCHIVES.len()).map(|i| (i, true)).collect(),
            imported: BTreeSet::new(),
            k3s: Default::default(),
            cache_bug: false,
            k3s_labelled: BTreeSet::new(),
            interleave_rng: world_rng(seed, 3),
            must_hold: BTreeSet::new(),
            let_go: BTreeSet::new(),
            stale: BTreeMap::new(),
            amnesia: BTreeSet::new(),
            unpinned: BTreeSet::new(),
            outcome: Outcome::default(),
            trace: Vec::new(),
            tracing,
        };
        sim.set_ledger_faults();
        // K3s's first start: everything imported and pinned, before or after pinkeeper.
        sim.k3s_start();
        sim
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        if self.tracing {
            let line = format!("t={} {}", self.mono, what());
            self.trace.push(line);
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.mono,
            wall: (self.mono as i64).saturating_add(self.offset).max(0) as Millis,
        }
    }

    fn set_ledger_faults(&mut self) {
        let shared = self.faults.clone();
        let ledger = match (&mut self.ledger, &mut self.node) {
            (Some(ledger), _) => ledger,
            (None, Some(node)) => &mut node.exec.journal,
            (None, None) => return,
        };
        ledger.inject(move || lock(&shared).write());
    }

    // --- the world ---

    /// Plays one step of chaos, then checks the invariants that hold at every step.
    fn step(&mut self) -> Result<(), String> {
        self.outcome.steps += 1;
        let roll = self.rng.random_range(0..100u32);
        match roll {
            0..=7 if self.k3s.is_empty() => self.k3s_restart(),
            0..=19 => self.k3s_op(),
            20..=23 => self.toggle_archive(),
            24..=25 => self.operator_pin(),
            26..=28 => self.operator_unpin(),
            29 => self.ctr_unpin(),
            30 => self.delete_image(),
            31..=32 => self.cri_pull_or_touch(),
            33..=35 => self.crash("between two steps"),
            36..=41 => self.change_faults(),
            42..=44 => self.release_events(),
            45..=46 => self.step_wall_clock(),
            47 if self.node.is_none() => self.damage_ledger(),
            48..=50 => self.flush_ledger(),
            51..=52 => self.containerd_restart(),
            53 => self.reload_keep(),
            _ => {}
        }
        self.advance_time();
        if self.rng.random_bool(0.8) {
            self.pinkeeper_step();
        }
        self.check_always()
    }

    fn advance_time(&mut self) {
        let dt = match self.rng.random_range(0..20u32) {
            0..=5 => 0,
            6..=10 => self.rng.random_range(1..200),
            11..=15 => self.rng.random_range(200..3_500),
            16..=18 => self.rng.random_range(3_500..20_000),
            _ => self.rng.random_range(20_000..200_000),
        };
        self.mono += dt;
    }

    /// K3s (and its containerd) restart: the stream breaks, then the start-up's calls follow
    /// as steps of their own.
    fn k3s_restart(&mut self) {
        self.containerd_restart();
        self.k3s_start();
    }

    fn k3s_start(&mut self) {
        self.outcome.k3s_starts += 1;
        self.cache_bug = self.rng.random_bool(0.3);
        // clearLabels: one List, then a whole-map update per pinned record.
        for record in self.store.images().into_values() {
            if record.labels.get(K3S_PIN).map(String::as_str) == Some(PINNED) {
                self.k3s.push_back(K3sOp::Sweep(record.name));
            }
        }
        for (&file, _) in self.files.iter() {
            self.k3s.push_back(K3sOp::Import(file));
        }
        let bug = self.cache_bug;
        self.note(|| format!("K3s starts (cache bug: {bug})"));
    }

    fn k3s_op(&mut self) {
        let Some(op) = self.k3s.pop_front() else {
            return;
        };
        match op {
            K3sOp::Sweep(name) => {
                if k3s_sweep(&self.store, &mut self.k3s_labelled, &name) {
                    self.note(|| format!("K3s sweeps {name}"));
                }
            }
            K3sOp::Import(file) => {
                // A file deleted or half-copied since the start began is not imported.
                if self.files.get(&file) != Some(&true) {
                    return;
                }
                let remembered = self.imported.contains(&file);
                if remembered && self.cache_bug {
                    self.note(|| format!("K3s skips {} (.cache.json bug)", ARCHIVES[file].file));
                    return;
                }
                let archive = &ARCHIVES[file];
                for name in archive.names {
                    let mut labels = self.store.labels(name).unwrap_or_default();
                    labels.insert(K3S_PIN.into(), PINNED.into());
                    labels.insert(CRI_PIN.into(), PINNED.into());
                    labels.insert(CRI_MANAGED.into(), "managed".into());
                    if archive.churned == Some(name) && !remembered {
                        self.store.delete(name);
                    }
                    // The import creates the record (a re-import keeps its labels), then K3s
                    // labels it (labelImages: a whole-map update).
                    if !self.store.replace_labels(name, labels.clone()) {
                        self.store.create(ImageRecord {
                            name: name.to_string(),
                            labels,
                            digest: Some(archive.digest.to_string()),
                        });
                    }
                    self.k3s_labelled.insert(name.to_string());
                    self.unpinned.remove(*name);
                    self.let_go.remove(*name);
                    self.amnesia.remove(*name);
                }
                self.imported.insert(file);
                self.note(|| format!("K3s imports {}", archive.file));
            }
        }
    }

    fn toggle_archive(&mut self) {
        let file = self.rng.random_range(0..ARCHIVES.len());
        let name = ARCHIVES[file].file;
        match (self.files.get(&file).copied(), self.rng.random_bool(0.5)) {
            (Some(true), true) => {
                self.files.remove(&file);
                self.note(|| format!("operator deletes {name}"));
            }
            (Some(true), false) => {
                self.files.insert(file, false);
                self.note(|| format!("{name} is being copied again (half there)"));
            }
            (Some(false), _) | (None, _) => {
                self.files.insert(file, true);
                self.note(|| format!("{name} is back, whole"));
            }
        }
        // The daemon's watch reads the directory again once the change settles.
        if self.rng.random_bool(0.7) {
            self.inventory();
        }
    }

    fn all_names() -> Vec<&'static str> {
        let mut names: Vec<&str> = ARCHIVES
            .iter()
            .flat_map(|a| a.names.iter().copied())
            .collect();
        names.push(PULLED);
        names
    }

    fn pick_name(&mut self) -> &'static str {
        let names = Self::all_names();
        names[self.rng.random_range(0..names.len())]
    }

    fn operator_pin(&mut self) {
        let name = self.pick_name();
        let Some(node) = self.node.as_mut().filter(|n| n.events.is_some()) else {
            return;
        };
        // The operator's latest wish is "pinned", whatever the answer (a pin may be applied
        // and answered with a failure).
        self.unpinned.remove(name);
        let call = operator::pin(&mut node.exec, &self.store, NAMESPACE, name);
        let done = run_ready(call);
        let Some((answer, report)) = done else {
            return self.crash("in `pinkeeper pin`");
        };
        self.after(report);
        if answer.is_ok() {
            self.let_go.remove(name);
            self.amnesia.remove(name);
        }
        let ok = answer.is_ok();
        self.note(|| format!("operator: pinkeeper pin {name} -> ok: {ok}"));
    }

    fn kept(&self, name: &str) -> bool {
        self.config.keep.matching(name).is_some()
    }

    /// The config is read again (SIGHUP) with other `keep` patterns; a restart reads them too.
    fn reload_keep(&mut self) {
        let keep = engine::Keep::new(&draw_keep(&mut self.keep_rng));
        let before = std::mem::replace(&mut self.config.keep, keep.clone());
        for name in Self::all_names() {
            let (was, is) = (before.matching(name).is_some(), self.kept(name));
            if was && !is {
                // What a removed pattern alone held may go.
                self.let_go(name);
            }
            if is {
                // The policy now decides over an operator's earlier unpin.
                self.unpinned.remove(name);
            }
        }
        let Some(node) = self.node.as_mut() else {
            return;
        };
        let store = node.events.is_some().then_some(&self.store);
        let call = node.exec.process(store, vec![Input::Keep(keep)]);
        let Some(report) = run_ready(call) else {
            return self.crash("in a reload");
        };
        self.after(report);
        let patterns = format!("{:?}", self.config.keep);
        self.note(|| format!("config reloaded: keep {patterns}"));
    }

    fn operator_unpin(&mut self) {
        let name = self.pick_name();
        if self.node.as_ref().is_none_or(|n| n.events.is_none()) {
            return;
        }
        let kept = self.kept(name);
        if !kept {
            // Released on purpose, whatever the answer.
            self.let_go(name);
        }
        let Some(node) = self.node.as_mut() else {
            return;
        };
        let call = operator::unpin(&mut node.exec, &self.store, NAMESPACE, name, false);
        let Some((answer, report)) = run_ready(call) else {
            return self.crash("in `pinkeeper unpin`");
        };
        self.after(report);
        let ok = answer.is_ok();
        if ok && kept {
            self.broken = Some(format!(
                "`pinkeeper unpin {name}` was carried out although a keep pattern holds it"
            ));
        }
        if ok {
            self.unpinned.insert(name.to_string());
        }
        self.note(|| format!("operator: pinkeeper unpin {name} -> ok: {ok}"));
    }

    fn ctr_unpin(&mut self) {
        let name = self.pick_name();
        if !self.kept(name) {
            // A kept image's pin is put back: pinkeeper holds it still.
            self.let_go(name);
        }
        self.store.set_label(name, CRI_PIN, "");
        self.note(|| format!("operator: ctr removes the CRI pin of {name}"));
    }

    fn delete_image(&mut self) {
        let name = self.pick_name();
        self.let_go(name);
        self.unpinned.remove(name);
        if self.store.delete(name) {
            self.k3s_labelled.remove(name);
            self.note(|| format!("operator deletes image {name}"));
        }
    }

    /// CRI pulls the pulled image, or writes its own bookkeeping label on a record.
    fn cri_pull_or_touch(&mut self) {
        if self.store.record(PULLED).is_none() {
            self.store.create(ImageRecord {
                name: PULLED.into(),
                labels: [(CRI_MANAGED.to_string(), "managed".to_string())].into(),
                digest: Some(PULLED_DIGEST.into()),
            });
            self.note(|| format!("CRI pulls {PULLED}"));
            return;
        }
        let name = self.pick_name();
        if let Some(mut labels) = self.store.labels(name) {
            labels.insert(CRI_MANAGED.into(), "managed".into());
            self.store.replace_labels(name, labels);
        }
    }

    fn containerd_restart(&mut self) {
        self.store.restart();
        self.note(|| "containerd restarts: the event stream breaks".into());
    }

    fn change_faults(&mut self) {
        let mut faults = lock(&self.faults);
        match self.rng.random_range(0..6u32) {
            0 => faults.calm(),
            1 => faults.fail = [0.0, 0.05, 0.3][self.rng.random_range(0..3)],
            2 => faults.late = [0.0, 0.05, 0.3][self.rng.random_range(0..3)],
            3 => faults.hang = [0.0, 0.01, 0.05][self.rng.random_range(0..3)],
            4 => faults.full = !faults.full,
            _ => faults.write_hang = [0.0, 0.02][self.rng.random_range(0..2)],
        }
        let (fail, late, hang, full) = (faults.fail, faults.late, faults.hang, faults.full);
        drop(faults);
        let holding = self.rng.random_bool(0.3);
        self.store.hold(holding);
        self.note(|| {
            format!("faults: fail {fail} late {late} hang {hang} disk full {full}; slow delivery {holding}")
        });
    }

    fn release_events(&mut self) {
        let count = self.rng.random_range(1..6);
        let duplicate = self.rng.random_bool(0.3);
        self.store.release(count, duplicate);
    }

    fn step_wall_clock(&mut self) {
        let magnitude = [
            1_000i64,
            60_000,
            3_600_000,
            86_400_000,
            31_536_000_000,
            946_080_000_000,
        ][self.rng.random_range(0..6)];
        let by = if self.rng.random_bool(0.5) {
            magnitude
        } else {
            -magnitude
        };
        self.offset = self.offset.saturating_add(by);
        self.note(|| format!("the wall clock steps by {by} ms"));
    }

    fn flush_ledger(&mut self) {
        if let Some(node) = self.node.as_mut() {
            node.exec.journal.flush();
        }
    }

    /// The ledger is lost, or comes back empty or unreadable (pinkeeper starts from nothing).
    fn damage_ledger(&mut self) {
        if let Some(ledger) = self.ledger.as_mut() {
            ledger.lose();
            for name in Self::all_names() {
                self.let_go(name);
                self.amnesia.insert(name.to_string());
            }
            self.note(|| "the ledger is lost (or found empty or damaged)".into());
        }
    }

    fn let_go(&mut self, name: &str) {
        self.must_hold.remove(name);
        self.let_go.insert(name.to_string());
        let durable = self.ledger_ref().and_then(|l| l.intents.get(name).cloned());
        match durable {
            Some(intent) => self.stale.insert(name.to_string(), intent),
            None => self.stale.remove(name),
        };
    }

    // --- pinkeeper ---

    /// pinkeeper is killed: what its ledger had not made durable is lost.
    fn crash(&mut self, where_: &str) {
        let Some(node) = self.node.take() else {
            return;
        };
        self.outcome.crashes += 1;
        let mut ledger = node.exec.journal;
        ledger.crash();
        // That K3s pinned a name is committed as soon as it is learned (an `Output::Commit`);
        // when that commit fails (a full disk, a hung write) the knowledge is lost with the
        // process: such a name, known from a CRI pin alone, cannot be told from an operator's
        // `ctr` pin until K3s or an operator pins it again (README: what it cannot protect
        // against).
        let owned = |i: &engine::Intent| i.k3s_pinned;
        let forgotten: Vec<String> = node
            .exec
            .engine
            .intents()
            .filter(|i| i.state != IntentState::Released && owned(i))
            .filter(|i| !ledger.intents.get(&i.name).is_some_and(owned))
            .map(|i| i.name.to_string())
            .collect();
        self.ledger = Some(ledger);
        for name in forgotten {
            self.let_go(&name);
            self.amnesia.insert(name);
        }
        lock(&self.faults).hung = false;
        self.note(|| format!("pinkeeper is killed {where_}"));
    }

    fn start(&mut self) {
        let Some(ledger) = self.ledger.take() else {
            return;
        };
        let engine = Engine::new(self.config.clone(), ledger.intents.values().cloned());
        let mut exec = Executor::new(engine, ledger, self.clock.clone());
        exec.keep_history = true;
        if self.tracing {
            exec.trace = Some(Vec::new());
        }
        self.node = Some(Node {
            exec,
            events: None,
            queue: EventQueue::new(K3S_PIN),
            verify: false,
        });
        self.note(|| "pinkeeper starts from its ledger".into());
    }

    fn provided(&self) -> BTreeMap<String, std::path::PathBuf> {
        let mut provided = BTreeMap::new();
        for (&file, &whole) in &self.files {
            if whole {
                for name in ARCHIVES[file].names {
                    provided.insert(name.to_string(), ARCHIVES[file].file.into());
                }
            }
        }
        provided
    }

    fn after(&mut self, report: Report) {
        self.outcome.restores += report.restored.len() as u64;
        if self.tracing {
            let outputs = self
                .node
                .as_mut()
                .and_then(|n| n.exec.trace.as_mut())
                .map(std::mem::take)
                .unwrap_or_default();
            for (_, output) in outputs {
                if !matches!(output, engine::Output::History(_)) {
                    let line = format!("t={}     output {output:?}", self.mono);
                    self.trace.push(line);
                }
            }
            for h in &report.history {
                let line = format!(
                    "t={}   pinkeeper: {} {}: {}",
                    self.mono, h.action, h.name, h.detail
                );
                self.trace.push(line);
            }
        }
        if report.verify {
            if let Some(node) = self.node.as_mut() {
                node.verify = true;
            }
        }
    }

    /// Feeds inputs through the executor; a call that never returns kills pinkeeper there.
    fn process(&mut self, inputs: Vec<Input>) {
        self.clock.set(self.now());
        let Some(node) = self.node.as_mut() else {
            return;
        };
        let store = node.events.is_some().then_some(&self.store);
        match run_ready(node.exec.process(store, inputs)) {
            Some(report) => self.after(report),
            None => self.crash("at an await"),
        }
    }

    fn inventory(&mut self) {
        let provided = self.provided();
        self.process(vec![Input::Inventory(provided.into())]);
    }

    /// Lists and reconciles (the daemon's `list`), taking the stream's events while the
    /// listing's calls run, as the daemon does; a failed listing is said and the stream
    /// breaks too.
    fn resync(&mut self, cause: ListCause) {
        self.clock.set(self.now());
        let Some(node) = self.node.as_mut() else {
            return;
        };
        // A broken stream stays broken: the next step's drain sees it.
        let slow = lock(&self.faults).slow > 0.0;
        let mut inbox = StreamInbox {
            events: node.events.as_mut(),
            queue: &mut node.queue,
            broken: false,
            sweeping: slow.then(|| Sweeping {
                store: &self.store,
                k3s: &mut self.k3s,
                k3s_labelled: &mut self.k3s_labelled,
                rng: &mut self.interleave_rng,
                trace: self.tracing.then_some((&mut self.trace, self.mono)),
            }),
        };
        let listed = run_ready(node.exec.resync_with(&self.store, cause, &mut inbox));
        match listed {
            Some(Ok(report)) => self.after(report),
            Some(Err(_)) => {
                node.events = None;
                self.process(vec![Input::Disconnected]);
            }
            None => self.crash("while listing"),
        }
    }

    /// One turn of the daemon's loop: start, connect (subscribe, read the directory, list),
    /// or follow the stream (events in batches through the queue, a verification, the
    /// timers).
    fn pinkeeper_step(&mut self) {
        if self.node.is_none() {
            self.start();
            self.set_ledger_faults();
        }
        let now = self.now();
        let Some(node) = self.node.as_mut() else {
            return;
        };
        if node.events.is_none() {
            match run_ready(self.store.subscribe()) {
                None => return self.crash("while subscribing"),
                Some(Err(_)) => {}
                Some(Ok(events)) => {
                    node.events = Some(events);
                    node.queue.clear();
                    self.note(|| "pinkeeper subscribes and reconciles".into());
                    self.inventory();
                    self.resync(ListCause::Connected);
                }
            }
            self.tick();
            return;
        }
        // The daemon's drain: events are taken from the stream while the calls they cause
        // are in flight (the calls' own events among them).
        self.clock.set(now);
        let slow = lock(&self.faults).slow > 0.0;
        let mut inbox = StreamInbox {
            events: node.events.as_mut(),
            queue: &mut node.queue,
            broken: false,
            sweeping: slow.then(|| Sweeping {
                store: &self.store,
                k3s: &mut self.k3s,
                k3s_labelled: &mut self.k3s_labelled,
                rng: &mut self.interleave_rng,
                trace: self.tracing.then_some((&mut self.trace, self.mono)),
            }),
        };
        let applied = run_ready(
            node.exec
                .process_with(Some(&self.store), Vec::new(), &mut inbox),
        );
        let broken = inbox.broken;
        match applied {
            Some(report) => self.after(report),
            None => return self.crash("while applying events"),
        }
        if self
            .node
            .as_mut()
            .is_some_and(|node| node.queue.take_overflow())
        {
            self.resync(ListCause::Connected);
        }
        if broken {
            if let Some(node) = self.node.as_mut() {
                node.events = None;
            }
            self.process(vec![Input::Disconnected]);
            self.note(|| "pinkeeper lost the stream".into());
            return;
        }
        if self.node.as_ref().is_some_and(|n| n.verify) {
            if let Some(node) = self.node.as_mut() {
                node.verify = false;
            }
            self.inventory();
            self.resync(ListCause::Verify);
        }
        self.tick();
    }

    fn tick(&mut self) {
        self.clock.set(self.now());
        let Some(node) = self.node.as_mut() else {
            return;
        };
        let store = node.events.is_some().then_some(&self.store);
        match run_ready(node.exec.tick_if_due(store)) {
            Some(report) => self.after(report),
            None => self.crash("at a timer"),
        }
    }

    // --- checks ---

    /// What must hold after every step.
    fn check_always(&mut self) -> Result<(), String> {
        if let Some(broken) = self.broken.take() {
            return Err(broken);
        }
        for (name, record) in self.store.images() {
            if record.labels.contains_key(K3S_PIN) && !self.k3s_labelled.contains(&name) {
                return Err(format!(
                    "{name} carries K3s's label, which only K3s may write: {:?}",
                    record.labels
                ));
            }
            if self.unpinned.contains(&name) && cri_pinned(&record.labels) {
                return Err(format!(
                    "{name} was unpinned with `pinkeeper unpin` and carries the CRI pin again"
                ));
            }
        }
        // Held intents that are durable must stay held until released on purpose.
        let committed: Vec<String> = self.ledger_ref().map_or_else(Vec::new, |ledger| {
            ledger
                .intents
                .values()
                .filter(|i| i.state != IntentState::Released)
                .filter(|i| {
                    !self.let_go.contains(i.name.as_str())
                        && !self.amnesia.contains(i.name.as_str())
                })
                .filter(|i| self.stale.get(i.name.as_str()) != Some(*i))
                .map(|i| i.name.to_string())
                .collect()
        });
        self.must_hold.extend(committed);
        Ok(())
    }

    fn ledger_ref(&self) -> Option<&MemoryLedger> {
        match (&self.ledger, &self.node) {
            (Some(ledger), _) => Some(ledger),
            (None, Some(node)) => Some(&node.exec.journal),
            (None, None) => None,
        }
    }

    /// Heals every fault, lets K3s finish its start, pinkeeper connect and the start-up
    /// settle for a bounded time, then checks what must hold once the node is calm.
    fn heal_and_check(&mut self) -> Result<(), String> {
        lock(&self.faults).calm();
        self.store.hold(false);
        self.store.release(usize::MAX, false);
        while !self.k3s.is_empty() {
            self.k3s_op();
            self.pinkeeper_step();
            self.mono += 50;
        }
        self.note(|| "healed: no more faults".into());
        let until = self.mono + bound(&self.config);
        while self.mono < until {
            self.pinkeeper_step();
            self.mono += 500;
        }
        self.pinkeeper_step();
        self.flush_ledger();
        self.check_always()?;
        self.check_calm()
    }

    fn check_calm(&mut self) -> Result<(), String> {
        let Some(node) = self.node.as_mut() else {
            return Err("pinkeeper is not running after healing".into());
        };
        if node.events.is_none() {
            return Err("pinkeeper is not connected after healing".into());
        }
        let images = self.store.images();
        let ledger = &node.exec.journal;
        for name in &self.must_hold {
            match ledger.intents.get(name.as_str()) {
                Some(i) if i.state != IntentState::Released => {}
                other => {
                    return Err(format!(
                        "{name}'s committed intent was lost (nobody released it): {other:?}; \
                         its record: {:?}",
                        images.get(name)
                    ))
                }
            }
        }
        for (name, record) in &images {
            if self.config.keep.matching(name).is_some() && !cri_pinned(&record.labels) {
                return Err(format!(
                    "{name} is kept by policy ({:?}) and not pinned {} ms after the faults \
                     healed: {:?}",
                    self.config.keep,
                    bound(&self.config),
                    record.labels
                ));
            }
        }
        for intent in node.exec.engine.intents() {
            if intent.state == IntentState::Released {
                continue;
            }
            if let Some(record) = images.get(intent.name.as_str()) {
                if !cri_pinned(&record.labels) {
                    return Err(format!(
                        "{} is held and not pinned {} ms after the faults healed: {:?}",
                        intent.name,
                        bound(&self.config),
                        record.labels
                    ));
                }
            }
            match ledger.intents.get(&intent.name) {
                Some(durable) if durable.state == intent.state => {}
                other => {
                    return Err(format!(
                        "the ledger and the engine disagree on {}: {:?} vs {other:?}",
                        intent.name, intent.state
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The patterns of a seed's start or of a reload: each of [`KEEP`] with a chance of one half.
fn draw_keep(rng: &mut XorShiftRng) -> Vec<&'static str> {
    KEEP.into_iter().filter(|_| rng.random_bool(0.5)).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
