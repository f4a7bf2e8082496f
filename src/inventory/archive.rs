//! Reading the image names out of one archive, the way containerd's importer does
//! (`core/images/archive/importer.go` `ImportIndex` and `client/import.go` `Import`, as called
//! by K3s's `preloadFile` with `WithAllPlatforms(true)` and `WithSkipMissing()` and no name
//! translator).
//!
//! What containerd does, and so what this module reproduces:
//! - Only regular tar entries count (`'0'`, and `'\0'` unless the name ends in `/`); names are
//!   `path.Clean`ed. `oci-layout` and `manifest.json` are decoded as they stream past (the
//!   first JSON value of at most 20 MiB; a decode error fails the whole import, whatever else
//!   the archive holds); every other regular file is a blob.
//! - OCI wins: if `oci-layout` has a non-empty `imageLayoutVersion`, the archive is an OCI
//!   layout (the version must be `1.0.0`) and `index.json` must be among the blobs; the names
//!   are the top-level manifests' `io.containerd.image.name` annotation, else
//!   `org.opencontainers.image.ref.name`, verbatim. `manifest.json` is then ignored — this is
//!   the case of `docker save` since Docker 25, which writes both.
//! - Otherwise `manifest.json` (docker save): every tar symlink must point at a blob, every
//!   `Config` and `Layers` entry must name a blob, and each `RepoTags` entry is normalised with
//!   `ParseDockerRef`. An archive with neither is "unrecognized image format".
//! - An index with no manifests fails (`WalkNotEmpty`), and a named image whose target has an
//!   invalid digest, a non-positive size or no media type fails the image store's validation.
//!
//! Layer contents are never kept: entry bodies are skipped (by seeking, for a plain `.tar`), or
//! decompressed into one reusable buffer and dropped. Memory stays bounded: the read buffers
//! below, the decompressor's window (zstd: at most 2^25 bytes, K3s's own limit) and the JSON
//! files kept (each at most [`JSON_LIMIT`]).

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, Read};

use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;

use super::reference::{is_valid_digest, normalize_reference, ReferenceError};
use super::{Compression, Layout};

/// A compressed archive is read up to this many times its size: real image archives expand a
/// few times at most; beyond that it is treated as a decompression bomb.
pub(crate) const MAX_EXPANSION: u64 = 1000;
/// ...but never less than this, so small files are never cut short.
const MIN_EXPANDED_BUDGET: u64 = 1 << 30;

/// containerd's `jsonLimit` for `manifest.json` and `oci-layout`; also our bound on the
/// `index.json` kept in memory.
pub(crate) const JSON_LIMIT: u64 = 20 * 1024 * 1024;

/// K3s's zstd decoder memory limit (`tarfile.MaxDecoderMemory`, 32 MiB = window log 25): a
/// `.tar.zst` made with a larger window fails to import in K3s, so it fails here too.
const ZSTD_WINDOW_LOG_MAX: u32 = 25;

/// Compressed bytes read from the file at a time: large enough that reading costs few system
/// calls, small enough to stay in the CPU's caches next to the decompressor's state.
const FILE_BUFFER: usize = 256 * 1024;

/// Decompressed bytes of an unneeded entry (a layer) drained at a time, into one reusable
/// buffer, instead of the tar crate's 32 KiB per call.
const DRAIN_BUFFER: usize = 128 * 1024;

const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_LAYOUT_VERSION: &str = "1.0.0";

#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadOptions {
    /// Read the whole archive even when the OCI index already gave the names, so that a
    /// truncated or corrupt tail is reported as K3s's import would fail on it.
    pub verify_whole_archive: bool,
    pub json_limit: u64,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            verify_whole_archive: false,
            json_limit: JSON_LIMIT,
        }
    }
}

