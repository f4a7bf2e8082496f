//! Image archives built offline, in both layouts K3s imports, with every compression it reads.
//!
//! - OCI image layout: `oci-layout`, `index.json` (one manifest entry per image name, named by
//!   `io.containerd.image.name` and/or `org.opencontainers.image.ref.name`), `blobs/sha256/*`.
//! - docker-save (pre-25 layout): `<layer id>/layer.tar`, `<layer id>/VERSION`, `<layer id>/json`,
//!   `<config hex>.json`, `manifest.json` (`Config`, `RepoTags`, `Layers`), `repositories`; in the
//!   lexical order `docker save` produces (it tars a temp dir), so the metadata comes after the
//!   blobs.
//!
//! Content is deterministic per image (seeded by its first name), so digests are stable across
//! runs. Layers are uncompressed tars of one generated file each; configs are valid OCI image
//! configs for the host platform, so containerd's CRI (1.7, 2.x) accepts the images.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::reference::normalize_repo_tag;

/// OCI manifest media type.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI index media type.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI config media type.
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer media type.
pub const MEDIA_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// containerd's image name annotation.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI's ref name annotation.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image to put in an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestImage {
    /// Names (OCI: one index entry each; docker-save: the `RepoTags`). The first seeds the
    /// content.
    pub names: Vec<String>,
    /// Bytes of the generated file in each layer (the size knob for benchmarks).
    pub layer_size: usize,
    /// Number of layers.
    pub layers: usize,
}

impl TestImage {
    /// One name, one layer of 64 bytes.
    pub fn new(name: impl Into<String>) -> TestImage {
        TestImage {
            names: vec![name.into()],
            layer_size: 64,
            layers: 1,
        }
    }

    /// Adds another name for the same image.
    pub fn with_name(mut self, name: impl Into<String>) -> TestImage {
        self.names.push(name.into());
        self
    }

    /// Sets the size of each layer's file.
    pub fn layer_size(mut self, bytes: usize) -> TestImage {
        self.layer_size = bytes;
        self
    }

    /// Sets the number of layers.
    pub fn layers(mut self, layers: usize) -> TestImage {
        self.layers = layers.max(1);
        self
    }

    /// Builds the image's blobs (deterministic).
    pub fn blobs(&self) -> Result<ImageBlobs> {
        let seed = self
            .names
            .first()
            .context("a test image needs at least one name")?;
        let slug: String = seed
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let mut layers = Vec::with_capacity(self.layers);
        for i in 0..self.layers {
            let data = pseudo_random(&format!("{seed}#{i}"), self.layer_size);
            let mut builder = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(
                    &mut header,
                    format!("pinkeeper/{slug}/layer{i}.bin"),
                    data.as_slice(),
                )
                .context("building a layer tar")?;
            let tar = builder.into_inner().context("finishing a layer tar")?;
            layers.push(Blob::new(MEDIA_OCI_LAYER, tar));
        }
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let history: Vec<_> = layers
            .iter()
            .map(|_| json!({"created": "1970-01-01T00:00:00Z", "created_by": "pinkeeper-testkit"}))
            .collect();
        let config = json!({
            "architecture": host_arch(),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Cmd": ["/pinkeeper"],
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Labels": {"org.pinkeeper.test-image": seed},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        let config = Blob::new(MEDIA_OCI_CONFIG, serde_json::to_vec(&config)?);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(MEDIA_OCI_MANIFEST, serde_json::to_vec(&manifest)?);
        Ok(ImageBlobs {
            config,
            layers,
            manifest,
        })
    }
}

/// One content-addressed blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Media type used when it is referenced.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// The bytes.
    pub data: Vec<u8>,
}

impl Blob {
    /// Hashes `data`.
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&data),
            data,
        }
    }

    /// The hex part of the digest.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    /// An OCI descriptor as JSON.
    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// The blobs of a [`TestImage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBlobs {
    /// Image config (its digest is the image id CRI uses: `sha256:<config>` records).
    pub config: Blob,
    /// Uncompressed layers.
    pub layers: Vec<Blob>,
    /// The OCI manifest (the target of OCI-layout imports).
    pub manifest: Blob,
}

