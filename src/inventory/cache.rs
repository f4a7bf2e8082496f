//! The scanner's cache of reads: one table per scan (paths and names in the engine's
//! [`FileNames`] buffer, 16 bytes a file beside them, two sorted indexes), the key that finds a
//! file again, junk's compact reads and their shared texts, and the ledger's stored records
//! taken in one at a time ([`StoredCache`]).

use super::*;

/// What the scanner keeps of a cached file besides its path and names (which are in the
/// table's [`FileNames`]): 16 bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Known {
    /// [`CacheKey::hash64`] of the identity and kind by suffix it was read with. Two keys
    /// with the same hash (odds of about 1 in 2^64 per lookup) would show a changed file as
    /// its old read until it changes again, as for junk.
    pub(super) key: u64,
    /// Index into the table's `errors`; [`NO_TEXT`] for none.
    pub(super) error: u32,
    /// With the layout the content showed.
    pub(super) kind: FileKind,
    /// The caller's store holds this path with this read.
    pub(super) stored: bool,
}

/// The cached files: paths and names in one shared buffer (the engine's [`Provided`] index
/// points into it too), the rest beside it, and two sorted indexes instead of maps: about
/// 60 bytes a file besides its path and names, in a handful of allocations.
#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) files: Arc<FileNames>,
    pub(super) known: Vec<Known>,
    /// The error texts of cached files (large broken ones: few), without the path.
    pub(super) errors: Vec<Box<str>>,
    /// The full identity of files the caller's store does not hold yet (to hand out in
    /// [`Scanner::cache_changes`]), by file index.
    pub(super) unstored: Vec<(u32, FileIdentity)>,
    /// File indexes by path (the buffer's bytes).
    pub(super) by_path: Box<[u32]>,
    /// File indexes by key: a renamed or hard-linked file is found by its identity.
    pub(super) by_key: Box<[u32]>,
}

impl Table {
    /// The file found at `path`.
    pub(super) fn find_path(&self, path: &Path) -> Option<u32> {
        let path = self.files.encode(path);
        let at = self
            .by_path
            .binary_search_by(|i| self.files.encoded_path(*i).cmp(&path))
            .ok()?;
        Some(self.by_path[at])
    }

    /// A file read with this key, under any path.
    pub(super) fn find_key(&self, key: u64) -> Option<u32> {
        let at = self
            .by_key
            .binary_search_by_key(&key, |i| self.known[*i as usize].key)
            .ok()?;
        Some(self.by_key[at])
    }

    /// The read of file `index`.
    pub(super) fn read(&self, index: u32) -> CachedRead {
        read_of(&self.files, &self.known, &self.errors, index)
    }
}

/// The read of file `index` of a table.
pub(super) fn read_of(
    files: &FileNames,
    known: &[Known],
    errors: &[Box<str>],
    index: u32,
) -> CachedRead {
    let known = known[index as usize];
    CachedRead {
        kind: known.kind,
        names: files.names(index).map(str::to_string).collect(),
        error: errors.get(known.error as usize).map(|e| e.to_string()),
    }
}

/// The records to store of the files `unstored` (which then count as stored).
pub(super) fn records(
    files: &FileNames,
    known: &mut [Known],
    errors: &[Box<str>],
    unstored: Vec<(u32, FileIdentity)>,
    reader: &str,
) -> Vec<CachedFile> {
    let mut records = Vec::with_capacity(unstored.len());
    for (index, identity) in unstored {
        known[index as usize].stored = true;
        let read = read_of(files, known, errors, index);
        records.push(CachedFile {
            path: files.path(index).into_owned(),
            reader: reader.to_string(),
            identity,
            kind: read.kind,
            names: read.names,
            error: read.error,
        });
    }
    records
}

/// A [`Table`] being filled by a scan (or from the caller's store).
#[derive(Debug, Default, Clone)]
pub(super) struct TableBuilder {
    pub(super) files: FileNames,
    pub(super) known: Vec<Known>,
    pub(super) errors: Vec<Box<str>>,
    pub(super) unstored: Vec<(u32, FileIdentity)>,
    /// Files read afresh in this scan, by key: a second hard link to one is not read again.
    pub(super) fresh: HashMap<u64, u32>,
}

impl TableBuilder {
    /// Room for `files` files and `text` bytes of paths and names, paths kept relative to
    /// `root`.
    pub(super) fn new(root: &Path, files: usize, text: usize) -> TableBuilder {
        TableBuilder {
            files: FileNames::new(root, files, text),
            known: Vec::with_capacity(files),
            errors: Vec::new(),
            unstored: Vec::new(),
            fresh: HashMap::new(),
        }
    }

