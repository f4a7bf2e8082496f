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
pub(crate) mod metrics;
pub(crate) mod notify;
pub mod operator;
mod scan;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::Notify;
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
use executor::{Clock, Executor, Inbox, Report, BATCH};
use scan::{scan_finished, ScanOutcome, SCAN_WAIT};

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

/// A gap between the wall clock's and the monotonic clock's time over a listing past which
/// the wall clock is taken to have been stepped.
const CLOCK_STEP: Duration = Duration::from_secs(1);
/// How long one drain of the event queue goes on taking new events.
const DRAIN_TIME: Duration = Duration::from_millis(500);

/// Events shared between the stream reader task and the main loop.
struct Shared {
    queue: Mutex<EventQueue>,
    /// Why the connection must start over: set by the reader when the stream broke, or when
    /// a listing failed (the events cleared before it are then covered by nothing).
    broken: Mutex<Option<String>>,
    wake: Notify,
}

/// The event queue as the executor's inbox: events, a batch at a time, until its time is up.
struct EventInbox<'a> {
    shared: &'a Shared,
    /// When it stops taking events: one timer for the whole drain.
    until: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Kept alive while the drain's calls run ([`keep_watchdog`]).
    watchdog: &'a mut Option<tokio::time::Interval>,
    /// What tells systemd ([`crate::daemon::notify::watchdog`]).
    ping: fn(),
}

impl Inbox for EventInbox<'_> {
    fn take(&mut self) -> Vec<Input> {
        if self.until.is_elapsed() {
            return Vec::new();
        }
        let events = lock(&self.shared.queue).drain_up_to(BATCH);
        events.into_iter().map(Input::Event).collect()
    }

    async fn ready(&mut self) {
        let EventInbox {
            shared,
            until,
            watchdog,
            ping,
        } = self;
        let events = async {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = until.as_mut() => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = events => {}
            _ = keep_watchdog(watchdog, *ping) => {}
        }
    }
}

/// No inputs but the listing: a reconcile after connecting, with systemd's watchdog kept alive
/// while its calls run ([`keep_watchdog`]).
struct WatchdogInbox<'a> {
    watchdog: &'a mut Option<tokio::time::Interval>,
    /// What tells systemd ([`crate::daemon::notify::watchdog`]).
    ping: fn(),
}

impl Inbox for WatchdogInbox<'_> {
    fn take(&mut self) -> Vec<Input> {
        Vec::new()
    }

    async fn ready(&mut self) {
        keep_watchdog(self.watchdog, self.ping).await
    }
}