/// What is wrong with an archive. The caller prefixes the file's path.
#[derive(Debug, Error)]
pub(crate) enum ArchiveError {
    #[error("not a valid {compression} stream: {source}")]
    Decompress {
        compression: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("corrupt or truncated archive: {0}")]
    Tar(#[source] io::Error),
    #[error(
        "the tar archive is truncated: an entry ends at byte {end} but the file has {len} bytes"
    )]
    Truncated { end: u64, len: u64 },
    #[error("{file} is not valid JSON of the expected shape: {reason}")]
    Json { file: &'static str, reason: String },
    #[error("{file} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        file: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("unsupported OCI layout version {0:?} (containerd imports only 1.0.0)")]
    OciVersion(String),
    #[error("OCI layout without index.json")]
    MissingIndex,
    #[error("neither an OCI layout (oci-layout + index.json) nor a docker-save archive (manifest.json): unrecognized image format")]
    Unrecognized,
    #[error("the image index lists no manifests, so containerd imports nothing")]
    EmptyIndex,
    #[error("manifest {index} of index.json (image {name:?}) has an invalid target ({reason}); containerd refuses to create the image")]
    BadTarget {
        index: usize,
        name: String,
        reason: &'static str,
    },
    #[error("tar symlink {name:?} points at {target:?}, which is not in the archive")]
    DanglingSymlink { name: String, target: String },
    #[error("manifest.json names config {0:?}, which is not in the archive")]
    MissingConfig(String),
    #[error("manifest.json names layer {0:?}, which is not in the archive")]
    MissingLayer(String),
    #[error("manifest.json RepoTags entry: {0}")]
    RepoTag(#[from] ReferenceError),
}

/// The outcome of reading one archive: what was learned even when it failed.
#[derive(Debug, Default)]
pub(crate) struct ArchiveRead {
    pub layout: Option<Layout>,
    pub names: Vec<String>,
    pub error: Option<ArchiveError>,
}

impl ArchiveRead {
    fn failed(layout: Option<Layout>, error: ArchiveError) -> Self {
        ArchiveRead {
            layout,
            names: Vec::new(),
            error: Some(error),
        }
    }
}

/// Reads an archive from `file`, a regular file of `len` bytes the caller opened (and checked,
/// see `open_regular`), decompressing by `compression`.
pub(crate) fn read_archive_file(
    file: std::fs::File,
    len: u64,
    compression: Compression,
    options: ReadOptions,
) -> ArchiveRead {
    match compression {
        Compression::None => {
            let mut archive = tar::Archive::new(io::BufReader::new(file));
            match archive.entries_with_seek() {
                Ok(entries) => read_entries(entries, options, Some(len), None),
                Err(e) => ArchiveRead::failed(None, ArchiveError::Tar(e)),
            }
        }
        other => {
            let budget = len.saturating_mul(MAX_EXPANSION).max(MIN_EXPANDED_BUDGET);
            read_buffered(
                io::BufReader::with_capacity(FILE_BUFFER, file),
                other,
                options,
                budget,
            )
        }
    }
}

/// Reads an archive from a stream (no seeking), decompressing by `compression`.
#[cfg(test)]
pub(crate) fn read_archive<R: Read>(
    reader: R,
    compression: Compression,
    options: ReadOptions,
) -> ArchiveRead {
    read_buffered(
        io::BufReader::with_capacity(FILE_BUFFER, reader),
        compression,
        options,
        u64::MAX,
    )
}

/// The decompressors read straight from `reader`'s buffer (no second buffer in between).
pub(crate) fn read_buffered<R: BufRead>(
    reader: R,
    compression: Compression,
    options: ReadOptions,
    budget: u64,
) -> ArchiveRead {
    match compression {
        Compression::None => stream_entries(reader, compression, options, budget),
        Compression::Gzip => stream_entries(
            flate2::bufread::MultiGzDecoder::new(reader),
            compression,
            options,
            budget,
        ),
        Compression::Bzip2 => stream_entries(
            bzip2::bufread::MultiBzDecoder::new(reader),
            compression,
            options,
            budget,
        ),
        Compression::Lz4 => stream_entries(
            lz4_flex::frame::FrameDecoder::new(reader),
            compression,
            options,
            budget,
        ),
        Compression::Zstd => {
            let decoder = zstd::stream::read::Decoder::with_buffer(reader).and_then(|mut d| {
                d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
                Ok(d)
            });
            match decoder {
                Ok(d) => stream_entries(d, compression, options, budget),
                Err(source) => ArchiveRead::failed(
                    None,
                    ArchiveError::Decompress {
                        compression: compression.name(),
                        source,
                    },
                ),
            }
        }
    }
}

fn stream_entries<R: Read>(
    reader: R,
    compression: Compression,
    options: ReadOptions,
    budget: u64,
) -> ArchiveRead {
    let decompressor_failed = Cell::new(false);
    let tracked = Tracked {
        inner: reader,
        failed: &decompressor_failed,
        budget,
        budget_left: budget,
    };
    let mut archive = tar::Archive::new(tracked);
    let mut read = match archive.entries() {
        Ok(entries) => {
            let mut drain = vec![0; DRAIN_BUFFER];
            read_entries(entries, options, None, Some(&mut drain))
        }
        Err(e) => ArchiveRead::failed(None, ArchiveError::Tar(e)),
    };
    // An error the decompressor raised is about the compression, not the tar inside.
    if decompressor_failed.get() && compression != Compression::None {
        if let Some(ArchiveError::Tar(source)) = read.error.take() {
            read.error = Some(ArchiveError::Decompress {
                compression: compression.name(),
                source,
            });
        }
    }
    read
}

/// Remembers whether the reader under the tar parser failed, and stops a decompression bomb:
/// at most `budget` decompressed bytes are read.
struct Tracked<'a, R> {
    inner: R,
    failed: &'a Cell<bool>,
    budget: u64,
    budget_left: u64,
}

