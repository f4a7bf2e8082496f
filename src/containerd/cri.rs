//! CRI's image service (`runtime.v1.ImageService`), which containerd serves on its own socket:
//! what kubelet sees of the images, and whether it sees them pinned (FACTS.md section 4).
//!
//! Only the messages and fields pinkeeper reads, declared here with the field numbers of
//! kubernetes/cri-api's `pkg/apis/runtime/v1/api.proto` (prost skips the others); no code
//! generation and no second copy of the CRI API in the build.

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_prost::ProstCodec;

const LIST_IMAGES: &str = "/runtime.v1.ImageService/ListImages";
const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
const IMAGE_FS_INFO: &str = "/runtime.v1.ImageService/ImageFsInfo";

/// How long a CRI call may take before pinkeeper gives up on it (it checks again later).
pub const CRI_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read: CRI lists every image of the node in one message.
const MAX_MESSAGE: usize = 64 << 20;

/// `ListImagesRequest`, without a filter.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesRequest {}

/// `ListImagesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesResponse {
    /// Every image CRI manages.
    #[prost(message, repeated, tag = "1")]
    pub images: Vec<Image>,
}

/// CRI's `Image`: one image (a config digest) with all its names.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    /// The image ID (its config's digest).
    #[prost(string, tag = "1")]
    pub id: String,
    /// Its tagged names (`docker.io/library/app:1`).
    #[prost(string, repeated, tag = "2")]
    pub repo_tags: Vec<String>,
    /// Its digest names (`docker.io/library/app@sha256:...`).
    #[prost(string, repeated, tag = "3")]
    pub repo_digests: Vec<String>,
    /// Its size in bytes, as CRI counts it.
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// Whether kubelet's image GC must leave it alone.
    #[prost(bool, tag = "8")]
    pub pinned: bool,
}

/// `ImageSpec`: an image reference.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    /// The reference (`localhost:5000/app:1`).
    #[prost(string, tag = "1")]
    pub image: String,
}

/// `PullImageRequest`, without credentials or a sandbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    /// What to pull.
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}

/// `PullImageResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    /// The image ID pulled.
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

/// `ImageFsInfoRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageFsInfoRequest {}

/// `ImageFsInfoResponse`: the filesystems images are stored on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageFsInfoResponse {
    /// Where images are stored (the snapshotter's directory, for containerd).
    #[prost(message, repeated, tag = "1")]
    pub image_filesystems: Vec<FilesystemUsage>,
}

/// `FilesystemUsage`, the fields read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FilesystemUsage {
    /// Which filesystem.
    #[prost(message, optional, tag = "2")]
    pub fs_id: Option<FilesystemIdentifier>,
    /// Bytes the images use on it.
    #[prost(message, optional, tag = "3")]
    pub used_bytes: Option<UInt64Value>,
}

/// `FilesystemIdentifier`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FilesystemIdentifier {
    /// A directory on the filesystem.
    #[prost(string, tag = "1")]
    pub mountpoint: String,
}

/// `UInt64Value` (CRI's own wrapper).
#[derive(Clone, PartialEq, prost::Message)]
pub struct UInt64Value {
    /// The value.
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

/// Why CRI's view could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// containerd answers, but serves no CRI (its CRI plugin is disabled, or this is not
    /// K3s's containerd).
    #[error("containerd serves no CRI image service (CRI disabled?): {0}")]
    Absent(String),
    /// The call failed or took longer than [`CRI_TIMEOUT`].
    #[error("CRI's ListImages failed: {0}")]
    Failed(String),
}

/// Every image CRI reports, on containerd's `channel`.
pub async fn list_images(channel: Channel) -> Result<Vec<Image>, CriError> {
    let answer: Result<ListImagesResponse, Status> =
        unary(channel, LIST_IMAGES, ListImagesRequest {}).await;
    answer
        .map(|r| r.images)
        .map_err(|status| match status.code() {
            Code::Unimplemented => CriError::Absent(status.message().to_string()),
            _ => CriError::Failed(format!("{}: {}", status.code(), status.message())),
        })
}

/// Where CRI (and so kubelet) says images are stored: the first image filesystem's directory.
pub async fn image_fs(channel: Channel) -> Result<String, CriError> {
    let answer: Result<ImageFsInfoResponse, Status> =
        unary(channel, IMAGE_FS_INFO, ImageFsInfoRequest {}).await;
    match answer {
        Ok(r) => r
            .image_filesystems
            .into_iter()
            .find_map(|f| f.fs_id.map(|id| id.mountpoint))
            .filter(|m| !m.is_empty())
            .ok_or_else(|| CriError::Failed("ImageFsInfo named no image filesystem".into())),
        Err(status) if status.code() == Code::Unimplemented => {
            Err(CriError::Absent(status.message().to_string()))
        }
        Err(status) => Err(CriError::Failed(format!(
            "ImageFsInfo: {}: {}",
            status.code(),
            status.message()
        ))),
    }
}

/// CRI's `PullImage` of `reference` (as kubelet pulls): the image ID. For the tests.
pub async fn pull_image(channel: Channel, reference: &str) -> Result<String, Status> {
    let request = PullImageRequest {
        image: Some(ImageSpec {
            image: reference.to_string(),
        }),
    };
    let answer: PullImageResponse = unary(channel, PULL_IMAGE, request).await?;
    Ok(answer.image_ref)
}

async fn unary<Q, A>(channel: Channel, path: &'static str, message: Q) -> Result<A, Status>
where
    Q: prost::Message + Send + Sync + 'static,
    A: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("containerd's channel is not ready: {e}")))?;
    let mut request = Request::new(message);
    request.set_timeout(CRI_TIMEOUT);
    let call = grpc.unary(
        request,
        PathAndQuery::from_static(path),
        ProstCodec::<Q, A>::default(),
    );
    match tokio::time::timeout(CRI_TIMEOUT, call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {} s",
            CRI_TIMEOUT.as_secs()
        ))),
    }
}
