//! What the images directory provides, compactly: each file's path and names in one buffer
//! ([`FileNames`], which the inventory's scanner also keeps as its cache, so a name is held
//! once), and a name index over it ([`Provided`]). The scanner's table and this index take 99
//! heap bytes a file where maps of owned strings took 735 (`tests/footprint_inventory.rs`),
//! in a handful of allocations instead of several per file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A range of [`FileNames`]' bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

/// One file: its path, and its names as a range of [`FileNames`]' name spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct File {
    path: Span,
    names_start: u32,
    names_end: u32,
}

/// Files and the image names each provides, in the order they were added, every byte in one
/// buffer, paths under the root (the images directory) without it. Offsets are 32-bit: a file
/// that would take the buffer past 4 GiB is not added ([`FileNames::push`] says so), and its
/// names then count as provided by no file, so pinkeeper restores their pins itself rather
/// than leave them to K3s.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileNames {
    /// A path under it is kept relative; any other is kept whole after a NUL byte (which no
    /// path holds).
    root: PathBuf,
    bytes: Vec<u8>,
    files: Vec<File>,
    names: Vec<Span>,
}

impl FileNames {
    /// Room for `files` files (of one name each) and `text` bytes of paths and names; paths
    /// under `root` are kept without it.
    pub fn new(root: &Path, files: usize, text: usize) -> FileNames {
        FileNames {
            root: root.to_path_buf(),
            bytes: Vec::with_capacity(text),
            files: Vec::with_capacity(files),
            names: Vec::with_capacity(files),
        }
    }

    /// Adds a file and its names; its index, or `None` (nothing added) past 4 GiB of text or
    /// 4 billion names.
    pub fn push<'a>(
        &mut self,
        path: &Path,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Option<u32> {
        let index = u32::try_from(self.files.len()).ok()?;
        let (bytes, spans) = (self.bytes.len(), self.names.len());
        let added = (|| {
            let path = self.encode(path);
            let path = self.span_of(&path)?;
            let names_start = u32::try_from(self.names.len()).ok()?;
            for name in names {
                let span = self.span_of(name.as_bytes())?;
                self.names.push(span);
            }
            let names_end = u32::try_from(self.names.len()).ok()?;
            Some(File {
                path,
                names_start,
                names_end,
            })
        })();
        match added {
            Some(file) => {
                self.files.push(file);
                Some(index)
            }
            None => {
                self.bytes.truncate(bytes);
                self.names.truncate(spans);
                None
            }
        }
    }

    fn span_of(&mut self, text: &[u8]) -> Option<Span> {
        let start = u32::try_from(self.bytes.len()).ok()?;
        let len = u32::try_from(text.len()).ok()?;
        start.checked_add(len)?;
        self.bytes.extend_from_slice(text);
        Some(Span { start, len })
    }

