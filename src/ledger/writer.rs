//! The ledger's writer thread: commits the daemon's changes in batches, off the event loop,
//! and keeps protecting when the ledger cannot be written (changes held in memory, retried with
//! capped backoff, [`Health`] for `status`, `doctor` and the metrics).
//!
//! It owns the open [`Ledger`] once the daemon has started and nothing else; what to write is
//! the engine's business, how a file is opened or recovered is `super`'s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use super::{guarded, Change, Ledger, LedgerError, FILE_NAME, WRITE_LINGER};
use crate::engine::{HistoryEntry, Intent, Name};
use crate::inventory::CachedFile;

/// An owned change, for [`Writer`].
#[derive(Debug, Clone)]
pub enum OwnedChange {
    /// Insert or replace an intent (boxed: a repair queues 10,000 of these beside as many
    /// history entries, and a change is as large as its largest kind).
    Save(Box<Intent>),
    /// Delete an intent's record (its history stays).
    Forget(Name),
    /// Append to the history.
    History(HistoryEntry),
    /// Insert or replace the cached read of a file of the images directory.
    CacheFile(Box<CachedFile>),
    /// Forget the cached read of a file.
    ForgetFile(PathBuf),
}

impl OwnedChange {
    /// The borrowed form [`Ledger::apply`] takes.
    pub fn as_change(&self) -> Change<'_> {
        match self {
            OwnedChange::Save(i) => Change::Save(i),
            OwnedChange::Forget(n) => Change::Forget(n),
            OwnedChange::History(h) => Change::History(h),
            OwnedChange::CacheFile(f) => Change::CacheFile(f),
            OwnedChange::ForgetFile(p) => Change::ForgetFile(p),
        }
    }

    /// The changes that bring the ledger's copy of the images directory cache up to date.
    pub fn from_cache_changes(changes: crate::inventory::CacheChanges) -> Vec<OwnedChange> {
        let removed = changes.removed.into_iter().map(OwnedChange::ForgetFile);
        let updated = changes
            .updated
            .into_iter()
            .map(|f| OwnedChange::CacheFile(Box::new(f)));
        removed.chain(updated).collect()
    }
}

/// How the ledger is doing, shared by the writer thread with `status` and the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Health {
    /// Why the ledger cannot be written now (`None`: every change is on disk or on its way).
    pub problem: Option<String>,
    /// Failed commits (and failed attempts to open the ledger) since pinkeeper started.
    pub write_errors: u64,
    /// Changes kept in memory until the ledger can be written again.
    pub pending: usize,
    /// History entries dropped because too many piled up while the ledger could not be
    /// written (intents are never dropped).
    pub history_dropped: u64,
    /// A damaged ledger moved aside at start, and what was saved from it.
    pub recovered: Option<String>,
}

/// The shared [`Health`].
pub type SharedHealth = std::sync::Arc<std::sync::Mutex<Health>>;

fn health_of(health: &SharedHealth) -> std::sync::MutexGuard<'_, Health> {
    // A poisoned lock only means a panic elsewhere; the figures are still consistent.
    health.lock().unwrap_or_else(|p| p.into_inner())
}

/// History entries held in memory at most while the ledger cannot be written.
pub const MAX_PENDING_HISTORY: usize = 10_000;
/// Changes folded into one commit while the ledger can be written; more wait in the queue for
/// the next, where they take less memory than folded (a repair of 10,000 queues 20,000).
const COMMIT_MAX: usize = 1024;
/// Retries of a failed commit: the first after this, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest wait between two attempts to write a failed batch again.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Changes that could not be committed yet: the latest record per intent (every intent kept,
/// whatever the count), the history up to [`MAX_PENDING_HISTORY`]. Cache updates are not
/// kept: the cache is only a cache, a stale entry is read again.
#[derive(Debug, Default)]
struct Pending {
    saves: BTreeMap<Name, Box<Intent>>,
    forgets: BTreeSet<Name>,
    history: VecDeque<HistoryEntry>,
    files: Vec<OwnedChange>,
    history_dropped: u64,
}