/// Tells systemd's watchdog that pinkeeper lives whenever it is due; never resolves. While the
/// executor carries out a long run of calls (100,000 restores take minutes, each call bounded by
/// [`crate::containerd::CALL_TIMEOUT`]), the main loop does not get its turn, and without this
/// systemd would kill pinkeeper in the middle of a repair (`WatchdogSec=30s`).
async fn keep_watchdog(watchdog: &mut Option<tokio::time::Interval>, ping: fn()) {
    loop {
        watchdog_due(watchdog).await;
        ping();
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
        // (the engine takes every archive as present until the first inventory).
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
        self.watch_images_dir();
        let socket = self.settings.containerd_socket.clone();
        let mut backoff = Backoff::default();
        let mut reported = false;
        loop {
            match Containerd::connect(&socket, &self.settings.namespace).await {
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
                done = scan_finished(&mut self.scan_task) => {
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
        let shared = Arc::new(Shared {
            queue: Mutex::new(EventQueue::new(&self.exec.engine.config().program_label)),
            broken: Mutex::new(None),
            wake: Notify::new(),
        });
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
                    crate::daemon::notify::watchdog();
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
            until: Box::pin(tokio::time::sleep(DRAIN_TIME)),
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

    /// Lists every image and reconciles ([`Executor::resync`]). The events queued meanwhile
    /// that containerd published before the listing began are forgotten: the listing shows
    /// their state or a later one, and applied after it they would read as news (an image's
    /// pins from before K3s's sweep, read after the listing that showed the sweep).
    async fn list(&mut self, cause: ListCause) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let (wall, mono) = (SystemTime::now(), tokio::time::Instant::now());
        let mut inbox = WatchdogInbox {
            watchdog: &mut self.watchdog,
            ping: crate::daemon::notify::watchdog,
        };
        let listed = self.exec.resync_with(&client, cause, &mut inbox).await;
        let wall_elapsed = SystemTime::now().duration_since(wall).ok();
        if let Some(shared) = &self.events {
            if listing_shows_the_past(listed.is_ok(), wall_elapsed, mono.elapsed()) {
                let forgotten = lock(&shared.queue).forget_published_before(wall);
                if forgotten > 0 {
                    debug!(forgotten, "events the listing already showed");
                }
            }
        }
        match listed {
            Ok(report) => {
                self.after(report);
                if cause == ListCause::Connected {
                    self.metrics.metrics().reconciled();
                }
            }
            // Events may have been cleared for it, and the stream may still be up (containerd
            // too slow to answer within the call's timeout): the connection starts over, and
            // the next one lists again.
            Err(e) => match &self.events {
                Some(shared) => {
                    lock(&shared.broken).get_or_insert(format!("listing failed: {e}"));
                    shared.wake.notify_one();
                }
                None => warn!("{e}"),
            },
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
        for (_, reason) in &report.restored {
            self.metrics.metrics().pinned(*reason);
        }
        for s in report.sweeps {
            self.metrics.metrics().sweep_seen(s.seen_live);
            log_sweep(&s);
            self.status.last_sweep = Some(s);
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

/// Whether a listing shows what containerd published before it began, so that the events
/// queued from before then can be forgotten: only a listing that was read, and only if the
/// wall clock (`wall_elapsed`, `None` if it went back) kept pace with the monotonic one
/// meanwhile; after a step, publication times say nothing about the listing.
fn listing_shows_the_past(
    listed: bool,
    wall_elapsed: Option<Duration>,
    mono_elapsed: Duration,
) -> bool {
    listed && wall_elapsed.is_some_and(|w| w.abs_diff(mono_elapsed) <= CLOCK_STEP)
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RESYNC_PINGS: AtomicUsize = AtomicUsize::new(0);
    static DRAIN_PINGS: AtomicUsize = AtomicUsize::new(0);

    fn watchdog_every_second() -> Option<tokio::time::Interval> {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(interval)
    }

    /// The executor waits on its inbox while calls are in flight: a reconcile whose calls take
    /// 10.5 s (simulated time) still tells systemd every second.
    #[tokio::test(start_paused = true)]
    async fn a_long_reconcile_keeps_the_watchdog_alive() {
        let mut watchdog = watchdog_every_second();
        let mut inbox = WatchdogInbox {
            watchdog: &mut watchdog,
            ping: || {
                RESYNC_PINGS.fetch_add(1, Ordering::SeqCst);
            },
        };
        let waited = tokio::time::timeout(Duration::from_millis(10_500), inbox.ready()).await;
        assert!(waited.is_err(), "a reconcile's inbox never has inputs");
        assert!(inbox.take().is_empty());
        // At 0, 1, ..., 10 s.
        assert_eq!(RESYNC_PINGS.load(Ordering::SeqCst), 11);
    }

    /// A drain's inbox too, also once it has stopped taking events; an event still wakes it.
    #[tokio::test(start_paused = true)]
    async fn a_long_drain_keeps_the_watchdog_alive() {
        let shared = Shared {
            queue: Mutex::new(EventQueue::new(crate::engine::K3S_PIN)),
            broken: Mutex::new(None),
            wake: Notify::new(),
        };
        let mut watchdog = watchdog_every_second();
        let mut inbox = EventInbox {
            shared: &shared,
            until: Box::pin(tokio::time::sleep(DRAIN_TIME)),
            watchdog: &mut watchdog,
            ping: || {
                DRAIN_PINGS.fetch_add(1, Ordering::SeqCst);
            },
        };
        let waited = tokio::time::timeout(Duration::from_millis(10_500), inbox.ready()).await;
        assert!(waited.is_err());
        assert_eq!(DRAIN_PINGS.load(Ordering::SeqCst), 11);
        let mut inbox = EventInbox {
            shared: &shared,
            until: Box::pin(tokio::time::sleep(DRAIN_TIME)),
            watchdog: &mut watchdog,
            ping: || {},
        };
        shared.wake.notify_one();
        let woke = tokio::time::timeout(Duration::from_millis(10), inbox.ready()).await;
        assert!(woke.is_ok(), "an event wakes the drain's inbox");
    }

    #[test]
    fn only_a_listing_read_with_a_steady_clock_forgets_events() {
        let ms = Duration::from_millis;
        assert!(listing_shows_the_past(true, Some(ms(40)), ms(42)));
        // A failed List covers nothing.
        assert!(!listing_shows_the_past(false, Some(ms(40)), ms(42)));
        // The wall clock stepped back, or forward, meanwhile.
        assert!(!listing_shows_the_past(true, None, ms(42)));
        assert!(!listing_shows_the_past(true, Some(ms(5_000)), ms(42)));
    }
}
