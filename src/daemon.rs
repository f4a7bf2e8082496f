//! `pinkeeper run`: wires containerd, the images directory and the ledger to the engine.
//!
//! One loop, list-then-watch: wait for containerd, subscribe (with a barrier), read the images
//! directory, list and reconcile, then follow the stream; on any break, start over. The engine
//! decides; this file only carries out its outputs, in an order that keeps the contract:
//! a newly recorded intent is committed to the ledger before any pin of the same batch.
//! It holds no rule of its own. The operator's calls (src/control/) are answered here, between
//! two batches of events, from the engine and the ledger.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::containerd::queue::EventQueue;
use crate::containerd::{Containerd, ContainerdError};
use crate::control::{self, pb, Call, Refusal, Reply, Request};
use crate::engine::{
    self, ApplyError, Engine, HistoryEntry, ImageRecord, Input, IntentState, IntentView, ListCause,
    Millis, Origin, Output, RestoreReason, SweepSummary, CRI_PIN, PINNED,
};
use crate::inventory::watch::Watcher;
use crate::inventory::Scanner;
use crate::ledger::{Ledger, OwnedChange, Writer};
use crate::metrics::{Exporter, Metrics};
use crate::reconnect::{images_dir_changed, AbortOnDrop, Backoff, RETRY_MAX_FAST};

/// Pins and Gets in flight at once: containerd serialises its metadata writes, so more buys
/// nothing.
const RPC_CONCURRENCY: usize = 32;
/// Events handed to the engine per batch (one ledger commit each).
const BATCH: usize = 4096;
/// How long a (re)connection waits for the images directory's scan before it lists anyway.
/// A scan of an unchanged directory takes milliseconds; a longer one (gigabytes of new
/// archives) is applied when it ends, and the engine restores then what it shows gone.
const SCAN_WAIT: Duration = Duration::from_secs(1);
/// How long the start-up verification waits for its read of the images directory (a hung
/// network filesystem) before it checks with the last inventory.
const SCAN_STUCK: Duration = Duration::from_secs(30);
/// How long an operator's `reconcile` waits for the scan: they asked for a fresh look.
const OPERATOR_SCAN_WAIT: Duration = Duration::from_secs(5);

/// What a scan on the blocking pool hands back: the scanner (with its cache), the inventory,
/// and the cache changes for the ledger.
type ScanOutcome = (
    Scanner,
    crate::inventory::Problems,
    Result<
        (BTreeMap<String, PathBuf>, crate::inventory::ProblemReport),
        crate::inventory::InventoryError,
    >,
    crate::inventory::CacheChanges,
);

/// The wall clock, in the engine's unit.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// Events shared between the stream reader task and the main loop.
struct Shared {
    queue: Mutex<EventQueue>,
    /// Set by the reader when the stream broke.
    broken: Mutex<Option<ContainerdError>>,
    wake: Notify,
}

/// The daemon's state.
struct Daemon {
    settings: Settings,
    engine: Engine,
    /// The ledger, written on its own thread.
    ledger: Writer,
    /// Taken while a scan runs on the blocking pool.
    scanner: Option<Scanner>,
    /// The scan running on the blocking pool: the loop goes on serving events, restores and
    /// the operator meanwhile, and applies its result when it ends.
    scan_task: Option<tokio::task::JoinHandle<ScanOutcome>>,
    /// Scans started so far; the one in flight is number `scans_started`.
    scans_started: u64,
    /// The directory changed (or a verification asked) while a scan ran: scan again after it.
    rescan_wanted: bool,
    /// A start-up verification waits for the scan of this number, then lists.
    verify_after_scan: Option<u64>,
    /// ... but not beyond this: a read that never ends (a hung network filesystem) must not
    /// cancel the verification.
    verify_wait_until: Option<tokio::time::Instant>,
    /// The last error of a whole scan (the directory unreadable), said once until it changes.
    scan_error: Option<String>,
    client: Option<Containerd>,
    /// Broken files of the images directory, as of the last scan: a summary per scan, and a
    /// line only for a file whose state changed (src/inventory/problems.rs).
    problems: crate::inventory::Problems,
    /// The live images directory: read again once a change has settled. Started (or, if
    /// inotify could not be set up, tried again) at each connection attempt.
    watch: Option<Watcher>,
    /// The operator's calls.
    control: tokio::sync::mpsc::Receiver<Request>,
    /// What `pinkeeper status` shows.
    status: StatusFacts,
    /// While an operator's reconcile runs: the history it writes, to answer with.
    captured: Option<Vec<HistoryEntry>>,
    /// Unpins that failed since the last operator call (name, why).
    unpin_failures: Vec<(String, String)>,
    /// systemd's watchdog, when `WatchdogSec=` is set: pinged from the main loop.
    watchdog: Option<tokio::time::Interval>,
    /// Prometheus metrics: counted and written out (textfile) when something changed.
    metrics: Exporter,
}

/// What the daemon knows about itself for `pinkeeper status`.
#[derive(Debug, Default)]
struct StatusFacts {
    started: Millis,
    connected_since: Option<Millis>,
    containerd_version: String,
    last_sweep: Option<SweepSummary>,
    last_reconcile: Millis,
    ledger_path: PathBuf,
    /// When the images directory was last read to its end, and its broken files then.
    images_read: Millis,
    images_broken: usize,
}

/// What woke the main loop.
enum Wake {
    Events,
    Timer,
    ImagesDir,
    Control(Request),
    Watchdog,
    Metrics,
    Scanned(Box<Result<ScanOutcome, tokio::task::JoinError>>),
    VerifyOverdue,
}

