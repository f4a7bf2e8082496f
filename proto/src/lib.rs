//! pinkeeper's control API, `pinkeeper.v1` (`pinkeeper/v1/control.proto`): prost messages,
//! the async ttrpc client `ControlClient`, the server trait `Control` and `create_control`.
#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/mod.rs"));

/// The prost these messages are built with (0.13, not the main crate's 0.14): for
/// `Message::encoded_len` when the daemon sizes a page of `List`.
pub use prost;
