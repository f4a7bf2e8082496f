//! The image store pinkeeper keeps pins in, as one trait: containerd
//! ([`crate::containerd::Containerd`]) implements it, and so does [`MemoryStore`], which the
//! replay, `reconcile --dry-run` and the deterministic simulation run against. The executor
//! (src/daemon/executor.rs) only ever sees this trait, so every one of them carries out the
//! engine's outputs with the same code.
//!
//! The doc comments state containerd's semantics (FACTS.md section 3); the conformance suite
//! (tests/store_conformance.rs) checks both implementations against them, so the in-memory
//! store cannot drift from the real one.
//!
//! It owns no rule of the contract: it moves records and events, nothing else.

pub mod memory;

pub use memory::{MemoryEvents, MemoryStore};

use crate::engine::{ApplyError, ImageEvent, ImageRecord};

/// A call to the store failed: it is down or restarting, or refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// An image store in one namespace.
///
/// Futures need not be `Send`: pinkeeper runs on a single-threaded runtime, and the
/// simulation polls them by hand.
#[allow(async_fn_in_trait)]
pub trait ImageStore {
    /// The stream [`ImageStore::subscribe`] returns.
    type Events: EventStream;

    /// Every image record of the namespace, as of one moment (containerd: `Images.List`, read
    /// in one transaction). Events published before the call may or may not be reflected;
    /// the caller subscribes first, so anything later arrives as an event.
    async fn list(&self) -> Result<Vec<ImageRecord>, StoreError>;

    /// One record; `Ok(None)` when no record has that name (containerd answers `NotFound`).
    async fn get(&self, name: &str) -> Result<Option<ImageRecord>, StoreError>;

    /// Sets `io.cri-containerd.pinned=pinned` and nothing else: a per-key update
    /// (`labels.io.cri-containerd.pinned`) keeps every other label and the target, and
    /// publishes `/images/update` with the whole label map after the change, even when the
    /// label was already set. `Err(NotFound)` when no record has that name (no event).
    ///
    /// A call that fails may still have been applied (the caller gave up first): the next
    /// event or listing tells.
    async fn pin(&self, name: &str) -> Result<(), ApplyError>;

    /// Removes `io.cri-containerd.pinned` with a per-key update (a masked key absent from the
    /// request is deleted), keeping every other label; publishes `/images/update`.
    /// `Err(NotFound)` when no record has that name.
    async fn unpin(&self, name: &str) -> Result<(), ApplyError>;

    /// Subscribes to the namespace's image events, and returns only once the subscription is
    /// live (containerd: a barrier event of pinkeeper's own came back on it). Every change
    /// committed after this returns is delivered, in commit order. Nothing before is
    /// replayed: the caller lists after subscribing.
    async fn subscribe(&self) -> Result<Self::Events, StoreError>;
}

/// A live subscription to image events.
#[allow(async_fn_in_trait)]
pub trait EventStream {
    /// The next image event. `Ok(None)` for a message pinkeeper ignores (a barrier, an
    /// undecodable payload). `Err` when the stream broke (containerd restarted): events
    /// committed from then on are lost to it, and the caller subscribes and lists again.
    ///
    /// Create and update carry the record's whole label map after the change; delete carries
    /// none. containerd never drops events for a slow reader: it buffers them.
    async fn next(&mut self) -> Result<Option<ImageEvent>, StoreError>;
}
