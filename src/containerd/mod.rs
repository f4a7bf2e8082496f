//! The only module that speaks containerd: connect, subscribe with a barrier, list, get, and
//! the per-key label update. Generated gRPC types stay here; the rest of pinkeeper sees
//! [`ImageRecord`] and [`ImageEvent`].
//!
//! Behaviour of containerd this code relies on is in FACTS.md section 3.

pub mod cri;
mod listing;
pub mod parts;
pub mod queue;
pub(crate) mod reconnect;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    GetImageRequest, ImageCreate, ImageDelete, ImageUpdate, ListImagesRequest, PublishRequest,
    SubscribeRequest, UpdateImageRequest,
};
use containerd_client::types::Envelope;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use crate::engine::{ApplyError, EventKind, ImageEvent, ImageRecord, CRI_PIN, PINNED};

/// Every unary call gives up after this long: nothing may hang the daemon.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// containerd sends listings up to 16 MiB; tonic's default limit is 4 MiB (FACTS.md 3).
const MAX_MESSAGE: usize = 64 << 20;
/// The topic of pinkeeper's own barrier events.
pub const BARRIER_TOPIC: &str = "/pinkeeper/barrier";

/// A failure talking to containerd, naming the socket.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The socket cannot be connected to.
    #[error("cannot connect to containerd at {socket}: {reason}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// A call failed.
    #[error("containerd at {socket}: {call} failed: {status}")]
    Call {
        /// The socket.
        socket: PathBuf,
        /// Which call.
        call: &'static str,
        /// gRPC status.
        status: Status,
    },
}

impl ContainerdError {
    /// Whether containerd is (probably) just down or restarting.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ContainerdError::Connect { .. } => true,
            ContainerdError::Call { status, .. } => matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ),
        }
    }
}

/// A connection to containerd in one namespace.
#[derive(Clone, Debug)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    /// The label keys kept in the records read ([`Containerd::keeping_labels`]).
    kept_labels: Option<std::sync::Arc<[String]>>,
}

impl Containerd {
    /// The connection, for CRI's services on the same socket ([`cri`]).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Connects once (fails at once if the socket is missing or refuses).
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, ContainerdError> {
        let channel = tokio::time::timeout(CALL_TIMEOUT, containerd_client::connect(socket))
            .await
            .map_err(|_| ContainerdError::Connect {
                socket: socket.to_path_buf(),
                reason: "timed out".into(),
            })?
            .map_err(|e| ContainerdError::Connect {
                socket: socket.to_path_buf(),
                reason: format!("{e} ({})", source_chain(&e)),
            })?;
        Ok(Containerd {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            kept_labels: None,
        })
    }

