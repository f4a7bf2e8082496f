//! [`Outputs`]: an input's outputs, a listing's decided a part at a time as they are taken.

use std::collections::BTreeSet;

use super::{Engine, ImageRecord, Now, Output};

/// How many records of a listing are applied before their outputs are given
/// ([`Engine::outputs`]).
pub const LISTING_PART: usize = 1024;

/// The outputs of one input ([`Engine::outputs`]).
#[must_use = "the engine's outputs must be carried out"]
pub struct Outputs<'a> {
    pub(super) engine: &'a mut Engine,
    pub(super) now: Now,
    /// Decided and not yet taken.
    pub(super) ready: std::vec::IntoIter<Output>,
    /// A listing still being applied.
    pub(super) listing: Option<ListingFeed>,
}

/// A listing being applied: the records left, and the names seen so far.
pub(super) struct ListingFeed {
    pub(super) images: std::vec::IntoIter<ImageRecord>,
    pub(super) seen: BTreeSet<String>,
}

impl Iterator for Outputs<'_> {
    type Item = Output;

    fn next(&mut self) -> Option<Output> {
        loop {
            if let Some(output) = self.ready.next() {
                return Some(output);
            }
            let feed = self.listing.as_mut()?;
            let mut out = Vec::new();
            if feed.images.len() == 0 {
                let seen = std::mem::take(&mut feed.seen);
                self.listing = None;
                self.engine.end_listing(self.now, seen, &mut out);
            } else {
                let part = feed.images.by_ref().take(LISTING_PART);
                self.engine
                    .listing_part(self.now, part, &mut feed.seen, &mut out);
            }
            self.ready = out.into_iter();
        }
    }
}

impl Drop for Outputs<'_> {
    /// The rest of a listing is applied all the same: the engine is never left in the middle
    /// of one.
    fn drop(&mut self) {
        if self.listing.is_some() {
            self.ready = Vec::new().into_iter();
            while self.next().is_some() {}
        }
    }
}
