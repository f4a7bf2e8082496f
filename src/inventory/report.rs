//! What `pinkeeper inventory` prints: a scan of the images directory as a table for people
//! or as JSON for programs. Owns only the presentation; it reads nothing itself.
//!
//! The JSON shape is part of pinkeeper's interface (documented in README.md); add fields,
//! never rename or remove them, and bump [`JSON_VERSION`] if a change cannot be additive.

use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::Serialize;

use super::{FileEntry, FileKind, Inventory};
use crate::escape;

/// The `version` field of the JSON output.
pub const JSON_VERSION: u32 = 1;

/// The JSON document.
#[derive(Debug, Serialize)]
pub struct Report {
    /// [`JSON_VERSION`].
    pub version: u32,
    /// The images directory, as given, escaped ([`crate::escape::path`]).
    pub images_dir: String,
    /// Every file K3s would import, in its import order.
    pub files: Vec<FileReport>,
    /// Paths passed over, and why.
    pub skipped: Vec<SkippedReport>,
}

/// One file of the images directory.
#[derive(Debug, Serialize)]
pub struct FileReport {
    /// Relative to the images directory, escaped ([`crate::escape::path`]).
    pub path: String,
    /// The path's bytes in hex, only when they are not UTF-8 (`path` is then escaped lossily
    /// for JSON readers that do not unescape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<String>,
    /// `oci`, `docker-save`, `list`, or `null` for an archive whose content is not recognised.
    pub format: Option<&'static str>,
    /// `none`, `gzip`, `bzip2`, `zstd`, `lz4`; `null` for a list.
    pub compression: Option<&'static str>,
    /// The image names it provides: containerd's names after K3s imports the archive, or the
    /// names CRI pulls for a list.
    pub names: Vec<String>,
    /// Why an archive provides nothing, or which lines of a list K3s skips; `null` if none.
    pub error: Option<String>,
}

/// A path that was not read.
#[derive(Debug, Serialize)]
pub struct SkippedReport {
    /// Relative to the images directory, escaped.
    pub path: String,
    /// The path's bytes in hex, only when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<String>,
    /// Why, and what to do.
    pub reason: String,
}

impl Report {
    /// The report of one scan of `images_dir`.
    pub fn new(images_dir: &Path, inventory: &Inventory) -> Report {
        Report::from_inventory(images_dir, inventory.clone())
    }

    /// The report of one scan of `images_dir`, taking the scan's strings instead of copying
    /// them (100,000 broken files would be two copies of their errors in memory).
    pub fn from_inventory(images_dir: &Path, inventory: Inventory) -> Report {
        Report {
            version: JSON_VERSION,
            images_dir: escape::path(images_dir).to_string(),
            files: inventory
                .files
                .into_iter()
                .map(|f| FileReport::new(images_dir, f))
                .collect(),
            skipped: inventory
                .skipped
                .into_iter()
                .map(|s| SkippedReport {
                    path: relative(images_dir, &s.path),
                    path_bytes: hex_if_not_utf8(images_dir, &s.path),
                    reason: escaped(s.reason),
                })
                .collect(),
        }
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Strings, numbers and options only: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Pretty-printed JSON, written as it is made (no copy of the whole document in memory).
    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self).map_err(io::Error::other)?;
        out.write_all(b"\n")
    }

    /// A table: one row per file, further names and the error on lines of their own; then
    /// the skipped paths and a summary line.
    pub fn to_table(&self) -> String {
        let mut out = Vec::new();
        // Writing to memory cannot fail, and every piece is UTF-8.
        let _ = self.write_table(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`Report::to_table`], written to `out`.
    pub fn write_table(&self, out: &mut impl Write) -> io::Result<()> {
        if self.files.is_empty() {
            writeln!(out, "no file K3s would import in {}", self.images_dir)?;
        } else {
            let rows = self.files.iter().map(|file| {
                let cell = |s: Option<&'static str>| s.unwrap_or("-");
                let names = file.names.iter().map(|n| escape::text(n).to_string());
                let error = file.error.iter().map(|e| format!("error: {e}"));
                let images = names.chain(error).collect::<Vec<_>>().join("\n");
                [
                    file.path.clone(),
                    cell(file.format).into(),
                    cell(file.compression).into(),
                    images,
                ]
            });
            let header = ["FILE", "FORMAT", "COMPRESSION", "IMAGES"];
            out.write_all(plain_table(&header, rows).as_bytes())?;
        }
        if !self.skipped.is_empty() {
            writeln!(out, "\nnot read:")?;
            for s in &self.skipped {
                writeln!(out, "  {}: {}", s.path, s.reason)?;
            }
        }
        let names: usize = self.files.iter().map(|f| f.names.len()).sum();
        let errors = self.files.iter().filter(|f| f.error.is_some()).count();
        writeln!(
            out,
            "\n{} file(s), {names} image name(s), {errors} file(s) with errors, {} path(s) not read",
            self.files.len(),
            self.skipped.len()
        )
    }
}

