//! `pinkeeper run`: wires containerd, the images directory and the ledger to the engine.
//!
//! One loop, list-then-watch: wait for containerd, subscribe (with a barrier), read the images
//! directory, list and reconcile, then follow the stream; on any break, start over. The engine
//! decides; this file only carries out its outputs, in an order that keeps the contract:
//! a newly recorded intent is committed to the ledger before any pin of the same batch.
//! It holds no rule of its own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::containerd::queue::EventQueue;
use crate::containerd::{Containerd, ContainerdError};
use crate::engine::{
    self, ApplyError, Engine, ImageRecord, Input, ListCause, Millis, Output, RestoreReason,
};
use crate::inventory::watch::Watcher;
use crate::inventory::Scanner;
use crate::ledger::{Ledger, OwnedChange, Writer};

/// First retry delay while containerd is away.
const RETRY_MIN: Duration = Duration::from_millis(20);
/// Retry delay cap during the first minute of an outage: K3s sweeps about a second after it
/// starts containerd, and pinkeeper wants to be subscribed by then.
const RETRY_MAX_FAST: Duration = Duration::from_millis(100);
/// Retry delay cap once containerd has been away for a while (K3s stopped).
const RETRY_MAX_SLOW: Duration = Duration::from_millis(1000);
/// How long an outage counts as "just restarting".
const FAST_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// Pins and Gets in flight at once: containerd serialises its metadata writes, so more buys
/// nothing.
const RPC_CONCURRENCY: usize = 32;
/// Events handed to the engine per batch (one ledger commit each).
const BATCH: usize = 4096;

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
    client: Option<Containerd>,
    /// Broken files of the images directory already reported (path, error): said once.
    reported_files: BTreeSet<(PathBuf, String)>,
    /// The live images directory: read again once a change has settled. Started (or, if
    /// inotify could not be set up, tried again) at each connection attempt.
    watch: Option<Watcher>,
}

/// Runs until SIGTERM or SIGINT. Errors are fatal (the ledger cannot be written, ...).
pub async fn run(settings: Settings, config: engine::Config) -> anyhow::Result<()> {
    let ledger = Ledger::open(&settings.state_dir)?;
    let intents = ledger.intents()?;
    // Files read by an earlier run and unchanged since are not read again.
    let scanner = Scanner::new(&settings.images_dir).with_cache(ledger.cached_files()?);
    info!(
        ledger = %ledger.path().display(),
        intents = intents.iter().filter(|i| i.state != engine::IntentState::Released).count(),
        "pinkeeper started"
    );
    let mut daemon = Daemon {
        scanner: Some(scanner),
        engine: Engine::new(config, intents),
        ledger: Writer::spawn(ledger)?,
        client: None,
        reported_files: BTreeSet::new(),
        watch: None,
        settings,
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    };
    tokio::pin!(shutdown);
    let result = tokio::select! {
        result = daemon.serve() => result,
        signal = &mut shutdown => {
            info!("{signal}: stopping");
            Ok(())
        }
    };
    // Whatever is queued for the ledger is committed before pinkeeper exits.
    daemon.ledger.close()?;
    result
}

impl Daemon {
    async fn serve(&mut self) -> anyhow::Result<()> {
        // Know the directory before the first listing: no archive is called gone unread.
        self.rescan().await?;
        loop {
            let client = self.wait_for_containerd().await;
            self.follow(client).await?;
            self.client = None;
            self.process(vec![Input::Disconnected]).await?;
        }
    }