/// Runs until SIGTERM or SIGINT. Errors are fatal (the ledger cannot be written, ...).
pub async fn run(settings: Settings, config: engine::Config) -> anyhow::Result<()> {
    // Room for the control socket's connections and the images directory's files.
    control::raise_fd_limit();
    // Only another pinkeeper holding the ledger stops the start: a damaged ledger is moved
    // aside, one that cannot be written is retried by the writer, and protection goes on
    // from memory and the listing meanwhile (src/ledger/mod.rs, `Ledger::start`).
    let started = Ledger::start(&settings.state_dir, now_ms() / 1000)?;
    let ledger_path = settings.state_dir.join(crate::ledger::FILE_NAME);
    if let Some(recovered) = &started.recovered {
        tracing::error!("{recovered}");
    }
    if let Some(problem) = &started.problem {
        tracing::error!(
            "{problem}; pinkeeper protects from memory and the listing, and keeps trying to \
             write the ledger"
        );
    }
    let intents = started.contents.intents;
    // Before any thread is started (the socket is created under a umask) and before
    // READY: an operator can ask as soon as pinkeeper says it runs.
    // Another pinkeeper on the socket stops this one (it protects the node already); any other
    // failure only costs the operator's API: protection never waits for it.
    let (requests, control) = control::channel();
    let served = match control::bind(&settings.control_socket) {
        Ok(listener) => control::serve(listener, &settings.control_socket, requests).await,
        Err(e) => Err(e),
    };
    let server = match served {
        Ok(server) => Some(server),
        Err(e @ control::ControlError::InUse { .. }) => return Err(e.into()),
        Err(e) => {
            tracing::error!(
                "{e}; pinkeeper keeps protecting without its control API (status, list, pin, \
                 unpin, history and reconcile cannot reach it): fix this and restart pinkeeper"
            );
            None
        }
    };
    // Metrics (off unless asked for): the HTTP listener is up before READY too.
    let metrics = Arc::new(Metrics::new());
    let http = match settings.metrics_address {
        Some(address) => crate::metrics::listen(address, metrics.clone()).await,
        None => None,
    };
    if let Some(file) = &settings.metrics_textfile {
        info!(file = %file.display(), "writing metrics for node-exporter's textfile collector");
    }
    let exporter = Exporter::new(
        metrics.clone(),
        settings.metrics_textfile.clone(),
        http.is_some(),
    );
    let _http = http.map(AbortOnDrop);
    // Files read by an earlier run and unchanged since are not read again.
    let scanner = Scanner::new(&settings.images_dir).with_cache(started.contents.cached);
    info!(
        ledger = %crate::escape::path(&ledger_path),
        intents = intents.iter().filter(|i| i.state != engine::IntentState::Released).count(),
        "pinkeeper started"
    );
    let status = StatusFacts {
        started: now_ms(),
        ledger_path: ledger_path.clone(),
        ..StatusFacts::default()
    };
    let mut daemon = Daemon {
        control,
        status,
        captured: None,
        unpin_failures: Vec::new(),
        watchdog: crate::notify::watchdog_period().map(|period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        }),
        scanner: Some(scanner),
        scan_task: None,
        scans_started: 0,
        rescan_wanted: false,
        verify_after_scan: None,
        verify_wait_until: None,
        scan_error: None,
        engine: Engine::new(config, intents),
        ledger: Writer::spawn_observed(
            started.ledger,
            &settings.state_dir,
            started.problem,
            metrics.ledger_observer(),
        )?,
        client: None,
        problems: crate::inventory::Problems::default(),
        watch: None,
        settings,
        metrics: exporter,
    };
    if let Some(recovered) = started.recovered {
        let entry = HistoryEntry {
            at: now_ms(),
            name: "(ledger)".into(),
            action: "ledger-recovered".into(),
            detail: recovered.clone(),
        };
        daemon.ledger.set_recovered(Some(recovered));
        let _ = daemon.ledger.write(vec![OwnedChange::History(entry)]);
    }
    daemon.publish_metrics();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    };
    tokio::pin!(shutdown);
    crate::notify::ready(&format!(
        "waiting for containerd at {}",
        daemon.settings.containerd_socket.display()
    ));
    let result = tokio::select! {
        result = daemon.serve() => result,
        signal = &mut shutdown => {
            info!("{signal}: stopping");
            Ok(())
        }
    };
    crate::notify::stopping();
    if let Some(server) = server {
        server.stop().await;
    }
    // Whatever is queued for the ledger is committed before pinkeeper exits.
    let closed = daemon.ledger.close();
    // The textfile's last word: not connected, every commit counted.
    daemon.metrics.metrics().disconnected();
    daemon.publish_metrics();
    if let Err(e) = closed {
        // Said, not fatal: what could not be written is re-learned from containerd.
        tracing::error!("{e}");
    }
    result
}

impl Daemon {
    async fn serve(&mut self) -> anyhow::Result<()> {
        // The directory is read while pinkeeper connects; no archive is called gone unread
        // (the engine takes every archive as present until the first inventory).
        self.start_scan();
        loop {
            let client = self.wait_for_containerd().await;
            self.follow(client).await?;
            self.client = None;
            self.status.connected_since = None;
            self.metrics.metrics().disconnected();
            crate::notify::status(&format!(
                "containerd at {} is away (K3s restarting?); waiting for it",
                self.settings.containerd_socket.display()
            ));
            self.process(vec![Input::Disconnected]).await?;
        }
    }

