//! A K3s emulator: the calls K3s makes to containerd at every start, and nothing else.
//!
//! Follows K3s's `pkg/agent/containerd` (`PreloadImages`, `clearLeases`, `clearLabels`,
//! `importAndWatchImages`, `preloadFile`, `labelImages`, `retagImages`, `labelContent`) and
//! containerd's Go client `Import(..., WithAllPlatforms(true), WithSkipMissing())` as K3s calls
//! it; see FACTS.md section 2. Differences, on purpose:
//! - `.txt` pull lists are not emulated (there is no registry here); they are reported as
//!   ignored.
//! - docker-save imports build the docker schema2 manifest the way containerd's importer does
//!   (same bytes, so the same digest for uncompressed layers), but not the extra index blob
//!   and the unreferenced `VERSION`/`json`/`repositories` blobs containerd also stores.
//! - The runtime watcher (imports ~2 s after a file appears) is not emulated; call
//!   [`K3s::import_file`] instead.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1::Image;
use containerd_client::types::Descriptor;
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::archive::{sha256_digest, Compression, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME};
use crate::client::Client;
use crate::reference::{normalize_repo_tag, parse_normalized};
use crate::{CRI_PIN_LABEL, PINNED};

/// K3s's file cache (opt-in: only used when the operator created it).
pub const CACHE_FILE: &str = ".cache.json";
/// The archive suffixes K3s's watcher accepts (`tarfile.SupportedExtensions`), case-sensitive.
pub const ARCHIVE_SUFFIXES: [&str; 8] = [
    ".tar", ".tar.lz4", ".tar.bz2", ".tbz", ".tar.gz", ".tgz", ".tar.zst", ".tzst",
];
const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const MEDIA_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const MEDIA_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const MEDIA_DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
const LABEL_DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source";
/// containerd's client leases imports for 24 h (`WithLease` default expiration).
const IMPORT_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Manifests and indexes larger than this are not parsed for GC labels.
const MAX_JSON_BLOB: usize = 4 << 20;

/// How the emulated K3s is configured.
#[derive(Clone, Debug)]
pub struct K3sConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// Namespace (`k8s.io`).
    pub namespace: String,
    /// The images dir (`<data-dir>/agent/images`).
    pub images_dir: PathBuf,
    /// `k3s` or `rke2`: the pin label is `io.cattle.<program>.pinned`, the lease `<program>`.
    pub program: String,
    /// Emulate an operator-created `.cache.json`, with bug k3s-io/k3s#14265: files unchanged
    /// since the last import are skipped and their images are not re-pinned.
    pub cache_json: bool,
    /// `--airgap-extra-registry` values: retag every image into these registries too.
    pub extra_registries: Vec<String>,
    /// How often to poll for containerd while waiting for it (K3s: about once a second).
    pub poll_interval: Duration,
    /// Give up waiting for containerd after this long.
    pub wait_timeout: Duration,
}

impl K3sConfig {
    /// K3s defaults for a socket and images dir.
    pub fn new(socket: impl Into<PathBuf>, images_dir: impl Into<PathBuf>) -> K3sConfig {
        K3sConfig {
            socket: socket.into(),
            namespace: crate::K8S_NAMESPACE.to_string(),
            images_dir: images_dir.into(),
            program: "k3s".to_string(),
            cache_json: false,
            extra_registries: Vec::new(),
            poll_interval: Duration::from_secs(1),
            wait_timeout: Duration::from_secs(60),
        }
    }

    /// `io.cattle.<program>.pinned`.
    pub fn pin_label(&self) -> String {
        format!("io.cattle.{}.pinned", self.program)
    }
}

/// What one start did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StartReport {
    /// Names whose pins the sweep removed, in order.
    pub swept: Vec<String>,
    /// Files imported, in order.
    pub imported: Vec<ImportReport>,
    /// Files skipped because `.cache.json` said they were unchanged.
    pub skipped_by_cache: Vec<PathBuf>,
    /// Files ignored (`.txt` lists, which the emulator does not pull).
    pub ignored: Vec<PathBuf>,
    /// Files whose import failed, with the error (K3s logs these and carries on).
    pub failed: Vec<(PathBuf, String)>,
    /// Wall time of the whole start, from the first poll to the last import.
    pub elapsed: Duration,
}

