//! `Images.List`'s answer, decoded a record at a time into [`ImageRecord`]s.
//!
//! The generated `ListImagesResponse` holds every record's whole message (its label map, its
//! target descriptor with annotations, two timestamps) until the last one is read, and the
//! records pinkeeper keeps are made from it afterwards: two copies of a listing at once. Here
//! each record is decoded into the generated `Image`, turned into an [`ImageRecord`] and
//! dropped before the next one, so only the answer's bytes and the records are held. The
//! daemon keeps only the labels the engine reads ([`super::Containerd::keeping_labels`]): a
//! record's label map costs a whole B-tree node (about 540 bytes) as soon as it has one label.

use std::sync::Arc;

use containerd_client::services::v1::{Image, ListImagesRequest};
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tonic_prost::ProstEncoder;

use crate::engine::ImageRecord;

/// `ListImagesResponse.images`.
const IMAGES: u32 = 1;
const LIST: &str = "/containerd.services.images.v1.Images/List";

/// A decoded `ListImagesResponse`: only ever received.
#[derive(Debug, Default)]
pub(super) struct Listing {
    pub(super) images: Vec<ImageRecord>,
    /// The label keys kept; `None` keeps every label.
    kept: Option<Arc<[String]>>,
}

impl prost::Message for Listing {
    fn encode_raw(&self, _buf: &mut impl BufMut) {
        // Never sent: an answer has no bytes of ours.
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != IMAGES {
            return prost::encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut image = Image::default();
        prost::encoding::message::merge(wire_type, &mut image, buf, ctx)?;
        self.images.push(super::record(image, self.kept.as_deref()));
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        self.images.clear();
    }
}

/// `Images.List` with `request`, its answer decoded by [`Listing`], keeping the labels
/// `kept` names (all if `None`).
pub(super) async fn list(
    channel: Channel,
    request: Request<ListImagesRequest>,
    max_message: usize,
    kept: Option<Arc<[String]>>,
) -> Result<Vec<ImageRecord>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(max_message);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("containerd's channel is not ready: {e}")))?;
    let reply = grpc
        .unary(request, PathAndQuery::from_static(LIST), ListingCodec(kept))
        .await?;
    Ok(reply.into_inner())
}

/// The generated client's encoder for the request, [`Listing`] for the answer.
struct ListingCodec(Option<Arc<[String]>>);

impl Codec for ListingCodec {
    type Encode = ListImagesRequest;
    type Decode = Vec<ImageRecord>;
    type Encoder = ProstEncoder<ListImagesRequest>;
    type Decoder = ListingDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ListingDecoder(self.0.clone())
    }
}

struct ListingDecoder(Option<Arc<[String]>>);

impl Decoder for ListingDecoder {
    type Item = Vec<ImageRecord>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let mut listing = Listing {
            images: Vec::new(),
            kept: self.0.clone(),
        };
        listing
            .merge(buf)
            .map_err(|e| Status::internal(format!("containerd's image listing: {e}")))?;
        Ok(Some(listing.images))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_client::services::v1::ListImagesResponse;
    use containerd_client::types::Descriptor;

    /// What the generated type decodes, this decodes, record for record; and bytes that are
    /// not a listing are an error, not a panic.
    #[test]
    fn it_decodes_what_the_generated_type_does() {
        let image = |name: &str, digest: &str, labels: &[(&str, &str)]| Image {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            target: Some(Descriptor {
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                digest: digest.into(),
                size: 1234,
                annotations: [("a".to_string(), "b".to_string())].into(),
            }),
            created_at: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 2,
            }),
            updated_at: None,
        };
        let answer = ListImagesResponse {
            images: vec![
                image(
                    "docker.io/library/a:1",
                    "sha256:aa",
                    &[("io.cri-containerd.pinned", "pinned")],
                ),
                image("docker.io/library/\u{fffd}b:2", "", &[]),
                image("c", "sha256:cc", &[("x", "y"), ("z", "")]),
            ],
        };
        let bytes = answer.encode_to_vec();
        let ours = Listing::decode(bytes.as_slice()).expect("decodes");
        let theirs: Vec<ImageRecord> = ListImagesResponse::decode(bytes.as_slice())
            .expect("decodes")
            .images
            .into_iter()
            .map(|i| super::super::record(i, None))
            .collect();
        assert_eq!(ours.images, theirs);
        assert_eq!(ours.images[1].digest, None);

        // Only the labels asked for.
        let mut kept = Listing {
            images: Vec::new(),
            kept: Some(["io.cri-containerd.pinned".to_string(), "z".to_string()].into()),
        };
        kept.merge(bytes.as_slice()).expect("decodes");
        let labels: Vec<Vec<&str>> = kept
            .images
            .iter()
            .map(|r| r.labels.keys().map(String::as_str).collect())
            .collect();
        assert_eq!(
            labels,
            [vec!["io.cri-containerd.pinned"], vec![], vec!["z"]]
        );

        assert!(Listing::decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(Listing::decode(&[0x0a, 0xff, 0xff][..]).is_err());
        assert!(Listing::decode(&[][..]).is_ok_and(|l| l.images.is_empty()));
    }
}
