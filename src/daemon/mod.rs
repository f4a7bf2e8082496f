//! `pinkeeper run`: the loop that follows containerd, and the daemon's state.
//!
//! One loop, list-then-watch: wait for containerd, subscribe (with a barrier), read the images
//! directory, list and reconcile, then follow the stream; on any break (of the stream, or a
//! listing that failed), start over. Between
//! two batches of events it serves the timers, the images directory's watch and scans
//! (scan.rs), the operator's calls (operator.rs), the watchdog and the metrics.
//!
//! The engine decides and the executor (executor.rs) carries its outputs out, for this loop
//! as for `replay` and the simulation; this file holds no rule of the contract and makes no
//! call to containerd's images itself.

pub mod executor;
mod inbox;
pub(crate) mod kubelet;
pub(crate) mod metrics;
pub(crate) mod notify;
pub mod operator;
mod scan;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::containerd::queue::EventQueue;
use crate::containerd::reconnect::{images_dir_changed, Backoff, RETRY_MAX_FAST};
use crate::containerd::Containerd;
use crate::control::{self, Request};
use crate::daemon::metrics::{Exporter, Metrics};
use crate::engine::{self, Action, Engine, HistoryEntry, Input, ListCause, Millis, SweepSummary};
use crate::inventory::watch::Watcher;
use crate::inventory::Scanner;
use crate::ledger::{Ledger, OwnedChange, Writer};
use executor::{Clock, Executor, Report};
use inbox::{lock, watchdog_due, EventInbox, ListingStart, Shared, DRAIN_TIME};
use scan::{finished, ScanOutcome, SCAN_WAIT};

/// The wall clock, in the engine's unit.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// The daemon's clock for the engine: a monotonic clock for every timer (an NTP step of
/// the wall clock, often by years on a node without a real-time clock, moves no decision),
/// and the wall clock for what is shown and stored.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    start: tokio::time::Instant,
}

impl SystemClock {
    fn new() -> Self {
        SystemClock {
            start: tokio::time::Instant::now(),
        }
    }

    /// When the engine's monotonic time `at` comes, for a sleep.
    fn instant(&self, at: Millis) -> tokio::time::Instant {
        self.start + Duration::from_millis(at)
    }
}

impl Clock for SystemClock {
    fn now(&self) -> engine::Now {
        engine::Now {
            mono: self.start.elapsed().as_millis() as Millis,
            wall: now_ms(),
        }
    }
}

/// The daemon's state.
struct Daemon {
    settings: Settings,
    /// The engine, the ledger (written on its own thread) and the clock.
    exec: Executor<Writer, SystemClock>,
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
    /// The connection's event queue, while connected: a listing forgets the events it shows.
    events: Option<Arc<Shared>>,
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
    /// systemd's watchdog, when `WatchdogSec=` is set: pinged from the main loop.
    watchdog: Option<tokio::time::Interval>,
    /// Prometheus metrics: counted and written out (textfile) when something changed.
    metrics: Exporter,
    /// Resolves the settings again (SIGHUP): the config file and the same flags.
    reload: Option<Reload>,
    /// CRI's view (what kubelet sees), as last read, and the read under way.
    cri: kubelet::CriFacts,
    cri_task: Option<kubelet::CriTask>,
    /// When to read CRI's view again while it reports an intent unpinned.
    cri_recheck_at: Option<tokio::time::Instant>,
}

/// Resolves the settings again, as `pinkeeper run` did at start: for SIGHUP.
pub type Reload = Box<dyn Fn() -> Result<Settings, crate::config::ConfigError> + Send>;

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
    /// The last SIGHUP's reading of the config (0: none), and why it did not apply.
    config_reloaded: Millis,
    config_reload_error: String,
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
    CriRecheck,
    Cri(Box<kubelet::CriDone>),
}

