//! The executor: the one place that carries out the engine's outputs, for the daemon,
//! `reconcile --dry-run`, `pinkeeper replay`, the simulation and the tests alike.
//!
//! It feeds inputs to the engine, writes what the engine asks to save through a
//! [`Journal`] (the ledger's writer, or one in memory), makes the calls on an
//! [`ImageStore`](crate::store::ImageStore) (containerd, or in memory), and feeds their
//! outcomes back until the engine is quiet. The contract's ordering rule comes from the
//! engine as data ([`Output::Commit`]): what was saved before a barrier is durable before any
//! pin or unpin after it. Everything else the caller must know (a verification to start, a
//! sweep to report, pins restored for the metrics, unpins that failed) comes back in a
//! [`Report`].
//!
//! It owns no rule, no socket, no file and no clock of its own: the caller gives it a
//! [`Clock`]. Logging of the decisions that change a label happens here, once.

use std::collections::{HashMap, HashSet, VecDeque};

use futures::stream::{FuturesUnordered, StreamExt};
use tracing::{debug, info, warn};

use crate::engine::{
    Action, ApplyError, Engine, HistoryEntry, ImageRecord, Input, ListCause, Name, Now, Output,
    RestoreReason, SweepSummary,
};
use crate::ledger::{Journal, OwnedChange};
use crate::store::{ImageStore, StoreError};

/// Pins and Gets in flight at once: containerd serialises its metadata writes, so more buys
/// nothing.
pub const RPC_CONCURRENCY: usize = 32;
/// Events the daemon's inbox hands over at a time.
pub const BATCH: usize = 4096;
/// Ledger changes handed to the writer at once in the background while the engine decides
/// more (a repair's: two per restore). The writer folds what is queued into commits of about
/// 1,024; this only bounds what the executor holds meanwhile (a change is 80 bytes).
pub const WRITE_BATCH: usize = 256;

/// The time the engine is given with each input: a monotonic clock for its timers, the wall
/// clock for what it shows and stores.
pub trait Clock {
    /// Now, on both clocks.
    fn now(&self) -> Now;
}

/// A clock that stands still until moved (replay, dry-run, simulation). Clones share it.
#[derive(Debug, Clone)]
pub struct FixedClock(std::rc::Rc<std::cell::Cell<Now>>);

impl FixedClock {
    /// A clock at `at`.
    pub fn at(at: impl Into<Now>) -> Self {
        FixedClock(std::rc::Rc::new(std::cell::Cell::new(at.into())))
    }
    /// Moves it.
    pub fn set(&self, at: impl Into<Now>) {
        self.0.set(at.into());
    }
}

impl Clock for FixedClock {
    fn now(&self) -> Now {
        self.0.get()
    }
}

/// What a call of [`Executor::process`] leaves for its caller.
#[derive(Debug, Default)]
pub struct Report {
    /// The engine asked for a verification ([`Output::Verify`]): read the images directory,
    /// then list with [`ListCause::Verify`].
    pub verify: bool,
    /// Sweep episodes that ended.
    pub sweeps: Vec<SweepSummary>,
    /// Pins restored (written and answered): why, in order (the names are in the log, and
    /// in [`Report::history`] when kept).
    pub restored: Vec<RestoreReason>,
    /// Unpins that failed: name, why.
    pub unpin_failures: Vec<(String, String)>,
    /// Pins (restores and operators') containerd refused or could not take: each is retried.
    pub pin_failures: usize,
    /// The history the engine wrote, in order, when [`Executor::keep_history`] is set (a
    /// repair of 100,000 restores would otherwise hold a copy of every entry until it ends).
    pub history: Vec<HistoryEntry>,
    /// Inputs handled (a listing counts its records): a big burst asks for memory back.
    pub handled: usize,
    /// The last ledger write that could not be made durable (the writer retries).
    pub not_durable: Option<String>,
}

impl Report {
    /// Adds a later report to this one.
    pub fn merge(&mut self, later: Report) {
        self.verify |= later.verify;
        self.sweeps.extend(later.sweeps);
        self.restored.extend(later.restored);
        self.unpin_failures.extend(later.unpin_failures);
        self.pin_failures += later.pin_failures;
        self.history.extend(later.history);
        self.handled += later.handled;
        if later.not_durable.is_some() {
            self.not_durable = later.not_durable;
        }
    }
}