    /// Adds a file read with `key`; not kept if the table's text is full (4 GiB): it is read
    /// again next time.
    pub(super) fn push<'a>(
        &mut self,
        path: &Path,
        names: impl IntoIterator<Item = &'a str>,
        (kind, error): (FileKind, Option<&str>),
        key: &CacheKey,
        stored: bool,
    ) -> Option<u32> {
        let index = self.files.push(path, names)?;
        let error = match error {
            Some(text) => {
                self.errors.push(Box::from(text));
                // Fewer errors than files, whose count `push` keeps within u32.
                (self.errors.len() - 1) as u32
            }
            None => NO_TEXT,
        };
        if !stored {
            self.unstored.push((index, key.identity));
        }
        self.known.push(Known {
            key: key.hash64(),
            error,
            kind,
            stored,
        });
        Some(index)
    }

    /// The read of file `index`.
    pub(super) fn read(&self, index: u32) -> CachedRead {
        read_of(&self.files, &self.known, &self.errors, index)
    }

    pub(super) fn finish(mut self) -> Table {
        self.files.shrink_to_fit();
        self.known.shrink_to_fit();
        self.errors.shrink_to_fit();
        self.unstored.shrink_to_fit();
        let count = self.known.len() as u32;
        let mut by_path: Vec<u32> = (0..count).collect();
        by_path
            .sort_unstable_by(|a, b| self.files.encoded_path(*a).cmp(self.files.encoded_path(*b)));
        let mut by_key: Vec<u32> = (0..count).collect();
        by_key.sort_unstable_by_key(|i| self.known[*i as usize].key);
        Table {
            files: Arc::new(self.files),
            known: self.known,
            errors: self.errors,
            unstored: self.unstored,
            by_path: by_path.into_boxed_slice(),
            by_key: by_key.into_boxed_slice(),
        }
    }
}

/// The cache's key: the identity, and the kind by suffix because a rename can change the
/// suffix and so how the same bytes are read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CacheKey {
    pub(super) identity: FileIdentity,
    pub(super) kind: FileKind,
}

impl CacheKey {
    /// The junk cache's key. Two different keys with the same hash (odds of about 1 in 2^64
    /// per lookup) would show a changed small file as its old read until it changes again.
    pub(super) fn hash64(&self) -> u64 {
        // SipHash with fixed keys: the same value in every scan of this process.
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

#[derive(Debug, Clone)]
pub(super) struct CachedRead {
    pub(super) kind: FileKind,
    pub(super) names: Vec<String>,
    /// Without the path: the path the file is found under is in [`FileEntry::path`].
    pub(super) error: Option<String>,
}

/// A junk file's read: its kind (with the layout the content showed) and its error text.
#[derive(Debug, Clone, Copy)]
pub(super) struct JunkRead {
    pub(super) kind: FileKind,
    /// Index into [`Scanner::junk_texts`]; [`NO_TEXT`] for no error (an empty list).
    pub(super) text: u32,
}

pub(super) const NO_TEXT: u32 = u32::MAX;

/// Error texts, each stored once.
#[derive(Debug, Default)]
pub(super) struct Texts {
    pub(super) texts: Vec<Arc<str>>,
    pub(super) ids: HashMap<Arc<str>, u32>,
}

impl Texts {
    /// The id of `text`, added if there is room.
    pub(super) fn id(&mut self, text: Option<&str>) -> Option<u32> {
        let Some(text) = text else {
            return Some(NO_TEXT);
        };
        if let Some(&id) = self.ids.get(text) {
            return Some(id);
        }
        if self.texts.len() >= MAX_JUNK_TEXTS {
            return None;
        }
        let id = u32::try_from(self.texts.len()).ok()?;
        let text: Arc<str> = Arc::from(text);
        self.texts.push(text.clone());
        self.ids.insert(text, id);
        Some(id)
    }

    pub(super) fn get(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(|t| &**t)
    }

    /// Keeps only the texts `junk` uses (renumbering them), once the table is full.
    pub(super) fn compact(&mut self, junk: &mut HashMap<u64, JunkRead>) {
        if self.texts.len() < MAX_JUNK_TEXTS {
            return;
        }
        let old = std::mem::take(self);
        let mut renumbered = HashMap::new();
        for read in junk.values_mut() {
            if read.text == NO_TEXT {
                continue;
            }
            read.text = *renumbered.entry(read.text).or_insert_with(|| {
                let id = self.texts.len() as u32;
                let text = old.texts[read.text as usize].clone();
                self.texts.push(text.clone());
                self.ids.insert(text, id);
                id
            });
        }
    }
}

/// A cache kept elsewhere (the ledger's), taken in a record at a time for
/// [`Scanner::with_stored`]: each record goes into the scanner's table as it is read, so that
/// the records are never held as a list (with 30,000 archives, a list of them was the 12 MB
/// peak of a restart).
#[derive(Debug, Default, Clone)]
pub struct StoredCache {
    /// Paths kept whole (no root yet): it lasts until the first scan.
    pub(super) table: TableBuilder,
    /// Records not trusted (another build's, or past the table's size).
    pub(super) forget: Vec<PathBuf>,
    /// This build's reader (see [`reader_name`]), once known.
    pub(super) reader: String,
}

impl StoredCache {
    /// Takes in one stored record.
    pub fn add(&mut self, entry: CachedFile) {
        if self.reader.is_empty() {
            self.reader = reader_name();
        }
        if entry.reader != self.reader {
            self.forget.push(entry.path);
            return;
        }
        let key = CacheKey {
            identity: entry.identity,
            kind: suffix_kind(entry.kind),
        };
        let names = entry.names.iter().map(String::as_str);
        let read = (entry.kind, entry.error.as_deref());
        if self
            .table
            .push(&entry.path, names, read, &key, true)
            .is_none()
        {
            self.forget.push(entry.path);
        }
    }

    /// How many records were taken in.
    pub fn len(&self) -> usize {
        self.table.known.len() + self.forget.len()
    }

    /// No record was taken in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