impl StartReport {
    /// Every name imported or aliased by this start.
    pub fn pinned_names(&self) -> Vec<String> {
        self.imported
            .iter()
            .flat_map(|f| f.images.iter().chain(f.aliases.iter()).cloned())
            .collect()
    }
}

/// What importing one file did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    /// The file.
    pub file: PathBuf,
    /// Image names the import created or updated, in order (all pinned afterwards).
    pub images: Vec<String>,
    /// Target digest per image name.
    pub digests: BTreeMap<String, String>,
    /// Names `labelImages` had to update (they lacked a pin).
    pub labelled: Vec<String>,
    /// Aliases created by `retagImages` (`<repo>@<digest>`, extra registries), with both pins.
    pub aliases: Vec<String>,
}

/// The emulator.
#[derive(Clone, Debug)]
pub struct K3s {
    config: K3sConfig,
}

impl K3s {
    /// An emulator with this configuration.
    pub fn new(config: K3sConfig) -> K3s {
        K3s { config }
    }

    /// The configuration.
    pub fn config(&self) -> &K3sConfig {
        &self.config
    }

    /// What K3s does at every start once containerd runs: wait for it, delete the old `k3s`
    /// lease, sweep, then import the images dir. An error of the sweep aborts (as in K3s);
    /// a file that fails to import is recorded in the report and the start carries on.
    pub async fn start(&self) -> Result<StartReport> {
        let started = Instant::now();
        let client = self.wait_for_containerd().await?;
        self.clear_leases(&client).await?;
        let swept = self.sweep_with(&client).await?;
        let mut report = self.import_dir_with(&client).await?;
        report.swept = swept;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Polls containerd until it answers (K3s polls CRI about once a second).
    pub async fn wait_for_containerd(&self) -> Result<Client> {
        let deadline = Instant::now() + self.config.wait_timeout;
        loop {
            let attempt = async {
                let client = Client::connect(&self.config.socket, &self.config.namespace).await?;
                client.version().await.map_err(|s| anyhow!("{s}"))?;
                Ok::<Client, anyhow::Error>(client)
            }
            .await;
            match attempt {
                Ok(client) => return Ok(client),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "containerd at {} did not answer within {:?}",
                        self.config.socket.display(),
                        self.config.wait_timeout
                    )))
                }
                Err(_) => tokio::time::sleep(self.config.poll_interval).await,
            }
        }
    }

    /// `clearLeases`: list leases and delete the one named after the program.
    pub async fn clear_leases(&self, client: &Client) -> Result<()> {
        let leases = client
            .list_leases()
            .await
            .map_err(|s| anyhow!("failed to clear leases: {s}"))?;
        for lease in leases.iter().filter(|l| **l == self.config.program) {
            // K3s ignores the result of this delete.
            let _ = client.delete_lease(lease).await;
        }
        Ok(())
    }

    /// The sweep (`clearLabels`) on a fresh connection.
    pub async fn sweep(&self) -> Result<Vec<String>> {
        let client = Client::connect(&self.config.socket, &self.config.namespace).await?;
        self.sweep_with(&client).await
    }

    /// `clearLabels`: ONE `Images.List` with filter `labels."io.cattle.k3s.pinned"==pinned`,
    /// then per listed image, sequentially: drop both pin keys from the listed copy and
    /// `Images.Update(image, ["labels"])` (the whole map). Returns the names updated.
    pub async fn sweep_with(&self, client: &Client) -> Result<Vec<String>> {
        let pin_label = self.config.pin_label();
        let filter = format!("labels.{pin_label:?}=={PINNED}");
        let images = client
            .list(&[filter])
            .await
            .map_err(|s| anyhow!("failed to clear pinned labels: listing: {s}"))?;
        let mut swept = Vec::with_capacity(images.len());
        let mut errors = Vec::new();
        for mut image in images {
            image.labels.remove(&pin_label);
            image.labels.remove(CRI_PIN_LABEL);
            let name = image.name.clone();
            match client.update(image, &["labels"]).await {
                Ok(_) => swept.push(name),
                Err(s) => errors.push(format!("failed to delete labels from image {name}: {s}")),
            }
        }
        if !errors.is_empty() {
            bail!("failed to clear pinned labels: {}", errors.join("; "));
        }
        Ok(swept)
    }

    /// Imports every file of the images dir the way K3s's start-up import does (including the
    /// `.cache.json` skip if enabled). A missing images dir imports nothing.
    pub async fn import_dir(&self) -> Result<StartReport> {
        let client = Client::connect(&self.config.socket, &self.config.namespace).await?;
        self.import_dir_with(&client).await
    }

    async fn import_dir_with(&self, client: &Client) -> Result<StartReport> {
        let mut report = StartReport::default();
        let dir = &self.config.images_dir;
        if !dir.is_dir() {
            return Ok(report);
        }
        let mut cache = FileCache::load(dir, self.config.cache_json)?;
        // K3s's workqueue: the dir is listed (sorted), its entries enqueued; a subdir's
        // entries go to the back of the queue when the subdir is processed.
        let mut queue = VecDeque::from([dir.clone()]);
        while let Some(path) = queue.pop_front() {
            let meta = match fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) => {
                    report.failed.push((path, format!("stat: {e}")));
                    continue;
                }
            };
            if meta.is_dir() {
                let mut entries: Vec<PathBuf> = fs::read_dir(&path)
                    .with_context(|| format!("unable to list contents of {}", path.display()))?
                    .map(|e| e.map(|e| e.path()))
                    .collect::<std::io::Result<_>>()
                    .with_context(|| format!("listing {}", path.display()))?;
                entries.sort();
                queue.extend(entries);
                continue;
            }
            let name = path.to_string_lossy();
            if name.ends_with(".txt") {
                report.ignored.push(path.clone());
                continue;
            }
            if !ARCHIVE_SUFFIXES.iter().any(|s| name.ends_with(s)) {
                continue;
            }
            if !cache.needs_import(&path, &meta) {
                report.skipped_by_cache.push(path.clone());
                continue;
            }
            match self.import_file_with(client, &path).await {
                Ok(file_report) => {
                    cache.record(&path, &meta);
                    report.imported.push(file_report);
                }
                Err(e) => report.failed.push((path.clone(), format!("{e:#}"))),
            }
        }
        cache.prune_and_save()?;
        Ok(report)
    }

    /// Imports one archive like K3s's `preloadFile`: `Import`, `labelImages`, `retagImages`,
    /// `labelContent`.
    pub async fn import_file(&self, path: &Path) -> Result<ImportReport> {
        let client = Client::connect(&self.config.socket, &self.config.namespace).await?;
        self.import_file_with(&client, path).await
    }

    async fn import_file_with(&self, client: &Client, path: &Path) -> Result<ImportReport> {
        let compression = Compression::from_path(path)
            .with_context(|| format!("{}: unhandled file type", path.display()))?;
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let reader = compression.decompressor(BufReader::new(file))?;
        let archive = read_archive(reader)
            .with_context(|| format!("failed to import images from {}", path.display()))?;
        let mut images = import(client, &archive)
            .await
            .with_context(|| format!("failed to import images from {}", path.display()))?;
        let mut report = ImportReport {
            file: path.to_path_buf(),
            images: images.iter().map(|i| i.name.clone()).collect(),
            digests: images
                .iter()
                .map(|i| {
                    let digest = i.target.as_ref().map(|t| t.digest.clone());
                    (i.name.clone(), digest.unwrap_or_default())
                })
                .collect(),
            ..Default::default()
        };
        report.labelled = self
            .label_images(client, &mut images)
            .await
            .context("failed to add pinned label to images")?;
        report.aliases = self
            .retag_images(client, &images)
            .await
            .context("failed to retag images")?;
        self.label_content(client, &images)
            .await
            .context("failed to add source labels to layer content")?;
        Ok(report)
    }

    /// `labelImages`: unless both pins are present, set both on the copy and replace the whole
    /// label map. Returns the names updated.
    async fn label_images(&self, client: &Client, images: &mut [Image]) -> Result<Vec<String>> {
        let pin_label = self.config.pin_label();
        let mut labelled = Vec::new();
        let mut errors = Vec::new();
        for image in images.iter_mut() {
            let has = |k: &str| image.labels.get(k).map(String::as_str) == Some(PINNED);
            if has(&pin_label) && has(CRI_PIN_LABEL) {
                continue;
            }
            let mut copy = image.clone();
            copy.labels.insert(pin_label.clone(), PINNED.to_string());
            copy.labels
                .insert(CRI_PIN_LABEL.to_string(), PINNED.to_string());
            match client.update(copy, &["labels"]).await {
                Ok(updated) => {
                    labelled.push(updated.name.clone());
                    *image = updated;
                }
                Err(s) => errors.push(format!("failed to add labels to image {}: {s}", image.name)),
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(labelled)
    }

    /// `retagImages`: `<repo>@<digest>` and, per extra registry, `<registry>/<path>:<tag>` and
    /// `<registry>/<path>@<digest>`, each by `forceCreateTag` (create; if it exists, delete and
    /// create again) from the labelled copy, so aliases carry both pins.
    async fn retag_images(&self, client: &Client, images: &[Image]) -> Result<Vec<String>> {
        let mut created = Vec::new();
        let mut errors = Vec::new();
        for image in images {
            let names = match alias_names(image, &self.config.extra_registries) {
                Ok(names) => names,
                Err(e) => {
                    errors.push(format!("failed to parse tag for image {}: {e}", image.name));
                    continue;
                }
            };
            for name in names {
                match force_create_tag(client, image, &name).await {
                    Ok(()) => created.push(name),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(created)
    }

    /// `labelContent`: `containerd.io/distribution.source.<registry>=<path>` on the target,
    /// config and layer blobs of each image (content labels only; no image events).
    async fn label_content(&self, client: &Client, images: &[Image]) -> Result<()> {
        let mut errors = Vec::new();
        for image in images {
            let reference = match parse_normalized(&image.name) {
                Ok(r) if r.tag.is_some() => r,
                _ => {
                    errors.push(format!("failed to parse tags for image {}", image.name));
                    continue;
                }
            };
            let Some(target) = &image.target else {
                continue;
            };
            let mut registries = self.config.extra_registries.clone();
            registries.push(reference.domain.clone());
            let digests = match content_digests(client, target).await {
                Ok(d) => d,
                Err(e) => {
                    errors.push(format!(
                        "failed to get content digests for {}: {e}",
                        image.name
                    ));
                    continue;
                }
            };
            let labels: BTreeMap<String, String> = registries
                .iter()
                .map(|r| {
                    (
                        format!("{LABEL_DISTRIBUTION_SOURCE}.{r}"),
                        reference.path.clone(),
                    )
                })
                .collect();
            for digest in digests {
                match client.update_content_labels(&digest, &labels).await {
                    Ok(()) => {}
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => errors.push(format!("labelling content {digest}: {s}")),
                }
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(())
    }
}

/// The alias names K3s's `retagImages` creates for an image (its own name excluded).
pub fn alias_names(image: &Image, extra_registries: &[String]) -> Result<Vec<String>> {
    let reference = parse_normalized(&image.name)?;
    let tag = reference
        .tag
        .clone()
        .with_context(|| format!("{} is not a tagged reference", image.name))?;
    let digest = image
        .target
        .as_ref()
        .map(|t| t.digest.clone())
        .unwrap_or_default();
    let mut names = vec![format!("{}@{digest}", reference.name())];
    for registry in extra_registries {
        names.push(format!("{registry}/{}:{tag}", reference.path));
        names.push(format!("{registry}/{}@{digest}", reference.path));
    }
    names.retain(|n| *n != image.name);
    Ok(names)
}

async fn force_create_tag(client: &Client, image: &Image, name: &str) -> Result<()> {
    let mut copy = image.clone();
    copy.name = name.to_string();
    match client.create(copy.clone()).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            client
                .delete(name)
                .await
                .map_err(|s| anyhow!("failed to delete existing image {name}: {s}"))?;
            client
                .create(copy)
                .await
                .map_err(|s| anyhow!("failed to tag after deleting existing image {name}: {s}"))?;
            Ok(())
        }
        Err(s) => Err(anyhow!("failed to tag image {name}: {s}")),
    }
}

/// Target, config and layer digests (K3s's `getDigests`, recursing into indexes).
async fn content_digests(client: &Client, target: &Descriptor) -> Result<Vec<String>> {
    let mut digests = Vec::new();
    let mut pending = vec![target.clone()];
    while let Some(desc) = pending.pop() {
        let data = match client.read_blob(&desc.digest).await {
            Ok(data) => data,
            Err(s) if s.code() == Code::NotFound => continue,
            Err(s) => return Err(anyhow!("reading {}: {s}", desc.digest)),
        };
        digests.push(desc.digest.clone());
        let value: serde_json::Value = serde_json::from_slice(&data).unwrap_or_default();
        if is_manifest_type(&desc.media_type) {
            if let Some(d) = value["config"]["digest"].as_str() {
                digests.push(d.to_string());
            }
            for layer in value["layers"].as_array().into_iter().flatten() {
                if let Some(d) = layer["digest"].as_str() {
                    digests.push(d.to_string());
                }
            }
        } else if is_index_type(&desc.media_type) {
            for m in value["manifests"].as_array().into_iter().flatten() {
                pending.push(json_descriptor(m)?);
            }
        }
    }
    Ok(digests)
}

fn is_manifest_type(media_type: &str) -> bool {
    media_type == crate::archive::MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
}

fn is_index_type(media_type: &str) -> bool {
    media_type == crate::archive::MEDIA_OCI_INDEX
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// An archive read into memory: regular files by normalised path (symlinks resolved).
struct ArchiveFiles {
    files: BTreeMap<String, Vec<u8>>,
}

fn read_archive(reader: impl Read) -> Result<ArchiveFiles> {
    let mut archive = tar::Archive::new(reader);
    let mut files = BTreeMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    for entry in archive.entries().context("reading the tar stream")? {
        let mut entry = entry.context("reading a tar entry")?;
        let path = clean_path(&entry.path().context("tar entry path")?.to_string_lossy());
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::with_capacity(entry.size() as usize);
                entry
                    .read_to_end(&mut data)
                    .with_context(|| format!("reading {path} from the archive"))?;
                files.insert(path, data);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Some(target) = entry.link_name().context("tar link name")? {
                    let target = target.to_string_lossy().to_string();
                    let resolved = if entry.header().entry_type() == tar::EntryType::Symlink {
                        let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
                        clean_path(&format!("{parent}/{target}"))
                    } else {
                        clean_path(&target)
                    };
                    links.push((path, resolved));
                }
            }
            _ => {}
        }
    }
    for (path, target) in links {
        if let Some(data) = files.get(&target).cloned() {
            files.insert(path, data);
        }
    }
    Ok(ArchiveFiles { files })
}

/// Normalises `./a/../b` style tar paths.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// containerd's `Import`: write the blobs under a temporary lease, build the image records and
/// `Update(target)`/`Create` each. Returns the records as containerd returned them.
async fn import(client: &Client, archive: &ArchiveFiles) -> Result<Vec<Image>> {
    let lease = format!("pk-import-{}", unique_suffix());
    let expire = rfc3339(SystemTime::now() + IMPORT_LEASE_TTL);
    client
        .create_lease(
            &lease,
            &BTreeMap::from([(LABEL_GC_EXPIRE.to_string(), expire)]),
        )
        .await
        .map_err(|s| anyhow!("creating the import lease: {s}"))?;
    let leased = client.with_lease(Some(lease.clone()));
    let result = import_leased(&leased, archive).await;
    // The Go client deletes its lease when Import returns (`done(ctx)`).
    let _ = client.delete_lease(&lease).await;
    result
}

async fn import_leased(client: &Client, archive: &ArchiveFiles) -> Result<Vec<Image>> {
    let files = &archive.files;
    let mut wanted: Vec<Image> = Vec::new();
    if let Some(manifest_json) = files.get("manifest.json") {
        // docker-save: containerd prefers manifest.json when present.
        let entries: Vec<DockerManifestEntry> =
            serde_json::from_slice(manifest_json).context("parsing manifest.json")?;
        for entry in entries {
            let config = files
                .get(&clean_path(&entry.config))
                .with_context(|| format!("config {} missing from the archive", entry.config))?;
            let config_desc =
                write_plain(client, &entry.config, MEDIA_DOCKER_CONFIG, config).await?;
            let mut layers = Vec::new();
            for layer_path in &entry.layers {
                let data = files
                    .get(&clean_path(layer_path))
                    .with_context(|| format!("layer {layer_path} missing from the archive"))?;
                layers.push(write_plain(client, layer_path, layer_media_type(data), data).await?);
            }
            // Go's field order, so the digest equals the one containerd's importer computes.
            let layers_json: Vec<String> = layers.iter().map(go_json_descriptor).collect();
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{MEDIA_DOCKER_MANIFEST}","config":{},"layers":[{}]}}"#,
                go_json_descriptor(&config_desc),
                layers_json.join(",")
            )
            .into_bytes();
            let manifest_desc =
                write_blob_with_gc_labels(client, "manifest", MEDIA_DOCKER_MANIFEST, &manifest)
                    .await?;
            for tag in entry.repo_tags.unwrap_or_default() {
                let name = normalize_repo_tag(&tag)
                    .with_context(|| format!("normalizing RepoTag {tag:?}"))?;
                let mut target = manifest_desc.clone();
                target
                    .annotations
                    .insert(ANNOTATION_CONTAINERD_NAME.to_string(), name.clone());
                wanted.push(Image {
                    name,
                    target: Some(target),
                    ..Default::default()
                });
            }
        }
    } else if let Some(index_json) = files.get("index.json") {
        // OCI layout: every blob goes into the content store.
        for (path, data) in files.range("blobs/".to_string()..) {
            let Some(rest) = path.strip_prefix("blobs/") else {
                break;
            };
            let Some((algorithm, hex)) = rest.split_once('/') else {
                continue;
            };
            let expected = format!("{algorithm}:{hex}");
            let actual = sha256_digest(data);
            if algorithm == "sha256" && actual != expected {
                bail!("{path}: content digest {actual} does not match its name");
            }
            write_blob_with_gc_labels(client, path, "", data).await?;
        }
        let index: serde_json::Value =
            serde_json::from_slice(index_json).context("parsing index.json")?;
        for m in index["manifests"].as_array().into_iter().flatten() {
            let desc = json_descriptor(m)?;
            // No name translator: K3s passes none, so ref.name is taken verbatim.
            let name = [ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME]
                .iter()
                .filter_map(|k| desc.annotations.get(*k))
                .find(|v| !v.is_empty())
                .cloned();
            let Some(name) = name else { continue };
            wanted.push(Image {
                name,
                target: Some(desc),
                ..Default::default()
            });
        }
    } else {
        bail!("unrecognized image format: neither manifest.json nor index.json in the archive");
    }

    let mut images = Vec::with_capacity(wanted.len());
    for image in wanted {
        let updated = match client.update(image.clone(), &["target"]).await {
            Ok(updated) => updated,
            Err(s) if s.code() == Code::NotFound => client
                .create(image.clone())
                .await
                .map_err(|s| anyhow!("creating image {}: {s}", image.name))?,
            Err(s) => return Err(anyhow!("updating image {}: {s}", image.name)),
        };
        images.push(updated);
    }
    Ok(images)
}

fn layer_media_type(data: &[u8]) -> &'static str {
    if data.starts_with(&[0x1f, 0x8b]) {
        MEDIA_DOCKER_LAYER_GZIP
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        MEDIA_DOCKER_LAYER_ZSTD
    } else {
        MEDIA_DOCKER_LAYER
    }
}

async fn write_plain(
    client: &Client,
    path: &str,
    media_type: &str,
    data: &[u8],
) -> Result<Descriptor> {
    let digest = sha256_digest(data);
    client
        .write_blob(&format!("tar-{path}"), &digest, data, &BTreeMap::new())
        .await?;
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest,
        size: data.len() as i64,
        annotations: HashMap::new(),
    })
}

