//! The ledger: pinkeeper's durable record of intents and of what it did, in one redb file
//! (`<state-dir>/ledger.redb`).
//!
//! It owns that file and nothing else. Writes come in batches ([`Ledger::apply`]): one
//! transaction, one fsync (redb's `Durability::Immediate`, with its copy-on-write commit an
//! interrupted write leaves the previous state), so a burst of a thousand events costs a
//! handful of fsyncs. It does not decide anything: records are what the engine says they are.
//! It also keeps the images directory's read cache ([`CachedFile`]s, by path), so that an
//! unchanged archive is not read again after a restart.
//!
//! This file opens, checks and recovers the file: an empty, foreign, cut-short or damaged
//! ledger is never taken for a new one ([`Ledger::start`] moves it aside), and no panic of redb
//! on a damaged file gets out ([`guarded`]). `writer.rs` is the daemon's writer thread, which
//! keeps protecting when the file cannot be written.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};

use crate::engine::{HistoryEntry, Intent};
use crate::escape;
use crate::inventory::{CachedFile, StoredCache};

pub mod journal;
mod writer;

pub use journal::{Discard, Journal, MemoryLedger, WriteFault};
pub use writer::{CommitObserver, Health, OwnedChange, SharedHealth, Writer, MAX_PENDING_HISTORY};

/// Image name -> JSON of [`Intent`].
const INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("intents");
/// Sequence number -> JSON of [`HistoryEntry`].
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
/// Path under the images directory (its bytes) -> JSON of [`CachedFile`].
const FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("files");
/// History kept: older entries are dropped first. About 200 bytes each.
pub const MAX_HISTORY: u64 = 50_000;
/// redb's page cache: the ledger is read once at start, and then only written (history
/// queries read the few pages they need). With 10,000 intents a 4 MiB cache filled up and
/// stayed resident: a quarter of the daemon's idle memory target.
const CACHE_BYTES: usize = 1 << 20;
/// How long changes nobody waits for may wait for more before they are committed.
const WRITE_LINGER: std::time::Duration = std::time::Duration::from_millis(50);
/// File name inside the state directory.
pub const FILE_NAME: &str = "ledger.redb";

/// A ledger failure, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The state directory cannot be created.
    #[error("cannot create the state directory {}: {source}; create it (as root) or pass another --state-dir", escape::path(path))]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the ledger.
    #[error("the ledger {} is already open in another process: is another pinkeeper running with this --state-dir? Stop it first", escape::path(path))]
    Busy {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but is not a ledger pinkeeper can trust: empty, not a redb file, not
    /// pinkeeper's, or damaged. Never taken for a new ledger.
    #[error("the ledger {} is damaged: {reason}. `pinkeeper run` moves it aside (to {}.damaged-<time>) and starts a new one with every intent it could still read; keep the damaged copy for a bug report", escape::path(path), escape::path(path))]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file cannot be opened.
    #[error("cannot open the ledger {}: {reason}", escape::path(path))]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A read or write failed.
    #[error("ledger {}: {reason}", escape::path(path))]
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
    /// Delete an intent's record (its history stays).
    Forget(&'a str),
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

/// What a ledger file holds, read without writing to it.
#[derive(Debug, Default, Clone)]
pub struct Contents {
    /// Every intent that could be decoded, released ones included.
    pub intents: Vec<Intent>,
    /// The images directory's read cache.
    pub cached: StoredCache,
    /// Intent records that could not be decoded (named in [`Contents::problem`]).
    pub undecodable: Vec<String>,
}

impl Contents {
    /// What is wrong with the records, if anything.
    pub fn problem(&self) -> Option<String> {
        (!self.undecodable.is_empty()).then(|| {
            let first: Vec<String> = self
                .undecodable
                .iter()
                .take(5)
                .map(|n| escape::text(n).to_string())
                .collect();
            format!(
                "{} intent record(s) cannot be decoded and are ignored ({}{})",
                self.undecodable.len(),
                first.join(", "),
                if self.undecodable.len() > 5 {
                    ", ..."
                } else {
                    ""
                }
            )
        })
    }
}

/// How the daemon's ledger came up: see [`Ledger::start`].
#[derive(Debug)]
pub struct Start {
    /// The ledger, open for writing; `None` while it cannot be (a full disk, a read-only
    /// state directory): the writer keeps trying.
    pub ledger: Option<Ledger>,
    /// What the ledger held.
    pub contents: Contents,
    /// Why the ledger is not fully working, for the log, `status` and the metrics.
    pub problem: Option<String>,
    /// A damaged ledger that was moved aside at this start, and what was saved from it.
    pub recovered: Option<String>,
}

/// The redb file's first bytes (redb `tree_store/page_store/header.rs`, `MAGICNUMBER`).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Runs `f`, turning a panic into an error: redb may panic on a file damaged outside it
/// (redb's `Database::open` documentation), and no file on disk may take pinkeeper down.
/// Such a panic is not printed as one (it is no crash: the error that follows says what it
/// means); any other panic still is.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, LedgerError>) -> Result<T, LedgerError> {
    quiet_panics_when_guarded();
    GUARDED.with(|g| g.set(g.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get() - 1));
    result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(LedgerError::Damaged {
            path: path.to_path_buf(),
            reason: format!("reading it failed inside the database library ({what})"),
        })
    })
}