/// Which annotations name the images in an OCI layout's `index.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OciNames {
    /// Only `io.containerd.image.name` (full name).
    ContainerdName,
    /// Only `org.opencontainers.image.ref.name`, holding the full name (as skopeo/buildah
    /// write it when given one). containerd uses it verbatim when K3s imports.
    RefName,
    /// Both, like `ctr images export`: `io.containerd.image.name` = full name,
    /// `org.opencontainers.image.ref.name` = the tag only.
    Both,
}

/// Archive layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// OCI image layout.
    Oci {
        /// Which annotations carry the names.
        names: OciNames,
        /// Put `index.json` and `oci-layout` after the blobs instead of first.
        index_last: bool,
    },
    /// `docker save` (pre-25) layout.
    DockerSave,
}

impl Layout {
    /// OCI layout named like `ctr images export` does, index first.
    pub fn oci() -> Layout {
        Layout::Oci {
            names: OciNames::Both,
            index_last: false,
        }
    }

    /// Every variant.
    pub fn all() -> Vec<Layout> {
        let mut all = vec![Layout::DockerSave];
        for names in [OciNames::ContainerdName, OciNames::RefName, OciNames::Both] {
            for index_last in [false, true] {
                all.push(Layout::Oci { names, index_last });
            }
        }
        all
    }
}

/// The archive compressions K3s reads, one per file suffix (FACTS.md 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `.tar`
    Tar,
    /// `.tar.gz`
    TarGz,
    /// `.tgz`
    Tgz,
    /// `.tar.bz2`
    TarBz2,
    /// `.tbz`
    Tbz,
    /// `.tar.zst`
    TarZst,
    /// `.tzst`
    Tzst,
    /// `.tar.lz4` (lz4 frame format)
    TarLz4,
}

impl Compression {
    /// Every suffix K3s imports.
    pub fn all() -> [Compression; 8] {
        use Compression::*;
        [Tar, TarGz, Tgz, TarBz2, Tbz, TarZst, Tzst, TarLz4]
    }

    /// The file suffix, with its leading dot.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::Tar => ".tar",
            Compression::TarGz => ".tar.gz",
            Compression::Tgz => ".tgz",
            Compression::TarBz2 => ".tar.bz2",
            Compression::Tbz => ".tbz",
            Compression::TarZst => ".tar.zst",
            Compression::Tzst => ".tzst",
            Compression::TarLz4 => ".tar.lz4",
        }
    }

    /// The compression of a file name by its (case-sensitive) suffix; `None` if K3s would
    /// not import it as an archive.
    pub fn from_path(path: &Path) -> Option<Compression> {
        // Bytes, as K3s (Go) compares them: a name need not be UTF-8.
        let name = std::os::unix::ffi::OsStrExt::as_bytes(path.file_name()?);
        // Longest suffixes first: ".tar" is a suffix of none of the others, but be explicit.
        let mut all = Compression::all();
        all.sort_by_key(|c| std::cmp::Reverse(c.suffix().len()));
        all.into_iter()
            .find(|c| name.ends_with(c.suffix().as_bytes()))
    }

    /// Compresses a tar stream.
    pub fn compress(self, tar: &[u8]) -> Result<Vec<u8>> {
        Ok(match self {
            Compression::Tar => tar.to_vec(),
            Compression::TarGz | Compression::Tgz => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar)?;
                e.finish()?
            }
            Compression::TarBz2 | Compression::Tbz => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(tar)?;
                e.finish()?
            }
            Compression::TarZst | Compression::Tzst => zstd::encode_all(tar, 3)?,
            Compression::TarLz4 => {
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                e.write_all(tar)?;
                e.finish().context("finishing an lz4 frame")?
            }
        })
    }

    /// A reader that decompresses `input`.
    pub fn decompressor<'a, R: Read + 'a>(self, input: R) -> Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::Tar => Box::new(input),
            Compression::TarGz | Compression::Tgz => Box::new(flate2::read::GzDecoder::new(input)),
            Compression::TarBz2 | Compression::Tbz => {
                Box::new(bzip2::read::MultiBzDecoder::new(input))
            }
            Compression::TarZst | Compression::Tzst => Box::new(
                zstd::stream::read::Decoder::new(input).context("starting a zstd decoder")?,
            ),
            Compression::TarLz4 => Box::new(lz4_flex::frame::FrameDecoder::new(input)),
        })
    }
}

