//! The daemon's reads of the images directory: scans run on the blocking pool while the loop
//! goes on, their inventory goes to the engine, and a start-up verification waits for the
//! scan that follows it (never beyond [`SCAN_STUCK`]). Also the directory's watch.
//!
//! It decides nothing about pins: the engine does, from the inventory.

use std::time::Duration;

use tracing::{debug, warn};

use super::{now_ms, Daemon};
use crate::engine::{Input, ListCause, Provided};
use crate::inventory::watch::Watcher;
use crate::inventory::Scanner;
use crate::ledger::OwnedChange;

/// How long a (re)connection waits for the images directory's scan before it lists anyway.
/// A scan of an unchanged directory takes milliseconds; a longer one (gigabytes of new
/// archives) is applied when it ends, and the engine restores then what it shows gone.
pub(super) const SCAN_WAIT: Duration = Duration::from_secs(1);
/// Read cache records handed to the ledger at once during a scan (see
/// [`Scanner::scan_problems_storing`]).
const CACHE_BATCH: usize = 1024;
/// How long the start-up verification waits for its read of the images directory (a hung
/// network filesystem) before it checks with the last inventory.
const SCAN_STUCK: Duration = Duration::from_secs(30);
/// How long an operator's `reconcile` waits for the scan: they asked for a fresh look.
pub(super) const OPERATOR_SCAN_WAIT: Duration = Duration::from_secs(5);

/// What a scan on the blocking pool hands back: the scanner (with its cache), the inventory,
/// and the cache changes for the ledger.
pub(super) type ScanOutcome = (
    Scanner,
    crate::inventory::Problems,
    Result<(Provided, crate::inventory::ProblemReport), crate::inventory::InventoryError>,
    crate::inventory::CacheChanges,
);

/// Resolves when the task in flight (a scan, a check of what kubelet sees) ends; never
/// without one. Cancel-safe: the task stays.
pub(super) async fn finished<T>(
    task: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(handle) => {
            let done = handle.await;
            *task = None;
            done
        }
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// The engine asked for a verification: the listing follows the scan that starts now
    /// (see `scanned`), so a slow directory never holds up the loop; one that never ends is
    /// not waited for beyond [`SCAN_STUCK`] (see `verify_overdue`).
    pub(super) fn start_verification(&mut self) {
        self.verify_after_scan = Some(self.scans_started + 1);
        self.verify_wait_until = Some(tokio::time::Instant::now() + SCAN_STUCK);
        self.start_scan();
    }

    /// Starts a scan of the images directory on the blocking pool, or, if one is running,
    /// asks for another after it.
    pub(super) fn start_scan(&mut self) {
        let Some(mut scanner) = self.scanner.take() else {
            self.rescan_wanted = true;
            return;
        };
        self.rescan_wanted = false;
        self.scans_started += 1;
        let mut problems = std::mem::take(&mut self.problems);
        let ledger = self.exec.journal.feed();
        self.scan_task = Some(tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let read_before = scanner.files_read();
            // The read cache goes to the ledger in the background as the scan goes (it is a
            // cache: losing a batch to a crash only means reading those files again).
            let mut store = |changes| {
                let _ = ledger.write(OwnedChange::from_cache_changes(changes));
            };
            let scanned = scanner.scan_problems_storing(CACHE_BATCH, &mut store);
            let result = scanned.map(|inventory| {
                let report = problems.observe(&inventory);
                // An index over the scanner's table: the names and paths are not copied.
                let provided = scanner.provided();
                let big = inventory.files.len() + inventory.skipped.len() + provided.len()
                    >= crate::memory::BURST;
                drop(inventory);
                if big {
                    // A scan of many files allocates per file what it does not keep.
                    crate::memory::release_freed();
                }
                debug!(
                    names = provided.len(),
                    files_read = scanner.files_read() - read_before,
                    took_ms = started.elapsed().as_millis() as u64,
                    "read the images directory"
                );
                (provided, report)
            });
            let cached = scanner.cache_changes();
            (scanner, problems, result, cached)
        }));
    }

    /// Scans the directory and waits for the result up to `budget`; a scan that takes longer
    /// goes on, and is applied when it ends.
    pub(super) async fn rescan_within(&mut self, budget: Duration) {
        self.start_scan();
        let Some(task) = self.scan_task.as_mut() else {
            return;
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
            }
        }
    }

    /// A scan ended: its cache goes to the ledger, its broken files are reported, its
    /// inventory goes to the engine; then a verification waiting for it lists, and a scan
    /// asked for meanwhile starts.
    pub(super) async fn scanned(&mut self, done: Result<ScanOutcome, tokio::task::JoinError>) {
        let finished = self.scans_started;
        let provided = match done {
            Ok((scanner, problems, result, cached)) => {
                self.scanner = Some(scanner);
                self.problems = problems;
                if !cached.is_empty() {
                    // The read cache goes to the ledger in the background (it is a cache:
                    // losing the last batch to a crash only means reading those files again).
                    let _ = self
                        .exec
                        .journal
                        .write(OwnedChange::from_cache_changes(cached));
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
            self.process(vec![Input::Inventory(provided)]).await;
        }
        if self.verify_after_scan.is_some_and(|n| n <= finished) {
            self.verify_after_scan = None;
            self.verify_wait_until = None;
            self.list(ListCause::Verify).await;
        }
        if self.rescan_wanted {
            self.start_scan();
        }
    }

    /// The verification waited [`SCAN_STUCK`] for a read of the images directory that did
    /// not end: it checks the pins with what was read before.
    pub(super) async fn verify_overdue(&mut self) {
        self.verify_wait_until = None;
        if self.verify_after_scan.take().is_some() {
            warn!(
                "the images directory has been read for over {}s without an end; checking the pins with the files read before",
                SCAN_STUCK.as_secs()
            );
            self.list(ListCause::Verify).await;
        }
    }

    /// Starts watching the images directory, or checks the watch (re-added if it was lost).
    /// `read_follows`: the caller starts a scan next, so arming the watch is no change.
    pub(super) fn watch_images_dir(&mut self, read_follows: bool) {
        let start = if read_follows {
            Watcher::start_before_read
        } else {
            Watcher::start
        };
        match &self.watch {
            Some(watch) if watch.is_alive() => watch.rearm(),
            _ => match start(&self.settings.images_dir) {
                Ok(watch) => self.watch = Some(watch),
                Err(e) => warn!(
                    dir = %self.settings.images_dir.display(),
                    "cannot watch the images directory ({e}); it is read again at each \
                     connection to containerd instead"
                ),
            },
        }
    }
}