/// Writes a blob; manifests and indexes get containerd's GC reference labels (what the
/// importer's `SetChildrenMappedLabels` sets), so their children survive garbage collection.
async fn write_blob_with_gc_labels(
    client: &Client,
    path: &str,
    media_type: &str,
    data: &[u8],
) -> Result<Descriptor> {
    let digest = sha256_digest(data);
    let mut labels = BTreeMap::new();
    if data.len() <= MAX_JSON_BLOB && data.first() == Some(&b'{') {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
            if let Some(config) = value["config"]["digest"].as_str() {
                labels.insert(
                    "containerd.io/gc.ref.content.config".to_string(),
                    config.to_string(),
                );
            }
            for (i, layer) in value["layers"].as_array().into_iter().flatten().enumerate() {
                if let Some(d) = layer["digest"].as_str() {
                    labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), d.to_string());
                }
            }
            for (i, m) in value["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(d) = m["digest"].as_str() {
                    labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), d.to_string());
                }
            }
        }
    }
    client
        .write_blob(&format!("tar-{path}"), &digest, data, &labels)
        .await?;
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest,
        size: data.len() as i64,
        annotations: HashMap::new(),
    })
}

/// A descriptor as Go's `encoding/json` writes an `ocispec.Descriptor` (field order kept).
fn go_json_descriptor(desc: &Descriptor) -> String {
    format!(
        r#"{{"mediaType":{},"digest":{},"size":{}}}"#,
        serde_json::Value::from(desc.media_type.as_str()),
        serde_json::Value::from(desc.digest.as_str()),
        desc.size
    )
}

