//! pinkeeper's control API, `pinkeeper.v1` (`pinkeeper/v1/control.proto`): prost messages,
//! the async ttrpc client `ControlClient`, the server trait `Control` and `create_control`.
#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/mod.rs"));