/// Runs until SIGTERM or SIGINT. Errors are fatal (the ledger cannot be written, ...).
pub async fn run(
    settings: Settings,
    config: engine::Config,
    reload: Option<Reload>,
) -> anyhow::Result<()> {
    // Room for the control socket's connections and the images directory's files.
    control::raise_fd_limit();
    crate::memory::tune();
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
    // SIGHUP reads the config again (`systemctl reload pinkeeper`): a call of the daemon's
    // loop, like an operator's, so it is applied between two batches.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let reloads = requests.clone();
    let _reloader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let (reply, _) = tokio::sync::oneshot::channel();
            let request = Request {
                call: control::Call::Reload,
                reply,
            };
            if reloads.send(request).await.is_err() {
                return;
            }
        }
    }));
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
        Some(address) => crate::daemon::metrics::listen(address, metrics.clone()).await,
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
    let _http = http.map(tokio_util::task::AbortOnDropHandle::new);
    // Files read by an earlier run and unchanged since are not read again.
    let scanner = Scanner::new(&settings.images_dir).with_stored(started.contents.cached);
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
        watchdog: crate::daemon::notify::watchdog_period().map(|period| {
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
        exec: Executor::new(
            Engine::new(config, intents),
            Writer::spawn_observed(
                started.ledger,
                &settings.state_dir,
                started.problem,
                metrics.ledger_observer(),
            )?,
            SystemClock::new(),
        ),
        client: None,
        events: None,
        problems: crate::inventory::Problems::default(),
        watch: None,
        settings,
        metrics: exporter,
        reload,
        cri: kubelet::CriFacts::default(),
        cri_task: None,
        cri_recheck_at: None,
    };
    if let Some(recovered) = started.recovered {
        let entry = HistoryEntry {
            at: now_ms(),
            name: "(ledger)".into(),
            action: Action::LedgerRecovered,
            detail: recovered.clone().into(),
        };
        daemon.exec.journal.set_recovered(Some(recovered));
        let _ = daemon.exec.journal.write(vec![OwnedChange::History(entry)]);
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
    crate::daemon::notify::ready(&format!(
        "waiting for containerd at {}",
        daemon.settings.containerd_socket.display()
    ));
    let result = tokio::select! {
        () = daemon.serve() => Ok(()),
        signal = &mut shutdown => {
            info!("{signal}: stopping");
            Ok(())
        }
    };
    crate::daemon::notify::stopping();
    if let Some(server) = server {
        server.stop().await;
    }
    // Whatever is queued for the ledger is committed before pinkeeper exits.
    let closed = daemon.exec.journal.close();
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
    async fn serve(&mut self) {
        // The directory is read while pinkeeper connects; no archive is called gone unread
        // (the engine takes every archive as present until the first inventory). Watched
        // first: a change from then on is signalled, anything before is in this read.
        self.watch_images_dir(true);
        self.start_scan();
        loop {
            let client = self.wait_for_containerd().await;
            self.follow(client).await;
            self.client = None;
            self.events = None;
            self.status.connected_since = None;
            self.metrics.metrics().disconnected();
            crate::daemon::notify::status(&format!(
                "containerd at {} is away (K3s restarting?); waiting for it",
                self.settings.containerd_socket.display()
            ));
            self.process(vec![Input::Disconnected]).await;
        }
    }

    /// Connects with capped, jittered backoff; returns once subscribed is possible.
    async fn wait_for_containerd(&mut self) -> Containerd {
        self.watch_images_dir(false);
        let socket = self.settings.containerd_socket.clone();
        let mut backoff = Backoff::default();
        let mut reported = false;
        loop {
            let connected = Containerd::connect(&socket, &self.settings.namespace).await;
            // The engine reads the pins of a record, nothing else.
            let pins = [
                engine::CRI_PIN.to_string(),
                self.exec.engine.config().program_label.clone(),
            ];
            match connected.map(|c| c.keeping_labels(pins)) {
                Ok(client) => match client.version().await {
                    Ok(version) => {
                        info!(socket = %socket.display(), version, "connected to containerd");
                        crate::daemon::notify::status(&format!(
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
            let report = self.exec.tick_if_due::<Containerd>(None).await;
            self.after(report);
            if self.metrics.is_due() {
                self.publish_metrics();
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = images_dir_changed(&mut self.watch) => self.start_scan(),
                done = finished(&mut self.scan_task) => {
                    self.scanned(done).await;
                    continue;
                }
                Some(request) = self.control.recv() => {
                    self.answer(request).await;
                    continue;
                }
                _ = watchdog_due(&mut self.watchdog) => {
                    crate::daemon::notify::watchdog();
                    continue;
                }
            }
        }
    }

    /// Subscribes, reconciles, then follows the stream until it breaks.
    async fn follow(&mut self, client: Containerd) {
        let subscription = match client.subscribe().await {
            Ok(s) => s,
            Err(e) => {
                warn!("{e}; retrying");
                tokio::time::sleep(RETRY_MAX_FAST).await;
                return;
            }
        };
        let subscribed_at = tokio::time::Instant::now();
        let shared = Arc::new(Shared::new(EventQueue::new(
            &self.exec.engine.config().program_label,
        )));
        let reader = tokio::spawn(read_events(subscription, shared.clone()));
        let _abort = tokio_util::task::AbortOnDropHandle::new(reader);
        self.client = Some(client);
        self.events = Some(shared.clone());
        self.status.connected_since = Some(now_ms());
        self.metrics.metrics().subscribed();

        self.resync(&shared, ListCause::Connected).await;
        debug!(elapsed = ?subscribed_at.elapsed(), "reconciled after connecting");

        loop {
            let wakeup = self
                .exec
                .engine
                .next_wakeup()
                .map(|at| self.exec.clock.instant(at));
            let woke = tokio::select! {
                _ = shared.wake.notified() => Wake::Events,
                _ = sleep_until(wakeup) => Wake::Timer,
                _ = sleep_until(self.verify_wait_until) => Wake::VerifyOverdue,
                _ = sleep_until(self.cri_recheck_at) => Wake::CriRecheck,
                done = finished(&mut self.cri_task) => Wake::Cri(Box::new(done)),
                _ = images_dir_changed(&mut self.watch) => Wake::ImagesDir,
                done = finished(&mut self.scan_task) => Wake::Scanned(Box::new(done)),
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
                    crate::daemon::notify::watchdog();
                    // The textfile's age says pinkeeper is alive (alert PinkeeperTextfileStale).
                    self.metrics.heartbeat();
                    continue;
                }
                Wake::Timer => {
                    self.process(vec![Input::Tick]).await;
                    continue;
                }
                Wake::VerifyOverdue => {
                    self.verify_overdue().await;
                    continue;
                }
                Wake::CriRecheck => {
                    self.start_cri_check();
                    continue;
                }
                Wake::Cri(done) => {
                    self.cri_checked(*done);
                    continue;
                }
                Wake::ImagesDir => {
                    self.start_scan();
                    continue;
                }
                Wake::Scanned(done) => {
                    // Events that came first are applied first.
                    self.drain(&shared).await;
                    self.scanned(*done).await;
                }
                Wake::Control(request) => {
                    // Events that came first are applied first: the answer (and a
                    // reconcile's listing) is never older than them.
                    self.drain(&shared).await;
                    self.answer(request).await;
                }
            }
            self.drain(&shared).await;
            if let Some(e) = lock(&shared.broken).take() {
                warn!("{e}; reconnecting");
                return;
            }
        }
    }

    /// Hands the queued events to the engine, and the ones that arrive while its calls are in
    /// flight, for at most [`DRAIN_TIME`]; what is left wakes the loop again once its timers,
    /// the watchdog and the control socket had their turn.
    async fn drain(&mut self, shared: &Shared) {
        if self.overflowed(shared).await {
            return;
        }
        if lock(&shared.queue).is_empty() {
            return;
        }
        let client = self.client.clone();
        let mut inbox = EventInbox {
            shared,
            until: Some(Box::pin(tokio::time::sleep(DRAIN_TIME))),
            listed: None,
            watchdog: &mut self.watchdog,
            ping: crate::daemon::notify::watchdog,
        };
        let report = self
            .exec
            .process_with(client.as_ref(), Vec::new(), &mut inbox)
            .await;
        self.after(report);
        // The inbox may have taken the wake-ups of what came meanwhile.
        if !self.overflowed(shared).await && !lock(&shared.queue).is_empty() {
            shared.wake.notify_one();
        }
    }

    /// Whether the queue overflowed; if so, every image is listed instead (`true`).
    async fn overflowed(&mut self, shared: &Shared) -> bool {
        if !lock(&shared.queue).take_overflow() {
            return false;
        }
        warn!("more image events than pinkeeper could queue; listing all images instead");
        self.resync(shared, ListCause::Connected).await;
        true
    }

    /// Rescans the directory and lists every image: events before this are covered by it.
    async fn resync(&mut self, shared: &Shared, cause: ListCause) {
        self.rescan_within(SCAN_WAIT).await;
        lock(&shared.queue).clear();
        self.list(cause).await
    }

    /// Lists every image and reconciles ([`Executor::resync`]), taking the events that come
    /// while its calls run; those containerd published before the listing began are
    /// forgotten first ([`EventInbox::listed`]).
    async fn list(&mut self, cause: ListCause) {
        let (Some(client), Some(shared)) = (self.client.clone(), self.events.clone()) else {
            return;
        };
        let mut inbox = EventInbox {
            shared: &shared,
            until: None,
            listed: Some(ListingStart::now()),
            watchdog: &mut self.watchdog,
            ping: crate::daemon::notify::watchdog,
        };
        match self.exec.resync_with(&client, cause, &mut inbox).await {
            Ok(report) => {
                self.after(report);
                if cause == ListCause::Connected {
                    self.metrics.metrics().reconciled();
                    // Once a K3s start-up would have swept and settled.
                    let settle = Duration::from_millis(self.settings.settle_ms);
                    self.want_cri_check_after(settle + kubelet::AFTER_CONNECT);
                }
                // The inbox may have taken the wake-ups of what came meanwhile.
                if !lock(&shared.queue).is_empty() {
                    shared.wake.notify_one();
                }
            }
            // Events may have been cleared for it, and the stream may still be up (containerd
            // too slow to answer within the call's timeout): the connection starts over, and
            // the next one lists again.
            Err(e) => {
                lock(&shared.broken).get_or_insert(format!("listing failed: {e}"));
                shared.wake.notify_one();
            }
        }
    }

    fn publish_metrics(&mut self) {
        self.metrics.metrics().ledger(&self.exec.journal.health());
        self.metrics.publish(|| self.exec.engine.tally());
    }

    /// Feeds inputs to the engine through the executor, then does what its report asks.
    async fn process(&mut self, inputs: Vec<Input>) {
        let client = self.client.clone();
        let report = self.exec.process(client.as_ref(), inputs).await;
        self.after(report);
    }

    /// What the daemon does with an executor's report: the metrics, the status, a
    /// verification to start, the operator's answer.
    fn after(&mut self, report: Report) {
        for reason in &report.restored {
            self.metrics.metrics().pinned(*reason);
        }
        if report.pin_failures > 0 {
            self.metrics.metrics().pins_failed(report.pin_failures);
        }
        for s in report.sweeps {
            self.metrics.metrics().sweep_seen(s.seen_live);
            log_sweep(&s);
            self.status.last_sweep = Some(s);
            // Its restores are done: does kubelet see them?
            self.want_cri_check();
        }
        if report.verify {
            debug!("start-up settled: reading the images directory, then checking that every intent is pinned");
            self.start_verification();
        }
        if let Some(captured) = self.captured.as_mut() {
            captured.extend(report.history);
        }
        // The gauges are counted from the engine at the next publication, not here.
        self.metrics.metrics().touch();
        if report.handled >= crate::memory::BURST {
            crate::memory::release_freed();
        }
    }
}

async fn read_events(mut subscription: crate::containerd::Subscription, shared: Arc<Shared>) {
    loop {
        match subscription.next_published().await {
            Ok(Some((event, published))) => {
                lock(&shared.queue).push(event, published);
                shared.wake.notify_one();
            }
            Ok(None) => {}
            Err(e) => {
                *lock(&shared.broken) = Some(format!("lost containerd's event stream ({e})"));
                shared.wake.notify_one();
                return;
            }
        }
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
                restored = s.restored(),
                archive_gone = s.restored_archive_gone,
                not_repinned = s.restored_not_repinned,
                policy = s.restored_policy,
                repinned_by_k3s = s.repinned_by_k3s,
                seen = if s.seen_live { "live" } else { "after reconnecting" },
                "K3s startup sweep: {} pinned image(s) swept, {} restored by pinkeeper{}, {} pinned again by K3s",
                s.swept,
                s.restored(),
                s.policy_words(),
                s.repinned_by_k3s
    );
}