impl<R: Read> Read for Tracked<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.budget_left == 0 {
            // At the budget: fine if the stream ends here, a bomb if it goes on.
            let mut probe = [0u8; 1];
            if self
                .inner
                .read(&mut probe)
                .inspect_err(|_| self.failed.set(true))?
                == 0
            {
                return Ok(0);
            }
            self.failed.set(true);
            return Err(io::Error::other(format!(
                "it expands to more than {} bytes, over {MAX_EXPANSION} times its size: \
                 a decompression bomb? Not read further",
                self.budget
            )));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.budget_left).unwrap_or(usize::MAX));
        let n = self
            .inner
            .read(&mut buf[..want])
            .inspect_err(|_| self.failed.set(true))?;
        self.budget_left -= n as u64;
        Ok(n)
    }
}

/// What the walk over the tar has seen so far.
#[derive(Default)]
struct Seen {
    oci_layout_version: String,
    /// the bytes, or the size when it is over the limit
    index_json: Option<Result<Vec<u8>, u64>>,
    manifests: Option<Vec<DockerManifest>>,
    blobs: HashSet<String>,
    /// tar symlinks, raw name -> joined target (containerd keys them by the raw name)
    symlinks: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct DockerManifest {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Walks the entries. `drain`, for a stream that cannot seek, is the buffer the bodies of
/// unneeded entries are read into and dropped; the tar crate skips whatever is left unread
/// (by seeking when it can).
fn read_entries<R: Read>(
    entries: tar::Entries<'_, R>,
    options: ReadOptions,
    file_len: Option<u64>,
    mut drain: Option<&mut [u8]>,
) -> ArchiveRead {
    let mut seen = Seen::default();
    let mut furthest_end = 0u64;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return ArchiveRead::failed(None, ArchiveError::Tar(e)),
        };
        furthest_end = furthest_end.max(entry.raw_file_position().saturating_add(entry.size()));
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let type_flag = entry.header().as_old().linkflag[0];
        if type_flag == b'2' {
            let link =
                String::from_utf8_lossy(&entry.link_name_bytes().unwrap_or_default()).into_owned();
            let target = go_path_join(&go_path_dir(&raw_name), &link);
            seen.symlinks.push((raw_name, target));
            continue;
        }
        let regular = type_flag == b'0' || (type_flag == 0 && !raw_name.ends_with('/'));
        if !regular {
            if let Err(e) = drain_body(&mut entry, drain.as_deref_mut()) {
                return ArchiveRead::failed(None, ArchiveError::Tar(e));
            }
            continue;
        }
        let name = go_path_clean(&raw_name);
        let size = entry.size();
        match name.as_str() {
            "oci-layout" => {
                let bytes = match read_capped(&mut entry, options.json_limit) {
                    Ok(b) => b,
                    Err(e) => return ArchiveRead::failed(None, ArchiveError::Tar(e)),
                };
                if let Err(reason) = decode_oci_layout(&bytes, &mut seen.oci_layout_version) {
                    return ArchiveRead::failed(
                        None,
                        ArchiveError::Json {
                            file: "oci-layout",
                            reason,
                        },
                    );
                }
            }
            "manifest.json" => {
                let bytes = match read_capped(&mut entry, options.json_limit) {
                    Ok(b) => b,
                    Err(e) => return ArchiveRead::failed(None, ArchiveError::Tar(e)),
                };
                match decode_docker_manifests(&bytes) {
                    Ok(m) => seen.manifests = m,
                    Err(reason) => {
                        let error = if size > options.json_limit {
                            ArchiveError::TooLarge {
                                file: "manifest.json",
                                size,
                                limit: options.json_limit,
                            }
                        } else {
                            ArchiveError::Json {
                                file: "manifest.json",
                                reason,
                            }
                        };
                        return ArchiveRead::failed(Some(Layout::DockerSave), error);
                    }
                }
            }
            _ => {
                if name == "index.json" {
                    seen.index_json = Some(if size > options.json_limit {
                        Err(size)
                    } else {
                        match read_capped(&mut entry, options.json_limit) {
                            Ok(b) => Ok(b),
                            Err(e) => return ArchiveRead::failed(None, ArchiveError::Tar(e)),
                        }
                    });
                }
                seen.blobs.insert(name);
            }
        }
        // The OCI index alone gives the names: stop before the layers.
        if !options.verify_whole_archive
            && !seen.oci_layout_version.is_empty()
            && seen.index_json.is_some()
        {
            return finish_oci(&seen, options.json_limit);
        }
        if let Err(e) = drain_body(&mut entry, drain.as_deref_mut()) {
            return ArchiveRead::failed(None, ArchiveError::Tar(e));
        }
    }
    if let Some(len) = file_len {
        if furthest_end > len {
            return ArchiveRead::failed(
                None,
                ArchiveError::Truncated {
                    end: furthest_end,
                    len,
                },
            );
        }
    }
    if !seen.oci_layout_version.is_empty() {
        return finish_oci(&seen, options.json_limit);
    }
    finish_docker(&seen)
}