    /// Records read by [`Containerd::list`] and [`Containerd::get`] keep only the labels
    /// `keys` names: the daemon's engine reads nothing but the pins, and a listing of 10,000
    /// records with a label map each held 5.4 MB more while it was read (events keep every
    /// label).
    pub fn keeping_labels(mut self, keys: impl IntoIterator<Item = String>) -> Self {
        self.kept_labels = Some(keys.into_iter().collect());
        self
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        if let Ok(ns) = self.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", ns);
        }
        request
    }

    fn call_error(&self, call: &'static str) -> impl FnOnce(Status) -> ContainerdError + '_ {
        move |status| ContainerdError::Call {
            socket: self.socket.clone(),
            call,
            status,
        }
    }

    fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// containerd's version string (`1.7.24`, `2.1.9`, ...).
    pub async fn version(&self) -> Result<String, ContainerdError> {
        let reply = VersionClient::new(self.channel.clone())
            .version(self.request(()))
            .await
            .map_err(self.call_error("Version"))?;
        Ok(reply.into_inner().version)
    }

    /// Every image record of the namespace.
    ///
    /// A namespace too large for one answer (containerd sends 16 MiB at most, about 50,000
    /// records) is listed in parts ([`parts`]), sorted by name as one answer would be.
    pub async fn list(&self) -> Result<Vec<ImageRecord>, ContainerdError> {
        match self.list_where(Vec::new()).await {
            Err(status) if too_large(&status) => self.list_in_parts().await,
            Err(status) => Err(self.call_error("Images.List")(status)),
            Ok(images) => Ok(images),
        }
    }

    async fn list_where(&self, filters: Vec<String>) -> Result<Vec<ImageRecord>, Status> {
        let request = self.request(ListImagesRequest { filters });
        let kept = self.kept_labels.clone();
        listing::list(self.channel.clone(), request, MAX_MESSAGE, kept).await
    }

    async fn list_in_parts(&self) -> Result<Vec<ImageRecord>, ContainerdError> {
        let mut todo = parts::Part::first();
        let mut images = Vec::new();
        let mut calls = 1;
        while let Some(part) = todo.pop() {
            calls += 1;
            match self.list_where(vec![part.filter()]).await {
                Ok(found) => images.extend(found),
                Err(status) if too_large(&status) => match part.split() {
                    Some(more) => todo.extend(more),
                    None => return Err(self.call_error("Images.List")(status)),
                },
                Err(status) => return Err(self.call_error("Images.List")(status)),
            }
        }
        images.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        tracing::debug!(
            records = images.len(),
            calls,
            "listed a namespace too large for one answer in parts"
        );
        Ok(images)
    }

    /// Every blob of the content store: its size and the blobs its
    /// `containerd.io/gc.ref.content.*` labels refer to ([`crate::disk`] counts the bytes pinned
    /// images hold from them).
    pub async fn content_blobs(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::disk::Blob>, ContainerdError> {
        use containerd_client::services::v1::content_client::ContentClient;
        use containerd_client::services::v1::ListContentRequest;
        let mut client =
            ContentClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        let request = self.request(ListContentRequest {
            filters: Vec::new(),
        });
        let mut stream = client
            .list(request)
            .await
            .map_err(self.call_error("Content.List"))?
            .into_inner();
        let mut blobs = std::collections::HashMap::new();
        while let Some(part) = stream
            .message()
            .await
            .map_err(self.call_error("Content.List"))?
        {
            for info in part.info {
                let refs = info
                    .labels
                    .into_iter()
                    .filter(|(key, _)| key.starts_with(crate::disk::GC_REF_CONTENT))
                    .map(|(_, digest)| digest)
                    .collect();
                let size = u64::try_from(info.size).unwrap_or(0);
                blobs.insert(info.digest, crate::disk::Blob { size, refs });
            }
        }
        Ok(blobs)
    }

    /// One image record, or `None` if it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<ImageRecord>, ContainerdError> {
        match self
            .images()
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(reply) => Ok(reply
                .into_inner()
                .image
                .map(|i| record(i, self.kept_labels.as_deref()))),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.call_error("Images.Get")(status)),
        }
    }

    /// Sets `io.cri-containerd.pinned=pinned` with a per-key update: containerd changes that one
    /// label atomically and keeps every other one (FACTS.md section 3).
    pub async fn pin(&self, name: &str) -> Result<(), ApplyError> {
        self.set_cri_pin(name, true).await
    }

    /// Removes `io.cri-containerd.pinned` with a per-key update (an operator's unpin): a masked
    /// key absent from the request is deleted, every other label is kept.
    pub async fn unpin(&self, name: &str) -> Result<(), ApplyError> {
        self.set_cri_pin(name, false).await
    }

    async fn set_cri_pin(&self, name: &str, pinned: bool) -> Result<(), ApplyError> {
        let labels = if pinned {
            [(CRI_PIN.to_string(), PINNED.to_string())].into()
        } else {
            Default::default()
        };
        let image = containerd_client::services::v1::Image {
            name: name.to_string(),
            labels,
            // containerd 1.7 and 2.x dereference the request's target before applying the
            // field mask (`imageFromProto`): a missing one crashes the whole daemon with a nil
            // pointer panic. With a `labels.` mask the stored target is kept and this one is
            // never used, so an empty descriptor is enough.
            target: Some(containerd_client::types::Descriptor::default()),
            ..Default::default()
        };
        let update = UpdateImageRequest {
            image: Some(image),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![format!("labels.{CRI_PIN}")],
            }),
            source_date_epoch: None,
        };
        match self.images().update(self.request(update)).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Err(ApplyError::NotFound),
            Err(status) => Err(ApplyError::Failed(
                self.call_error("Images.Update")(status).to_string(),
            )),
        }
    }

    /// Subscribes to this namespace's image events and returns the stream once it is live:
    /// `Subscribe` only resolves when a first event arrives, so a barrier event of pinkeeper's
    /// own is published until it comes back (FACTS.md section 3).
    pub async fn subscribe(&self) -> Result<Subscription, ContainerdError> {
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let barrier = format!("{BARRIER_TOPIC}/{nonce}");
        let filters = vec![
            format!("topic~=\"^/images/\",namespace=={}", self.namespace),
            format!("topic==\"{barrier}\""),
        ];
        let mut events =
            EventsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        // No timeout on the stream itself: it lives as long as containerd does.
        let mut request = Request::new(SubscribeRequest { filters });
        if let Ok(ns) = self.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", ns);
        }
        let mut subscribe = Box::pin(events.subscribe(request));
        let publisher = EventsClient::new(self.channel.clone());
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let give_up = tokio::time::sleep(CALL_TIMEOUT);
        tokio::pin!(give_up);
        let publish_barrier = || {
            let request = self.request(PublishRequest {
                topic: barrier.clone(),
                event: Some(prost_types::Any {
                    type_url: "google.protobuf.Empty".into(),
                    value: vec![],
                }),
            });
            let mut publisher = publisher.clone();
            async move {
                publisher
                    .publish(request)
                    .await
                    .map(|_| ())
                    .map_err(self.call_error("Events.Publish"))
            }
        };
        let never_came = || {
            self.call_error("Events.Subscribe")(Status::deadline_exceeded(
                "pinkeeper's barrier event never came back on the stream",
            ))
        };
        // Publish until the subscription answers at all...
        let mut stream: Streaming<Envelope> = loop {
            tokio::select! {
                reply = &mut subscribe => {
                    break reply.map_err(self.call_error("Events.Subscribe"))?.into_inner();
                }
                _ = tick.tick() => publish_barrier().await?,
                _ = &mut give_up => return Err(never_came()),
            }
        };
        // ...and until a barrier comes back on it: the first message may be an image event,
        // with every barrier so far published before the subscription was live. Events before
        // the barrier are covered by the listing that follows.
        loop {
            tokio::select! {
                message = stream.message() => {
                    let envelope = message
                        .map_err(self.call_error("Events.Subscribe"))?
                        .ok_or_else(|| {
                            self.call_error("Events.Subscribe")(Status::unavailable("stream ended"))
                        })?;
                    if envelope.topic == barrier {
                        break;
                    }
                }
                _ = tick.tick() => publish_barrier().await?,
                _ = &mut give_up => return Err(never_came()),
            }
        }
        Ok(Subscription {
            stream,
            socket: self.socket.clone(),
        })
    }
}