impl Pending {
    fn add(&mut self, change: OwnedChange) {
        match change {
            OwnedChange::Save(intent) => {
                self.forgets.remove(intent.name.as_str());
                self.saves.insert(intent.name.clone(), intent);
            }
            OwnedChange::Forget(name) => {
                self.saves.remove(name.as_str());
                self.forgets.insert(name);
            }
            OwnedChange::History(entry) => {
                if self.history.len() >= MAX_PENDING_HISTORY {
                    self.history.pop_front();
                    self.history_dropped += 1;
                }
                self.history.push_back(entry);
            }
            file @ (OwnedChange::CacheFile(_) | OwnedChange::ForgetFile(_)) => {
                self.files.push(file)
            }
        }
    }

    fn len(&self) -> usize {
        self.saves.len() + self.forgets.len() + self.history.len() + self.files.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn batch(&self) -> Vec<Change<'_>> {
        let forgets = self.forgets.iter().map(|n| Change::Forget(n));
        let saves = self.saves.values().map(|i| Change::Save(i));
        let history = self.history.iter().map(Change::History);
        let files = self.files.iter().map(OwnedChange::as_change);
        forgets.chain(saves).chain(history).chain(files).collect()
    }

    /// After a failed commit: what is worth trying again.
    fn keep_after_failure(&mut self) {
        self.files.clear();
    }
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// A history read, answered after every change queued before it is committed.
struct HistoryQuery {
    name: Option<String>,
    limit: usize,
    reply: tokio::sync::oneshot::Sender<Result<Vec<HistoryEntry>, String>>,
}

/// What the writer thread is asked to do: commit changes (and say when, if asked), or read the
/// history once what came before is committed.
enum Job {
    Write(Vec<OwnedChange>, Option<Ack>),
    History(HistoryQuery),
}

/// Writes the ledger on a thread of its own, so an fsync never holds up the event loop, and
/// folds every batch queued while a commit was running into the next transaction: a burst of
/// events costs a handful of fsyncs. [`Writer::write_durably`] waits for its batch to be on disk.
///
/// A commit that fails (a full disk, an I/O error, a ledger that cannot be opened at all) never
/// stops it: the changes stay in memory ([`Pending`]), are tried again with capped backoff
/// (the ledger is opened again first: redb refuses further writes after an I/O error), and
/// [`Health`] says so. The daemon keeps protecting from what it holds in memory meanwhile.
#[derive(Debug)]
pub struct Writer {
    /// The queue; `None` once closed. Shared with [`Feed`]s, which hold no sender of their
    /// own: closing is never held up by one.
    jobs: Jobs,
    thread: Option<std::thread::JoinHandle<()>>,
    health: SharedHealth,
}

type Jobs = std::sync::Arc<std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>>;

/// Queues batches from another thread (a scan of the images directory, on the blocking
/// pool); once the writer is closed, a write fails and is dropped.
#[derive(Debug, Clone)]
pub struct Feed(Jobs);

impl Feed {
    /// Queues a batch; it is committed soon, with whatever else is queued.
    pub fn write(&self, changes: Vec<OwnedChange>) -> Result<(), String> {
        send_job(&self.0, Job::Write(changes, None))
    }
}

fn send_job(jobs: &Jobs, job: Job) -> Result<(), String> {
    // A panic while holding the lock leaves the sender as it was: still usable.
    let jobs = jobs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let jobs = jobs.as_ref().ok_or("the ledger writer is closed")?;
    jobs.send(job)
        .map_err(|_| "the ledger writer stopped".to_string())
}

/// Told how long each commit took, on the writer thread (the daemon's metrics).
pub type CommitObserver = Box<dyn Fn(std::time::Duration) + Send>;

/// The writer thread's state.
struct WriterThread {
    ledger: Option<Ledger>,
    state_dir: PathBuf,
    pending: Pending,
    health: SharedHealth,
    on_commit: CommitObserver,
    /// Attempts failed in a row, for the backoff.
    failures: u32,
}

impl WriterThread {
    fn run(mut self, queue: std::sync::mpsc::Receiver<Job>) {
        loop {
            let first = if self.pending.is_empty() && self.ledger.is_some() {
                match queue.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                }
            } else {
                match queue.recv_timeout(self.retry_delay()) {
                    Ok(job) => Some(job),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    // Stopping: one last attempt at what is pending.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = self.commit();
                        return;
                    }
                }
            };
            let mut acks: Vec<Ack> = Vec::new();
            let mut reads: Vec<HistoryQuery> = Vec::new();
            let mut received = 0usize;
            if let Some(first) = first {
                received += self.take(first, &mut acks, &mut reads);
                // Changes nobody waits for are held a moment, so a trickle of events
                // (CRI labelling images one by one) shares one fsync; a durable write or
                // a read is served at once.
                let linger_until = std::time::Instant::now() + WRITE_LINGER;
                loop {
                    let waited_for = !acks.is_empty() || !reads.is_empty();
                    let next = if waited_for {
                        queue.try_recv().ok()
                    } else {
                        let left =
                            linger_until.saturating_duration_since(std::time::Instant::now());
                        queue.recv_timeout(left).ok()
                    };
                    let Some(job) = next else { break };
                    received += self.take(job, &mut acks, &mut reads);
                    // While the ledger cannot be written (its last commit failed), everything
                    // is taken: a durable write's caller hears of it at once, not a retry
                    // later.
                    if self.ledger.is_some() && self.pending.len() >= COMMIT_MAX {
                        break;
                    }
                }
            }
            let reply = self.commit();
            for ack in acks {
                let _ = ack.send(reply.clone());
            }
            for query in reads {
                let answer = match &self.ledger {
                    Some(ledger) => guarded(&ledger.path, || {
                        ledger.history(query.name.as_deref(), query.limit)
                    })
                    .map_err(|e| e.to_string()),
                    None => Err(self.problem()),
                };
                let _ = query.reply.send(answer);
            }
            if received >= crate::memory::BURST {
                // The batch's encodings and redb's dirty pages are free now.
                crate::memory::release_freed();
            }
        }
    }

    fn take(&mut self, job: Job, acks: &mut Vec<Ack>, reads: &mut Vec<HistoryQuery>) -> usize {
        match job {
            Job::Write(changes, ack) => {
                let n = changes.len();
                for change in changes {
                    self.pending.add(change);
                }
                acks.extend(ack);
                n
            }
            Job::History(query) => {
                reads.push(query);
                0
            }
        }
    }

    fn problem(&self) -> String {
        health_of(&self.health)
            .problem
            .clone()
            .unwrap_or_else(|| "the ledger is not open".into())
    }

    fn retry_delay(&self) -> std::time::Duration {
        let doubled = RETRY_FIRST.saturating_mul(1 << self.failures.saturating_sub(1).min(8));
        doubled.min(RETRY_MAX)
    }

    /// Writes what is pending; the ledger is (re)opened first if needed.
    fn commit(&mut self) -> Result<(), String> {
        if self.pending.is_empty() && self.ledger.is_some() {
            return Ok(());
        }
        let result = self.try_commit();
        let mut health = health_of(&self.health);
        health.history_dropped = self.pending.history_dropped;
        match result {
            Ok(()) => {
                if let Some(problem) = health.problem.take() {
                    tracing::info!(
                        "the ledger can be written again; everything kept in memory is on disk \
                         (the problem was: {problem})"
                    );
                }
                self.failures = 0;
                health.pending = 0;
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                self.failures = self.failures.saturating_add(1);
                health.write_errors += 1;
                self.pending.keep_after_failure();
                health.pending = self.pending.len();
                if health.problem.is_none() {
                    tracing::error!(
                        pending = self.pending.len(),
                        "cannot write the ledger: {reason}; pinkeeper keeps protecting from memory and tries again (every {}s at most)",
                        RETRY_MAX.as_secs()
                    );
                } else {
                    tracing::debug!("the ledger still cannot be written: {reason}");
                }
                health.problem = Some(reason.clone());
                // redb refuses writes after an I/O error until it is opened again.
                self.ledger = None;
                Err(reason)
            }
        }
    }

    fn try_commit(&mut self) -> Result<(), LedgerError> {
        if self.ledger.is_none() {
            self.ledger = Some(Ledger::open(&self.state_dir)?);
        }
        let Some(ledger) = self.ledger.as_mut() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = self.pending.batch();
        let started = std::time::Instant::now();
        let path = ledger.path.clone();
        guarded(&path, || ledger.apply(&batch))?;
        (self.on_commit)(started.elapsed());
        self.pending = Pending {
            history_dropped: self.pending.history_dropped,
            ..Pending::default()
        };
        Ok(())
    }
}

