//! The bounded queue between containerd's event stream and the engine.
//!
//! containerd never drops a slow subscriber: it buffers without bound in its own memory
//! (FACTS.md section 3). So the stream is drained at once into this queue, which coalesces
//! per image name and is bounded; when it overflows it is emptied and the caller resyncs by
//! listing. Coalescing keeps every change of an image's pins (the engine tells K3s's sweep
//! from an operator's unpin by those transitions) and folds everything else into the latest
//! label map. Each event keeps when containerd published it: a listing begun after that
//! already shows it, and applied after the listing it would be an older state read as news
//! ([`EventQueue::forget_published_before`]).

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use crate::engine::{self, EventKind, ImageEvent, Pins};

/// Most events held at once (after coalescing). Past it, the queue overflows.
pub const MAX_QUEUED_EVENTS: usize = 16_384;

/// A coalescing, bounded queue of image events.
#[derive(Debug)]
pub struct EventQueue {
    program_label: String,
    /// Names in the order their first pending event arrived.
    order: VecDeque<String>,
    /// Pending events per name, oldest first, with when containerd published them (a folded
    /// event: the last one folded into it).
    pending: HashMap<String, Vec<(ImageEvent, Option<SystemTime>)>>,
    len: usize,
    overflowed: bool,
}

impl EventQueue {
    /// An empty queue; `program_label` is K3s's pin label (its changes are never folded).
    pub fn new(program_label: &str) -> Self {
        EventQueue {
            program_label: program_label.to_string(),
            order: VecDeque::new(),
            pending: HashMap::new(),
            len: 0,
            overflowed: false,
        }
    }

    fn pins(&self, event: &ImageEvent) -> Pins {
        engine::pins(&event.labels, &self.program_label)
    }

    /// Adds an event, with when containerd published it if known. Returns false when the
    /// queue overflowed (it is then empty, and stays refusing until
    /// [`EventQueue::take_overflow`]).
    pub fn push(&mut self, event: ImageEvent, published: Option<SystemTime>) -> bool {
        if self.overflowed {
            return false;
        }
        let pins = self.pins(&event);
        let program_label = &self.program_label;
        if let Some(list) = self.pending.get_mut(&event.name) {
            if let Some((last, last_published)) = list.last_mut() {
                let last_pins = engine::pins(&last.labels, program_label);
                if last.kind != EventKind::Delete
                    && event.kind == EventKind::Update
                    && last_pins == pins
                {
                    last.labels = event.labels;
                    *last_published = published;
                    return true;
                }
            }
            list.push((event, published));
        } else {
            self.order.push_back(event.name.clone());
            self.pending
                .insert(event.name.clone(), vec![(event, published)]);
        }
        self.len += 1;
        if self.len > MAX_QUEUED_EVENTS {
            self.clear();
            self.overflowed = true;
            return false;
        }
        true
    }

    /// Takes every pending event: per name in arrival order, names in order of first arrival.
    pub fn drain(&mut self) -> Vec<ImageEvent> {
        self.drain_up_to(usize::MAX)
    }

    /// Takes pending events as [`EventQueue::drain`] does, a whole name at a time, until at
    /// least `max` are taken or none is left.
    pub fn drain_up_to(&mut self, max: usize) -> Vec<ImageEvent> {
        let mut out = Vec::with_capacity(self.len.min(max));
        while out.len() < max {
            let Some(name) = self.order.pop_front() else {
                break;
            };
            if let Some(list) = self.pending.remove(&name) {
                self.len -= list.len();
                out.extend(list.into_iter().map(|(event, _)| event));
            }
        }
        self.shrink_when_empty();
        out
    }

    /// Gives back the tables a burst grew (a sweep of 10,000 images grows them to 10,000
    /// names, about 1 MiB, which an empty queue would otherwise keep for the daemon's life).
    /// Small tables stay: the usual few events at a time reuse them.
    fn shrink_when_empty(&mut self) {
        const KEPT: usize = 64;
        if self.order.is_empty() && (self.pending.capacity() > KEPT || self.order.capacity() > KEPT)
        {
            self.order.shrink_to_fit();
            self.pending.shrink_to_fit();
        }
    }

    /// Forgets the events containerd published before `start`, the moment a listing began:
    /// the listing shows their state or a later one. Events without a timestamp are kept.
    /// How many were forgotten.
    pub fn forget_published_before(&mut self, start: SystemTime) -> usize {
        let before = self.len;
        self.pending.retain(|_, list| {
            list.retain(|(_, published)| published.is_none_or(|p| p >= start));
            !list.is_empty()
        });
        let pending = &self.pending;
        self.order.retain(|name| pending.contains_key(name));
        self.len = self.pending.values().map(Vec::len).sum();
        self.shrink_when_empty();
        before - self.len
    }

    /// Forgets everything pending (a listing is about to show the same state).
    pub fn clear(&mut self) {
        self.order.clear();
        self.pending.clear();
        self.len = 0;
        self.shrink_when_empty();
    }

    /// True once after an overflow; the queue accepts events again afterwards.
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    /// Events pending.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CRI_PIN, K3S_PIN, PINNED};