/// A live image event stream.
pub struct Subscription {
    stream: Streaming<Envelope>,
    socket: PathBuf,
}

impl Subscription {
    /// The next image event; `Ok(None)` for envelopes pinkeeper ignores (barriers, undecodable
    /// payloads). An error means the stream broke (containerd restarted).
    pub async fn next(&mut self) -> Result<Option<ImageEvent>, ContainerdError> {
        let envelope = self.next_envelope().await?;
        Ok(decode(&envelope))
    }

    /// Like [`Subscription::next`], with when containerd published the event: a listing
    /// begun after that already shows it (`daemon`'s queue forgets such events).
    pub async fn next_published(
        &mut self,
    ) -> Result<Option<(ImageEvent, Option<SystemTime>)>, ContainerdError> {
        let envelope = self.next_envelope().await?;
        Ok(decode(&envelope).map(|event| (event, published(&envelope))))
    }

    /// Like [`Subscription::next`], with what the envelope says around the event (when
    /// containerd published it, the topic, the payload's type): `pinkeeper record` writes them
    /// out so that a replay sees the stream as containerd sent it.
    pub async fn next_enveloped(&mut self) -> Result<Option<EnvelopedEvent>, ContainerdError> {
        let envelope = self.next_envelope().await?;
        let Some(event) = decode(&envelope) else {
            return Ok(None);
        };
        Ok(Some(EnvelopedEvent {
            timestamp: published(&envelope),
            namespace: envelope.namespace,
            topic: envelope.topic,
            type_url: envelope.event.map(|any| any.type_url).unwrap_or_default(),
            event,
        }))
    }