/// The image names containerd gives the images of an archive when K3s imports it
/// (OCI: verbatim annotation; docker-save: normalised `RepoTags`).
pub fn expected_names(layout: Layout, images: &[TestImage]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for image in images {
        for name in &image.names {
            names.push(match layout {
                Layout::Oci { .. } => name.clone(),
                Layout::DockerSave => normalize_repo_tag(name)?,
            });
        }
    }
    Ok(names)
}

/// Builds the uncompressed tar of an archive.
pub fn build_tar(layout: Layout, images: &[TestImage]) -> Result<Vec<u8>> {
    if images.is_empty() {
        bail!("an archive needs at least one image");
    }
    // path -> bytes; BTreeMap dedups shared blobs and gives docker save's lexical order.
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut metadata: Vec<(String, Vec<u8>)> = Vec::new();
    match layout {
        Layout::Oci { names, index_last } => {
            let mut manifests = Vec::new();
            for image in images {
                let blobs = image.blobs()?;
                for blob in blobs.layers.iter().chain([&blobs.config, &blobs.manifest]) {
                    files.insert(format!("blobs/sha256/{}", blob.hex()), blob.data.clone());
                }
                for name in &image.names {
                    let mut annotations = serde_json::Map::new();
                    match names {
                        OciNames::ContainerdName => {
                            annotations.insert(ANNOTATION_CONTAINERD_NAME.into(), json!(name));
                        }
                        OciNames::RefName => {
                            annotations.insert(ANNOTATION_REF_NAME.into(), json!(name));
                        }
                        OciNames::Both => {
                            annotations.insert(ANNOTATION_CONTAINERD_NAME.into(), json!(name));
                            let tag = crate::reference::parse_normalized(name)?
                                .tag
                                .unwrap_or_else(|| "latest".to_string());
                            annotations.insert(ANNOTATION_REF_NAME.into(), json!(tag));
                        }
                    }
                    let mut desc = blobs.manifest.descriptor();
                    desc["annotations"] = serde_json::Value::Object(annotations);
                    manifests.push(desc);
                }
            }
            let index = json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_INDEX,
                "manifests": manifests,
            });
            metadata.push((
                "oci-layout".into(),
                serde_json::to_vec(&json!({"imageLayoutVersion": "1.0.0"}))?,
            ));
            metadata.push(("index.json".into(), serde_json::to_vec(&index)?));
            if index_last {
                for (path, data) in metadata {
                    files.insert(path, data);
                }
                // Lexical order puts "blobs/..." first, then index.json, then oci-layout.
                write_tar(files.into_iter())
            } else {
                write_tar(metadata.into_iter().chain(files))
            }
        }
        Layout::DockerSave => {
            let mut manifest = Vec::new();
            let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            for image in images {
                let blobs = image.blobs()?;
                let mut layer_paths = Vec::new();
                let mut parent: Option<String> = None;
                for layer in &blobs.layers {
                    // docker's v1 layer ids are chained hashes; any stable id will do here.
                    let id = sha256_digest(
                        format!("{}{}", parent.as_deref().unwrap_or(""), layer.digest).as_bytes(),
                    )
                    .trim_start_matches("sha256:")
                    .to_string();
                    files.insert(format!("{id}/layer.tar"), layer.data.clone());
                    files.insert(format!("{id}/VERSION"), b"1.0".to_vec());
                    let mut v1 = json!({"id": id, "created": "1970-01-01T00:00:00Z"});
                    if let Some(parent) = &parent {
                        v1["parent"] = json!(parent);
                    }
                    files.insert(format!("{id}/json"), serde_json::to_vec(&v1)?);
                    layer_paths.push(format!("{id}/layer.tar"));
                    parent = Some(id);
                }
                let config_path = format!("{}.json", blobs.config.hex());
                files.insert(config_path.clone(), blobs.config.data.clone());
                for name in &image.names {
                    let (repo, tag) = split_repo_tag(name);
                    if let Some(top) = &parent {
                        repositories
                            .entry(repo.to_string())
                            .or_default()
                            .insert(tag.to_string(), top.clone());
                    }
                }
                manifest.push(json!({
                    "Config": config_path,
                    "RepoTags": image.names,
                    "Layers": layer_paths,
                }));
            }
            files.insert("manifest.json".into(), serde_json::to_vec(&manifest)?);
            files.insert("repositories".into(), serde_json::to_vec(&repositories)?);
            write_tar(files.into_iter())
        }
    }
}