/// Reads what is left of an entry's body into `buf` and drops it (nothing without a buffer).
fn drain_body<R: Read>(entry: &mut R, buf: Option<&mut [u8]>) -> io::Result<()> {
    let Some(buf) = buf else { return Ok(()) };
    loop {
        match entry.read(buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn read_capped<R: Read>(entry: &mut R, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    entry.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

fn finish_oci(seen: &Seen, limit: u64) -> ArchiveRead {
    let layout = Some(Layout::Oci);
    if seen.oci_layout_version != OCI_LAYOUT_VERSION {
        return ArchiveRead::failed(
            layout,
            ArchiveError::OciVersion(seen.oci_layout_version.clone()),
        );
    }
    let bytes = match &seen.index_json {
        None => return ArchiveRead::failed(layout, ArchiveError::MissingIndex),
        Some(Err(size)) => {
            return ArchiveRead::failed(
                layout,
                ArchiveError::TooLarge {
                    file: "index.json",
                    size: *size,
                    limit,
                },
            )
        }
        Some(Ok(bytes)) => bytes,
    };
    match oci_names(bytes) {
        Ok(names) => ArchiveRead {
            layout,
            names,
            error: None,
        },
        Err(e) => ArchiveRead::failed(layout, e),
    }
}

fn finish_docker(seen: &Seen) -> ArchiveRead {
    let Some(manifests) = &seen.manifests else {
        return ArchiveRead::failed(None, ArchiveError::Unrecognized);
    };
    let layout = Some(Layout::DockerSave);
    let mut blobs: HashSet<&str> = seen.blobs.iter().map(String::as_str).collect();
    for (name, target) in &seen.symlinks {
        if !seen.blobs.contains(target) {
            return ArchiveRead::failed(
                layout,
                ArchiveError::DanglingSymlink {
                    name: name.clone(),
                    target: target.clone(),
                },
            );
        }
        blobs.insert(name);
    }
    let mut names = Names::default();
    for manifest in manifests {
        if !blobs.contains(manifest.config.as_str()) {
            return ArchiveRead::failed(
                layout,
                ArchiveError::MissingConfig(manifest.config.clone()),
            );
        }
        if let Some(layer) = manifest.layers.iter().find(|l| !blobs.contains(l.as_str())) {
            return ArchiveRead::failed(layout, ArchiveError::MissingLayer(layer.clone()));
        }
        for tag in &manifest.repo_tags {
            match normalize_reference(tag) {
                Ok(name) => names.push(name),
                Err(e) => return ArchiveRead::failed(layout, e.into()),
            }
        }
    }
    if manifests.is_empty() {
        return ArchiveRead::failed(layout, ArchiveError::EmptyIndex);
    }
    ArchiveRead {
        layout,
        names: names.names,
        error: None,
    }
}

/// Names in first-seen order without duplicates, each checked in constant time (a
/// `manifest.json` can hold hundreds of thousands of tags).
#[derive(Default)]
struct Names {
    names: Vec<String>,
    seen: HashSet<String>,
}

impl Names {
    fn push(&mut self, name: String) {
        if !self.seen.contains(name.as_str()) {
            self.seen.insert(name.clone());
            self.names.push(name);
        }
    }
}

// ---- JSON, decoded with the leniency and strictness of Go's encoding/json ----

/// Go's `json.Decoder.Decode`: the first JSON value; anything after it is not looked at.
fn first_value(bytes: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Value::deserialize(&mut de).map_err(|e| e.to_string())
}

/// Go matches struct fields case-insensitively, preferring the exact name.
fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// A Go `string` field: null leaves it empty, anything but a string is a type error.
fn string_field(object: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "field {name:?} must be a string, not {}",
            kind(other)
        )),
    }
}

/// A Go `[]string` field.
fn strings_field(object: &Map<String, Value>, name: &str) -> Result<Vec<String>, String> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Null => Ok(String::new()),
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "{name:?} entries must be strings, not {}",
                    kind(other)
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "field {name:?} must be an array, not {}",
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `oci-layout` into `ocispec.ImageLayout`; a later file overrides only the fields it has.
fn decode_oci_layout(bytes: &[u8], version: &mut String) -> Result<(), String> {
    match first_value(bytes)? {
        Value::Null => Ok(()),
        Value::Object(o) => {
            if let Some(v) = string_field(&o, "imageLayoutVersion")? {
                *version = v;
            }
            Ok(())
        }
        other => Err(format!("expected an object, found {}", kind(&other))),
    }
}

/// `manifest.json` into `[]struct{Config string; RepoTags []string; Layers []string}`.
/// JSON `null` gives a nil slice, which containerd treats as "no manifest.json".
fn decode_docker_manifests(bytes: &[u8]) -> Result<Option<Vec<DockerManifest>>, String> {
    let items = match first_value(bytes)? {
        Value::Null => return Ok(None),
        Value::Array(items) => items,
        other => return Err(format!("expected an array, found {}", kind(&other))),
    };
    let mut manifests = Vec::with_capacity(items.len());
    for item in items {
        let manifest = match item {
            Value::Null => DockerManifest::default(),
            Value::Object(o) => DockerManifest {
                config: string_field(&o, "Config")?.unwrap_or_default(),
                repo_tags: strings_field(&o, "RepoTags")?,
                layers: strings_field(&o, "Layers")?,
            },
            other => return Err(format!("entries must be objects, not {}", kind(&other))),
        };
        manifests.push(manifest);
    }
    Ok(Some(manifests))
}

/// The names `client.Import` gives the top-level manifests of an OCI `index.json`
/// (`json.Unmarshal`: the whole file must be one JSON value).
fn oci_names(bytes: &[u8]) -> Result<Vec<String>, ArchiveError> {
    let bad = |reason: String| ArchiveError::Json {
        file: "index.json",
        reason,
    };
    let index: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let manifests = match &index {
        Value::Null => Vec::new(),
        Value::Object(o) => {
            check_int(o, "schemaVersion").map_err(bad)?;
            string_field(o, "mediaType").map_err(bad)?;
            string_map(o, "annotations").map_err(bad)?;
            match field(o, "manifests") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items.clone(),
                Some(other) => {
                    return Err(bad(format!(
                        "field \"manifests\" must be an array, not {}",
                        kind(other)
                    )))
                }
            }
        }
        other => return Err(bad(format!("expected an object, found {}", kind(other)))),
    };
    let mut descriptors = Vec::with_capacity(manifests.len());
    for item in &manifests {
        descriptors.push(Descriptor::decode(item).map_err(bad)?);
    }
    if descriptors.is_empty() {
        return Err(ArchiveError::EmptyIndex);
    }
    let mut names = Names::default();
    for (index, d) in descriptors.into_iter().enumerate() {
        let name = match d.annotations.get(ANNOTATION_IMAGE_NAME) {
            Some(n) if !n.is_empty() => n.clone(),
            _ => d
                .annotations
                .get(ANNOTATION_REF_NAME)
                .cloned()
                .unwrap_or_default(),
        };
        if name.is_empty() {
            continue;
        }
        let reason = if !is_valid_digest(&d.digest) {
            Some("invalid digest")
        } else if d.size <= 0 {
            Some("size must be greater than zero")
        } else if d.media_type.is_empty() {
            Some("no mediaType")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(ArchiveError::BadTarget {
                index,
                name,
                reason,
            });
        }
        names.push(name);
    }
    Ok(names.names)
}