    /// Connects with capped, jittered backoff; returns once subscribed is possible.
    async fn wait_for_containerd(&mut self) -> Containerd {
        self.watch_images_dir();
        let socket = self.settings.containerd_socket.clone();
        let mut backoff = Backoff::default();
        let mut reported = false;
        loop {
            match Containerd::connect(&socket, &self.settings.namespace).await {
                Ok(client) => match client.version().await {
                    Ok(version) => {
                        info!(socket = %socket.display(), version, "connected to containerd");
                        crate::notify::status(&format!(
                            "connected to containerd {version} at {}",
                            socket.display()
                        ));
                        self.status.containerd_version = version;
                        return client;
                    }
                    Err(e) => debug!("{e}"),
                },
                Err(e) => {
                    if !reported {
                        info!("waiting for containerd: {e}");
                        reported = true;
                    }
                }
            }
            // Drive timers while waiting (alias-churn releases, verification).
            self.tick_if_due().await.ok();
            if self.metrics.is_due() {
                self.publish_metrics();
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = images_dir_changed(&mut self.watch) => self.start_scan(),
                done = scan_finished(&mut self.scan_task) => {
                    if let Err(e) = self.scanned(done).await {
                        warn!("{e:#}");
                    }
                    continue;
                }
                Some(request) = self.control.recv() => {
                    if let Err(e) = self.answer(request).await {
                        warn!("{e:#}");
                    }
                    continue;
                }
                _ = watchdog_due(&mut self.watchdog) => {
                    crate::notify::watchdog();
                    continue;
                }
            }
        }
    }

