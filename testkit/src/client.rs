//! A thin containerd gRPC client for tests and the K3s emulator.
//!
//! Owns one tonic `Channel` to a containerd socket and a namespace (sent as the
//! `containerd-namespace` gRPC header), and optionally a lease (`containerd-lease` header) that
//! protects content written during an import from garbage collection, as containerd's Go
//! client does inside `Import`. Raw operations return `tonic::Status` so callers can branch on
//! `NotFound`/`AlreadyExists` exactly as K3s does; helpers return `anyhow` errors with context.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, ListImagesRequest,
    UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{Info, UpdateRequest};
use containerd_client::types::Descriptor;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::CRI_PIN_LABEL;

/// containerd sends messages up to 16 MiB; tonic's default decode limit is 4 MiB (FACTS.md 3).
const MAX_MESSAGE: usize = 16 << 20;
/// Size of one `Content.Write` data message.
const WRITE_CHUNK: usize = 1 << 20;

/// An image record reduced to what tests look at.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    /// Image name (the record's key).
    pub name: String,
    /// Target digest (`sha256:...`), empty if the record has no target.
    pub digest: String,
    /// All labels.
    pub labels: BTreeMap<String, String>,
}

impl ImageInfo {
    /// Reduces a containerd image record.
    pub fn from_image(image: &Image) -> Self {
        ImageInfo {
            name: image.name.clone(),
            digest: image
                .target
                .as_ref()
                .map(|t| t.digest.clone())
                .unwrap_or_default(),
            labels: image
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Whether `key=pinned` is present.
    pub fn has(&self, key: &str) -> bool {
        self.labels.get(key).map(String::as_str) == Some(crate::PINNED)
    }
}

/// A containerd client bound to one namespace.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    lease: Option<String>,
}

impl Client {
    /// Connects to the containerd gRPC socket. Fails if the socket does not exist yet.
    pub async fn connect(socket: impl AsRef<Path>, namespace: &str) -> Result<Self> {
        let socket = socket.as_ref().to_path_buf();
        let channel = containerd_client::connect(&socket)
            .await
            .with_context(|| format!("connecting to containerd at {}", socket.display()))?;
        Ok(Client {
            channel,
            socket,
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    /// The same connection in another namespace.
    pub fn with_namespace(&self, namespace: &str) -> Self {
        Client {
            namespace: namespace.to_string(),
            ..self.clone()
        }
    }

    /// The same connection, with every request carrying `lease` (`containerd-lease` header).
    pub fn with_lease(&self, lease: Option<String>) -> Self {
        Client {
            lease,
            ..self.clone()
        }
    }

    /// The underlying channel (reconnects by itself after a containerd restart).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The namespace requests are sent in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn request<T>(&self, message: T) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        let ns = MetadataValue::try_from(self.namespace.as_str())
            .map_err(|_| Status::invalid_argument("namespace is not a valid header value"))?;
        request.metadata_mut().insert("containerd-namespace", ns);
        if let Some(lease) = &self.lease {
            let lease = MetadataValue::try_from(lease.as_str())
                .map_err(|_| Status::invalid_argument("lease is not a valid header value"))?;
            request.metadata_mut().insert("containerd-lease", lease);
        }
        Ok(request)
    }

    fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    /// containerd's `Version` RPC: the daemon's version string.
    pub async fn version(&self) -> Result<String, Status> {
        let response = VersionClient::new(self.channel.clone())
            .version(Request::new(()))
            .await?;
        Ok(response.into_inner().version)
    }

    // ---- raw image operations (K3s's calls) ----

    /// `Images.List` with containerd filters (entries are OR'ed).
    pub async fn list(&self, filters: &[String]) -> Result<Vec<Image>, Status> {
        let request = self.request(ListImagesRequest {
            filters: filters.to_vec(),
        })?;
        Ok(self.images().list(request).await?.into_inner().images)
    }

    /// Every record: one `Images.List`, or, when containerd refuses an answer that large
    /// (16 MiB, about 50,000 records), one per last character of the name (`name~="7$"`, and
    /// `name~="[^0-9]$"` for the rest), which together hold every name once.
    pub async fn list_all(&self) -> Result<Vec<Image>, Status> {
        match self.list(&[]).await {
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                let mut parts: Vec<String> = (0..10).map(|d| format!("name~=\"{d}$\"")).collect();
                parts.push("name~=\"[^0-9]$\"".to_string());
                let mut images = Vec::new();
                for part in parts {
                    images.extend(self.list(&[part]).await?);
                }
                images.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(images)
            }
            other => other,
        }
    }

    /// `Images.Get`.
    pub async fn get(&self, name: &str) -> Result<Image, Status> {
        let request = self.request(GetImageRequest {
            name: name.to_string(),
        })?;
        self.images()
            .get(request)
            .await?
            .into_inner()
            .image
            .ok_or_else(|| Status::internal(format!("Images.Get {name}: empty response")))
    }

    /// `Images.Create`.
    pub async fn create(&self, image: Image) -> Result<Image, Status> {
        let name = image.name.clone();
        let request = self.request(CreateImageRequest {
            image: Some(image),
            source_date_epoch: None,
        })?;
        self.images()
            .create(request)
            .await?
            .into_inner()
            .image
            .ok_or_else(|| Status::internal(format!("Images.Create {name}: empty response")))
    }

    /// `Images.Update` with `update_mask.paths` (empty = whole record, `labels` = whole label
    /// map, `labels.<key>` = one key, deleted if its value is empty).
    pub async fn update(&self, image: Image, paths: &[&str]) -> Result<Image, Status> {
        let name = image.name.clone();
        let update_mask = if paths.is_empty() {
            None
        } else {
            Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            })
        };
        let request = self.request(UpdateImageRequest {
            image: Some(image),
            update_mask,
            source_date_epoch: None,
        })?;
        self.images()
            .update(request)
            .await?
            .into_inner()
            .image
            .ok_or_else(|| Status::internal(format!("Images.Update {name}: empty response")))
    }