struct Descriptor {
    media_type: String,
    digest: String,
    size: i64,
    annotations: HashMap<String, String>,
}

impl Descriptor {
    fn decode(v: &Value) -> Result<Self, String> {
        let o = match v {
            Value::Null => {
                return Ok(Descriptor {
                    media_type: String::new(),
                    digest: String::new(),
                    size: 0,
                    annotations: HashMap::new(),
                })
            }
            Value::Object(o) => o,
            other => return Err(format!("manifests must be objects, not {}", kind(other))),
        };
        strings_field(o, "urls")?;
        string_field(o, "artifactType")?;
        match field(o, "platform") {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(format!(
                    "\"platform\" must be an object, not {}",
                    kind(other)
                ))
            }
        }
        Ok(Descriptor {
            media_type: string_field(o, "mediaType")?.unwrap_or_default(),
            digest: string_field(o, "digest")?.unwrap_or_default(),
            size: check_int(o, "size")?.unwrap_or(0),
            annotations: string_map(o, "annotations")?,
        })
    }
}

/// A Go integer field (`int`/`int64`): a number without fraction or exponent that fits.
fn check_int(object: &Map<String, Value>, name: &str) -> Result<Option<i64>, String> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("field {name:?} must be an integer, not {n}")),
        Some(other) => Err(format!(
            "field {name:?} must be a number, not {}",
            kind(other)
        )),
    }
}