    /// Gives back unused capacity (the buffers are kept for as long as the directory is
    /// unchanged).
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.files.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    /// How many files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// No file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn bytes(&self, span: Span) -> &[u8] {
        // Spans are made by `span_of` over this buffer, which only grows (or is cut back to
        // before a span that was then dropped): always in range.
        &self.bytes[span.start as usize..(span.start + span.len) as usize]
    }

    fn text(&self, span: Span) -> &str {
        // Only `&str`s are pushed as names.
        std::str::from_utf8(self.bytes(span)).unwrap_or_default()
    }

    /// `path` as this buffer keeps it: relative to the root if under it, else whole after a
    /// NUL byte. Ordered and compared as bytes, like [`FileNames::encoded_path`].
    pub fn encode<'a>(&self, path: &'a Path) -> Cow<'a, [u8]> {
        if !self.root.as_os_str().is_empty() {
            if let Ok(relative) = path.strip_prefix(&self.root) {
                let relative = relative.as_os_str().as_bytes();
                // Only where joining gives back the same bytes (no doubled or trailing `/`).
                if !relative.is_empty()
                    && relative[0] != 0
                    && self.root.join(OsStr::from_bytes(relative)).as_os_str() == path.as_os_str()
                {
                    return Cow::Borrowed(relative);
                }
            }
        }
        let mut whole = Vec::with_capacity(path.as_os_str().len() + 1);
        whole.push(0);
        whole.extend_from_slice(path.as_os_str().as_bytes());
        Cow::Owned(whole)
    }

    /// The path of file `index` as kept (see [`FileNames::encode`]).
    pub fn encoded_path(&self, index: u32) -> &[u8] {
        self.bytes(self.files[index as usize].path)
    }

    /// The path of file `index` (`index` < [`FileNames::len`]).
    pub fn path(&self, index: u32) -> Cow<'_, Path> {
        match self.encoded_path(index) {
            [0, whole @ ..] => Cow::Borrowed(Path::new(OsStr::from_bytes(whole))),
            relative => Cow::Owned(self.root.join(OsStr::from_bytes(relative))),
        }
    }

    /// The names of file `index`, in the order they were added.
    pub fn names(&self, index: u32) -> impl ExactSizeIterator<Item = &str> + '_ {
        let file = self.files[index as usize];
        self.names[file.names_start as usize..file.names_end as usize]
            .iter()
            .map(|span| self.text(*span))
    }

    /// Bytes of paths and names.
    pub fn text_len(&self) -> usize {
        self.bytes.len()
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.root.as_os_str().len()
            + self.bytes.capacity()
            + self.files.capacity() * std::mem::size_of::<File>()
            + self.names.capacity() * std::mem::size_of::<Span>()
    }
}

/// Every image name some file of the images directory provides, with the file that provides
/// it (the first in K3s's import order): the [`FileNames`] of a scan, shared with the
/// scanner, and its names sorted for lookups.
#[derive(Debug, Clone, Default)]
pub struct Provided {
    files: Arc<FileNames>,
    /// (index into `files.names`, file index), sorted by name, one per name.
    by_name: Box<[(u32, u32)]>,
}

impl Provided {
    /// The names `files` provide, each with the first file (in the order they were added)
    /// that provides it.
    pub fn new(files: Arc<FileNames>) -> Provided {
        let mut by_name: Vec<(u32, u32)> = Vec::with_capacity(files.names.len());
        for (index, file) in files.files.iter().enumerate() {
            // `push` keeps both counts within u32.
            let index = index as u32;
            by_name.extend((file.names_start..file.names_end).map(|name| (name, index)));
        }
        // Stable: for a name provided twice, the first file stays first.
        by_name.sort_by(|a, b| {
            files
                .bytes(files.names[a.0 as usize])
                .cmp(files.bytes(files.names[b.0 as usize]))
        });
        by_name.dedup_by(|later, first| {
            files.bytes(files.names[later.0 as usize]) == files.bytes(files.names[first.0 as usize])
        });
        Provided {
            files,
            by_name: by_name.into_boxed_slice(),
        }
    }

    /// The file that provides `name`.
    pub fn get(&self, name: &str) -> Option<Cow<'_, Path>> {
        let names = &self.files.names;
        let at = self
            .by_name
            .binary_search_by(|(n, _)| self.files.bytes(names[*n as usize]).cmp(name.as_bytes()))
            .ok()?;
        Some(self.files.path(self.by_name[at].1))
    }

    /// Whether some file provides `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every provided name with its file, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Cow<'_, Path>)> + '_ {
        self.by_name.iter().map(|(name, file)| {
            (
                self.files.text(self.files.names[*name as usize]),
                self.files.path(*file),
            )
        })
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// No name.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Heap bytes held, counting the shared [`FileNames`] in full.
    pub fn heap_bytes(&self) -> usize {
        self.files.heap_bytes() + self.by_name.len() * std::mem::size_of::<(u32, u32)>()
    }
}