thread_local! {
    /// How deep this thread is in [`guarded`] calls.
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Installs, once, a panic hook that stays quiet (a debug line) for panics [`guarded`] turns
/// into errors, and hands every other panic to the hook that was there before.
fn quiet_panics_when_guarded() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|g| g.get()) > 0 {
                tracing::debug!("the database library panicked on a damaged ledger: {info}");
            } else {
                previous(info);
            }
        }));
    });
}

fn database_error(path: &Path, e: redb::DatabaseError) -> LedgerError {
    let path = path.to_path_buf();
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => LedgerError::Busy { path },
        redb::DatabaseError::UpgradeRequired(v) => LedgerError::Damaged {
            path,
            reason: format!("it is in an older database format ({v}), not one pinkeeper wrote"),
        },
        redb::DatabaseError::Storage(e) => storage_error(path, e),
        other => LedgerError::Open {
            path,
            reason: other.to_string(),
        },
    }
}

fn storage_error(path: PathBuf, e: redb::StorageError) -> LedgerError {
    match e {
        redb::StorageError::Corrupted(reason) => LedgerError::Damaged {
            path,
            reason: format!("the database check failed ({reason})"),
        },
        redb::StorageError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            LedgerError::Damaged {
                path,
                reason: format!("the file is cut short ({e})"),
            }
        }
        redb::StorageError::Io(e) => LedgerError::Io {
            path,
            reason: io_reason(&e),
        },
        other => LedgerError::Io {
            path,
            reason: other.to_string(),
        },
    }
}

/// An I/O error in words, with what to do for the ones an operator can fix.
fn io_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => format!(
            "{e}: the filesystem of the state directory is full; free space there (pinkeeper \
             keeps protecting from memory and writes everything once it can)"
        ),
        Some(libc::EROFS) => format!(
            "{e}: the state directory is on a read-only filesystem; pinkeeper protects from \
             memory only until it can write"
        ),
        _ => e.to_string(),
    }
}