impl Writer {
    /// Hands the ledger to a writer thread.
    pub fn spawn(ledger: Ledger) -> Result<Writer, LedgerError> {
        let state_dir = ledger
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Writer::spawn_observed(Some(ledger), &state_dir, None, Box::new(|_| {}))
    }

    /// Hands the ledger (or, when it could not be opened, the state directory to open it in
    /// later) to a writer thread that reports the time of each commit.
    pub fn spawn_observed(
        ledger: Option<Ledger>,
        state_dir: &Path,
        problem: Option<String>,
        on_commit: CommitObserver,
    ) -> Result<Writer, LedgerError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let health = SharedHealth::default();
        if ledger.is_none() {
            // The thread keeps trying to open it.
            health_of(&health).problem =
                Some(problem.unwrap_or_else(|| "the ledger is not open".into()));
        }
        let thread = WriterThread {
            ledger,
            state_dir: state_dir.to_path_buf(),
            pending: Pending::default(),
            health: health.clone(),
            on_commit,
            failures: 1,
        };
        let thread = std::thread::Builder::new()
            .name("pinkeeper-ledger".into())
            .spawn(move || thread.run(queue))
            .map_err(|e| LedgerError::Io {
                path: state_dir.join(FILE_NAME),
                reason: format!("cannot start the ledger writer thread: {e}"),
            })?;
        Ok(Writer {
            jobs: std::sync::Arc::new(std::sync::Mutex::new(Some(jobs))),
            thread: Some(thread),
            health,
        })
    }

    /// How the ledger is doing.
    pub fn health(&self) -> Health {
        health_of(&self.health).clone()
    }

    /// Records the recovery of a damaged ledger at start, for `status`.
    pub fn set_recovered(&self, recovered: Option<String>) {
        health_of(&self.health).recovered = recovered;
    }

    /// Queues a batch; it is committed soon, with whatever else is queued.
    pub fn write(&self, changes: Vec<OwnedChange>) -> Result<(), String> {
        self.send(changes, None)
    }

    /// Queues a batch and waits until it is on disk. An error says the ledger cannot be
    /// written now: the batch stays queued and is written once it can.
    pub async fn write_durably(&self, changes: Vec<OwnedChange>) -> Result<(), String> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.send(changes, Some(ack))?;
        done.await
            .map_err(|_| "the ledger writer stopped".to_string())?
    }

    /// History entries, newest first (optionally of one image, at most `limit`), read once
    /// every change queued before is committed.
    pub async fn history(
        &self,
        name: Option<String>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.job(Job::History(HistoryQuery { name, limit, reply }))?;
        answer
            .await
            .map_err(|_| "the ledger writer stopped".to_string())?
    }

    fn send(&self, changes: Vec<OwnedChange>, ack: Option<Ack>) -> Result<(), String> {
        self.job(Job::Write(changes, ack))
    }

    fn job(&self, job: Job) -> Result<(), String> {
        send_job(&self.jobs, job)
    }

    /// A handle for queueing batches from another thread.
    pub fn feed(&self) -> Feed {
        Feed(self.jobs.clone())
    }

    /// Commits everything queued (one last attempt if the ledger cannot be written) and stops
    /// the thread; returns the problem if changes could not be written.
    pub fn close(&mut self) -> Result<(), LedgerError> {
        *self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                return Err(LedgerError::Io {
                    path: PathBuf::new(),
                    reason: "the ledger writer thread panicked".into(),
                });
            }
        }
        let health = self.health();
        match health.problem {
            Some(reason) if health.pending > 0 => Err(LedgerError::Io {
                path: PathBuf::new(),
                reason: format!(
                    "{} change(s) could not be written: {reason}",
                    health.pending
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Action;
    use crate::ledger::tests::intent;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A writer on a new ledger in `dir`, and the count of its commits.
    fn counted(dir: &Path) -> (Writer, Arc<AtomicUsize>) {
        let commits = Arc::new(AtomicUsize::new(0));
        let seen = commits.clone();
        let writer = Writer::spawn_observed(
            Some(Ledger::open(dir).unwrap()),
            dir,
            None,
            Box::new(move |_took| {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .unwrap();
        (writer, commits)
    }

    #[tokio::test]
    async fn a_feed_writes_from_another_thread_and_never_holds_up_closing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = counted(dir.path());
        let feed = writer.feed();
        let file = crate::ledger::tests::cached(&dir.path().join("a.tar"), &["a"]);
        std::thread::spawn({
            let feed = feed.clone();
            let file = file.clone();
            move || feed.write(vec![OwnedChange::CacheFile(Box::new(file))])
        })
        .join()
        .unwrap()
        .unwrap();
        // Closing commits what was queued, although `feed` is still held.
        writer.close().unwrap();
        assert!(feed.write(Vec::new()).is_err(), "closed");
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.cached_files().unwrap(), vec![file]);
    }

    #[tokio::test]
    async fn the_writer_reports_each_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, commits) = counted(dir.path());
        writer
            .write_durably(vec![OwnedChange::Save(Box::new(intent("a")))])
            .await
            .unwrap();
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A read alone commits nothing.
        writer.history(None, 10).await.unwrap();
        writer.close().unwrap();
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_long_queue_is_committed_in_parts_and_a_durable_write_behind_it_waits_for_all() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, commits) = counted(dir.path());
        let n = COMMIT_MAX * 3;
        for batch in (0..n).collect::<Vec<_>>().chunks(100) {
            let changes = batch
                .iter()
                .map(|i| OwnedChange::Save(Box::new(intent(&format!("img{i}")))))
                .collect();
            writer.write(changes).unwrap();
        }
        writer
            .write_durably(vec![OwnedChange::Save(Box::new(intent("last")))])
            .await
            .unwrap();
        writer.close().unwrap();
        assert_eq!(
            Ledger::open(dir.path()).unwrap().intents().unwrap().len(),
            n + 1
        );
        // At most COMMIT_MAX changes (and the rest of the batch that passed it) in one commit,
        // however many are queued.
        let commits = commits.load(std::sync::atomic::Ordering::SeqCst);
        assert!(commits >= 3, "{commits} commits");
    }

    #[tokio::test]
    async fn the_writer_keeps_failed_changes_and_writes_them_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // The state directory cannot be created yet (a file is in the way).
        std::fs::write(&state, b"").unwrap();
        let writer =
            Writer::spawn_observed(None, &state, Some("blocked".into()), Box::new(|_| {})).unwrap();
        let err = writer
            .write_durably(vec![OwnedChange::Save(Box::new(intent("a")))])
            .await
            .unwrap_err();
        assert!(err.contains("state directory"), "{err}");
        let health = writer.health();
        assert!(health.problem.is_some() && health.pending == 1 && health.write_errors >= 1);
        // The way is cleared: the next retry (within RETRY_MAX) writes it.
        std::fs::remove_file(&state).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while writer.health().problem.is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                writer.health()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drop(writer);
        assert_eq!(
            Ledger::open(&state).unwrap().intents().unwrap(),
            vec![intent("a")]
        );
    }

    #[test]
    fn a_change_is_no_larger_than_a_history_entry() {
        // A repair of 10,000 queues 20,000 changes: the large kinds are boxed.
        assert_eq!(
            std::mem::size_of::<OwnedChange>(),
            std::mem::size_of::<HistoryEntry>()
        );
    }

    #[test]
    fn pending_changes_keep_every_intent_and_bound_the_history() {
        let mut pending = Pending::default();
        let h = HistoryEntry {
            at: 1,
            name: "a".into(),
            action: Action::Recorded,
            detail: "".into(),
        };
        for _ in 0..MAX_PENDING_HISTORY + 7 {
            pending.add(OwnedChange::History(h.clone()));
        }
        pending.add(OwnedChange::Save(Box::new(intent("a"))));
        pending.add(OwnedChange::Save(Box::new(intent("a"))));
        pending.add(OwnedChange::Save(Box::new(intent("b"))));
        pending.add(OwnedChange::Forget("b".into()));
        assert_eq!(pending.history.len(), MAX_PENDING_HISTORY);
        assert_eq!(pending.history_dropped, 7);
        assert_eq!(pending.saves.len(), 1);
        assert!(pending.forgets.contains("b"));
    }
}
