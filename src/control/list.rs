//! `List`'s paging and its name patterns.

use std::cell::Cell;

use pinkeeper_proto::prost::Message as _;

use super::pb;

/// `List` pages: at most this many intents per answer (the CLI asks for this many)...
pub const LIST_PAGE: u32 = 1000;
/// ... and the daemon never gives more than this many, whatever is asked...
pub const LIST_PAGE_MAX: u32 = 5000;
/// ... nor more than about this many bytes (ttrpc refuses answers over 4 MiB).
pub const LIST_PAGE_BYTES: usize = 1 << 20;

/// One page of `List`: which intents it takes and how it ends.
///
/// The daemon offers the intents that match the request to [`ListPage::takes`] in name order
/// (the engine's order), then gives what it built to [`ListPage::answer`]. A page continues
/// after the last name of the previous one (`page_token`), so an intent added or released
/// between two pages is listed at most once and the others exactly once. `page_size` 0 (a
/// client from before paging) gets every intent in one answer, as before.
#[derive(Debug)]
pub struct ListPage<'a> {
    after: &'a str,
    limit: Option<usize>,
    taken: Cell<usize>,
}

impl<'a> ListPage<'a> {
    /// The page `req` asks for.
    pub fn new(req: &'a pb::ListRequest) -> ListPage<'a> {
        ListPage {
            after: &req.page_token,
            limit: (req.page_size > 0).then(|| req.page_size.min(LIST_PAGE_MAX) as usize),
            taken: Cell::new(0),
        }
    }

    /// Whether the intent `name` (one that matches the request) goes in this page. Takes one
    /// more than the page size, to know whether another page follows.
    pub fn takes(&self, name: &str) -> bool {
        if !self.after.is_empty() && name <= self.after {
            return false;
        }
        match self.limit {
            Some(limit) if self.taken.get() > limit => false,
            _ => {
                self.taken.set(self.taken.get() + 1);
                true
            }
        }
    }

    /// The answer, from the intents taken (in name order).
    pub fn answer(&self, mut intents: Vec<pb::IntentInfo>) -> pb::ListResponse {
        let Some(limit) = self.limit else {
            return pb::ListResponse {
                intents,
                next_page_token: String::new(),
            };
        };
        let mut keep = intents.len().min(limit);
        let mut bytes = 0;
        for (at, intent) in intents.iter().take(keep).enumerate() {
            bytes += intent.encoded_len() + 8;
            if bytes > LIST_PAGE_BYTES && at > 0 {
                keep = at;
                break;
            }
        }
        let more = keep < intents.len();
        intents.truncate(keep);
        let next_page_token = match intents.last() {
            Some(last) if more => last.name.clone(),
            _ => String::new(),
        };
        pb::ListResponse {
            intents,
            next_page_token,
        }
    }
}

/// Whether `name` matches an operator's pattern: shell-style `*` and `?` when it has any,
/// else a substring.
pub fn matches(pattern: &str, name: &str) -> bool {
    if pattern.is_empty() {
        return true;
    }
    if !pattern.contains(['*', '?']) {
        return name.contains(pattern);
    }
    wildmatch::WildMatch::new(pattern).matches(name)
}