/// Builds an archive and writes it to `path`, compressed by the path's suffix. Returns the
/// image names containerd will give its images.
pub fn write_archive(path: &Path, layout: Layout, images: &[TestImage]) -> Result<Vec<String>> {
    let compression = Compression::from_path(path).with_context(|| {
        format!(
            "{}: not an archive suffix K3s imports (.tar .tar.gz .tgz .tar.bz2 .tbz .tar.zst \
             .tzst .tar.lz4)",
            path.display()
        )
    })?;
    let tar = build_tar(layout, images)?;
    let data = compression.compress(&tar)?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    expected_names(layout, images)
}

fn write_tar(entries: impl Iterator<Item = (String, Vec<u8>)>) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, &path, data.as_slice())
            .with_context(|| format!("adding {path} to the archive"))?;
    }
    builder.into_inner().context("finishing the archive tar")
}

/// `name:tag` -> (`name`, `tag`), tag `latest` if absent.
fn split_repo_tag(name: &str) -> (&str, &str) {
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
        None => (name, "latest"),
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The OCI architecture of this host.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// Deterministic bytes from a seed (xorshift64* over a SHA-256 of the seed).
fn pseudo_random(seed: &str, len: usize) -> Vec<u8> {
    let hash = Sha256::digest(seed.as_bytes());
    let mut state = u64::from_le_bytes([
        hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7],
    ]) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_round_trips() -> Result<()> {
        let images = [
            TestImage::new("docker.io/library/a:1").with_name("docker.io/library/a:latest"),
            TestImage::new("registry.x:5000/b:2").layers(2),
        ];
        for layout in Layout::all() {
            let one = build_tar(layout, &images)?;
            assert_eq!(
                one,
                build_tar(layout, &images)?,
                "{layout:?} not deterministic"
            );
            for compression in Compression::all() {
                let packed = compression.compress(&one)?;
                let mut back = Vec::new();
                compression
                    .decompressor(packed.as_slice())?
                    .read_to_end(&mut back)?;
                assert_eq!(back, one, "{compression:?}");
            }
        }
        let entries: Vec<String> =
            tar::Archive::new(build_tar(Layout::DockerSave, &images)?.as_slice())
                .entries()?
                .map(|e| Ok(e?.path()?.display().to_string()))
                .collect::<Result<_>>()?;
        assert_eq!(entries.last().map(String::as_str), Some("repositories"));
        assert!(entries.iter().position(|e| e == "manifest.json") > Some(entries.len() - 3));
        Ok(())
    }

    #[test]
    fn suffixes() {
        assert_eq!(
            Compression::from_path(Path::new("a.tar.gz")),
            Some(Compression::TarGz)
        );
        assert_eq!(
            Compression::from_path(Path::new("a.tzst")),
            Some(Compression::Tzst)
        );
        assert_eq!(
            Compression::from_path(Path::new("a.tar")),
            Some(Compression::Tar)
        );
        assert_eq!(Compression::from_path(Path::new("a.TAR")), None);
        assert_eq!(Compression::from_path(Path::new("a.txt")), None);
        assert_eq!(Compression::from_path(Path::new(".cache.json")), None);
    }
}