    /// `Images.Delete` (asynchronous garbage collection, as K3s and ctr do).
    pub async fn delete(&self, name: &str) -> Result<(), Status> {
        let request = self.request(DeleteImageRequest {
            name: name.to_string(),
            sync: false,
            target: None,
        })?;
        self.images().delete(request).await?;
        Ok(())
    }

    // ---- helpers for tests ----

    /// Every image in the namespace, reduced, keyed by name.
    pub async fn images_by_name(&self) -> Result<BTreeMap<String, ImageInfo>> {
        let images = self
            .list_all()
            .await
            .with_context(|| format!("listing images in namespace {}", self.namespace))?;
        Ok(images
            .iter()
            .map(|i| (i.name.clone(), ImageInfo::from_image(i)))
            .collect())
    }

    /// One image, reduced; `None` if it does not exist.
    pub async fn image(&self, name: &str) -> Result<Option<ImageInfo>> {
        match self.get(name).await {
            Ok(image) => Ok(Some(ImageInfo::from_image(&image))),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(anyhow!("Images.Get {name}: {status}")),
        }
    }

    /// Sets one label with a per-key update (`labels.<key>`), atomically on the server.
    pub async fn set_label(&self, name: &str, key: &str, value: &str) -> Result<ImageInfo> {
        let image = Image {
            name: name.to_string(),
            labels: HashMap::from([(key.to_string(), value.to_string())]),
            // containerd 1.7 and 2.x crash (nil pointer in `imageFromProto`) on an update
            // without a target; the `labels.` mask keeps the stored one, so any will do.
            target: Some(Default::default()),
            ..Default::default()
        };
        let path = format!("labels.{key}");
        let updated = self
            .update(image, &[path.as_str()])
            .await
            .map_err(|s| anyhow!("setting label {key}={value} on {name}: {s}"))?;
        Ok(ImageInfo::from_image(&updated))
    }

    /// Deletes one label with a per-key update whose value is empty.
    pub async fn delete_label(&self, name: &str, key: &str) -> Result<ImageInfo> {
        self.set_label(name, key, "")
            .await
            .with_context(|| format!("deleting label {key} from {name}"))
    }

