//! The ledger: pinkeeper's durable record of intents and of what it did, in one redb file
//! (`<state-dir>/ledger.redb`).
//!
//! It owns that file and nothing else. Writes come in batches ([`Ledger::apply`]): one
//! transaction, one fsync (redb's `Durability::Immediate`, with its copy-on-write commit an
//! interrupted write leaves the previous state), so a burst of a thousand events costs a
//! handful of fsyncs. It does not decide anything: records are what the engine says they are.
//! It also keeps the images directory's read cache ([`CachedFile`]s, by path), so that an
//! unchanged archive is not read again after a restart.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::engine::{HistoryEntry, Intent};
use crate::inventory::CachedFile;

/// Image name -> JSON of [`Intent`].
const INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("intents");
/// Sequence number -> JSON of [`HistoryEntry`].
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
/// Path under the images directory (its bytes) -> JSON of [`CachedFile`].
const FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("files");
/// History kept: older entries are dropped first. About 200 bytes each.
pub const MAX_HISTORY: u64 = 50_000;
/// redb's page cache: the ledger is small and read once at start.
const CACHE_BYTES: usize = 4 << 20;
/// How long changes nobody waits for may wait for more before they are committed.
const WRITE_LINGER: std::time::Duration = std::time::Duration::from_millis(50);
/// File name inside the state directory.
pub const FILE_NAME: &str = "ledger.redb";

