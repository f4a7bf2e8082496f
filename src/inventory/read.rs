//! Reading one file of the images directory: opened without following links or blocking on
//! a fifo, its type checked on the open file, then read as an archive (`archive.rs`) or a
//! `.txt` pull list. Knows nothing of the walk or the cache (`mod.rs`).

use super::*;

/// `PATH: MESSAGE`, the path escaped.
pub(super) fn with_path(path: &Path, message: &str) -> String {
    format!("{}: {message}", escape::path(path))
}

/// Reads one file the way a scan does (with the default options, without a cache): what it
/// provides, or why it was not read. `Err` when it is not a regular file (as seen on the open
/// file), is not a file K3s imports (by its name), or is gone. Never blocks on a fifo.
pub fn read_one(path: &Path) -> Result<FileEntry, SkippedPath> {
    let skipped = |reason: String| SkippedPath {
        path: path.to_path_buf(),
        reason,
    };
    let Some(kind) = classify(path) else {
        return Err(skipped("not a file K3s imports (by its name)".to_string()));
    };
    match read_file(path, kind, ReadOptions::default()) {
        FileRead::Read { read, .. } | FileRead::Failed(read) => Ok(entry(path.to_path_buf(), read)),
        FileRead::NotRegular(reason) => Err(skipped(reason)),
        FileRead::Gone => Err(skipped("no such file".to_string())),
    }
}

/// The outcome of reading one file.
pub(super) enum FileRead {
    /// Read; `identity` is the open file's (fstat).
    Read {
        identity: FileIdentity,
        read: CachedRead,
    },
    /// Could not be opened or examined, which may be transient: an error entry, not cached.
    Failed(CachedRead),
    /// Not a regular file on opening (a fifo, socket or device, or a link, swapped in since
    /// the walk): why it was not read.
    NotRegular(String),
    /// Removed since the walk.
    Gone,
}

pub(super) const NOT_REGULAR: &str = "not a regular file (fifo, socket or device): not read";

/// Opens `path` for reading without blocking (a fifo opens at once, and is then refused) and
/// without following a final symbolic link, and checks the open file's type.
pub(super) fn open_regular(path: &Path) -> Result<(fs::File, fs::Metadata), FileRead> {
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(FileRead::Gone),
        // ELOOP: the last component is now a symbolic link; ENXIO: a socket (or a fifo's
        // other end missing, which O_RDONLY never meets).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENXIO)) => {
            return Err(FileRead::NotRegular(format!(
                "replaced by a symbolic link, socket or device since the directory was listed \
                 ({e}): not read"
            )))
        }
        Err(e) => return Err(FileRead::Failed(unreadable(e))),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Err(FileRead::Failed(unreadable(e))),
    };
    if !meta.is_file() {
        return Err(FileRead::NotRegular(NOT_REGULAR.to_string()));
    }
    Ok((file, meta))
}

pub(super) fn unreadable(e: io::Error) -> CachedRead {
    CachedRead {
        kind: FileKind::List,
        names: Vec::new(),
        error: Some(format!("cannot open: {e}; check the file's permissions")),
    }
}

/// Opens and reads one file. Errors do not name the file: [`FileEntry::path`] does.
pub(super) fn read_file(path: &Path, kind: FileKind, options: ReadOptions) -> FileRead {
    let (file, meta) = match open_regular(path) {
        Ok(opened) => opened,
        Err(FileRead::Failed(read)) => return FileRead::Failed(CachedRead { kind, ..read }),
        Err(other) => return other,
    };
    let identity = FileIdentity::of(&meta);
    // Nothing on disk may take the daemon down: a panic in a decoder becomes an error entry.
    let outcome = catch_unwind(AssertUnwindSafe(|| match kind {
        FileKind::List => read_list(file),
        FileKind::Archive { compression, .. } => Ok({
            let read = archive::read_archive_file(file, meta.len(), compression, options);
            let error = read.error.map(|e| {
                format!(
                    "{e}; K3s cannot import it either: replace it with a good copy or remove it"
                )
            });
            CachedRead {
                kind: FileKind::Archive {
                    compression,
                    layout: read.layout,
                },
                names: read.names,
                error,
            }
        }),
    }));
    let read = match outcome {
        Ok(Ok(read)) => read,
        Ok(Err(failed)) => return FileRead::Failed(failed),
        Err(_) => CachedRead {
            kind,
            names: Vec::new(),
            error: Some(
                "reading the file crashed the decoder (a bug in pinkeeper or a library it uses); \
             the file is treated as providing nothing"
                    .to_string(),
            ),
        },
    };
    FileRead::Read { identity, read }
}

/// Reads a list; `Err` (not cached) when reading failed, which may be transient.
pub(super) fn read_list(file: fs::File) -> Result<CachedRead, CachedRead> {
    let mut bytes = Vec::new();
    if let Err(e) = file.take(LIST_LIMIT + 1).read_to_end(&mut bytes) {
        return Err(CachedRead {
            kind: FileKind::List,
            names: Vec::new(),
            error: Some(format!(
                "cannot read the image list: {e}; check the file's permissions"
            )),
        });
    }
    let mut problems = Vec::new();
    if bytes.len() as u64 > LIST_LIMIT {
        bytes.truncate(LIST_LIMIT as usize);
        problems.push(format!(
            "the list is over {LIST_LIMIT} bytes; only the start was read"
        ));
    }
    let (names, mut line_problems) = parse_list(&bytes);
    problems.append(&mut line_problems);
    let error = (!problems.is_empty()).then(|| problems.join("; "));
    Ok(CachedRead {
        kind: FileKind::List,
        names,
        error,
    })
}

/// K3s's `prePullImages`: one reference a line (`bufio.ScanLines`, so `\r\n` works), trimmed,
/// blank lines skipped. There is no comment syntax: a `# …` line is an invalid reference,
/// which K3s logs and skips, as are other unparsable lines. Names are what CRI stores after
/// the pull (`ParseDockerRef`).
pub(super) fn parse_list(bytes: &[u8]) -> (Vec<String>, Vec<String>) {
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    let mut problems = Vec::new();
    let mut lines = bytes.split(|&b| b == b'\n').enumerate().peekable();
    while let Some((index, raw)) = lines.next() {
        if raw.is_empty() && lines.peek().is_none() {
            break; // the empty remainder after a final newline is not a line
        }
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.len() > MAX_LIST_LINE {
            problems.push(format!(
                "line {} is longer than 64 KiB, and K3s stops reading the list there",
                index + 1
            ));
            break;
        }
        let text = String::from_utf8_lossy(line);
        let reference = text.trim();
        if reference.is_empty() {
            continue;
        }
        match normalize_reference(reference) {
            Ok(name) => {
                if !seen.contains(name.as_str()) {
                    seen.insert(name.clone());
                    names.push(name);
                }
            }
            Err(e) => problems.push(format!("line {} skipped by K3s: {e}", index + 1)),
        }
    }
    (names, problems)
}