/// A Go `map[string]string` field.
fn string_map(object: &Map<String, Value>, name: &str) -> Result<HashMap<String, String>, String> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(HashMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                Value::Null => Ok((k.clone(), String::new())),
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(format!(
                    "{name:?} values must be strings, not {}",
                    kind(other)
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "field {name:?} must be an object, not {}",
            kind(other)
        )),
    }
}

// ---- Go's path package, which containerd uses on tar entry names ----

/// Go's `path.Clean`.
pub(crate) fn go_path_clean(p: &str) -> String {
    if p.is_empty() {
        return ".".to_owned();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Go's `path.Dir`.
fn go_path_dir(p: &str) -> String {
    let dir = match p.rfind('/') {
        Some(i) => &p[..=i],
        None => "",
    };
    go_path_clean(dir)
}

/// Go's `path.Join` of two elements.
fn go_path_join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => String::new(),
        (true, false) => go_path_clean(b),
        (false, true) => go_path_clean(a),
        (false, false) => go_path_clean(&format!("{a}/{b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_path_functions() {
        for (input, want) in [
            ("", "."),
            ("./index.json", "index.json"),
            ("a/../index.json", "index.json"),
            ("/index.json", "/index.json"),
            ("../x", "../x"),
            ("/../x", "/x"),
            ("a//b/./c/", "a/b/c"),
            ("a/b/../..", "."),
        ] {
            assert_eq!(go_path_clean(input), want, "clean {input:?}");
        }
        assert_eq!(go_path_dir("abc/layer.tar"), "abc");
        assert_eq!(go_path_dir("layer.tar"), ".");
        assert_eq!(go_path_join(".", "x/layer.tar"), "x/layer.tar");
        assert_eq!(go_path_join("abc", "../def/layer.tar"), "def/layer.tar");
    }

    #[test]
    fn json_decoding_follows_go() {
        // first value only, trailing bytes ignored (json.Decoder)
        let m = decode_docker_manifests(br#"[{"config":"c","repotags":["a:1",null]}] trailing"#)
            .unwrap()
            .unwrap();
        assert_eq!(m[0].config, "c");
        assert_eq!(m[0].repo_tags, vec!["a:1".to_owned(), String::new()]);
        assert!(decode_docker_manifests(b"null").unwrap().is_none());
        assert!(decode_docker_manifests(br#"{"Config":"c"}"#).is_err());
        assert!(decode_docker_manifests(br#"[{"RepoTags":"a:1"}]"#).is_err());
        // index.json must be one whole value (json.Unmarshal)
        assert!(oci_names(b"{} x").is_err());
        let mut v = String::new();
        decode_oci_layout(br#"{"imageLayoutVersion":"1.0.0"}"#, &mut v).unwrap();
        decode_oci_layout(br#"{}"#, &mut v).unwrap();
        assert_eq!(v, "1.0.0");
    }
}

#[cfg(test)]
mod bomb_tests {
    use super::*;
    use std::io::Write;

    fn gzip_tar_of_zeros(size: usize) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(size as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "zeros", io::repeat(0).take(size as u64))
            .unwrap();
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_decompression_bomb_is_reported_not_read_to_the_end() {
        let bytes = gzip_tar_of_zeros(8 << 20);
        let read = read_buffered(
            io::BufReader::new(bytes.as_slice()),
            Compression::Gzip,
            ReadOptions::default(),
            1 << 20,
        );
        let error = read.error.expect("an error").to_string();
        assert!(error.contains("decompression bomb"), "{error}");
    }

    #[test]
    fn a_stream_ending_exactly_at_the_budget_is_fine() {
        let bytes = gzip_tar_of_zeros(4096);
        let all = read_buffered(
            io::BufReader::new(bytes.as_slice()),
            Compression::Gzip,
            ReadOptions::default(),
            u64::MAX,
        );
        let mut decoded = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes.as_slice())
            .read_to_end(&mut decoded)
            .unwrap();
        let exact = read_buffered(
            io::BufReader::new(bytes.as_slice()),
            Compression::Gzip,
            ReadOptions::default(),
            decoded.len() as u64,
        );
        assert_eq!(
            all.error.map(|e| e.to_string()),
            exact.error.map(|e| e.to_string())
        );
    }
}