    /// Subscribes, reconciles, then follows the stream until it breaks.
    async fn follow(&mut self, client: Containerd) -> anyhow::Result<()> {
        let subscription = match client.subscribe().await {
            Ok(s) => s,
            Err(e) => {
                warn!("{e}; retrying");
                tokio::time::sleep(RETRY_MAX_FAST).await;
                return Ok(());
            }
        };
        let subscribed_at = tokio::time::Instant::now();
        let shared = Arc::new(Shared {
            queue: Mutex::new(EventQueue::new(&self.engine.config().program_label)),
            broken: Mutex::new(None),
            wake: Notify::new(),
        });
        let reader = tokio::spawn(read_events(subscription, shared.clone()));
        let _abort = AbortOnDrop(reader);
        self.client = Some(client);
        self.status.connected_since = Some(now_ms());
        self.metrics.metrics().subscribed();

        self.resync(&shared, ListCause::Connected).await?;
        debug!(elapsed = ?subscribed_at.elapsed(), "reconciled after connecting");

        loop {
            let wakeup = self.engine.next_wakeup().map(|at| {
                tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()))
            });
            let woke = tokio::select! {
                _ = shared.wake.notified() => Wake::Events,
                _ = sleep_until(wakeup) => Wake::Timer,
                _ = sleep_until(self.verify_wait_until) => Wake::VerifyOverdue,
                _ = images_dir_changed(&mut self.watch) => Wake::ImagesDir,
                done = scan_finished(&mut self.scan_task) => Wake::Scanned(Box::new(done)),
                Some(request) = self.control.recv() => Wake::Control(request),
                _ = watchdog_due(&mut self.watchdog) => Wake::Watchdog,
                _ = self.metrics.due() => Wake::Metrics,
            };
            match woke {
                Wake::Events => {}
                Wake::Metrics => {
                    self.publish_metrics();
                    continue;
                }
                Wake::Watchdog => {
                    crate::notify::watchdog();
                    continue;
                }
                Wake::Timer => {
                    self.process(vec![Input::Tick]).await?;
                    continue;
                }
                Wake::VerifyOverdue => {
                    self.verify_overdue().await?;
                    continue;
                }
                Wake::ImagesDir => {
                    self.start_scan();
                    continue;
                }
                Wake::Scanned(done) => {
                    // Events that came first are applied first.
                    self.drain(&shared).await?;
                    self.scanned(*done).await?;
                }
                Wake::Control(request) => {
                    // Events that came first are applied first: the answer (and a
                    // reconcile's listing) is never older than them.
                    self.drain(&shared).await?;
                    self.answer(request).await?;
                }
            }
            self.drain(&shared).await?;
            if let Some(e) = lock(&shared.broken).take() {
                warn!("lost containerd's event stream ({e}); reconnecting");
                return Ok(());
            }
        }
    }

    /// Hands the queued events to the engine.
    async fn drain(&mut self, shared: &Shared) -> anyhow::Result<()> {
        {
            let (events, overflowed) = {
                let mut queue = lock(&shared.queue);
                let overflowed = queue.take_overflow();
                (queue.drain(), overflowed)
            };
            if overflowed {
                warn!("more image events than pinkeeper could queue; listing all images instead");
                self.resync(shared, ListCause::Connected).await?;
            } else {
                let mut events = events.into_iter().map(Input::Event).peekable();
                while events.peek().is_some() {
                    self.process(events.by_ref().take(BATCH).collect()).await?;
                }
            }
        }
        Ok(())
    }

    /// Rescans the directory and lists every image: events before this are covered by it.
    async fn resync(&mut self, shared: &Shared, cause: ListCause) -> anyhow::Result<()> {
        self.rescan_within(SCAN_WAIT).await?;
        lock(&shared.queue).clear();
        self.list(cause).await
    }

    async fn list(&mut self, cause: ListCause) -> anyhow::Result<()> {
        let Some(client) = self.client.clone() else {
            return Ok(());
        };
        match client.list().await {
            Ok(images) => {
                debug!(images = images.len(), ?cause, "listed images");
                let reconciling = matches!(cause, ListCause::Connected);
                self.process(vec![Input::Listing { images, cause }]).await?;
                if reconciling {
                    self.metrics.metrics().reconciled();
                }
                Ok(())
            }
            Err(e) => {
                // The stream breaks too; the next connection lists again.
                warn!("{e}");
                Ok(())
            }
        }
    }

    /// Starts a scan of the images directory on the blocking pool, or, if one is running,
    /// asks for another after it.
    fn start_scan(&mut self) {
        let Some(mut scanner) = self.scanner.take() else {
            self.rescan_wanted = true;
            return;
        };
        self.rescan_wanted = false;
        self.scans_started += 1;
        let mut problems = std::mem::take(&mut self.problems);
        self.scan_task = Some(tokio::task::spawn_blocking(move || {
            let result = scanner.scan().map(|inventory| {
                let report = problems.observe(&inventory);
                let provided = inventory.provided();
                let big = inventory.files.len() + inventory.skipped.len() + provided.len()
                    >= crate::memory::BURST;
                drop(inventory);
                if big {
                    // A scan of many files allocates per file what it does not keep.
                    crate::memory::release_freed();
                }
                (provided, report)
            });
            let cached = scanner.cache_changes();
            (scanner, problems, result, cached)
        }));
    }

    /// Scans the directory and waits for the result up to `budget`; a scan that takes longer
    /// goes on, and is applied when it ends.
    async fn rescan_within(&mut self, budget: Duration) -> anyhow::Result<()> {
        self.start_scan();
        let Some(task) = self.scan_task.as_mut() else {
            return Ok(());
        };
        match tokio::time::timeout(budget, task).await {
            Ok(done) => {
                self.scan_task = None;
                self.scanned(done).await
            }
            Err(_) => {
                debug!(
                    ?budget,
                    "the images directory is still being read; going on without waiting"
                );
                Ok(())
            }
        }
    }

    /// A scan ended: its cache goes to the ledger, its broken files are reported, its
    /// inventory goes to the engine; then a verification waiting for it lists, and a scan
    /// asked for meanwhile starts.
    async fn scanned(
        &mut self,
        done: Result<ScanOutcome, tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let finished = self.scans_started;
        let provided = match done {
            Ok((scanner, problems, result, cached)) => {
                self.scanner = Some(scanner);
                self.problems = problems;
                if !cached.is_empty() {
                    // The read cache goes to the ledger in the background (it is a cache:
                    // losing the last batch to a crash only means reading those files again).
                    let _ = self.ledger.write(OwnedChange::from_cache_changes(cached));
                }
                match result {
                    Ok((provided, report)) => {
                        self.scan_error = None;
                        report.log();
                        self.status.images_read = now_ms();
                        self.status.images_broken = report.count;
                        Some(provided)
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if self.scan_error.as_ref() != Some(&e) {
                            warn!("{e}");
                            self.scan_error = Some(e);
                        }
                        None
                    }
                }
            }
            Err(e) => {
                // Nothing read from disk may stop pinkeeper: start again with an empty cache.
                warn!("the images directory scan failed ({e}); reading it again from scratch");
                self.scanner = Some(Scanner::new(&self.settings.images_dir));
                self.rescan_wanted = true;
                None
            }
        };
        if let Some(provided) = provided {
            self.process(vec![Input::Inventory(provided)]).await?;
        }
        if self.verify_after_scan.is_some_and(|n| n <= finished) {
            self.verify_after_scan = None;
            self.verify_wait_until = None;
            self.list(ListCause::Verify).await?;
        }
        if self.rescan_wanted {
            self.start_scan();
        }
        Ok(())
    }

    /// The verification waited [`SCAN_STUCK`] for a read of the images directory that did
    /// not end: it checks the pins with what was read before.
    async fn verify_overdue(&mut self) -> anyhow::Result<()> {
        self.verify_wait_until = None;
        if self.verify_after_scan.take().is_some() {
            warn!(
                "the images directory has been read for over {}s without an end; checking the pins with the files read before",
                SCAN_STUCK.as_secs()
            );
            self.list(ListCause::Verify).await?;
        }
        Ok(())
    }

    /// Starts watching the images directory, or checks the watch (re-added if it was lost).
    fn watch_images_dir(&mut self) {
        match &self.watch {
            Some(watch) if watch.is_alive() => watch.rearm(),
            _ => match Watcher::start(&self.settings.images_dir) {
                Ok(watch) => self.watch = Some(watch),
                Err(e) => warn!(
                    dir = %self.settings.images_dir.display(),
                    "cannot watch the images directory ({e}); it is read again at each \
                     connection to containerd instead"
                ),
            },
        }
    }

    /// Counts the gauges and rewrites the metrics textfile (src/metrics.rs); nothing when
    /// metrics are off.
    fn publish_metrics(&mut self) {
        self.metrics.metrics().ledger(&self.ledger.health());
        self.metrics.publish(|| self.engine.tally());
    }

    async fn tick_if_due(&mut self) -> anyhow::Result<()> {
        if self.engine.next_wakeup().is_some_and(|at| at <= now_ms()) {
            self.process(vec![Input::Tick]).await?;
        }
        Ok(())
    }

    /// Feeds inputs to the engine and carries out everything that follows, until quiet.
    async fn process(&mut self, inputs: Vec<Input>) -> anyhow::Result<()> {
        let mut inputs: VecDeque<Input> = inputs.into();
        let mut changes: Vec<Output> = Vec::new();
        let mut handled = 0usize;
        while !inputs.is_empty() {
            let mut effects = Vec::new();
            while let Some(input) = inputs.pop_front() {
                handled += match &input {
                    Input::Listing { images, .. } => images.len(),
                    _ => 1,
                };
                for output in self.engine.handle(now_ms(), input) {
                    match output {
                        Output::Save { .. } | Output::Forget { .. } | Output::History(_) => {
                            changes.push(output)
                        }
                        other => effects.push(other),
                    }
                }
            }
            let pins_ahead = effects.iter().any(|o| matches!(o, Output::Pin { .. }));
            let unpins_ahead = effects.iter().any(|o| matches!(o, Output::Unpin { .. }));
            let new_intent = changes
                .iter()
                .any(|o| matches!(o, Output::Save { new: true, .. }));
            if (pins_ahead && new_intent) || unpins_ahead {
                // Contract rule 7: an intent is on disk before pinkeeper acts on it; and an
                // operator's release is, before the pin goes (else a crash in between would
                // read as K3s's sweep at the next start).
                self.commit(&mut changes, true).await?;
            }
            let (mut calls, others): (Vec<Output>, Vec<Output>) = effects
                .into_iter()
                .partition(|e| matches!(e, Output::Pin { .. } | Output::Fetch { .. }));
            // Pins first and all at once: an image of a gone archive stays unpinned for as
            // short a time as containerd allows (it serialises the writes itself).
            calls.sort_by_key(|c| !matches!(c, Output::Pin { .. }));
            self.call_all(calls, &mut inputs).await;
            for effect in others {
                self.carry_out(effect).await?;
            }
        }
        // Other changes need not hold up the pins: the writer commits them in the background.
        self.commit(&mut changes, false).await?;
        // The gauges are counted from the engine at the next publication, not here.
        self.metrics.metrics().touch();
        if handled >= crate::memory::BURST {
            crate::memory::release_freed();
        }
        Ok(())
    }

    async fn carry_out(&mut self, effect: Output) -> anyhow::Result<()> {
        match effect {
            Output::Verify => {
                debug!("start-up settled: reading the images directory, then checking that every intent is pinned");
                // The listing follows the scan that starts after this (see `scanned`), so a
                // slow directory never holds up the loop; one that never ends is not waited
                // for beyond SCAN_STUCK (see `verify_overdue`).
                self.verify_after_scan = Some(self.scans_started + 1);
                self.verify_wait_until = Some(tokio::time::Instant::now() + SCAN_STUCK);
                self.start_scan();
            }
            Output::Unpin { name } => {
                let result = match self.client.clone() {
                    Some(client) => client.unpin(&name).await,
                    None => Err(ApplyError::Failed("containerd is not connected".into())),
                };
                match result {
                    Ok(()) | Err(ApplyError::NotFound) => {
                        info!(image = %name, "removed io.cri-containerd.pinned: an operator ran `pinkeeper unpin`")
                    }
                    Err(ApplyError::Failed(why)) => {
                        warn!(image = %name, "could not remove the pin: {why}");
                        self.unpin_failures.push((name, why));
                    }
                }
            }
            Output::SweepSummary(s) => {
                self.metrics.metrics().sweep_seen(s.seen_live);
                self.status.last_sweep = Some(s.clone());
                log_sweep(&s);
            }
            Output::Pin { .. }
            | Output::Fetch { .. }
            | Output::Save { .. }
            | Output::History(_)
            | Output::Forget { .. } => {}
        }
        Ok(())
    }

    /// Carries out the pins and Gets concurrently (at most [`RPC_CONCURRENCY`] at once, pins
    /// first) and queues their outcomes for the engine.
    async fn call_all(&mut self, calls: Vec<Output>, inputs: &mut VecDeque<Input>) {
        enum Done {
            Pinned(String, RestoreReason, Result<(), ApplyError>),
            Fetched(String, Result<Option<ImageRecord>, ContainerdError>),
        }
        let Some(client) = self.client.clone() else {
            for call in calls {
                if let Output::Pin { name, .. } = call {
                    let result = Err(ApplyError::Failed("containerd is not connected".into()));
                    inputs.push_back(Input::Pinned { name, result });
                }
            }
            return;
        };
        let mut running = tokio::task::JoinSet::new();
        let mut calls = calls.into_iter();
        loop {
            while running.len() < RPC_CONCURRENCY {
                let client = client.clone();
                match calls.next() {
                    Some(Output::Pin { name, reason }) => running.spawn(async move {
                        let result = client.pin(&name).await;
                        Done::Pinned(name, reason, result)
                    }),
                    Some(Output::Fetch { name }) => running.spawn(async move {
                        let result = client.get(&name).await;
                        Done::Fetched(name, result)
                    }),
                    Some(_) => continue,
                    None => break,
                };
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            match done {
                Ok(Done::Pinned(name, reason, result)) => {
                    match &result {
                        Ok(()) => {
                            info!(
                                image = %name,
                                reason = ?reason,
                                "restored io.cri-containerd.pinned=pinned: {}",
                                reason.explain()
                            );
                            self.metrics.metrics().pinned(reason);
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
                Ok(Done::Fetched(name, Ok(record))) => {
                    inputs.push_back(Input::Fetched { name, record })
                }
                // containerd is going away: the next connection's listing covers it.
                Ok(Done::Fetched(_, Err(e))) => debug!("{e}"),
                Err(_) => {}
            }
        }
    }

    /// Hands the ledger changes to the writer. With `durably`, or when they record a new
    /// intent, waits until they are on disk: a recorded intent survives `kill -9`.
    async fn commit(&mut self, changes: &mut Vec<Output>, durably: bool) -> anyhow::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let durably = durably
            || changes
                .iter()
                .any(|c| matches!(c, Output::Save { new: true, .. }));
        let mut batch = Vec::with_capacity(changes.len());
        let mut history = Vec::new();
        for change in changes.drain(..) {
            match change {
                Output::Save { intent, .. } => batch.push(OwnedChange::Save(intent)),
                Output::Forget { name } => batch.push(OwnedChange::Forget(name)),
                Output::History(h) => {
                    history.push(h.clone());
                    batch.push(OwnedChange::History(h));
                }
                _ => {}
            }
        }
        let sent = if durably {
            self.ledger.write_durably(batch).await
        } else {
            self.ledger.write(batch)
        };
        if let Err(e) = sent {
            // The ledger cannot be written now (a full disk): the writer keeps the changes,
            // says so once and retries. Protection goes on from memory: the pins of this
            // batch are set all the same (contract rule 7 is kept as soon as the disk allows).
            debug!("ledger write not durable yet: {e}");
        }
        if let Some(captured) = self.captured.as_mut() {
            captured.extend(history.iter().cloned());
        }
        for h in history {
            match h.action.as_str() {
                "released" => info!(image = %h.name, "intent released: {}", h.detail),
                "restore-failed" => warn!(image = %h.name, "restore failed: {}", h.detail),
                "archive-gone" => info!(image = %h.name, "{}", h.detail),
                _ => debug!(image = %h.name, action = %h.action, "{}", h.detail),
            }
        }
        Ok(())
    }
}

/// Drains the stream into the queue at once, so containerd never buffers for pinkeeper.
async fn read_events(mut subscription: crate::containerd::Subscription, shared: Arc<Shared>) {
    loop {
        match subscription.next().await {
            Ok(Some(event)) => {
                lock(&shared.queue).push(event);
                shared.wake.notify_one();
            }
            Ok(None) => {}
            Err(e) => {
                *lock(&shared.broken) = Some(e);
                shared.wake.notify_one();
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolves when the scan in flight ends; never without one. Cancel-safe: the task stays.
async fn scan_finished(
    task: &mut Option<tokio::task::JoinHandle<ScanOutcome>>,
) -> Result<ScanOutcome, tokio::task::JoinError> {
    match task {
        Some(handle) => {
            let done = handle.await;
            *task = None;
            done
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the watchdog is due; never without one.
async fn watchdog_due(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The operator's one line about a sweep episode.
fn log_sweep(s: &SweepSummary) {
    info!(
                swept = s.swept,
                restored = s.restored_archive_gone + s.restored_not_repinned,
                archive_gone = s.restored_archive_gone,
                not_repinned = s.restored_not_repinned,
                repinned_by_k3s = s.repinned_by_k3s,
                seen = if s.seen_live { "live" } else { "after reconnecting" },
                "K3s startup sweep: {} pinned image(s) swept, {} restored by pinkeeper, {} pinned again by K3s",
                s.swept,
                s.restored_archive_gone + s.restored_not_repinned,
                s.repinned_by_k3s
    );
}

/// How many history entries `pinkeeper history` shows unless told.
const HISTORY_DEFAULT: usize = 100;

/// The operator's calls.
impl Daemon {
    /// Answers one call. Errors are the daemon's own (the ledger stopped): fatal.
    async fn answer(&mut self, request: Request) -> anyhow::Result<()> {
        let result = match request.call {
            Call::Status => Ok(Reply::Status(self.status())),
            Call::List(req) => Ok(Reply::List(self.list_intents(&req))),
            Call::Pin(req) => self.operator_pin(req.name.trim()).await?.map(Reply::Pin),
            Call::Unpin(req) => self
                .operator_unpin(req.name.trim(), req.all_names)
                .await?
                .map(Reply::Unpin),
            Call::History(req) => self.history(req).await.map(Reply::History),
            Call::Reconcile(req) => self.reconcile(req.dry_run).await?.map(Reply::Reconcile),
        };
        // The caller may have given up (timeout, Ctrl-C): nothing to do then.
        let _ = request.reply.send(result);
        Ok(())
    }

    fn status(&mut self) -> pb::StatusResponse {
        let summary = self.engine.summary();
        let ledger = self.ledger.health();
        let facts = &self.status;
        pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms: facts.started,
            connected: self.client.is_some(),
            containerd_version: facts.containerd_version.clone(),
            containerd_socket: self.settings.containerd_socket.display().to_string(),
            namespace: self.settings.namespace.clone(),
            images_dir: self.settings.images_dir.display().to_string(),
            ledger_path: crate::escape::path(&facts.ledger_path).to_string(),
            last_sweep: facts.last_sweep.as_ref().map(|s| pb::SweepInfo {
                started_ms: s.started,
                seen_live: s.seen_live,
                swept: s.swept as u32,
                restored_archive_gone: s.restored_archive_gone as u32,
                restored_not_repinned: s.restored_not_repinned as u32,
                repinned_by_k3s: s.repinned_by_k3s as u32,
            }),
            intents_held: summary.tally.held as u32,
            intents_swept: summary.tally.swept as u32,
            intents_released: summary.tally.released as u32,
            pins_restored: summary.restores,
            archives_gone: summary.archives_gone as u32,
            at_risk: summary.at_risk,
            last_reconcile_ms: facts.last_reconcile,
            connected_since_ms: facts.connected_since.unwrap_or(0),
            ledger_problem: ledger.problem.unwrap_or_default(),
            ledger_write_errors: ledger.write_errors,
            ledger_pending: u32::try_from(ledger.pending).unwrap_or(u32::MAX),
            ledger_recovered: ledger.recovered.unwrap_or_default(),
            images_dir_read_ms: facts.images_read,
            images_dir_broken: u32::try_from(facts.images_broken).unwrap_or(u32::MAX),
            images_dir_scans: self.scans_started - u64::from(self.scan_task.is_some()),
            verification_pending: self.engine.verification_pending(),
        }
    }

    fn list_intents(&mut self, req: &pb::ListRequest) -> pb::ListResponse {
        // One page (control::ListPage): the engine offers intents in name order.
        let page = control::ListPage::new(req);
        let intents = self
            .engine
            .views_of(|i| {
                (req.all || i.state != IntentState::Released)
                    && control::matches(&req.pattern, &i.name)
                    && page.takes(&i.name)
            })
            .iter()
            .map(intent_info)
            .collect();
        page.answer(intents)
    }

    fn connected(&self) -> Result<crate::containerd::Containerd, Refusal> {
        self.client.clone().ok_or_else(|| {
            Refusal::unavailable(format!(
                "pinkeeper is not connected to containerd at {} (K3s may be restarting); try again in a moment",
                self.settings.containerd_socket.display()
            ))
        })
    }

    /// Looks an image up by the name given, or by its normalized reference (`app:1` is
    /// `docker.io/library/app:1`, as K3s names it).
    async fn find(
        &self,
        client: &crate::containerd::Containerd,
        name: &str,
    ) -> Result<Option<ImageRecord>, Refusal> {
        let unavailable =
            |e: crate::containerd::ContainerdError| Refusal::unavailable(e.to_string());
        if let Some(record) = client.get(name).await.map_err(unavailable)? {
            return Ok(Some(record));
        }
        match crate::inventory::reference::normalize_reference(name) {
            Ok(full) if full != name => client.get(&full).await.map_err(unavailable),
            _ => Ok(None),
        }
    }

    fn no_such_image(&self, name: &str) -> Refusal {
        Refusal::not_found(format!(
            "no image {name} in containerd namespace {}; give the full name as `pinkeeper list` \
             or `ctr -n {} images ls` shows it (docker.io/library/app:1)",
            self.settings.namespace, self.settings.namespace
        ))
    }

    async fn operator_pin(
        &mut self,
        name: &str,
    ) -> anyhow::Result<Result<pb::PinResponse, Refusal>> {
        if name.is_empty() {
            return Ok(Err(Refusal::invalid("pin: give an image name")));
        }
        let client = match self.connected() {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        let record = match self.find(&client, name).await {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(Err(self.no_such_image(name))),
            Err(r) => return Ok(Err(r)),
        };
        let name = record.name.clone();
        let was_pinned = record.labels.get(CRI_PIN).map(String::as_str) == Some(PINNED);
        self.process(vec![Input::OperatorPin { record }]).await?;
        let Some(view) = self.engine.view(&name) else {
            return Ok(Err(Refusal::failed(format!(
                "{name}: the intent was not recorded"
            ))));
        };
        if !view.pinned_now {
            return Ok(Err(Refusal::failed(format!(
                "recorded the intent for {name}, but could not set io.cri-containerd.pinned (see \
                 pinkeeper's log); it is set again at the next `pinkeeper reconcile`"
            ))));
        }
        Ok(Ok(pb::PinResponse {
            intent: Some(intent_info(&view)),
            was_pinned,
        }))
    }

    async fn operator_unpin(
        &mut self,
        name: &str,
        all_names: bool,
    ) -> anyhow::Result<Result<pb::UnpinResponse, Refusal>> {
        if name.is_empty() {
            return Ok(Err(Refusal::invalid("unpin: give an image name")));
        }
        let client = match self.connected() {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        let record = match self.find(&client, name).await {
            Ok(r) => r,
            Err(r) => return Ok(Err(r)),
        };
        let name = record.as_ref().map_or(name.to_string(), |r| r.name.clone());
        if record.is_none() && self.engine.intent(&name).is_none() {
            return Ok(Err(self.no_such_image(&name)));
        }
        let digest = record
            .as_ref()
            .and_then(|r| r.digest.clone())
            .or_else(|| self.engine.intent(&name).and_then(|i| i.digest.clone()));
        // The other names of the same image: CRI keeps it pinned while any of them is.
        let mut same_image: Vec<ImageRecord> = Vec::new();
        if let Some(digest) = &digest {
            match client.list().await {
                Ok(images) => {
                    same_image = images
                        .into_iter()
                        .filter(|r| r.name != name && r.digest.as_ref() == Some(digest))
                        .collect()
                }
                Err(e) => return Ok(Err(Refusal::unavailable(e.to_string()))),
            }
        }
        let mut targets = vec![(name.clone(), record)];
        if all_names {
            targets.extend(same_image.iter().map(|r| (r.name.clone(), Some(r.clone()))));
        }
        self.unpin_failures.clear();
        let mut names = Vec::new();
        let mut warnings = Vec::new();
        for (target, record) in targets {
            let k3s_label = record.as_ref().is_some_and(|r| {
                r.labels
                    .get(&self.engine.config().program_label)
                    .map(String::as_str)
                    == Some(PINNED)
            });
            self.process(vec![Input::OperatorUnpin {
                name: target.clone(),
                record,
            }])
            .await?;
            if k3s_label {
                if let Some(file) = self.engine.archive_of(&target) {
                    warnings.push(format!(
                        "K3s pins {target} again at its next start: {} provides it; delete that \
                         file too if the image may be garbage-collected",
                        crate::escape::path(&file)
                    ));
                }
            }
            names.push(target);
        }
        let failures = std::mem::take(&mut self.unpin_failures);
        if !failures.is_empty() {
            let list: Vec<String> = failures
                .iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect();
            return Ok(Err(Refusal::failed(format!(
                "released the intent, but could not remove io.cri-containerd.pinned from {}; run \
                 `pinkeeper unpin` again",
                list.join("; ")
            ))));
        }
        let still_pinned_aliases: Vec<String> = if all_names {
            Vec::new()
        } else {
            same_image
                .iter()
                .filter(|r| r.labels.get(CRI_PIN).map(String::as_str) == Some(PINNED))
                .map(|r| r.name.clone())
                .collect()
        };
        if !still_pinned_aliases.is_empty() {
            warnings.push(format!(
                "the image stays pinned: CRI pins an image while any of its names is, and {} \
                 still carry the pin; use --all-names to unpin every name",
                still_pinned_aliases.join(", ")
            ));
        }
        Ok(Ok(pb::UnpinResponse {
            names,
            still_pinned_aliases,
            warnings,
        }))
    }

    async fn history(&mut self, req: pb::HistoryRequest) -> Result<pb::HistoryResponse, Refusal> {
        let limit = match req.limit {
            0 => HISTORY_DEFAULT,
            n => n as usize,
        };
        let name = Some(req.name.trim().to_string()).filter(|n| !n.is_empty());
        let entries = self
            .ledger
            .history(name, limit)
            .await
            .map_err(|e| Refusal::failed(format!("cannot read the ledger's history: {e}")))?;
        Ok(pb::HistoryResponse {
            entries: entries
                .into_iter()
                .map(|h| pb::HistoryEntry {
                    at_ms: h.at,
                    name: h.name,
                    action: h.action,
                    detail: h.detail,
                })
                .collect(),
        })
    }

    /// Reads the images directory and lists every image, as after a reconnection. With
    /// `dry_run`, a copy of the engine decides and nothing is written.
    async fn reconcile(
        &mut self,
        dry_run: bool,
    ) -> anyhow::Result<Result<pb::ReconcileResponse, Refusal>> {
        let client = match self.connected() {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        let decisions = if dry_run {
            // The engine's copy has the last inventory (the watch keeps it fresh): a dry run
            // reads nothing that would change the real engine.
            let provided = None;
            let images = match client.list().await {
                Ok(images) => images,
                Err(e) => return Ok(Err(Refusal::unavailable(e.to_string()))),
            };
            let mut what_if = self.engine.clone();
            simulate(&mut what_if, now_ms(), provided, images)
        } else {
            self.captured = Some(Vec::new());
            let done = async {
                self.rescan_within(OPERATOR_SCAN_WAIT).await?;
                self.list(ListCause::Connected).await
            }
            .await;
            let captured = self.captured.take().unwrap_or_default();
            done?;
            self.status.last_reconcile = now_ms();
            captured
                .into_iter()
                .map(|h| pb::Decision {
                    action: h.action,
                    name: h.name,
                    detail: h.detail,
                })
                .collect()
        };
        Ok(Ok(pb::ReconcileResponse { decisions, dry_run }))
    }
}

/// Runs a reconcile on a copy of the engine: every Get answered from the listing, every pin
/// taken as written, the churn window let pass. What it decided, in order.
fn simulate(
    engine: &mut Engine,
    now: Millis,
    provided: Option<BTreeMap<String, PathBuf>>,
    images: Vec<ImageRecord>,
) -> Vec<pb::Decision> {
    let by_name: BTreeMap<String, ImageRecord> =
        images.iter().map(|r| (r.name.clone(), r.clone())).collect();
    let mut inputs: VecDeque<(Millis, Input)> = VecDeque::new();
    if let Some(provided) = provided {
        inputs.push_back((now, Input::Inventory(provided)));
    }
    inputs.push_back((
        now,
        Input::Listing {
            images,
            cause: ListCause::Connected,
        },
    ));
    let later = now + engine.config().churn_window + 1;
    inputs.push_back((later, Input::Tick));
    let mut decisions = Vec::new();
    let mut verify_said = false;
    while let Some((at, input)) = inputs.pop_front() {
        for output in engine.handle(at, input) {
            match output {
                Output::Fetch { name } => {
                    let record = by_name.get(&name).cloned();
                    inputs.push_front((at, Input::Fetched { name, record }));
                }
                Output::Pin { name, .. } => inputs.push_front((
                    at,
                    Input::Pinned {
                        name,
                        result: Ok(()),
                    },
                )),
                Output::History(h) => decisions.push(pb::Decision {
                    action: h.action,
                    name: h.name,
                    detail: h.detail,
                }),
                Output::Verify if !verify_said => {
                    verify_said = true;
                    decisions.push(pb::Decision {
                        action: "verify".into(),
                        name: String::new(),
                        detail: "once the start-up settles, pinkeeper checks that K3s pinned \
                                 again every swept image whose archive is still there"
                            .into(),
                    });
                }
                _ => {}
            }
        }
    }
    decisions
}

/// The API's view of an intent.
fn intent_info(view: &IntentView) -> pb::IntentInfo {
    let i = &view.intent;
    let state = match i.state {
        IntentState::Held => "held",
        IntentState::Swept => "swept",
        IntentState::Released => "released",
    };
    let source = i
        .source
        .as_ref()
        .map(|p| crate::escape::path(p).to_string());
    let why = match (i.origin, &source) {
        (Origin::Operator, _) => "pinned by an operator (pinkeeper pin)".to_string(),
        (Origin::SeenPinned, Some(file)) => format!("seen pinned; imported by K3s from {file}"),
        (Origin::SeenPinned, None) => {
            "seen pinned (not from a file of the images directory)".into()
        }
    };
    pb::IntentInfo {
        name: i.name.clone(),
        digest: i.digest.clone().unwrap_or_default(),
        state: state.into(),
        archive: view.archive.as_str().into(),
        source: source.unwrap_or_default(),
        pinned_now: view.pinned_now,
        exists: view.exists,
        why,
        since_ms: i.since,
        restores: i.restores,
        last_restored_ms: i.last_restored.unwrap_or(0),
        released_because: i.released_because.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(both: bool) -> engine::Labels {
        let mut labels = engine::Labels::new();
        labels.insert(CRI_PIN.into(), PINNED.into());
        if both {
            labels.insert(engine::K3S_PIN.into(), PINNED.into());
        }
        labels
    }

    #[test]
    fn a_dry_run_tells_a_missed_sweep_and_changes_nothing() {
        let record = |name: &str, labels| ImageRecord {
            name: name.into(),
            labels,
            digest: Some(format!("sha256:{name}")),
        };
        let mut engine = Engine::new(engine::Config::default(), []);
        engine.handle(0, Input::Inventory(BTreeMap::new()));
        engine.handle(
            0,
            Input::Listing {
                images: vec![record("a", pinned(true)), record("b", pinned(true))],
                cause: ListCause::Connected,
            },
        );
        let before: Vec<_> = engine.intents().cloned().collect();
        let mut what_if = engine.clone();
        // K3s swept both while pinkeeper was away; b's record is gone.
        let decisions = simulate(
            &mut what_if,
            1_000,
            Some(BTreeMap::new()),
            vec![record("a", engine::Labels::new())],
        );
        let said: Vec<(&str, &str)> = decisions
            .iter()
            .map(|d| (d.action.as_str(), d.name.as_str()))
            .collect();
        assert!(said.contains(&("swept", "a")), "{said:?}");
        assert!(said.contains(&("restored", "a")), "{said:?}");
        assert!(said.contains(&("released", "b")), "{said:?}");
        let after: Vec<_> = engine.intents().cloned().collect();
        assert_eq!(before, after);
    }
}