    /// Replaces the whole label map (`update_mask.paths = ["labels"]`).
    pub async fn replace_labels(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<ImageInfo> {
        let image = Image {
            name: name.to_string(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            // See `set_label`: a missing target crashes containerd 1.7 and 2.x.
            target: Some(Default::default()),
            ..Default::default()
        };
        let updated = self
            .update(image, &["labels"])
            .await
            .map_err(|s| anyhow!("replacing the labels of {name}: {s}"))?;
        Ok(ImageInfo::from_image(&updated))
    }

    /// Creates an image record pointing at `target` with `labels`.
    pub async fn create_image(
        &self,
        name: &str,
        target: Descriptor,
        labels: &BTreeMap<String, String>,
    ) -> Result<ImageInfo> {
        let image = Image {
            name: name.to_string(),
            target: Some(target),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ..Default::default()
        };
        let created = self
            .create(image)
            .await
            .map_err(|s| anyhow!("creating image {name}: {s}"))?;
        Ok(ImageInfo::from_image(&created))
    }

    /// Deletes an image record.
    pub async fn delete_image(&self, name: &str) -> Result<()> {
        self.delete(name)
            .await
            .map_err(|s| anyhow!("deleting image {name}: {s}"))
    }

    /// What an operator's `ctr -n k8s.io images label NAME io.cri-containerd.pinned=` does:
    /// ctr sends a per-key update `labels.io.cri-containerd.pinned` with an empty value.
    pub async fn ctr_remove_cri_pin(&self, name: &str) -> Result<ImageInfo> {
        self.delete_label(name, CRI_PIN_LABEL).await
    }

    // ---- content and leases (the import) ----

    /// Writes one blob through `Content.Write` (ref, total, expected digest, commit with
    /// `labels`). A blob that already exists is success, as in containerd's `WriteBlob`.
    pub async fn write_blob(
        &self,
        reference: &str,
        digest: &str,
        data: &[u8],
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let total = i64::try_from(data.len()).context("blob too large")?;
        let mut messages = Vec::with_capacity(data.len() / WRITE_CHUNK + 2);
        let mut offset = 0usize;
        // The first message opens the writer (ref, total, expected); the last commits it.
        loop {
            let end = (offset + WRITE_CHUNK).min(data.len());
            let last = end == data.len();
            let action = if last {
                WriteAction::Commit
            } else {
                WriteAction::Write
            };
            messages.push(WriteContentRequest {
                action: action as i32,
                r#ref: reference.to_string(),
                total,
                expected: digest.to_string(),
                offset: offset as i64,
                data: data[offset..end].to_vec(),
                labels: if last {
                    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                } else {
                    HashMap::new()
                },
            });
            offset = end;
            if last {
                break;
            }
        }
        let request = self
            .request(tokio_stream::iter(messages))
            .map_err(|s| anyhow!("{s}"))?;
        let result = async {
            let mut responses = self.content().write(request).await?.into_inner();
            while responses.message().await?.is_some() {}
            Ok::<(), Status>(())
        }
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(anyhow!("writing blob {digest} ({reference}): {status}")),
        }
    }

    /// `Content.Update` of some labels of a blob (`labels.<key>` paths); NotFound is returned
    /// as the status so callers can ignore it like K3s's `labelContent`.
    pub async fn update_content_labels(
        &self,
        digest: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Status> {
        let request = self.request(UpdateRequest {
            info: Some(Info {
                digest: digest.to_string(),
                labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        })?;
        self.content().update(request).await?;
        Ok(())
    }

    /// Reads a whole blob (small blobs only: manifests, configs).
    pub async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, Status> {
        use containerd_client::services::v1::ReadContentRequest;
        let request = self.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        })?;
        let mut stream = self.content().read(request).await?.into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// `Leases.Create` with an id and labels.
    pub async fn create_lease(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Status> {
        use containerd_client::services::v1::CreateRequest;
        let request = self.request(CreateRequest {
            id: id.to_string(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })?;
        self.leases().create(request).await?;
        Ok(())
    }

    /// `Leases.List` ids.
    pub async fn list_leases(&self) -> Result<Vec<String>, Status> {
        use containerd_client::services::v1::ListRequest;
        let request = self.request(ListRequest { filters: vec![] })?;
        Ok(self
            .leases()
            .list(request)
            .await?
            .into_inner()
            .leases
            .into_iter()
            .map(|l| l.id)
            .collect())
    }

    /// `Leases.Delete`.
    pub async fn delete_lease(&self, id: &str) -> Result<(), Status> {
        use containerd_client::services::v1::DeleteRequest;
        let request = self.request(DeleteRequest {
            id: id.to_string(),
            sync: false,
        })?;
        self.leases().delete(request).await?;
        Ok(())
    }
}

/// Follows the `/images/update` events of `namespace` on `socket` until the stream ends,
/// calling `f(name, timestamp in ns as stamped by containerd, labels)` for each. For
/// benchmarks that time label changes with containerd's own clock.
pub async fn watch_image_updates(
    socket: &Path,
    namespace: &str,
    mut f: impl FnMut(&str, i128, &HashMap<String, String>) -> Result<()>,
) -> Result<()> {
    use containerd_client::services::v1::events_client::EventsClient;
    use containerd_client::services::v1::{ImageUpdate, SubscribeRequest};
    use prost::Message;

    let channel = containerd_client::connect(socket).await?;
    let mut client = EventsClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let request = SubscribeRequest {
        filters: vec![format!("topic==\"/images/update\",namespace=={namespace}")],
    };
    let mut stream = client.subscribe(request).await?.into_inner();
    while let Some(envelope) = stream.message().await? {
        let Some(any) = envelope.event else { continue };
        let Ok(update) = ImageUpdate::decode(any.value.as_slice()) else {
            continue;
        };
        let ts = envelope
            .timestamp
            .map_or(0, |t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128);
        f(&update.name, ts, &update.labels)?;
    }
    Ok(())
}
