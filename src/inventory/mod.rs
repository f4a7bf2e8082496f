//! The inventory of the K3s images directory (`<data-dir>/agent/images`): which files K3s
//! imports at start-up and which image names each of them provides.
//!
//! Owns: walking the directory the way K3s's importer does, reading archives the way
//! containerd's `Import` names their images, reading `.txt` pull lists, and a cache keyed by
//! file identity so an unchanged file is read once (exported and imported as [`CachedFile`]s
//! so the daemon can keep it in the ledger across restarts). Pure library code:
//! std I/O only, no async, no containerd, no clock; it never writes to the directory.
//!
//! K3s behaviour this mirrors (FACTS.md §2 "Import"; k3s `pkg/agent/containerd/watcher.go`
//! `processImageEvent`/`isFileSupported`, `containerd.go` `preloadFile`/`prePullImages`,
//! rancher/wharfie `pkg/tarfile`):
//! - A file is considered when its name ends, case-sensitively, in one of
//!   [`ARCHIVE_SUFFIXES`] or `.txt`. There is no rule about dotfiles: `.cache.json` is ignored
//!   for its suffix, but a `.hidden.tar` *is* imported by K3s, so it is listed here too.
//! - Directories are walked recursively in K3s's work-queue order: each directory's entries
//!   sorted by name, files before the contents of subdirectories (breadth first).
//! - Symbolic links are followed (K3s `os.Stat`s) only while the target stays inside the
//!   images directory (a pinkeeper rule: it never reads files elsewhere on the host); links
//!   out, broken links, loops and non-regular files are reported in [`Inventory::skipped`].
//!
//! A hostile directory must not block or bloat the daemon: every file is opened with
//! `O_NONBLOCK | O_NOFOLLOW` and its type checked on the open file (a fifo swapped in after the
//! walk is skipped, never waited on); duplicate names are checked in hash sets; junk (small files
//! that provide nothing) is remembered in 16 bytes a file and never stored; [`Problems`] turns
//! the scans into a bounded number of log lines.

mod archive;
mod cache;
pub mod problems;
mod read;
pub mod reference;
pub mod report;
mod walk;
pub(crate) mod watch;

pub use cache::StoredCache;
use cache::*;
pub use read::read_one;
use read::*;
use walk::*;

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{FileNames, Provided};
use crate::escape;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use problems::{ProblemChange, ProblemReport, Problems};
pub use reference::{normalize_reference, ReferenceError};

use archive::ReadOptions;

/// The archive suffixes K3s imports (wharfie `tarfile.SupportedExtensions`), matched
/// case-sensitively as K3s's watcher does.
pub const ARCHIVE_SUFFIXES: [&str; 8] = [
    ".tar", ".tar.lz4", ".tar.bz2", ".tbz", ".tar.gz", ".tgz", ".tar.zst", ".tzst",
];

/// The suffix of a list of image references that K3s pulls through CRI.
pub const LIST_SUFFIX: &str = ".txt";

/// The largest `.txt` list read into memory (K3s has no limit; ours keeps reads bounded).
const LIST_LIMIT: u64 = 16 * 1024 * 1024;

/// A file this small that provides no name is junk: its read is kept in memory only, compactly
/// (no path, a shared error text), and never handed to the caller's store, so 100,000 empty
/// `.tar` files neither grow the ledger nor the daemon. Reading it again after a restart costs
/// about what looking it up would. A larger broken file (a corrupt 2 GiB archive) is cached
/// and stored like any other, so it is not decompressed again at every start.
const JUNK_MAX_SIZE: u64 = 64 * 1024;

/// Distinct error texts kept for junk files; a junk file with yet another text is read again
/// at the next scan instead (they are small, by [`JUNK_MAX_SIZE`]).
const MAX_JUNK_TEXTS: usize = 1024;

/// Go's `bufio.MaxScanTokenSize`: K3s's line scanner gives up at a longer line and silently
/// ignores the rest of the list.
const MAX_LIST_LINE: usize = 64 * 1024 - 1;