impl PartialEq for Provided {
    fn eq(&self, other: &Provided) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Provided {}

/// Name -> file pairs (tests, the replay), one file per pair: for a name given twice, the
/// first pair counts.
impl FromIterator<(String, PathBuf)> for Provided {
    fn from_iter<I: IntoIterator<Item = (String, PathBuf)>>(pairs: I) -> Provided {
        let mut files = FileNames::default();
        for (name, path) in pairs {
            files.push(&path, [name.as_str()]);
        }
        Provided::new(Arc::new(files))
    }
}

impl From<BTreeMap<String, PathBuf>> for Provided {
    fn from(map: BTreeMap<String, PathBuf>) -> Provided {
        map.into_iter().collect()
    }
}

impl<const N: usize> From<[(String, PathBuf); N]> for Provided {
    fn from(pairs: [(String, PathBuf); N]) -> Provided {
        pairs.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_file_in_order_provides_a_name() {
        let mut files = FileNames::default();
        files.push(Path::new("b.tar"), ["x", "y"]).unwrap();
        files.push(Path::new("a.tar"), ["y", "z", "x"]).unwrap();
        files.push(Path::new("empty.tar"), []).unwrap();
        files.push(Path::new("odd\n\u{7f}.tar"), ["w"]).unwrap();
        let provided = Provided::new(Arc::new(files));
        assert_eq!(provided.len(), 4);
        let get = |name| provided.get(name).map(Cow::into_owned);
        assert_eq!(get("x"), Some(PathBuf::from("b.tar")));
        assert_eq!(get("y"), Some(PathBuf::from("b.tar")));
        assert_eq!(get("z"), Some(PathBuf::from("a.tar")));
        assert_eq!(get("w"), Some(PathBuf::from("odd\n\u{7f}.tar")));
        assert_eq!(provided.get("v"), None);
        assert_eq!(provided.get(""), None);
        let names: Vec<&str> = provided.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["w", "x", "y", "z"]);
    }

    #[test]
    fn a_path_that_is_not_utf8_comes_back_as_it_was() {
        let path = Path::new(OsStr::from_bytes(b"\xff\xfe.tar"));
        let mut files = FileNames::default();
        let index = files.push(path, ["n"]).unwrap();
        assert_eq!(files.path(index), path);
        assert_eq!(files.names(index).collect::<Vec<_>>(), ["n"]);
        assert_eq!(
            Provided::new(Arc::new(files)).get("n").as_deref(),
            Some(path)
        );
    }

    #[test]
    fn paths_under_the_root_are_kept_without_it_and_come_back_whole() {
        let root = Path::new("/var/lib/rancher/k3s/agent/images");
        let mut files = FileNames::new(root, 0, 0);
        let paths = [
            root.join("a.tar"),
            root.join("sub/b.tar"),
            PathBuf::from("/elsewhere/c.tar"),
            PathBuf::from("/var/lib/rancher/k3s/agent/images//d.tar"),
            PathBuf::from("relative.tar"),
            root.to_path_buf(),
        ];
        for path in &paths {
            let index = files.push(path, ["n"]).unwrap();
            assert_eq!(files.path(index).as_os_str(), path.as_os_str());
        }
        assert_eq!(files.encoded_path(0), b"a.tar");
        assert_eq!(files.encoded_path(1), b"sub/b.tar");
        assert_eq!(files.encoded_path(2), b"\0/elsewhere/c.tar");
        assert_eq!(files.encode(&paths[1]), &b"sub/b.tar"[..]);
        assert_eq!(files.text_len(), 5 + 9 + 17 + 41 + 13 + 34 + 6);
    }

    #[test]
    fn a_map_converts_with_its_pairs() {
        let map = BTreeMap::from([
            ("a".to_string(), PathBuf::from("1.tar")),
            ("b".to_string(), PathBuf::from("1.tar")),
        ]);
        let provided = Provided::from(map.clone());
        let back: BTreeMap<String, PathBuf> = provided
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_path_buf()))
            .collect();
        assert_eq!(back, map);
        assert!(Provided::default().is_empty());
    }
}