/// pinkeeper's one style of human-readable table (here and in `control/cli.rs`): a line of
/// column names, then left-aligned columns two spaces apart, no borders, no trailing spaces; a
/// cell of several lines (`\n`) continues on lines of its own, in its column.
pub fn plain_table<const N: usize>(
    header: &[&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(header.iter().copied());
    for row in rows {
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` escaped ([`crate::escape::text`]), the same string when nothing needed escaping.
fn escaped(text: String) -> String {
    let shown = escape::text(&text).to_string();
    if shown == text {
        text
    } else {
        shown
    }
}

impl FileReport {
    fn new(images_dir: &Path, file: FileEntry) -> FileReport {
        let (format, compression) = match file.kind {
            FileKind::List => (Some("list"), None),
            FileKind::Archive {
                compression,
                layout,
            } => (layout.map(|l| l.as_str()), Some(compression.as_str())),
        };
        // The error starts with the file's path; the path has a column of its own here.
        let prefix = format!("{}: ", escape::path(&file.path));
        let error = file.error.map(|e| {
            escaped(if e.starts_with(&prefix) {
                e[prefix.len()..].to_string()
            } else {
                e
            })
        });
        FileReport {
            path: relative(images_dir, &file.path),
            path_bytes: hex_if_not_utf8(images_dir, &file.path),
            format,
            compression,
            names: file.names,
            error,
        }
    }
}

fn relative(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => escape::path(rel).to_string(),
        _ => escape::path(path).to_string(),
    }
}

/// The hex of the bytes of `path` relative to `root` (as `path` shows it), when they are not
/// UTF-8.
fn hex_if_not_utf8(root: &Path, path: &Path) -> Option<String> {
    let path = match path.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel,
        _ => path,
    };
    if path.to_str().is_some() {
        return None;
    }
    let bytes = path.as_os_str().as_bytes();
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    Some(hex)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::inventory::{Compression, Layout, SkippedPath};

    fn sample() -> (PathBuf, Inventory) {
        let root = PathBuf::from("/images");
        let inventory = Inventory {
            files: vec![
                FileEntry {
                    path: root.join("airgap.tar.zst"),
                    kind: FileKind::Archive {
                        compression: Compression::Zstd,
                        layout: Some(Layout::DockerSave),
                    },
                    names: vec![
                        "docker.io/library/a:1".into(),
                        "docker.io/library/b:2".into(),
                    ],
                    error: None,
                },
                FileEntry {
                    path: root.join("sub/broken.tgz"),
                    kind: FileKind::Archive {
                        compression: Compression::Gzip,
                        layout: None,
                    },
                    names: vec![],
                    error: Some("/images/sub/broken.tgz: not a valid gzip stream".into()),
                },
                FileEntry {
                    path: root.join("pull.txt"),
                    kind: FileKind::List,
                    names: vec!["docker.io/library/c:3".into()],
                    error: Some("/images/pull.txt: line 2 skipped by K3s".into()),
                },
            ],
            skipped: vec![SkippedPath {
                path: root.join("out.tar"),
                reason: "symbolic link outside".into(),
            }],
        };
        (root, inventory)
    }

    #[test]
    fn json_shape_is_stable() {
        let (root, inventory) = sample();
        let json: serde_json::Value =
            serde_json::from_str(&Report::new(&root, &inventory).to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "images_dir": "/images",
                "files": [
                    {"path": "airgap.tar.zst", "format": "docker-save", "compression": "zstd",
                     "names": ["docker.io/library/a:1", "docker.io/library/b:2"], "error": null},
                    {"path": "sub/broken.tgz", "format": null, "compression": "gzip",
                     "names": [], "error": "not a valid gzip stream"},
                    {"path": "pull.txt", "format": "list", "compression": null,
                     "names": ["docker.io/library/c:3"], "error": "line 2 skipped by K3s"},
                ],
                "skipped": [{"path": "out.tar", "reason": "symbolic link outside"}],
            })
        );
    }

    #[test]
    fn table_lists_every_name_and_error() {
        let (root, inventory) = sample();
        let table = Report::new(&root, &inventory).to_table();
        let expected = "\
FILE            FORMAT       COMPRESSION  IMAGES
airgap.tar.zst  docker-save  zstd         docker.io/library/a:1
                                          docker.io/library/b:2
sub/broken.tgz  -            gzip         error: not a valid gzip stream
pull.txt        list         -            docker.io/library/c:3
                                          error: line 2 skipped by K3s

not read:
  out.tar: symbolic link outside

3 file(s), 3 image name(s), 2 file(s) with errors, 1 path(s) not read
";
        assert_eq!(table, expected);
        let empty = Report::new(&root, &Inventory::default()).to_table();
        assert!(
            empty.starts_with("no file K3s would import in /images\n"),
            "{empty}"
        );
    }
}