/// How an archive is compressed, from its suffix (wharfie `GetOpener`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// `.tar`
    None,
    /// `.tar.gz`, `.tgz` (concatenated gzip members are read on, as Go's reader does)
    Gzip,
    /// `.tar.bz2`, `.tbz`
    Bzip2,
    /// `.tar.zst`, `.tzst`, with K3s's 32 MiB decoder window limit
    Zstd,
    /// `.tar.lz4`, the LZ4 frame format
    Lz4,
}

impl Compression {
    /// What `pinkeeper inventory` shows: `none`, `gzip`, `bzip2`, `zstd`, `lz4`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            other => other.name(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }
}

/// The archive format containerd recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `oci-layout` + `index.json` (including `docker save` since Docker 25).
    Oci,
    /// `manifest.json` with `RepoTags` (classic `docker save`).
    DockerSave,
}

impl Layout {
    /// What `pinkeeper inventory` shows: `oci`, `docker-save`.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Oci => "oci",
            Layout::DockerSave => "docker-save",
        }
    }
}

/// What a file in the images directory is to K3s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// An image archive; `layout` is `None` until (or unless) the content says which.
    Archive {
        /// From the file's suffix.
        compression: Compression,
        /// From the file's content.
        layout: Option<Layout>,
    },
    /// A `.txt` list of image references.
    List,
}

/// One file K3s would import, and what it provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// The path as found under the images directory (a link's own path, not its target).
    pub path: PathBuf,
    /// What K3s does with it.
    pub kind: FileKind,
    /// Image names as containerd records them (archives) or as CRI pulls them (lists),
    /// in file order, without duplicates.
    pub names: Vec<String>,
    /// Why the file provides nothing (archives: the import would fail), or, for a list, which
    /// lines K3s would skip. Starts with the file's path, escaped ([`crate::escape::path`]),
    /// and `: `. Made afresh by each scan: the scanner keeps errors without paths.
    pub error: Option<String>,
}

/// A path in the images directory that was not read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPath {
    /// The path under the images directory.
    pub path: PathBuf,
    /// Why it was passed over, and what to do about it.
    pub reason: String,
}

/// The result of one scan of the images directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Every considered file, in K3s's import order.
    pub files: Vec<FileEntry>,
    /// Paths passed over: links leading out of the directory, broken links, loops,
    /// non-regular files, unlistable subdirectories.
    pub skipped: Vec<SkippedPath>,
}

impl Inventory {
    /// Every image name some file provides, with the file that provides it (the first in
    /// import order).
    pub fn provided(&self) -> BTreeMap<String, PathBuf> {
        let mut provided = BTreeMap::new();
        for file in &self.files {
            for name in &file.names {
                provided
                    .entry(name.clone())
                    .or_insert_with(|| file.path.clone());
            }
        }
        provided
    }

    /// The file that provides `name`, if any (first in import order). One lookup walks every
    /// name once; to look up many names, build [`Inventory::providers`] once instead.
    pub fn provider_of(&self, name: &str) -> Option<&Path> {
        self.files
            .iter()
            .find(|f| f.names.iter().any(|n| n == name))
            .map(|f| f.path.as_path())
    }

    /// Name -> the file that provides it (the first in import order), for many lookups in
    /// constant time each.
    pub fn providers(&self) -> HashMap<&str, &Path> {
        let mut providers = HashMap::with_capacity(self.files.iter().map(|f| f.names.len()).sum());
        for file in &self.files {
            for name in &file.names {
                providers
                    .entry(name.as_str())
                    .or_insert(file.path.as_path());
            }
        }
        providers
    }

    /// The files that could not be read or provide nothing because they are broken.
    pub fn errors(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().filter(|f| f.error.is_some())
    }
}