    async fn next_envelope(&mut self) -> Result<Envelope, ContainerdError> {
        self.stream
            .message()
            .await
            .map_err(|status| ContainerdError::Call {
                socket: self.socket.clone(),
                call: "Events.Subscribe",
                status,
            })?
            .ok_or_else(|| ContainerdError::Call {
                socket: self.socket.clone(),
                call: "Events.Subscribe",
                status: Status::unavailable("stream ended"),
            })
    }
}

/// When containerd published an envelope (`None` without a valid timestamp).
fn published(envelope: &Envelope) -> Option<SystemTime> {
    let t = envelope.timestamp.as_ref()?;
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// An image event with its envelope's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopedEvent {
    /// When containerd published it (`None` if the envelope had no valid timestamp).
    pub timestamp: Option<SystemTime>,
    /// The envelope's namespace.
    pub namespace: String,
    /// `/images/create`, `/images/update` or `/images/delete`.
    pub topic: String,
    /// The payload's type URL as containerd sent it (without a leading `/`).
    pub type_url: String,
    /// The decoded event.
    pub event: ImageEvent,
}

/// Decodes an image event envelope by its topic (the `Any`'s type URL has no leading `/`,
/// FACTS.md section 3, so it is not used).
pub fn decode(envelope: &Envelope) -> Option<ImageEvent> {
    let value = envelope.event.as_ref()?.value.as_slice();
    let (kind, name, labels) = match envelope.topic.as_str() {
        "/images/create" => {
            let e = ImageCreate::decode(value).ok()?;
            (EventKind::Create, e.name, e.labels)
        }
        "/images/update" => {
            let e = ImageUpdate::decode(value).ok()?;
            (EventKind::Update, e.name, e.labels)
        }
        "/images/delete" => {
            let e = ImageDelete::decode(value).ok()?;
            (EventKind::Delete, e.name, Default::default())
        }
        _ => return None,
    };
    Some(ImageEvent {
        kind,
        name,
        labels: labels.into_iter().collect(),
    })
}

/// containerd (or tonic, past [`MAX_MESSAGE`]) refused an answer for its size.
fn too_large(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted
}

/// The record pinkeeper reads, with the labels `kept` names (every label if `None`).
fn record(image: containerd_client::services::v1::Image, kept: Option<&[String]>) -> ImageRecord {
    ImageRecord {
        name: image.name,
        labels: image
            .labels
            .into_iter()
            .filter(|(key, _)| kept.is_none_or(|kept| kept.contains(key)))
            .collect(),
        digest: image.target.map(|t| t.digest).filter(|d| !d.is_empty()),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// The executor's view of containerd (src/store/): the same calls, their errors in words.
impl crate::store::ImageStore for Containerd {
    type Events = Subscription;

    async fn list(&self) -> Result<Vec<ImageRecord>, crate::store::StoreError> {
        Containerd::list(self).await.map_err(store_error)
    }

    async fn get(&self, name: &str) -> Result<Option<ImageRecord>, crate::store::StoreError> {
        Containerd::get(self, name).await.map_err(store_error)
    }

    async fn pin(&self, name: &str) -> Result<(), ApplyError> {
        Containerd::pin(self, name).await
    }

    async fn unpin(&self, name: &str) -> Result<(), ApplyError> {
        Containerd::unpin(self, name).await
    }

    async fn subscribe(&self) -> Result<Subscription, crate::store::StoreError> {
        Containerd::subscribe(self).await.map_err(store_error)
    }
}

impl crate::store::EventStream for Subscription {
    async fn next(&mut self) -> Result<Option<ImageEvent>, crate::store::StoreError> {
        Subscription::next(self).await.map_err(store_error)
    }
}

fn store_error(e: ContainerdError) -> crate::store::StoreError {
    crate::store::StoreError(e.to_string())
}