/// The engine with what carries out its outputs. See the module documentation.
#[derive(Debug)]
pub struct Executor<J, C> {
    /// The engine.
    pub engine: Engine,
    /// Where its ledger changes go.
    pub journal: J,
    /// The time given with each input.
    pub clock: C,
    /// When set, every output of the engine is appended here with its time
    /// (`pinkeeper replay`, tests).
    pub trace: Option<Vec<(Now, Output)>>,
    /// Whether each [`Report`] carries a copy of the history the engine wrote (an operator's
    /// `reconcile`, the simulation); the ledger and the log have it all the same.
    pub keep_history: bool,
}

impl<J: Journal, C: Clock> Executor<J, C> {
    /// An executor for this engine.
    pub fn new(engine: Engine, journal: J, clock: C) -> Self {
        Executor {
            engine,
            journal,
            clock,
            trace: None,
            keep_history: false,
        }
    }

    /// Feeds `inputs` to the engine and carries out everything that follows, until the
    /// engine is quiet. `store` is `None` while disconnected: pins fail, Gets are dropped
    /// (the next connection's listing covers them).
    pub async fn process<S: ImageStore>(
        &mut self,
        store: Option<&S>,
        inputs: Vec<Input>,
    ) -> Report {
        self.process_with(store, inputs, &mut NoInbox).await
    }

    /// [`Executor::process`], taking more inputs from `inbox` while calls are in flight: a
    /// pin goes out the moment the engine asks for it, not once the calls asked before it
    /// are answered.
    ///
    /// The engine sees each name's inputs in the order a round-by-round executor would give
    /// them: an event for a name with a call in flight waits for that call's outcome. So an
    /// answer to a Get is never older than an event already handled, and a pin's outcome
    /// comes before the event its own write made.
    pub async fn process_with<S: ImageStore, I: Inbox>(
        &mut self,
        store: Option<&S>,
        inputs: Vec<Input>,
        inbox: &mut I,
    ) -> Report {
        let mut report = Report::default();
        let mut inputs: VecDeque<Input> = inputs.into();
        let mut changes: Vec<OwnedChange> = Vec::new();
        let mut calls = Calls::default();
        let mut running = FuturesUnordered::new();
        loop {
            inputs.extend(inbox.take());
            let mut unpins = Vec::new();
            let mut barrier = false;
            while let Some(input) = inputs.pop_front() {
                let input = match calls.hold(input) {
                    Some(input) => input,
                    None => continue,
                };
                report.handled += match &input {
                    Input::Listing { images, .. } => images.len(),
                    _ => 1,
                };
                let now = self.clock.now();
                let Executor {
                    engine,
                    journal,
                    trace,
                    keep_history,
                    ..
                } = &mut *self;
                // A listing's outputs are decided a part at a time as they are taken
                // (`Engine::outputs`): a repair of 100,000 never holds them all.
                for output in engine.outputs(now, input) {
                    if let Some(trace) = trace.as_mut() {
                        trace.push((now, output.clone()));
                    }
                    match output {
                        Output::Save { intent, .. } => changes.push(OwnedChange::Save(intent)),
                        Output::Forget { name } => changes.push(OwnedChange::Forget(name)),
                        Output::History(h) => {
                            log_history(&h);
                            if *keep_history {
                                report.history.push(h.clone());
                            }
                            changes.push(OwnedChange::History(h));
                        }
                        Output::Commit => barrier = true,
                        Output::Pin { name, reason } => calls.push(Call::Pin(name, reason)),
                        Output::Fetch { name } => calls.push(Call::Get(name)),
                        Output::Unpin { name } => unpins.push(name),
                        Output::Verify => report.verify = true,
                        Output::SweepSummary(s) => report.sweeps.push(s),
                    }
                    // A repair of 10,000 restores would hold 20,000 changes here. Written a
                    // batch at a time, in the background; a barrier still waits for them all.
                    if changes.len() >= WRITE_BATCH {
                        write_behind(journal, &mut changes, &mut report);
                    }
                }
            }
            // Other changes need not hold up the pins: the journal writes them in the
            // background, a batch at a time (above; each outcome of a long repair is one).
            let durable = !barrier || self.commit(&mut changes, true, &mut report).await;
            for name in unpins {
                if durable {
                    calls.push(Call::Unpin(name));
                } else {
                    // An unpin is never carried out on a release the ledger does not hold: a
                    // restart would read the missing pin as K3s's sweep, and undo it.
                    let why = format!(
                        "the ledger cannot be written ({}), so the pin stays; free space in \
                         pinkeeper's state directory and run `pinkeeper unpin` again",
                        report.not_durable.as_deref().unwrap_or("unknown error")
                    );
                    warn!(image = %name, "not unpinned: {why}");
                    report.unpin_failures.push((name.into(), why));
                }
            }
            // Pins first: an image of a gone archive stays unpinned for as short a time as
            // the store allows (containerd serialises the writes itself). They go out even
            // when the ledger cannot be written: protection goes on from memory, and rule 7
            // is kept as soon as the disk allows.
            while running.len() < RPC_CONCURRENCY {
                let Some(call) = calls.start() else { break };
                running.push(carry_out(store, call));
            }
            if running.is_empty() {
                debug_assert!(calls.is_idle(), "nothing waits once nothing is in flight");
                self.commit(&mut changes, false, &mut report).await;
                break;
            }
            let next = {
                let done = running.next();
                let more = std::pin::pin!(inbox.ready());
                match futures::future::select(done, more).await {
                    futures::future::Either::Left((done, _)) => done,
                    futures::future::Either::Right(_) => None,
                }
            };
            if let Some(done) = next {
                self.finished(done, &mut calls, &mut inputs, &mut report);
            }
        }
        report
    }