/// A scan that could not happen at all.
#[derive(Debug, Error)]
pub enum InventoryError {
    #[error(
        "cannot read the K3s images directory {}: {source}; check that it is \
         <data-dir>/agent/images and that pinkeeper (root) can list it",
        escape::path(path)
    )]
    /// The directory exists but cannot be listed (or its path cannot be examined).
    Unreadable {
        /// The images directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// Tells what K3s would do with a file, by its name alone: `None` for files K3s ignores.
pub fn classify(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.as_bytes();
    // K3s's gate (`isFileSupported`) is case-sensitive; its dispatch (`HasSuffixI`) is not,
    // but after the gate the two agree.
    if name.ends_with(LIST_SUFFIX.as_bytes()) {
        return Some(FileKind::List);
    }
    let compression = if name.ends_with(b".tar") {
        Compression::None
    } else if name.ends_with(b".tar.lz4") {
        Compression::Lz4
    } else if name.ends_with(b".tar.bz2") || name.ends_with(b".tbz") {
        Compression::Bzip2
    } else if name.ends_with(b".tar.gz") || name.ends_with(b".tgz") {
        Compression::Gzip
    } else if name.ends_with(b".tar.zst") || name.ends_with(b".tzst") {
        Compression::Zstd
    } else {
        return None;
    };
    Some(FileKind::Archive {
        compression,
        layout: None,
    })
}

/// Bump when a change to the reading code can change what a file provides (names, layout,
/// error): entries cached in the ledger by another reader are then read again. The
/// pinkeeper version is part of the reader's name too, so an upgrade re-reads every file once.
const READER_REVISION: u32 = 1;

/// The name of this build's reader, stored with every cached entry.
fn reader_name() -> String {
    format!(
        "pinkeeper {} reader {READER_REVISION}",
        env!("CARGO_PKG_VERSION")
    )
}

/// A file's identity on disk: an unchanged identity means unchanged content, as far as
/// anyone can tell without reading it (K3s keys its `.cache.json` on size and mtime too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device of the file (of a link's target).
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileIdentity {
    fn of(meta: &fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// One file's cached read, as [`Scanner::with_cache`] takes it and
/// [`Scanner::cache_changes`] hands it out: what the daemon keeps in the ledger so that an
/// unchanged file is not read again after a restart either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    /// The path as scanned (under the images directory). The ledger keys the record on it,
    /// so it is not part of the serialised record.
    #[serde(skip)]
    pub path: PathBuf,
    /// Which build read the file; an entry of another reader is not trusted.
    pub reader: String,
    /// The file's identity when it was read.
    pub identity: FileIdentity,
    /// What the file is (with the layout the content showed).
    pub kind: FileKind,
    /// The names it provides.
    pub names: Vec<String>,
    /// What is wrong with it, without the path (see [`FileEntry::error`]).
    pub error: Option<String>,
}

/// What changed in a scanner's cache since the last [`Scanner::cache_changes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheChanges {
    /// Files read (or found under a new path) since: store them, replacing the record of the
    /// same path.
    pub updated: Vec<CachedFile>,
    /// Paths whose record is obsolete (the file is gone, changed kind, or cannot be opened):
    /// forget them.
    pub removed: Vec<PathBuf>,
}

impl CacheChanges {
    /// Nothing to store or forget.
    pub fn is_empty(&self) -> bool {
        self.updated.is_empty() && self.removed.is_empty()
    }
}

/// Scans the images directory, re-reading only files whose identity changed.
#[derive(Debug)]
pub struct Scanner {
    images_dir: PathBuf,
    options: ReadOptions,
    /// Every cached file (not junk) of the last scan, in its order (or of the imported cache
    /// before the first scan): path, names, identity, and whether the caller's store holds it.
    table: Table,
    /// Reads of junk (small files that provide nothing, see [`JUNK_MAX_SIZE`]), by a 64-bit
    /// hash of their [`CacheKey`]: 16 bytes a file, no path, the error text shared.
    junk: HashMap<u64, JunkRead>,
    /// The error texts of junk files, each once.
    junk_texts: Texts,
    /// Paths the caller's store holds that are no longer in `table` (gone, changed into
    /// junk, or stored by another build): to forget at the next [`Scanner::cache_changes`].
    forget: Vec<PathBuf>,
    files_read: u64,
}

/// What a [`Scanner`] holds between scans, for tests and for the daemon's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Full cached reads (files that provide names, or large broken ones).
    pub reads: usize,
    /// Junk files remembered compactly (no path, shared error text).
    pub junk: usize,
    /// Paths held (of cached files, and of stored records to forget): never junk.
    pub paths: usize,
    /// Distinct error texts of junk files (at most 1,024).
    pub junk_texts: usize,
    /// An estimate of the heap bytes all this takes.
    pub approx_bytes: usize,
}