fn json_descriptor(value: &serde_json::Value) -> Result<Descriptor> {
    let digest = value["digest"]
        .as_str()
        .with_context(|| format!("descriptor without a digest: {value}"))?;
    Ok(Descriptor {
        media_type: value["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: digest.to_string(),
        size: value["size"].as_i64().unwrap_or_default(),
        annotations: value["annotations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect(),
    })
}

/// K3s's `.cache.json`: path -> size and modification time (RFC 3339, seconds).
#[derive(Default, Serialize, Deserialize, Clone, Debug)]
struct CachedFile {
    size: u64,
    #[serde(rename = "modTime")]
    mod_time: String,
    #[serde(skip)]
    seen: bool,
}

struct FileCache {
    /// Where the cache lives; `None` when disabled.
    path: Option<PathBuf>,
    entries: BTreeMap<String, CachedFile>,
}

impl FileCache {
    /// Loads the cache; with `enabled`, creates an empty `.cache.json` first (the operator's
    /// opt-in). An empty file is a valid empty cache, as in K3s.
    fn load(dir: &Path, enabled: bool) -> Result<FileCache> {
        if !enabled {
            return Ok(FileCache {
                path: None,
                entries: BTreeMap::new(),
            });
        }
        let path = dir.join(CACHE_FILE);
        if !path.exists() {
            fs::write(&path, b"").with_context(|| format!("creating {}", path.display()))?;
        }
        let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let entries = if data.is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?
        };
        Ok(FileCache {
            path: Some(path),
            entries,
        })
    }

    /// K3s re-imports when there is no entry, or when size differs AND the file is newer.
    fn needs_import(&mut self, path: &Path, meta: &fs::Metadata) -> bool {
        if self.path.is_none() {
            return true;
        }
        let key = path.to_string_lossy().to_string();
        let Some(entry) = self.entries.get_mut(&key) else {
            return true;
        };
        let modified = meta.modified().map(rfc3339).unwrap_or_default();
        if entry.size != meta.len() && modified > entry.mod_time {
            return true;
        }
        entry.seen = true;
        false
    }

    fn record(&mut self, path: &Path, meta: &fs::Metadata) {
        if self.path.is_none() {
            return;
        }
        self.entries.insert(
            path.to_string_lossy().to_string(),
            CachedFile {
                size: meta.len(),
                mod_time: meta.modified().map(rfc3339).unwrap_or_default(),
                seen: true,
            },
        );
    }

    fn prune_and_save(mut self) -> Result<()> {
        let Some(path) = self.path.take() else {
            return Ok(());
        };
        self.entries.retain(|_, e| e.seen);
        let data = serde_json::to_vec(&self.entries)?;
        fs::write(&path, data).with_context(|| format!("writing {}", path.display()))
    }
}

/// RFC 3339 UTC with second precision (Go's `metav1.Time` JSON, and lease expiry labels).
fn rfc3339(time: SystemTime) -> String {
    let time =
        jiff::Timestamp::try_from(time.max(UNIX_EPOCH)).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!("{time:.0}")
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
    }

    #[test]
    fn aliases_like_k3s() -> Result<()> {
        let image = Image {
            name: "docker.io/library/nginx:1.29.4".into(),
            target: Some(Descriptor {
                digest: "sha256:abc".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            alias_names(&image, &["registry.example.com".into()])?,
            vec![
                "docker.io/library/nginx@sha256:abc",
                "registry.example.com/library/nginx:1.29.4",
                "registry.example.com/library/nginx@sha256:abc",
            ]
        );
        let untagged = Image {
            name: "docker.io/library/nginx@sha256:abc".into(),
            ..image
        };
        assert!(alias_names(&untagged, &[]).is_err());
        Ok(())
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path("./a/b/../c"), "a/c");
        assert_eq!(clean_path("/blobs/sha256/x"), "blobs/sha256/x");
    }
}