/// A ledger failure, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The state directory cannot be created.
    #[error("cannot create the state directory {path}: {source}; create it (as root) or pass another --state-dir")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the ledger.
    #[error("the ledger {path} is already open in another process: is another pinkeeper running with this --state-dir? Stop it first")]
    Busy {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be opened or is damaged.
    #[error("cannot open the ledger {path}: {reason}. If the file is damaged, move it aside (mv {path} {path}.broken) and start pinkeeper again: it re-learns every image that is pinned now, but forgets the intents of images that are unpinned right now")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A read or write failed.
    #[error("ledger {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One change to write.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Insert or replace an intent.
    Save(&'a Intent),
    /// Append to the history.
    History(&'a HistoryEntry),
    /// Insert or replace the cached read of a file of the images directory.
    CacheFile(&'a CachedFile),
    /// Forget the cached read of a file.
    ForgetFile(&'a Path),
}

/// The open ledger.
#[derive(Debug)]
pub struct Ledger {
    db: Database,
    path: PathBuf,
    /// Next history sequence number.
    next_seq: u64,
}

impl Ledger {
    /// Opens (or creates) `<state_dir>/ledger.redb`.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        std::fs::create_dir_all(state_dir).map_err(|source| LedgerError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    LedgerError::Busy { path: path.clone() }
                }
                other => LedgerError::Open {
                    path: path.clone(),
                    reason: other.to_string(),
                },
            })?;
        let mut ledger = Ledger {
            db,
            path,
            next_seq: 0,
        };
        // Create the tables so readers never see them missing.
        ledger.write(|txn| {
            txn.open_table(INTENTS)?;
            txn.open_table(HISTORY)?;
            txn.open_table(FILES)?;
            Ok(())
        })?;
        ledger.next_seq = ledger.read(|txn| {
            let table = txn.open_table(HISTORY)?;
            let next = table.last()?.map_or(0, |(k, _)| k.value() + 1);
            Ok(next)
        })?;
        Ok(ledger)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every intent, released ones included. A record that cannot be decoded is an error
    /// naming it (nothing is dropped silently).
    pub fn intents(&self) -> Result<Vec<Intent>, LedgerError> {
        let rows = self.read(|txn| {
            let table = txn.open_table(INTENTS)?;
            let mut rows = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                rows.push((k.value().to_string(), v.value().to_vec()))
            }
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(name, bytes)| {
                serde_json::from_slice(&bytes).map_err(|e| LedgerError::Io {
                    path: self.path.clone(),
                    reason: format!("the record of {name} cannot be decoded ({e})"),
                })
            })
            .collect()
    }

    /// The cached reads of the images directory's files. A record that cannot be decoded
    /// (written by another version) is left out: that file is simply read again.
    pub fn cached_files(&self) -> Result<Vec<CachedFile>, LedgerError> {
        self.read(|txn| {
            let table = txn.open_table(FILES)?;
            let mut files = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                if let Ok(mut file) = serde_json::from_slice::<CachedFile>(v.value()) {
                    file.path = PathBuf::from(OsStr::from_bytes(k.value()));
                    files.push(file);
                }
            }
            Ok(files)
        })
    }

    /// History entries, newest first, optionally of one image, at most `limit`.
    pub fn history(
        &self,
        name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, LedgerError> {
        self.read(|txn| {
            let table = txn.open_table(HISTORY)?;
            let mut out = Vec::new();
            for row in table.iter()?.rev() {
                if out.len() >= limit {
                    break;
                }
                let (_, v) = row?;
                if let Ok(entry) = serde_json::from_slice::<HistoryEntry>(v.value()) {
                    if name.is_none_or(|n| n == entry.name) {
                        out.push(entry);
                    }
                }
            }
            Ok(out)
        })
    }

    /// Writes a batch in one durable transaction.
    pub fn apply(&mut self, changes: &[Change<'_>]) -> Result<(), LedgerError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut seq = self.next_seq;
        self.write(|txn| {
            let mut intents = txn.open_table(INTENTS)?;
            let mut history = txn.open_table(HISTORY)?;
            let mut files = txn.open_table(FILES)?;
            for change in changes {
                match change {
                    Change::Save(intent) => {
                        let bytes = serde_json::to_vec(intent).map_err(boxed)?;
                        intents.insert(intent.name.as_str(), bytes.as_slice())?;
                    }
                    Change::History(entry) => {
                        let bytes = serde_json::to_vec(entry).map_err(boxed)?;
                        history.insert(seq, bytes.as_slice())?;
                        seq += 1;
                    }
                    Change::CacheFile(file) => {
                        let bytes = serde_json::to_vec(file).map_err(boxed)?;
                        files.insert(file.path.as_os_str().as_bytes(), bytes.as_slice())?;
                    }
                    Change::ForgetFile(path) => {
                        files.remove(path.as_os_str().as_bytes())?;
                    }
                }
            }
            let excess = history.len()?.saturating_sub(MAX_HISTORY);
            for _ in 0..excess {
                history.pop_first()?;
            }
            Ok(())
        })?;
        self.next_seq = seq;
        Ok(())
    }

    fn write<T>(
        &mut self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, Box<dyn std::error::Error>>,
    ) -> Result<T, LedgerError> {
        let io = |e: &dyn std::fmt::Display| LedgerError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let txn = self.db.begin_write().map_err(|e| io(&e))?;
        let value = f(&txn).map_err(|e| io(&e))?;
        txn.commit().map_err(|e| io(&e))?;
        Ok(value)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, Box<dyn std::error::Error>>,
    ) -> Result<T, LedgerError> {
        let txn = self.db.begin_read().map_err(|e| LedgerError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        f(&txn).map_err(|e| LedgerError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

/// An owned change, for [`Writer`].
#[derive(Debug, Clone)]
pub enum OwnedChange {
    /// Insert or replace an intent.
    Save(Intent),
    /// Append to the history.
    History(HistoryEntry),
    /// Insert or replace the cached read of a file of the images directory.
    CacheFile(CachedFile),
    /// Forget the cached read of a file.
    ForgetFile(PathBuf),
}

impl OwnedChange {
    /// The borrowed form [`Ledger::apply`] takes.
    pub fn as_change(&self) -> Change<'_> {
        match self {
            OwnedChange::Save(i) => Change::Save(i),
            OwnedChange::History(h) => Change::History(h),
            OwnedChange::CacheFile(f) => Change::CacheFile(f),
            OwnedChange::ForgetFile(p) => Change::ForgetFile(p),
        }
    }

    /// The changes that bring the ledger's copy of the images directory cache up to date.
    pub fn from_cache_changes(changes: crate::inventory::CacheChanges) -> Vec<OwnedChange> {
        let removed = changes.removed.into_iter().map(OwnedChange::ForgetFile);
        let updated = changes.updated.into_iter().map(OwnedChange::CacheFile);
        removed.chain(updated).collect()
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
#[derive(Debug)]
pub struct Writer {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<Result<(), LedgerError>>>,
}

/// Told how long each commit took, on the writer thread (the daemon's metrics).
pub type CommitObserver = Box<dyn Fn(std::time::Duration) + Send>;

impl Writer {
    /// Hands the ledger to a writer thread.
    pub fn spawn(ledger: Ledger) -> Result<Writer, LedgerError> {
        Writer::spawn_observed(ledger, Box::new(|_| {}))
    }

    /// Hands the ledger to a writer thread that reports the time of each commit.
    pub fn spawn_observed(
        mut ledger: Ledger,
        on_commit: CommitObserver,
    ) -> Result<Writer, LedgerError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let path = ledger.path.clone();
        let thread = std::thread::Builder::new()
            .name("pinkeeper-ledger".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut changes = Vec::new();
                    let mut acks: Vec<Ack> = Vec::new();
                    let mut reads: Vec<HistoryQuery> = Vec::new();
                    let take =
                        |job: Job,
                         changes: &mut Vec<OwnedChange>,
                         acks: &mut Vec<Ack>,
                         reads: &mut Vec<HistoryQuery>| match job {
                            Job::Write(more, ack) => {
                                changes.extend(more);
                                acks.extend(ack);
                            }
                            Job::History(query) => reads.push(query),
                        };
                    take(first, &mut changes, &mut acks, &mut reads);
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
                        take(job, &mut changes, &mut acks, &mut reads);
                    }
                    let result = if changes.is_empty() {
                        Ok(())
                    } else {
                        let batch: Vec<Change<'_>> =
                            changes.iter().map(OwnedChange::as_change).collect();
                        let started = std::time::Instant::now();
                        let result = ledger.apply(&batch);
                        on_commit(started.elapsed());
                        result
                    };
                    let reply = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
                    for ack in acks {
                        let _ = ack.send(reply.clone());
                    }
                    for query in reads {
                        let answer = ledger
                            .history(query.name.as_deref(), query.limit)
                            .map_err(|e| e.to_string());
                        let _ = query.reply.send(answer);
                    }
                    if changes.len() >= crate::memory::BURST {
                        // The batch's encodings and redb's dirty pages are free now.
                        drop(changes);
                        crate::memory::release_freed();
                    }
                    result?;
                }
                Ok(())
            })
            .map_err(|e| LedgerError::Io {
                path,
                reason: format!("cannot start the ledger writer thread: {e}"),
            })?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues a batch; it is committed soon, with whatever else is queued.
    pub fn write(&self, changes: Vec<OwnedChange>) -> Result<(), String> {
        self.send(changes, None)
    }

    /// Queues a batch and waits until it is on disk.
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
        let jobs = self.jobs.as_ref().ok_or("the ledger writer is closed")?;
        jobs.send(job)
            .map_err(|_| "the ledger writer stopped after an error".to_string())
    }

    /// Commits everything queued and stops the thread; returns the first write error.
    pub fn close(&mut self) -> Result<(), LedgerError> {
        self.jobs = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(LedgerError::Io {
                path: PathBuf::new(),
                reason: "the ledger writer thread panicked".into(),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn boxed(e: serde_json::Error) -> Box<dyn std::error::Error> {
    Box::new(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{IntentState, Origin};

    fn intent(name: &str) -> Intent {
        Intent {
            name: name.to_string(),
            digest: Some("sha256:abc".into()),
            source: None,
            labels: Default::default(),
            state: IntentState::Held,
            origin: Origin::SeenPinned,
            since: 1,
            restores: 0,
            last_restored: None,
            released_because: None,
        }
    }

    #[test]
    fn survives_reopen_and_keeps_history_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut ledger = Ledger::open(dir.path()).unwrap();
            let a = intent("a");
            let h = HistoryEntry {
                at: 5,
                name: "a".into(),
                action: "recorded".into(),
                detail: "x".into(),
            };
            ledger
                .apply(&[Change::Save(&a), Change::History(&h), Change::History(&h)])
                .unwrap();
        }
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.intents().unwrap(), vec![intent("a")]);
        assert_eq!(ledger.history(Some("a"), 10).unwrap().len(), 2);
        assert_eq!(ledger.history(Some("b"), 10).unwrap().len(), 0);
        assert_eq!(ledger.next_seq, 2);
    }

    fn cached(path: &Path, names: &[&str]) -> CachedFile {
        use crate::inventory::{Compression, FileIdentity, FileKind, Layout};
        CachedFile {
            path: path.to_path_buf(),
            reader: "test".into(),
            identity: FileIdentity {
                dev: 1,
                ino: 2,
                size: 3,
                // past 2262, so over i64 nanoseconds
                mtime_ns: i128::from(i64::MAX) * 4 + 5,
            },
            kind: FileKind::Archive {
                compression: Compression::Zstd,
                layout: Some(Layout::DockerSave),
            },
            names: names.iter().map(|n| n.to_string()).collect(),
            error: None,
        }
    }

    #[test]
    fn cached_files_round_trip_and_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let odd = PathBuf::from(OsStr::from_bytes(b"/images/not-utf8-\xff.tar"));
        let a = cached(Path::new("/images/a.tar.zst"), &["docker.io/library/a:1"]);
        let mut b = cached(&odd, &[]);
        b.kind = crate::inventory::FileKind::List;
        b.error = Some("line 2 skipped by K3s".into());
        {
            let mut ledger = Ledger::open(dir.path()).unwrap();
            ledger
                .apply(&[Change::CacheFile(&a), Change::CacheFile(&b)])
                .unwrap();
            // a record another version cannot decode is left out, not an error
            ledger
                .write(|txn| {
                    txn.open_table(FILES)?
                        .insert(b"/images/garbage.tar".as_slice(), b"{".as_slice())?;
                    Ok(())
                })
                .unwrap();
        }
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let mut files = ledger.cached_files().unwrap();
        files.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(files, vec![a.clone(), b.clone()]);
        let changes = [OwnedChange::ForgetFile(odd.clone())];
        let batch: Vec<Change<'_>> = changes.iter().map(OwnedChange::as_change).collect();
        ledger.apply(&batch).unwrap();
        assert_eq!(ledger.cached_files().unwrap(), vec![a]);
        // the cache does not disturb the intents
        assert!(ledger.intents().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_writer_reports_each_commit() {
        let dir = tempfile::tempdir().unwrap();
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = commits.clone();
        let mut writer = Writer::spawn_observed(
            Ledger::open(dir.path()).unwrap(),
            Box::new(move |_took| {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .unwrap();
        writer
            .write_durably(vec![OwnedChange::Save(intent("a"))])
            .await
            .unwrap();
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A read alone commits nothing.
        writer.history(None, 10).await.unwrap();
        writer.close().unwrap();
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn second_open_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Ledger::open(dir.path()).unwrap();
        let err = Ledger::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("another pinkeeper"), "{err}");
    }

    #[test]
    fn garbage_file_is_reported_with_recovery_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            b"not a database at all, just bytes",
        )
        .unwrap();
        let err = Ledger::open(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ledger.redb") && text.contains("move it aside"),
            "{text}"
        );
    }
}
