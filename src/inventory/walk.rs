//! Walking the images directory in K3s's work-queue order (each directory's entries sorted,
//! files before subdirectories), following links only inside the directory. Reads no file.

use super::*;

pub(super) struct Found {
    pub(super) path: PathBuf,
    /// For a link the walk followed, its canonical target: what is opened (without following
    /// a link again). `None`: the path itself.
    pub(super) target: Option<PathBuf>,
    pub(super) kind: FileKind,
    /// As the walk saw it (the open file's identity is taken again when it is read).
    pub(super) identity: FileIdentity,
}

/// Where the walk puts what it finds.
struct Listing<'a> {
    /// Each file, as it is found.
    on_file: &'a mut dyn FnMut(Found),
    skipped: Vec<SkippedPath>,
}

impl Listing<'_> {
    fn skip(&mut self, path: PathBuf, reason: impl Into<String>) {
        self.skipped.push(SkippedPath {
            path,
            reason: reason.into(),
        });
    }
}

/// Walks `root`, giving `on_file` each file K3s would import as it is found (in K3s's order);
/// returns what was passed over. An error only when the directory itself cannot be listed,
/// before any file is given.
pub(super) fn walk(
    root: &Path,
    on_file: &mut dyn FnMut(Found),
) -> Result<Vec<SkippedPath>, InventoryError> {
    let unreadable = |source| InventoryError::Unreadable {
        path: root.to_path_buf(),
        source,
    };
    let mut listing = Listing {
        on_file,
        skipped: Vec::new(),
    };
    let root_meta = match fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(listing.skipped),
        Err(e) => return Err(unreadable(e)),
    };
    if !root_meta.is_dir() {
        listing.skip(
            root.to_path_buf(),
            "the images path is not a directory; K3s imports nothing from it",
        );
        return Ok(listing.skipped);
    }
    let canonical_root = fs::canonicalize(root).map_err(unreadable)?;
    let mut visited = HashSet::from([(root_meta.dev(), root_meta.ino())]);
    let mut queue = VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        let is_root = dir.as_path() == root;
        let names = match list_dir(&dir) {
            Ok(names) => names,
            Err(e) if is_root => return Err(unreadable(e)),
            Err(e) => {
                listing.skip(
                    dir,
                    format!("cannot list this directory ({e}); K3s cannot import from it either"),
                );
                continue;
            }
        };
        for name in names {
            let path = dir.join(&name);
            visit(
                path,
                &canonical_root,
                &mut visited,
                &mut queue,
                &mut listing,
            );
        }
    }
    Ok(listing.skipped)
}

pub(super) fn list_dir(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        names.push(entry?.file_name());
    }
    // os.ReadDir order: by name, bytewise
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn visit(
    path: PathBuf,
    canonical_root: &Path,
    visited: &mut HashSet<(u64, u64)>,
    queue: &mut VecDeque<PathBuf>,
    listing: &mut Listing<'_>,
) {
    let kind = classify(&path);
    let link_meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        // removed since it was listed: nothing to import
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            listing.skip(path, format!("cannot stat: {e}"));
            return;
        }
    };
    let (meta, target) = if link_meta.file_type().is_symlink() {
        let target = match fs::canonicalize(&path) {
            Ok(t) => t,
            Err(e) => {
                if kind.is_some() {
                    listing.skip(
                        path,
                        format!("broken symbolic link ({e}); K3s skips it too"),
                    );
                }
                return;
            }
        };
        if !target.starts_with(canonical_root) {
            if kind.is_some() || target.is_dir() {
                listing.skip(
                    path,
                    format!(
                        "symbolic link to {}, outside the images directory: not followed \
                         (move the file into the images directory)",
                        escape::path(&target)
                    ),
                );
            }
            return;
        }
        match fs::metadata(&target) {
            Ok(m) => (m, Some(target)),
            Err(e) => {
                listing.skip(path, format!("cannot stat the link's target: {e}"));
                return;
            }
        }
    } else {
        (link_meta, None)
    };
    if meta.is_dir() {
        if visited.insert((meta.dev(), meta.ino())) {
            queue.push_back(path);
        } else {
            listing.skip(
                path,
                "directory already scanned through another path (symbolic link loop or alias)",
            );
        }
        return;
    }
    let Some(kind) = kind else {
        return;
    };
    if !meta.is_file() {
        listing.skip(path, NOT_REGULAR);
        return;
    }
    (listing.on_file)(Found {
        path,
        target,
        kind,
        identity: FileIdentity::of(&meta),
    });
}