impl Ledger {
    /// Opens `<state_dir>/ledger.redb`, or creates it when there is no such file. A file
    /// that is there but empty, foreign or damaged is refused ([`LedgerError::Damaged`]),
    /// never taken for a new ledger; nothing is moved (that is [`Ledger::start`]'s job).
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = state_dir.join(FILE_NAME);
        if std::fs::symlink_metadata(&path).is_err() {
            create_state_dir(state_dir)?;
            return Ledger::create_new(&path);
        }
        check_header(&path)?;
        Ledger::open_existing(&path)
    }

    /// Reads `<state_dir>/ledger.redb` without writing it, as far as redb allows (a file
    /// left by a crash is repaired first, as any open does): `None` when there is no file.
    pub fn inspect(state_dir: &Path) -> Result<Option<Contents>, LedgerError> {
        let path = state_dir.join(FILE_NAME);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        check_header(&path)?;
        let mut partial = Contents::default();
        match read_only(&path, &mut partial) {
            Err(LedgerError::Open { .. }) => {
                // Needs the repair an open after a crash does.
                let ledger = Ledger::open_existing(&path)?;
                let mut contents = Contents::default();
                guarded(&path, || ledger.read_contents(&mut contents))?;
                Ok(Some(contents))
            }
            other => other.map(|()| Some(partial)),
        }
    }

    /// Opens the daemon's ledger, staying up whatever the file's state: only another
    /// pinkeeper holding it is an error. A damaged (empty, foreign, corrupt) ledger is moved
    /// aside to `ledger.redb.damaged-<unix seconds>`, kept for inspection, and a new one is
    /// started with every intent that could still be read; a ledger that cannot be written
    /// (full disk, read-only filesystem) is read, and [`Writer`] opens it again later.
    pub fn start(state_dir: &Path, now_secs: u64) -> Result<Start, LedgerError> {
        let path = state_dir.join(FILE_NAME);
        let mut contents = Contents::default();
        let exists = std::fs::symlink_metadata(&path).is_ok();
        let opened = if !exists {
            create_state_dir(state_dir).and_then(|()| Ledger::create_new(&path))
        } else {
            check_header(&path)
                .and_then(|()| match read_only(&path, &mut contents) {
                    // A file left by a crash: the read-write open repairs it.
                    Err(LedgerError::Open { .. }) => Ok(false),
                    Err(e) => Err(e),
                    Ok(()) => Ok(true),
                })
                .and_then(|read| {
                    let ledger = Ledger::open_existing(&path)?;
                    if !read {
                        contents = Contents::default();
                        guarded(&path, || ledger.read_contents(&mut contents))?;
                    }
                    Ok(ledger)
                })
        };
        let problem = contents.problem();
        match opened {
            Ok(ledger) => Ok(Start {
                ledger: Some(ledger),
                contents,
                problem,
                recovered: None,
            }),
            Err(LedgerError::Busy { path }) => Err(LedgerError::Busy { path }),
            Err(LedgerError::Damaged { reason, .. }) => {
                Ok(Ledger::recover(&path, &reason, contents, now_secs))
            }
            Err(e) => Ok(Start {
                ledger: None,
                problem: Some(e.to_string()),
                contents,
                recovered: None,
            }),
        }
    }

    /// Moves a damaged ledger aside and starts a new one with what could be read of it.
    fn recover(path: &Path, reason: &str, contents: Contents, now_secs: u64) -> Start {
        let mut aside = path.as_os_str().to_owned();
        aside.push(format!(".damaged-{now_secs}"));
        let aside = PathBuf::from(aside);
        let saved = contents.intents.len();
        if let Err(e) = std::fs::rename(path, &aside) {
            return Start {
                ledger: None,
                problem: Some(format!(
                    "the ledger {} is damaged ({reason}) and cannot be moved aside ({}); \
                     pinkeeper protects from memory only: move it away by hand",
                    escape::path(path),
                    io_reason(&e)
                )),
                contents,
                recovered: None,
            };
        }
        let recovered = format!(
            "the ledger {} was damaged ({reason}): moved aside to {}, and a new ledger started \
             with the {saved} intent(s) that could be read; images pinned right now are \
             recorded again from containerd, intents of images that are unpinned right now \
             may be lost",
            escape::path(path),
            escape::path(&aside)
        );
        let created = Ledger::create_new(path).and_then(|mut ledger| {
            let changes: Vec<Change<'_>> = contents.intents.iter().map(Change::Save).collect();
            ledger.apply(&changes)?;
            Ok(ledger)
        });
        match created {
            Ok(ledger) => Start {
                ledger: Some(ledger),
                problem: None,
                contents,
                recovered: Some(recovered),
            },
            Err(e) => Start {
                ledger: None,
                problem: Some(e.to_string()),
                contents,
                recovered: Some(recovered),
            },
        }
    }

    /// Creates a new ledger atomically: initialised under a temporary name and renamed into
    /// place, so a crash or a full disk never leaves an empty `ledger.redb` behind.
    fn create_new(path: &Path) -> Result<Ledger, LedgerError> {
        let mut temp = path.as_os_str().to_owned();
        temp.push(".new");
        let temp = PathBuf::from(temp);
        let io = |e: std::io::Error| LedgerError::Io {
            path: path.to_path_buf(),
            reason: io_reason(&e),
        };
        match std::fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let made = guarded(path, || {
            let db = Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&temp)
                .map_err(|e| database_error(path, e))?;
            let txn = db.begin_write().map_err(|e| transaction_error(path, e))?;
            create_tables(&txn).map_err(|e| LedgerError::Io {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            txn.commit().map_err(|e| commit_error(path, e))?;
            Ok(())
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        std::fs::rename(&temp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            // The rename is durable once the directory is.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ledger::open_existing(path)
    }

    /// Opens a ledger file that exists, checking every page (redb's integrity check) so a
    /// file damaged outside redb is reported, not trusted.
    fn open_existing(path: &Path) -> Result<Ledger, LedgerError> {
        guarded(path, || {
            let db = Database::builder()
                .set_cache_size(CACHE_BYTES)
                .set_check_integrity_on_open(true)
                .open(path)
                .map_err(|e| database_error(path, e))?;
            let mut ledger = Ledger {
                db,
                path: path.to_path_buf(),
                next_seq: 0,
            };
            let tables = ledger.read(|txn| {
                Ok(txn
                    .list_tables()?
                    .map(|t| t.name().to_string())
                    .collect::<Vec<_>>())
            })?;
            let ours = [INTENTS.name(), HISTORY.name(), FILES.name()];
            if !tables.is_empty() && !tables.iter().any(|t| t == INTENTS.name()) {
                return Err(LedgerError::Damaged {
                    path: path.to_path_buf(),
                    reason: format!(
                        "it is a database, but not pinkeeper's (tables: {})",
                        tables.join(", ")
                    ),
                });
            }
            if ours.iter().any(|t| !tables.iter().any(|have| have == t)) {
                ledger.write(create_tables)?;
            }
            ledger.next_seq = ledger.read(|txn| {
                let table = txn.open_table(HISTORY)?;
                let next = table.last()?.map_or(0, |(k, _)| k.value() + 1);
                Ok(next)
            })?;
            Ok(ledger)
        })
    }

    /// Every intent and cached read, into `into` (so that what was read before a failure is
    /// kept by the caller).
    fn read_contents(&self, into: &mut Contents) -> Result<(), LedgerError> {
        self.read(|txn| read_tables(txn, into))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every intent, released ones included. Records that cannot be decoded are left out
    /// (see [`Contents::undecodable`]).
    pub fn intents(&self) -> Result<Vec<Intent>, LedgerError> {
        let mut contents = Contents::default();
        guarded(&self.path, || self.read_contents(&mut contents))?;
        Ok(contents.intents)
    }

    /// The cached reads of the images directory's files. A record that cannot be decoded
    /// (written by another version) is left out: that file is simply read again.
    pub fn cached_files(&self) -> Result<Vec<CachedFile>, LedgerError> {
        let mut files = Vec::new();
        guarded(&self.path, || {
            self.read(|txn| read_files(txn, &mut |file| files.push(file)))
        })?;
        Ok(files)
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
                    Change::Forget(name) => {
                        intents.remove(*name)?;
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
        let txn = self
            .db
            .begin_write()
            .map_err(|e| transaction_error(&self.path, e))?;
        let value = f(&txn).map_err(|e| LedgerError::Io {
            path: self.path.clone(),
            reason: boxed_reason(e.as_ref()),
        })?;
        txn.commit().map_err(|e| commit_error(&self.path, e))?;
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

fn boxed(e: serde_json::Error) -> Box<dyn std::error::Error> {
    Box::new(e)
}

/// A table operation's error in words (a full disk says what to do).
fn boxed_reason(e: &(dyn std::error::Error + 'static)) -> String {
    match e.downcast_ref::<redb::StorageError>() {
        Some(redb::StorageError::Io(io)) => io_reason(io),
        _ => e.to_string(),
    }
}

fn create_state_dir(state_dir: &Path) -> Result<(), LedgerError> {
    std::fs::create_dir_all(state_dir).map_err(|source| LedgerError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    })
}

/// Refuses a file that cannot be a ledger before redb sees it: redb initialises an empty file
/// as a new database, which would silently forget every intent.
fn check_header(path: &Path) -> Result<(), LedgerError> {
    let damaged = |reason: String| LedgerError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| LedgerError::Open {
        path: path.to_path_buf(),
        reason: io_reason(&e),
    })?;
    if !meta.is_file() {
        return Err(damaged("it is not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(damaged(
            "the file is empty (0 bytes), which pinkeeper never leaves behind".into(),
        ));
    }
    let mut head = [0u8; REDB_MAGIC.len()];
    let read = std::fs::File::open(path).and_then(|mut f| {
        use std::io::Read;
        let mut filled = 0;
        while filled < head.len() {
            match f.read(&mut head[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    });
    match read {
        Ok(n) if n == head.len() && head == REDB_MAGIC => Ok(()),
        Ok(_) => Err(damaged(
            "it does not start like a pinkeeper ledger (a redb database)".into(),
        )),
        Err(e) => Err(LedgerError::Open {
            path: path.to_path_buf(),
            reason: io_reason(&e),
        }),
    }
}

/// Reads a ledger without writing to it. `Err(Open)` when the file needs the repair of an
/// open after a crash (redb refuses to repair read-only); what was read before a failure
/// stays in `into`.
fn read_only(path: &Path, into: &mut Contents) -> Result<(), LedgerError> {
    guarded(path, || {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .open_read_only(path)
            .map_err(|e| match e {
                redb::DatabaseError::RepairAborted => LedgerError::Open {
                    path: path.to_path_buf(),
                    reason: "it needs repair after an unclean stop".into(),
                },
                other => database_error(path, other),
            })?;
        let txn = db.begin_read().map_err(|e| transaction_error(path, e))?;
        read_tables(&txn, into).map_err(|e| LedgerError::Damaged {
            path: path.to_path_buf(),
            reason: format!("its records cannot be read ({e})"),
        })
    })
}

fn create_tables(txn: &redb::WriteTransaction) -> Result<(), Box<dyn std::error::Error>> {
    txn.open_table(INTENTS)?;
    txn.open_table(HISTORY)?;
    txn.open_table(FILES)?;
    Ok(())
}

/// The intents (a record that cannot be decoded is named in `undecodable`) and the cached
/// reads (a record of another version is left out: that file is read again).
fn read_tables(
    txn: &redb::ReadTransaction,
    into: &mut Contents,
) -> Result<(), Box<dyn std::error::Error>> {
    let has = |name: &str| -> Result<bool, redb::StorageError> {
        Ok(txn.list_tables()?.any(|t| t.name() == name))
    };
    if has(INTENTS.name())? {
        let table = txn.open_table(INTENTS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            match serde_json::from_slice::<Intent>(v.value()) {
                Ok(intent) => into.intents.push(intent),
                Err(_) => into.undecodable.push(k.value().to_string()),
            }
        }
    }
    read_files(txn, &mut |file| into.cached.add(file))
}

/// The cached reads, a record at a time (a record of another version is left out: that file
/// is read again).
fn read_files(
    txn: &redb::ReadTransaction,
    into: &mut dyn FnMut(CachedFile),
) -> Result<(), Box<dyn std::error::Error>> {
    if txn.list_tables()?.any(|t| t.name() == FILES.name()) {
        let table = txn.open_table(FILES)?;
        for row in table.iter()? {
            let (k, v) = row?;
            if let Ok(mut file) = serde_json::from_slice::<CachedFile>(v.value()) {
                file.path = PathBuf::from(OsStr::from_bytes(k.value()));
                into(file);
            }
        }
    }
    Ok(())
}

fn transaction_error(path: &Path, e: redb::TransactionError) -> LedgerError {
    match e {
        redb::TransactionError::Storage(e) => storage_error(path.to_path_buf(), e),
        other => LedgerError::Io {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

fn commit_error(path: &Path, e: redb::CommitError) -> LedgerError {
    match e {
        redb::CommitError::Storage(e) => storage_error(path.to_path_buf(), e),
        other => LedgerError::Io {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests;