    /// Reports a call's outcome to the engine (an unpin's to the operator only: the record's
    /// next event or listing shows it to the engine), then the events that waited for it.
    fn finished(
        &mut self,
        done: Done,
        calls: &mut Calls,
        inputs: &mut VecDeque<Input>,
        report: &mut Report,
    ) {
        let name = match done {
            Done::Pinned(name, reason, result) => {
                match &result {
                    Ok(()) => {
                        info!(
                            image = %name,
                            reason = ?reason,
                            "restored io.cri-containerd.pinned=pinned: {}",
                            reason.explain()
                        );
                        report.restored.push(reason);
                    }
                    Err(ApplyError::NotFound) => {
                        info!(image = %name, "could not restore the pin: the image record is gone")
                    }
                    Err(ApplyError::Failed(why)) => {
                        report.pin_failures += 1;
                        warn!(image = %name, "could not restore the pin: {why}; will retry")
                    }
                }
                inputs.push_back(Input::Pinned {
                    name: name.to_string(),
                    result,
                });
                name
            }
            Done::Fetched(name, Ok(record)) => {
                inputs.push_back(Input::Fetched {
                    name: name.to_string(),
                    record,
                });
                name
            }
            // A listing settles it instead (the engine asks for one).
            Done::Fetched(name, Err(e)) => {
                debug!("{e}");
                inputs.push_back(Input::FetchFailed {
                    name: name.to_string(),
                });
                name
            }
            Done::Unpinned(name, result) => {
                match result {
                    Ok(()) | Err(ApplyError::NotFound) => {
                        info!(image = %name, "removed io.cri-containerd.pinned: an operator ran `pinkeeper unpin`")
                    }
                    Err(ApplyError::Failed(why)) => {
                        warn!(image = %name, "could not remove the pin: {why}");
                        report.unpin_failures.push((name.to_string(), why));
                    }
                }
                name
            }
        };
        inputs.extend(calls.done(&name));
    }

    /// Lists every record and reconciles: after (re)subscribing ([`ListCause::Connected`],
    /// events before the subscription are covered by it) or for a verification.
    pub async fn resync<S: ImageStore>(
        &mut self,
        store: &S,
        cause: ListCause,
    ) -> Result<Report, StoreError> {
        self.resync_with(store, cause, &mut NoInbox).await
    }

    /// [`Executor::resync`], with `inbox` polled while the calls run.
    pub async fn resync_with<S: ImageStore, I: Inbox>(
        &mut self,
        store: &S,
        cause: ListCause,
        inbox: &mut I,
    ) -> Result<Report, StoreError> {
        let images = store.list().await?;
        debug!(images = images.len(), ?cause, "listed images");
        let listing = vec![Input::Listing { images, cause }];
        Ok(self.process_with(Some(store), listing, inbox).await)
    }

