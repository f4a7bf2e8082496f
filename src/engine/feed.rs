//! [`Outputs`]: an input's outputs, a listing's decided a part at a time as they are taken.

use std::collections::BTreeSet;

use super::{Engine, ImageRecord, Name, Now, Output};

/// How many records of a listing are applied before their outputs are given
/// ([`Engine::outputs`]): each makes up to three outputs (a pin, a history line, a record).
pub const LISTING_PART: usize = 256;

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
    /// The records left, last first: taken from the end, and the buffer given back as they
    /// go (a listing of 100,000 records is 7 MB of them).
    left: Vec<ImageRecord>,
    /// The names of intents listed so far.
    pub(super) seen: BTreeSet<Name>,
}

impl ListingFeed {
    pub(super) fn new(mut images: Vec<ImageRecord>) -> ListingFeed {
        images.reverse();
        ListingFeed {
            left: images,
            seen: BTreeSet::new(),
        }
    }

    /// The next part, in the listing's order; `None` once every record is taken.
    fn part(&mut self) -> Option<Vec<ImageRecord>> {
        if self.left.is_empty() {
            return None;
        }
        let at = self.left.len().saturating_sub(LISTING_PART);
        let mut part = self.left.split_off(at);
        part.reverse();
        if self.left.capacity() >= 2 * self.left.len() + LISTING_PART {
            // Shrinking a large buffer gives its tail back in place.
            self.left.shrink_to_fit();
        }
        Some(part)
    }
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
            match feed.part() {
                Some(part) => {
                    self.engine
                        .listing_part(self.now, part.into_iter(), &mut feed.seen, &mut out);
                }
                None => {
                    let seen = std::mem::take(&mut feed.seen);
                    self.listing = None;
                    self.engine.end_listing(self.now, seen, &mut out);
                }
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