    fn ev(kind: EventKind, name: &str, labels: &[&str]) -> ImageEvent {
        ImageEvent {
            kind,
            name: name.into(),
            labels: labels
                .iter()
                .map(|k| (k.to_string(), PINNED.to_string()))
                .collect(),
        }
    }

    #[test]
    fn folds_updates_but_keeps_pin_transitions() {
        let mut q = EventQueue::new(K3S_PIN);
        q.push(ev(EventKind::Update, "a", &[K3S_PIN, CRI_PIN]), None);
        q.push(
            ev(EventKind::Update, "a", &[K3S_PIN, CRI_PIN, "other"]),
            None,
        );
        q.push(ev(EventKind::Update, "b", &[]), None);
        q.push(ev(EventKind::Update, "a", &[K3S_PIN]), None);
        q.push(ev(EventKind::Update, "a", &[]), None);
        q.push(ev(EventKind::Update, "a", &["x"]), None);
        let out = q.drain();
        let names: Vec<_> = out
            .iter()
            .map(|e| (e.name.as_str(), e.labels.len()))
            .collect();
        assert_eq!(names, vec![("a", 3), ("a", 1), ("a", 1), ("b", 0)]);
        assert!(q.is_empty());
    }

    #[test]
    fn keeps_delete_then_create() {
        let mut q = EventQueue::new(K3S_PIN);
        q.push(ev(EventKind::Delete, "a", &[]), None);
        q.push(ev(EventKind::Create, "a", &[K3S_PIN, CRI_PIN]), None);
        q.push(ev(EventKind::Update, "a", &[K3S_PIN, CRI_PIN]), None);
        let kinds: Vec<_> = q.drain().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![EventKind::Delete, EventKind::Create]);
    }

    #[test]
    fn forgets_what_was_published_before_a_listing_began() {
        let start = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(100);
        let at = |s: u64| Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
        let mut q = EventQueue::new(K3S_PIN);
        // a: its pins before the listing (stale), then the sweep after it.
        q.push(ev(EventKind::Update, "a", &[K3S_PIN, CRI_PIN]), at(99));
        q.push(ev(EventKind::Update, "a", &[]), at(101));
        // b: folded into an event published after the start: kept.
        q.push(ev(EventKind::Update, "b", &[K3S_PIN, CRI_PIN]), at(98));
        q.push(
            ev(EventKind::Update, "b", &[K3S_PIN, CRI_PIN, "x"]),
            at(100),
        );
        // c: all before; d: no timestamp.
        q.push(ev(EventKind::Delete, "c", &[]), at(50));
        q.push(ev(EventKind::Create, "d", &[]), None);
        assert_eq!(q.len(), 5);
        assert_eq!(q.forget_published_before(start), 2);
        assert_eq!(q.len(), 3);
        let out: Vec<_> = q
            .drain()
            .into_iter()
            .map(|e| (e.name, e.labels.len()))
            .collect();
        assert_eq!(out, vec![("a".into(), 0), ("b".into(), 3), ("d".into(), 0)]);
    }

    #[test]
    fn drains_a_whole_name_at_a_time_up_to_a_count() {
        let mut q = EventQueue::new(K3S_PIN);
        q.push(ev(EventKind::Delete, "a", &[]), None);
        q.push(ev(EventKind::Create, "a", &[K3S_PIN, CRI_PIN]), None);
        q.push(ev(EventKind::Update, "b", &[]), None);
        q.push(ev(EventKind::Update, "c", &[]), None);
        let names = |events: Vec<ImageEvent>| -> Vec<String> {
            events.into_iter().map(|e| e.name).collect()
        };
        assert_eq!(names(q.drain_up_to(1)), ["a", "a"]);
        assert_eq!(q.len(), 2);
        assert_eq!(names(q.drain_up_to(5)), ["b", "c"]);
        assert!(q.is_empty());
        assert!(q.drain_up_to(5).is_empty());
    }

    #[test]
    fn a_drained_burst_gives_its_tables_back() {
        let mut q = EventQueue::new(K3S_PIN);
        for i in 0..10_000 {
            q.push(ev(EventKind::Update, &format!("n{i}"), &[]), None);
        }
        assert!(q.pending.capacity() >= 10_000);
        while !q.drain_up_to(4096).is_empty() {}
        assert_eq!(q.pending.capacity(), 0);
        assert_eq!(q.order.capacity(), 0);
    }

    #[test]
    fn overflow_empties_and_reports_once() {
        let mut q = EventQueue::new(K3S_PIN);
        let mut refused = false;
        for i in 0..=MAX_QUEUED_EVENTS {
            refused |= !q.push(ev(EventKind::Create, &format!("n{i}"), &[]), None);
        }
        assert!(refused);
        assert!(q.is_empty());
        assert!(!q.push(ev(EventKind::Create, "late", &[]), None));
        assert!(q.take_overflow());
        assert!(!q.take_overflow());
        assert!(q.push(ev(EventKind::Create, "again", &[]), None));
    }
}