    /// Lets time pass: a tick when the engine's next timer is due.
    pub async fn tick_if_due<S: ImageStore>(&mut self, store: Option<&S>) -> Report {
        if self
            .engine
            .next_wakeup()
            .is_some_and(|at| at <= self.clock.now().mono)
        {
            self.process(store, vec![Input::Tick]).await
        } else {
            Report::default()
        }
    }

    /// Writes the changes; `durably` waits until they, and every change written before them,
    /// are on disk (even with no change of its own: a barrier covers earlier background
    /// writes too). Whether that worked.
    async fn commit(
        &mut self,
        changes: &mut Vec<OwnedChange>,
        durably: bool,
        report: &mut Report,
    ) -> bool {
        if changes.is_empty() && !durably {
            return true;
        }
        if !durably {
            return write_behind(&mut self.journal, changes, report);
        }
        let sent = self.journal.write_durably(std::mem::take(changes)).await;
        written(sent, report)
    }
}

/// Hands `changes` to the journal to write in the background.
fn write_behind<J: Journal>(
    journal: &mut J,
    changes: &mut Vec<OwnedChange>,
    report: &mut Report,
) -> bool {
    let sent = journal.write(std::mem::take(changes));
    written(sent, report)
}

fn written(sent: Result<(), String>, report: &mut Report) -> bool {
    if let Err(e) = sent {
        // The ledger cannot be written now (a full disk): the writer keeps the changes, says so
        // once and retries. Protection goes on from memory: the pins of this batch are set all
        // the same (contract rule 7 is kept as soon as the disk allows).
        debug!("ledger write not durable yet: {e}");
        report.not_durable = Some(e);
        return false;
    }
    true
}

/// Where [`Executor::process_with`] takes more inputs from while calls are in flight (the
/// daemon's event queue).
#[allow(async_fn_in_trait)]
pub trait Inbox {
    /// The inputs waiting now; empty when there are none, or when no more should be taken.
    fn take(&mut self) -> Vec<Input>;
    /// Resolves when [`Inbox::take`] may have more; never, if it will not.
    async fn ready(&mut self);
}

/// No inputs but the ones given ([`Executor::process`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInbox;

impl Inbox for NoInbox {
    fn take(&mut self) -> Vec<Input> {
        Vec::new()
    }
    async fn ready(&mut self) {
        std::future::pending().await
    }
}

/// A call the engine asked for.
#[derive(Debug)]
enum Call {
    Pin(Name, RestoreReason),
    Get(Name),
    Unpin(Name),
}

impl Call {
    fn name(&self) -> &Name {
        match self {
            Call::Pin(name, _) | Call::Get(name) | Call::Unpin(name) => name,
        }
    }
}

/// A call's outcome.
enum Done {
    Pinned(Name, RestoreReason, Result<(), ApplyError>),
    Fetched(Name, Result<Option<ImageRecord>, StoreError>),
    Unpinned(Name, Result<(), ApplyError>),
}

/// The calls of one [`Executor::process_with`]: waiting to start (pins first), in flight (at
/// most one per name, so a name's calls are made in the order asked), and the events that
/// wait for a name's call to be answered.
#[derive(Default)]
struct Calls {
    pins: VecDeque<Call>,
    others: VecDeque<Call>,
    /// Names with a Get waiting to start. One Get per name serves every reason it was asked
    /// for before it starts: its answer is read as the record's state then (K3s's alias
    /// churn, a delete and a create of one name, asks once).
    fetching: HashSet<Name>,
    in_flight: HashSet<Name>,
    held: HashMap<String, Vec<Input>>,
}

impl Calls {
    fn push(&mut self, call: Call) {
        match &call {
            Call::Pin(..) => self.pins.push_back(call),
            Call::Get(name) => {
                if self.fetching.insert(name.clone()) {
                    self.others.push_back(call);
                }
            }
            Call::Unpin(_) => self.others.push_back(call),
        }
    }

    /// The next call that may start: the first waiting one whose name has none in flight,
    /// pins first.
    fn start(&mut self) -> Option<Call> {
        let in_flight = &self.in_flight;
        let first = |queue: &mut VecDeque<Call>| {
            let at = queue.iter().position(|c| !in_flight.contains(c.name()))?;
            queue.remove(at)
        };
        let call = first(&mut self.pins).or_else(|| first(&mut self.others))?;
        if let Call::Get(name) = &call {
            self.fetching.remove(name);
        }
        self.in_flight.insert(call.name().clone());
        Some(call)
    }