/// The kind a file's suffix alone gives (the layout is learned from the content).
fn suffix_kind(kind: FileKind) -> FileKind {
    match kind {
        FileKind::Archive { compression, .. } => FileKind::Archive {
            compression,
            layout: None,
        },
        FileKind::List => FileKind::List,
    }
}

/// Junk: a small file that provides no name (see [`JUNK_MAX_SIZE`]).
fn is_junk(identity: &FileIdentity, read: &CachedRead) -> bool {
    read.names.is_empty() && identity.size < JUNK_MAX_SIZE
}

impl Scanner {
    /// A scanner of `images_dir` (normally `/var/lib/rancher/k3s/agent/images`) with an
    /// empty cache.
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        Scanner {
            images_dir: images_dir.into(),
            options: ReadOptions::default(),
            table: Table::default(),
            junk: HashMap::new(),
            junk_texts: Texts::default(),
            forget: Vec::new(),
            files_read: 0,
        }
    }

    /// Starts from a cache kept elsewhere (the ledger's, see [`Scanner::cache_changes`]):
    /// a file whose identity is unchanged is not read again. Entries made by another build
    /// of pinkeeper are not used, and are reported as to be replaced or removed; so are
    /// entries of junk files (stored by an earlier version), which are kept in memory only.
    pub fn with_cache(self, entries: impl IntoIterator<Item = CachedFile>) -> Self {
        let mut stored = StoredCache::default();
        for entry in entries {
            stored.add(entry);
        }
        self.with_stored(stored)
    }

    /// [`Scanner::with_cache`], from records taken in one by one.
    pub fn with_stored(mut self, stored: StoredCache) -> Self {
        self.table = stored.table.finish();
        self.forget.extend(stored.forget);
        self
    }

    /// What to store and forget so that the caller's copy of the cache equals this
    /// scanner's, since the previous call (or [`Scanner::with_cache`]). Empty when no file
    /// was read and none moved or went away. Junk files are never handed out.
    pub fn cache_changes(&mut self) -> CacheChanges {
        let mut changes = CacheChanges::default();
        let reader = reader_name();
        let table = &mut self.table;
        let unstored = std::mem::take(&mut table.unstored);
        changes.updated = records(
            &table.files,
            &mut table.known,
            &table.errors,
            unstored,
            &reader,
        );
        let mut removed = std::mem::take(&mut self.forget);
        removed.retain(|path| self.table.find_path(path).is_none());
        removed.sort_unstable();
        removed.dedup();
        changes.removed = removed;
        changes
    }

    /// Read every OCI archive to its end instead of stopping at `index.json`, so that a
    /// truncated or corrupt tail is reported (K3s's import would fail on it). Slower: the
    /// layers are decompressed.
    pub fn verify_whole_archives(mut self, verify: bool) -> Self {
        self.options.verify_whole_archive = verify;
        self
    }

    /// The directory this scanner reads.
    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    /// How many files this scanner has opened and read so far (cache misses).
    pub fn files_read(&self) -> u64 {
        self.files_read
    }

    /// The names the last scan found provided, each with the first file in import order that
    /// provides it: an index over the scanner's own table, not a copy of it. Before the first
    /// [`Scanner::scan`], the names of the imported cache (in the store's order).
    pub fn provided(&self) -> Provided {
        Provided::new(self.table.files.clone())
    }

    /// What this scanner keeps between scans.
    pub fn cache_stats(&self) -> CacheStats {
        use std::mem::size_of;
        let table = &self.table;
        let errors: usize = table
            .errors
            .iter()
            .map(|e| e.len() + size_of::<Box<str>>())
            .sum();
        let reads = table.files.heap_bytes()
            + table.known.capacity() * size_of::<Known>()
            + errors
            + table.unstored.capacity() * size_of::<(u32, FileIdentity)>()
            + (table.by_path.len() + table.by_key.len()) * size_of::<u32>();
        let forget: usize = self
            .forget
            .iter()
            .map(|p| p.as_os_str().len() + size_of::<PathBuf>())
            .sum();
        let junk = self.junk.capacity() * (size_of::<(u64, JunkRead)>() + 1);
        let texts: usize = self.junk_texts.texts.iter().map(|t| 2 * t.len() + 64).sum();
        CacheStats {
            reads: table.known.len(),
            junk: self.junk.len(),
            paths: table.known.len() + self.forget.len(),
            junk_texts: self.junk_texts.texts.len(),
            approx_bytes: reads + forget + junk + texts,
        }
    }

    /// Walks the images directory and reads every new or changed file. A missing directory
    /// is an empty inventory (K3s imports nothing); one that exists but cannot be listed is
    /// an error. A file is opened without blocking and without following a link, and read
    /// only if the open file is a regular one: a fifo, socket or device swapped in since the
    /// walk is reported in [`Inventory::skipped`].
    pub fn scan(&mut self) -> Result<Inventory, InventoryError> {
        self.scan_files(true, None)
    }

    /// [`Scanner::scan`], keeping in the inventory only the files with an error (and the
    /// paths skipped): what the daemon reports. The names found are in
    /// [`Scanner::provided`]. Saves an entry, a path and a copy of the names per good file:
    /// with 30,000 archives, about 7 MB for the scan's length.
    pub fn scan_problems(&mut self) -> Result<Inventory, InventoryError> {
        self.scan_files(false, None)
    }

    /// [`Scanner::scan_problems`], handing `store` the records of files read so far every
    /// `every` new reads (what [`Scanner::cache_changes`] would hand out later): a long first
    /// read of a large directory, stopped half-way, keeps what it read, and its records are
    /// never all held at once.
    pub fn scan_problems_storing(
        &mut self,
        every: usize,
        store: &mut dyn FnMut(CacheChanges),
    ) -> Result<Inventory, InventoryError> {
        self.scan_files(false, Some((every.max(1), store)))
    }

    fn scan_files(
        &mut self,
        all: bool,
        mut store: Option<(usize, &mut dyn FnMut(CacheChanges))>,
    ) -> Result<Inventory, InventoryError> {
        let old = std::mem::take(&mut self.table);
        // The last scan's size is the best guess of this one's.
        let mut pass = Pass {
            next: TableBuilder::new(&self.images_dir, old.known.len(), old.files.text_len()),
            junk: HashMap::new(),
            files: Vec::new(),
            all,
        };
        let mut unopened = Vec::new();
        // Each file is taken as the walk finds it, in K3s's order: no list of them is held.
        let root = self.images_dir.clone();
        let reader = reader_name();
        let walked = walk(&root, &mut |found| {
            self.take(found, &old, &mut pass, &mut unopened);
            if let Some((every, store)) = store.as_mut() {
                if pass.next.unstored.len() >= *every {
                    let next = &mut pass.next;
                    let unstored = std::mem::take(&mut next.unstored);
                    let updated = records(
                        &next.files,
                        &mut next.known,
                        &next.errors,
                        unstored,
                        &reader,
                    );
                    store(CacheChanges {
                        updated,
                        removed: Vec::new(),
                    });
                }
            }
        });
        let mut skipped = match walked {
            Ok(skipped) => skipped,
            Err(e) => {
                // Nothing was found: the cache stays as it was.
                self.table = old;
                return Err(e);
            }
        };
        skipped.extend(unopened);
        // Entries of files that are gone (or changed) are dropped here; the store forgets
        // the paths it held that this scan did not keep.
        let next = pass.next.finish();
        for index in 0..old.known.len() as u32 {
            if old.known[index as usize].stored {
                let path = old.files.path(index);
                if next.find_path(&path).is_none() {
                    self.forget.push(path.into_owned());
                }
            }
        }
        drop(old);
        self.table = next;
        self.junk = pass.junk;
        self.junk_texts.compact(&mut self.junk);
        Ok(Inventory {
            files: pass.files,
            skipped,
        })
    }

    /// One file the walk found: its cached read, or a read of it; a file that is no longer a
    /// regular one when opened goes in `unopened`.
    fn take(
        &mut self,
        found: Found,
        old: &Table,
        pass: &mut Pass,
        unopened: &mut Vec<SkippedPath>,
    ) {
        let key = CacheKey {
            identity: found.identity,
            kind: found.kind,
        };
        if self.cached(&key, &found.path, old, pass) {
            return;
        }
        self.files_read += 1;
        let open_path = found.target.as_deref().unwrap_or(&found.path);
        match read_file(open_path, found.kind, self.options) {
            FileRead::Read { identity, read } => {
                // The open file's identity: it may have changed since the walk.
                let key = CacheKey {
                    identity,
                    kind: found.kind,
                };
                if let Some(index) = self.keep(&key, &found.path, &read, false, pass) {
                    pass.next.fresh.insert(key.hash64(), index);
                }
                pass.report(found.path, read);
            }
            FileRead::Failed(read) => pass.report(found.path, read),
            FileRead::NotRegular(reason) => unopened.push(SkippedPath {
                path: found.path,
                reason,
            }),
            FileRead::Gone => {}
        }
    }

    /// Whether `key` at `path` was read before (by this scan or the last one): if so its
    /// read is kept for the next scan and reported.
    fn cached(&mut self, key: &CacheKey, path: &Path, old: &Table, pass: &mut Pass) -> bool {
        let hash = key.hash64();
        if let Some(junk) = self.junk.get(&hash).or_else(|| pass.junk.get(&hash)) {
            let junk = *junk;
            pass.junk.insert(hash, junk);
            pass.report_entry(FileEntry {
                path: path.to_path_buf(),
                kind: junk.kind,
                names: Vec::new(),
                error: self.junk_texts.get(junk.text).map(|e| with_path(path, e)),
            });
            return true;
        }
        // Unchanged at the same path: the store's record stays as it is. Else renamed, or
        // another link to a file read before.
        let (index, stored) = match old
            .find_path(path)
            .filter(|i| old.known[*i as usize].key == hash)
        {
            Some(index) => (Some(index), old.known[index as usize].stored),
            None => (old.find_key(hash), false),
        };
        let Some(index) = index else {
            // A second link to a file this scan read.
            let Some(&index) = pass.next.fresh.get(&hash) else {
                return false;
            };
            let read = pass.next.read(index);
            self.keep(key, path, &read, false, pass);
            pass.report(path.to_path_buf(), read);
            return true;
        };
        let known = old.known[index as usize];
        let nameless = old.files.names(index).len() == 0;
        if !pass.all && known.error == NO_TEXT && !(nameless && key.identity.size < JUNK_MAX_SIZE) {
            // Kept as it is, and not reported: no copy of the names.
            let names = old.files.names(index);
            let _ = pass.next.push(path, names, (known.kind, None), key, stored);
            return true;
        }
        let read = old.read(index);
        self.keep(key, path, &read, stored, pass);
        pass.report(path.to_path_buf(), read);
        true
    }

    /// Keeps `read` for the next scan: junk compactly, anything else in the table (and for
    /// the caller's store, unless it holds it already). The table's index, if it went there.
    fn keep(
        &mut self,
        key: &CacheKey,
        path: &Path,
        read: &CachedRead,
        stored: bool,
        pass: &mut Pass,
    ) -> Option<u32> {
        if is_junk(&key.identity, read) {
            if let Some(text) = self.junk_texts.id(read.error.as_deref()) {
                pass.junk.insert(
                    key.hash64(),
                    JunkRead {
                        kind: read.kind,
                        text,
                    },
                );
            }
            return None;
        }
        let names = read.names.iter().map(String::as_str);
        let read = (read.kind, read.error.as_deref());
        pass.next.push(path, names, read, key, stored)
    }
}

/// What one scan builds: the next table and junk cache, and the inventory's entries.
struct Pass {
    next: TableBuilder,
    junk: HashMap<u64, JunkRead>,
    files: Vec<FileEntry>,
    /// Every file goes in `files`, not only those with an error.
    all: bool,
}

impl Pass {
    fn report(&mut self, path: PathBuf, read: CachedRead) {
        if self.all || read.error.is_some() {
            self.files.push(entry(path, read));
        }
    }

    fn report_entry(&mut self, entry: FileEntry) {
        if self.all || entry.error.is_some() {
            self.files.push(entry);
        }
    }
}

fn entry(path: PathBuf, read: CachedRead) -> FileEntry {
    FileEntry {
        error: read.error.as_deref().map(|e| with_path(&path, e)),
        path,
        kind: read.kind,
        names: read.names,
    }
}