    /// Connects with capped, jittered backoff; returns once subscribed is possible.
    async fn wait_for_containerd(&mut self) -> Containerd {
        self.watch_images_dir();
        let socket = self.settings.containerd_socket.clone();
        let started = tokio::time::Instant::now();
        let mut delay = RETRY_MIN;
        let mut reported = false;
        loop {
            match Containerd::connect(&socket, &self.settings.namespace).await {
                Ok(client) => match client.version().await {
                    Ok(version) => {
                        info!(socket = %socket.display(), version, "connected to containerd");
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
            tokio::select! {
                _ = tokio::time::sleep(jitter(delay)) => {}
                _ = images_dir_changed(&mut self.watch) => {
                    // Errors (the ledger) come back at the next write, in `follow`.
                    if let Err(e) = self.rescan().await {
                        warn!("{e:#}");
                    }
                }
            }
            let cap = if started.elapsed() < FAST_RETRY_WINDOW {
                RETRY_MAX_FAST
            } else {
                RETRY_MAX_SLOW
            };
            delay = (delay * 2).min(cap);
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

        self.resync(&shared, ListCause::Connected).await?;
        debug!(elapsed = ?subscribed_at.elapsed(), "reconciled after connecting");

        loop {
            let wakeup = self.engine.next_wakeup().map(|at| {
                tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()))
            });
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = sleep_until(wakeup) => {
                    self.process(vec![Input::Tick]).await?;
                    continue;
                }
                _ = images_dir_changed(&mut self.watch) => {
                    self.rescan().await?;
                    continue;
                }
            }
            let (events, overflowed) = {
                let mut queue = lock(&shared.queue);
                let overflowed = queue.take_overflow();
                (queue.drain(), overflowed)
            };
            if overflowed {
                warn!("more image events than pinkeeper could queue; listing all images instead");
                self.resync(&shared, ListCause::Connected).await?;
            } else {
                let mut events = events.into_iter().map(Input::Event).peekable();
                while events.peek().is_some() {
                    self.process(events.by_ref().take(BATCH).collect()).await?;
                }
            }
            if let Some(e) = lock(&shared.broken).take() {
                warn!("lost containerd's event stream ({e}); reconnecting");
                return Ok(());
            }
        }
    }

    /// Rescans the directory and lists every image: events before this are covered by it.
    async fn resync(&mut self, shared: &Shared, cause: ListCause) -> anyhow::Result<()> {
        self.rescan().await?;
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
                self.process(vec![Input::Listing { images, cause }]).await
            }
            Err(e) => {
                // The stream breaks too; the next connection lists again.
                warn!("{e}");
                Ok(())
            }
        }
    }

    /// Reads the images directory and hands it to the engine.
    async fn rescan(&mut self) -> anyhow::Result<()> {
        if let Some(provided) = self.scan().await? {
            self.process(vec![Input::Inventory(provided)]).await?;
        }
        Ok(())
    }

    /// Reads the images directory (blocking I/O, off the async thread). Broken files are
    /// reported once each; a directory that cannot be read gives `None` (nothing is called
    /// gone then; K3s's own re-pins and the verification still apply).
    async fn scan(&mut self) -> anyhow::Result<Option<BTreeMap<String, PathBuf>>> {
        let Some(mut scanner) = self.scanner.take() else {
            return Ok(None);
        };
        let (scanner, result, cached) = tokio::task::spawn_blocking(move || {
            let result = scanner.scan();
            let cached = scanner.cache_changes();
            (scanner, result, cached)
        })
        .await
        .context("the images directory scan panicked")?;
        self.scanner = Some(scanner);
        // The read cache goes to the ledger in the background (it is a cache: losing the
        // last batch to a crash only means reading those files again).
        if !cached.is_empty()
            && self
                .ledger
                .write(OwnedChange::from_cache_changes(cached))
                .is_err()
        {
            self.ledger.close()?;
            anyhow::bail!("the ledger writer stopped");
        }
        match result {
            Ok(inventory) => {
                let mut reported = BTreeSet::new();
                for entry in inventory.errors() {
                    let error = entry.error.clone().unwrap_or_default();
                    let key = (entry.path.clone(), error.clone());
                    if !self.reported_files.contains(&key) {
                        warn!(file = %entry.path.display(), "skipping a file of the images directory: {error}");
                    }
                    reported.insert(key);
                }
                self.reported_files = reported;
                Ok(Some(inventory.provided()))
            }
            Err(e) => {
                warn!("{e}");
                Ok(None)
            }
        }
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
        while !inputs.is_empty() {
            let mut effects = Vec::new();
            while let Some(input) = inputs.pop_front() {
                for output in self.engine.handle(now_ms(), input) {
                    match output {
                        Output::Save { .. } | Output::History(_) => changes.push(output),
                        other => effects.push(other),
                    }
                }
            }
            let pins_ahead = effects.iter().any(|o| matches!(o, Output::Pin { .. }));
            let new_intent = changes
                .iter()
                .any(|o| matches!(o, Output::Save { new: true, .. }));
            if pins_ahead && new_intent {
                // Contract rule 7: an intent is on disk before pinkeeper acts on it.
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
                self.carry_out(effect, &mut inputs).await?;
            }
        }
        // Other changes need not hold up the pins: the writer commits them in the background.
        self.commit(&mut changes, false).await
    }

    async fn carry_out(
        &mut self,
        effect: Output,
        inputs: &mut VecDeque<Input>,
    ) -> anyhow::Result<()> {
        match effect {
            Output::Verify => {
                debug!("start-up settled: checking that every intent is pinned");
                if let Some(provided) = self.scan().await? {
                    inputs.push_back(Input::Inventory(provided));
                }
                if let Some(client) = self.client.clone() {
                    match client.list().await {
                        Ok(images) => inputs.push_back(Input::Listing {
                            images,
                            cause: ListCause::Verify,
                        }),
                        Err(e) => warn!("{e}"),
                    }
                }
            }
            Output::SweepSummary(s) => info!(
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
            ),
            Output::Pin { .. } | Output::Fetch { .. } | Output::Save { .. } | Output::History(_) => {}
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
                        Ok(()) => info!(
                            image = %name,
                            reason = ?reason,
                            "restored io.cri-containerd.pinned=pinned: {}",
                            reason.explain()
                        ),
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
        if sent.is_err() {
            // The writer stopped on an error: report that one. Nothing more can be recorded.
            self.ledger.close()?;
            anyhow::bail!("the ledger writer stopped");
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

/// Resolves when the images directory changed and settled; never without a watch.
async fn images_dir_changed(watch: &mut Option<Watcher>) {
    match watch {
        Some(watch) => {
            watch.changed().await;
            debug!("the images directory changed: reading it again");
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

/// Up to a quarter more, so a fleet of nodes does not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos() as u64);
    d + Duration::from_nanos(nanos % (d.as_nanos() as u64 / 4 + 1))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