    /// `input`, unless it is an event for a name with a call in flight: that waits for the
    /// call's outcome ([`Calls::done`]).
    fn hold(&mut self, input: Input) -> Option<Input> {
        match &input {
            Input::Event(event) if self.in_flight.contains(event.name.as_str()) => {
                self.held.entry(event.name.clone()).or_default().push(input);
                None
            }
            _ => Some(input),
        }
    }

    /// Nothing waits to start, is in flight, or is held.
    fn is_idle(&self) -> bool {
        self.pins.is_empty()
            && self.others.is_empty()
            && self.in_flight.is_empty()
            && self.held.is_empty()
    }

    /// The call on `name` was answered: the events that waited for it.
    fn done(&mut self, name: &str) -> Vec<Input> {
        self.in_flight.remove(name);
        self.held.remove(name).unwrap_or_default()
    }
}

/// Makes one call; while disconnected it fails at once (a Get is then settled by the next
/// connection's listing).
fn carry_out<'a, S: ImageStore>(
    store: Option<&'a S>,
    call: Call,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Done> + 'a>> {
    const AWAY: &str = "containerd is not connected";
    Box::pin(async move {
        match call {
            Call::Pin(name, reason) => {
                let result = match store {
                    Some(store) => store.pin(&name).await,
                    None => Err(ApplyError::Failed(AWAY.into())),
                };
                Done::Pinned(name, reason, result)
            }
            Call::Get(name) => {
                let result = match store {
                    Some(store) => store.get(&name).await,
                    None => Err(StoreError(AWAY.into())),
                };
                Done::Fetched(name, result)
            }
            Call::Unpin(name) => {
                let result = match store {
                    Some(store) => store.unpin(&name).await,
                    None => Err(ApplyError::Failed(AWAY.into())),
                };
                Done::Unpinned(name, result)
            }
        }
    })
}

/// One log line per decision an operator needs to see; the rest at debug.
fn log_history(h: &HistoryEntry) {
    match h.action {
        Action::Released => info!(image = %h.name, "intent released: {}", h.detail),
        Action::RestoreFailed => warn!(image = %h.name, "restore failed: {}", h.detail),
        Action::ArchiveGone => info!(image = %h.name, "{}", h.detail),
        _ => debug!(image = %h.name, action = %h.action, "{}", h.detail),
    }
}

/// Carries out a future whose calls never wait for anything outside it (an in-memory store
/// and journal): `replay`, `--dry-run` and the simulation are synchronous. A call may answer
/// "not yet" a few times ([`crate::store::memory::Fault::Slow`]); `None` if the future is
/// still waiting after [`READY_POLLS`] polls (a call told to hang).
pub fn run_ready<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    for _ in 0..READY_POLLS {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return Some(out);
        }
    }
    None
}

