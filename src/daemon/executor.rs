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

use std::collections::{HashSet, VecDeque};

use futures::stream::{FuturesUnordered, StreamExt};
use tracing::{debug, info, warn};

use crate::engine::{
    Action, ApplyError, Engine, HistoryEntry, ImageEvent, ImageRecord, Input, ListCause, Now,
    Output, RestoreReason, SweepSummary,
};
use crate::ledger::{Journal, OwnedChange};
use crate::store::{ImageStore, StoreError};

/// Pins and Gets in flight at once: containerd serialises its metadata writes, so more buys
/// nothing.
pub const RPC_CONCURRENCY: usize = 32;
/// Events handed to the engine per batch (one ledger commit each).
pub const BATCH: usize = 4096;

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
    /// Pins restored (written and answered), with why.
    pub restored: Vec<(String, RestoreReason)>,
    /// Unpins that failed: name, why.
    pub unpin_failures: Vec<(String, String)>,
    /// The history the engine wrote, in order.
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
}

impl<J: Journal, C: Clock> Executor<J, C> {
    /// An executor for this engine.
    pub fn new(engine: Engine, journal: J, clock: C) -> Self {
        Executor {
            engine,
            journal,
            clock,
            trace: None,
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
        let mut report = Report::default();
        let mut inputs: VecDeque<Input> = inputs.into();
        let mut changes: Vec<OwnedChange> = Vec::new();
        while !inputs.is_empty() {
            let mut calls = Vec::new();
            // One Get per name per round: its answer is read as the record's state now, which
            // serves every reason it was asked for (K3s's alias churn, a delete and a create of
            // one name in a batch, asks once for each).
            let mut fetching = HashSet::new();
            let mut unpins = Vec::new();
            let mut barrier = false;
            while let Some(input) = inputs.pop_front() {
                report.handled += match &input {
                    Input::Listing { images, .. } => images.len(),
                    _ => 1,
                };
                let now = self.clock.now();
                for output in self.engine.handle(now, input) {
                    if let Some(trace) = self.trace.as_mut() {
                        trace.push((now, output.clone()));
                    }
                    match output {
                        Output::Save { intent, .. } => changes.push(OwnedChange::Save(intent)),
                        Output::Forget { name } => changes.push(OwnedChange::Forget(name)),
                        Output::History(h) => {
                            log_history(&h);
                            report.history.push(h.clone());
                            changes.push(OwnedChange::History(h));
                        }
                        Output::Commit => barrier = true,
                        Output::Fetch { ref name } if !fetching.insert(name.clone()) => {}
                        Output::Pin { .. } | Output::Fetch { .. } => calls.push(output),
                        Output::Unpin { name } => unpins.push(name),
                        Output::Verify => report.verify = true,
                        Output::SweepSummary(s) => report.sweeps.push(s),
                    }
                }
            }
            let durable = !barrier || self.commit(&mut changes, true, &mut report).await;
            // Pins first and all at once: an image of a gone archive stays unpinned for as
            // short a time as the store allows (containerd serialises the writes itself).
            // They go out even when the ledger cannot be written: protection goes on from
            // memory, and rule 7 is kept as soon as the disk allows.
            calls.sort_by_key(|c| !matches!(c, Output::Pin { .. }));
            self.call_all(store, calls, &mut inputs, &mut report).await;
            for name in unpins {
                if durable {
                    self.unpin(store, name, &mut report).await;
                } else {
                    // An unpin is never carried out on a release the ledger does not hold: a
                    // restart would read the missing pin as K3s's sweep, and undo it.
                    let why = format!(
                        "the ledger cannot be written ({}), so the pin stays; free space in \
                         pinkeeper's state directory and run `pinkeeper unpin` again",
                        report.not_durable.as_deref().unwrap_or("unknown error")
                    );
                    warn!(image = %name, "not unpinned: {why}");
                    report.unpin_failures.push((name, why));
                }
            }
        }
        // Other changes need not hold up the pins: the journal writes them in the background.
        self.commit(&mut changes, false, &mut report).await;
        report
    }

    /// Applies a stream's events in batches of [`BATCH`].
    pub async fn apply_events<S: ImageStore>(
        &mut self,
        store: Option<&S>,
        events: Vec<ImageEvent>,
    ) -> Report {
        let mut report = Report::default();
        let mut events = events.into_iter().map(Input::Event).peekable();
        while events.peek().is_some() {
            let batch = events.by_ref().take(BATCH).collect();
            report.merge(self.process(store, batch).await);
        }
        report
    }

    /// Lists every record and reconciles: after (re)subscribing ([`ListCause::Connected`],
    /// events before the subscription are covered by it) or for a verification.
    pub async fn resync<S: ImageStore>(
        &mut self,
        store: &S,
        cause: ListCause,
    ) -> Result<Report, StoreError> {
        let images = store.list().await?;
        debug!(images = images.len(), ?cause, "listed images");
        Ok(self
            .process(Some(store), vec![Input::Listing { images, cause }])
            .await)
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
        let batch = std::mem::take(changes);
        let sent = if durably {
            self.journal.write_durably(batch).await
        } else {
            self.journal.write(batch)
        };
        if let Err(e) = sent {
            // The ledger cannot be written now (a full disk): the writer keeps the changes,
            // says so once and retries. Protection goes on from memory: the pins of this batch
            // are set all the same (contract rule 7 is kept as soon as the disk allows).
            debug!("ledger write not durable yet: {e}");
            report.not_durable = Some(e);
            return false;
        }
        true
    }

    /// Carries out the pins and Gets concurrently (at most [`RPC_CONCURRENCY`] at once, pins
    /// first) and queues their outcomes for the engine.
    async fn call_all<S: ImageStore>(
        &mut self,
        store: Option<&S>,
        calls: Vec<Output>,
        inputs: &mut VecDeque<Input>,
        report: &mut Report,
    ) {
        enum Done {
            Pinned(String, RestoreReason, Result<(), ApplyError>),
            Fetched(String, Result<Option<ImageRecord>, StoreError>),
        }
        let Some(store) = store else {
            for call in calls {
                match call {
                    Output::Pin { name, .. } => {
                        let result = Err(ApplyError::Failed("containerd is not connected".into()));
                        inputs.push_back(Input::Pinned { name, result });
                    }
                    Output::Fetch { name } => inputs.push_back(Input::FetchFailed { name }),
                    _ => {}
                }
            }
            return;
        };
        let mut running = FuturesUnordered::new();
        let mut calls = calls.into_iter();
        loop {
            while running.len() < RPC_CONCURRENCY {
                let call: std::pin::Pin<Box<dyn std::future::Future<Output = Done> + '_>> =
                    match calls.next() {
                        Some(Output::Pin { name, reason }) => Box::pin(async move {
                            let result = store.pin(&name).await;
                            Done::Pinned(name, reason, result)
                        }),
                        Some(Output::Fetch { name }) => Box::pin(async move {
                            let result = store.get(&name).await;
                            Done::Fetched(name, result)
                        }),
                        Some(_) => continue,
                        None => break,
                    };
                running.push(call);
            }
            let Some(done) = running.next().await else {
                break;
            };
            match done {
                Done::Pinned(name, reason, result) => {
                    match &result {
                        Ok(()) => {
                            info!(
                                image = %name,
                                reason = ?reason,
                                "restored io.cri-containerd.pinned=pinned: {}",
                                reason.explain()
                            );
                            report.restored.push((name.clone(), reason));
                        }
                        Err(ApplyError::NotFound) => {
                            info!(image = %name, "could not restore the pin: the image record is gone")
                        }
                        Err(ApplyError::Failed(why)) => {
                            warn!(image = %name, "could not restore the pin: {why}; will retry")
                        }
                    }
                    inputs.push_back(Input::Pinned { name, result });
                }
                Done::Fetched(name, Ok(record)) => {
                    inputs.push_back(Input::Fetched { name, record })
                }
                // A listing settles it instead (the engine asks for one).
                Done::Fetched(name, Err(e)) => {
                    debug!("{e}");
                    inputs.push_back(Input::FetchFailed { name });
                }
            }
        }
    }

    /// An operator's unpin; its outcome needs no report to the engine (the record's next
    /// event or listing shows it), only to the operator.
    async fn unpin<S: ImageStore>(&mut self, store: Option<&S>, name: String, report: &mut Report) {
        let result = match store {
            Some(store) => store.unpin(&name).await,
            None => Err(ApplyError::Failed("containerd is not connected".into())),
        };
        match result {
            Ok(()) | Err(ApplyError::NotFound) => {
                info!(image = %name, "removed io.cri-containerd.pinned: an operator ran `pinkeeper unpin`")
            }
            Err(ApplyError::Failed(why)) => {
                warn!(image = %name, "could not remove the pin: {why}");
                report.unpin_failures.push((name, why));
            }
        }
    }
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

/// Carries out a future whose calls never wait (an in-memory store and journal): `replay`
/// and `--dry-run` are synchronous. `None` if it waits anyway (a call told to hang).
pub fn run_ready<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::engine::{Config, EventKind, CRI_PIN, K3S_PIN, PINNED};
    use crate::ledger::journal::MemoryLedger;
    use crate::store::memory::{Call, Fault, MemoryStore};

    /// K3s re-creating a name it had imported (`forceCreateTag`: a delete, then a create with
    /// both pins) costs one Get, not one per event.
    #[test]
    fn alias_churn_costs_one_get() {
        let store = MemoryStore::new();
        let gets = Arc::new(AtomicUsize::new(0));
        let counted = gets.clone();
        store.inject(move |call| {
            if matches!(call, Call::Get(_)) {
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
        run_ready(exec.apply_events(Some(&store), churn)).expect("in memory");
        assert_eq!(gets.load(Ordering::Relaxed), 1);
        assert!(exec.engine.intent(name).is_some_and(|i| i.pins.cri));
    }
}