/// How many times [`run_ready`] polls before it calls a future stuck.
pub const READY_POLLS: usize = 10_000;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::engine::{Config, EventKind, ImageEvent, CRI_PIN, K3S_PIN, PINNED};
    use crate::ledger::journal::MemoryLedger;
    use crate::store::memory::{Call as StoreCall, Fault, MemoryStore};

    /// An inbox with one batch of inputs, ready at once.
    struct Later(Vec<Input>);

    impl Inbox for Later {
        fn take(&mut self) -> Vec<Input> {
            std::mem::take(&mut self.0)
        }
        async fn ready(&mut self) {
            if self.0.is_empty() {
                std::future::pending::<()>().await
            }
        }
    }

    fn both_pins() -> crate::engine::Labels {
        [K3S_PIN, CRI_PIN]
            .iter()
            .map(|k| (k.to_string(), PINNED.to_string()))
            .collect()
    }

    /// K3s's sweep of two images whose archives are gone: the second one's restore goes out
    /// while the first one's is still in flight, not once it is answered.
    #[test]
    fn a_pin_goes_out_while_another_is_in_flight() {
        let (slow, quick) = ("docker.io/library/slow:1", "docker.io/library/quick:1");
        let store = MemoryStore::new();
        let exec_store = store.clone();
        let mut exec = Executor::new(
            Engine::new(Config::default(), []),
            MemoryLedger::default(),
            FixedClock::at(1),
        );
        exec.keep_history = true;
        let mut records = Vec::new();
        for name in [slow, quick] {
            let record = ImageRecord {
                name: name.into(),
                labels: both_pins(),
                digest: Some(format!("sha256:{}", name.len())),
            };
            store.create(record.clone());
            records.push(record);
        }
        let start = vec![
            Input::Inventory(Default::default()),
            Input::Listing {
                images: records,
                cause: ListCause::Connected,
            },
        ];
        run_ready(exec.process(Some(&exec_store), start)).expect("in memory");
        store.inject(move |call| match call {
            StoreCall::Pin(name) if name == slow => Fault::Slow { polls: 3 },
            _ => Fault::None,
        });
        let swept = |name: &str| {
            store.replace_labels(name, Default::default());
            Input::Event(ImageEvent {
                kind: EventKind::Update,
                name: name.into(),
                labels: Default::default(),
            })
        };
        let first = swept(slow);
        let mut inbox = Later(vec![swept(quick)]);
        let report = run_ready(exec.process_with(Some(&exec_store), vec![first], &mut inbox))
            .expect("in memory");
        let restored: Vec<&str> = report
            .history
            .iter()
            .filter(|h| h.action == Action::Restored)
            .map(|h| h.name.as_str())
            .collect();
        assert_eq!(restored, [quick, slow]);
        for name in [slow, quick] {
            assert!(store.labels(name).is_some_and(|l| l.contains_key(CRI_PIN)));
        }
    }

    /// An event for a name with a call in flight waits for the call's outcome; others do not.
    #[test]
    fn an_event_waits_for_its_names_call() {
        let event = |name: &str| {
            Input::Event(ImageEvent {
                kind: EventKind::Update,
                name: name.into(),
                labels: Default::default(),
            })
        };
        let mut calls = Calls::default();
        calls.push(Call::Pin("a".into(), RestoreReason::ArchiveGone));
        calls.push(Call::Get("a".into()));
        calls.push(Call::Get("b".into()));
        calls.push(Call::Get("b".into()));
        assert!(calls.hold(event("a")).is_some(), "not started yet");
        assert!(matches!(calls.start(), Some(Call::Pin(..))));
        assert!(
            matches!(calls.start(), Some(Call::Get(n)) if n == "b"),
            "a's Get waits for a's pin; b's two Gets are one"
        );
        assert!(calls.start().is_none());
        assert!(calls.hold(event("a")).is_none());
        assert!(calls.hold(event("c")).is_some());
        let released = calls.done("a");
        assert!(matches!(released.as_slice(), [Input::Event(e)] if e.name == "a"));
        assert!(matches!(calls.start(), Some(Call::Get(n)) if n == "a"));
    }

    /// K3s re-creating a name it had imported (`forceCreateTag`: a delete, then a create with
    /// both pins) costs one Get, not one per event.
    #[test]
    fn alias_churn_costs_one_get() {
        let store = MemoryStore::new();
        let gets = Arc::new(AtomicUsize::new(0));
        let counted = gets.clone();
        store.inject(move |call| {
            if matches!(call, StoreCall::Get(_)) {
                counted.fetch_add(1, Ordering::Relaxed);
            }
            Fault::None
        });
        let labels: crate::engine::Labels = [K3S_PIN, CRI_PIN]
            .iter()
            .map(|k| (k.to_string(), PINNED.to_string()))
            .collect();
        let name = "docker.io/library/app:1";
        let record = ImageRecord {
            name: name.into(),
            labels: labels.clone(),
            digest: Some("sha256:aaaa".into()),
        };
        store.create(record.clone());
        let mut exec = Executor::new(
            Engine::new(Config::default(), []),
            MemoryLedger::default(),
            FixedClock::at(1),
        );
        let listing = Input::Listing {
            images: vec![record],
            cause: ListCause::Connected,
        };
        run_ready(exec.process(Some(&store), vec![listing])).expect("in memory");
        assert_eq!(
            gets.load(Ordering::Relaxed),
            0,
            "the listing has the digest"
        );
        let event = |kind| ImageEvent {
            kind,
            name: name.into(),
            labels: labels.clone(),
        };
        let churn = vec![event(EventKind::Delete), event(EventKind::Create)];
        let churn = churn.into_iter().map(Input::Event).collect();
        run_ready(exec.process(Some(&store), churn)).expect("in memory");
        assert_eq!(gets.load(Ordering::Relaxed), 1);
        assert!(exec.engine.intent(name).is_some_and(|i| i.pins.cri));
    }
}
