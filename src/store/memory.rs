//! An image store in memory, with containerd's semantics (see [`super::ImageStore`]), for the
//! replay, `reconcile --dry-run`, the simulation and the conformance suite.
//!
//! The world around pinkeeper (K3s, an operator, CRI) changes it with [`MemoryStore::apply`]
//! and friends, which commit and publish like containerd does. A simulation can also make
//! calls fail, answer after being applied, or never answer ([`Fault`]), break every
//! subscription (containerd restarting), and hold, release and duplicate deliveries.
//!
//! Clones share one store. Every future it returns is ready at once, except a call told to
//! be [`Fault::Slow`] (ready after being polled a few more times) or to [`Fault::Hang`], and
//! [`MemoryEvents::next`] with nothing to deliver.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use super::{EventStream, ImageStore, StoreError};
use crate::engine::{ApplyError, EventKind, ImageEvent, ImageRecord, Labels, CRI_PIN, PINNED};

/// A call pinkeeper makes, as a fault injector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call<'a> {
    /// `list`
    List,
    /// `get(name)`
    Get(&'a str),
    /// `pin(name)`
    Pin(&'a str),
    /// `unpin(name)`
    Unpin(&'a str),
    /// `subscribe`
    Subscribe,
}

/// What happens to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// It works.
    #[default]
    None,
    /// It fails and changes nothing (containerd refused or was unreachable).
    Fail,
    /// It is applied, and the caller hears a failure (it gave up waiting first).
    AppliedThenFail,
    /// It never answers; `applied` says whether it took effect (pinkeeper is killed while
    /// waiting: the simulation drops it).
    Hang {
        /// Whether the store committed it.
        applied: bool,
    },
    /// It works, once polled `polls` more times (others' calls finish meanwhile): it is
    /// carried out, and its event published, only then.
    Slow {
        /// How many times it answers "not yet" first.
        polls: u8,
    },
}

/// Answers "not yet" `n` times, waking its task each time.
async fn not_yet(n: u8) {
    for _ in 0..n {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if std::mem::replace(&mut yielded, true) {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await;
    }
}

type Injector = Box<dyn FnMut(Call<'_>) -> Fault + Send>;

struct Subscriber {
    id: u64,
    /// Committed and deliverable, in order.
    ready: VecDeque<ImageEvent>,
    /// Committed and not yet deliverable (slow delivery; see [`MemoryStore::hold`]).
    held: VecDeque<ImageEvent>,
    broken: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    images: BTreeMap<String, ImageRecord>,
    /// Digests for records created by name only ([`MemoryStore::apply`]).
    digests: BTreeMap<String, String>,
    subscribers: Vec<Subscriber>,
    next_id: u64,
    holding: bool,
    injector: Option<Injector>,
    /// Pins pinkeeper wrote (whether or not the record existed).
    pins_written: usize,
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("images", &state.images)
            .field("subscribers", &state.subscribers.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding these records (no events).
    pub fn with_images(images: impl IntoIterator<Item = ImageRecord>) -> Self {
        let store = Self::new();
        store.replace_all(images);
        store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the data is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides the fate of every call pinkeeper makes from now on.
    pub fn inject(&self, injector: impl FnMut(Call<'_>) -> Fault + Send + 'static) {
        self.lock().injector = Some(Box::new(injector));
    }

    /// Every call works again.
    pub fn heal(&self) {
        self.lock().injector = None;
    }

    fn fault(&self, call: Call<'_>) -> Fault {
        match self.lock().injector.as_mut() {
            Some(injector) => injector(call),
            None => Fault::None,
        }
    }

    /// The digest a record created by `name` gets: set with [`MemoryStore::set_digest`],
    /// else the one its name carries (`repo@sha256:..`), else one made from the name.
    pub fn digest_for(&self, name: &str) -> String {
        Self::digest_of(&self.lock(), name)
    }

    fn digest_of(state: &State, name: &str) -> String {
        if let Some(d) = state.digests.get(name) {
            return d.clone();
        }
        match name.split_once('@') {
            Some((_, d)) => d.to_string(),
            None => format!("sha256:{:0>64}", name.len()),
        }
    }

    /// The digest records created by `name` get.
    pub fn set_digest(&self, name: &str, digest: &str) {
        self.lock()
            .digests
            .insert(name.to_string(), digest.to_string());
    }

    fn publish(state: &mut State, event: ImageEvent) {
        let holding = state.holding;
        for sub in state.subscribers.iter_mut().filter(|s| !s.broken) {
            if holding || !sub.held.is_empty() {
                sub.held.push_back(event.clone());
            } else {
                sub.ready.push_back(event.clone());
                if let Some(w) = sub.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Commits what an event says and publishes it (what K3s, CRI or `ctr` do). A create or
    /// update keeps the record's digest, or gives it one ([`MemoryStore::set_digest`]).
    /// Labels with an empty value are dropped, from the record and the event, as containerd
    /// does.
    pub fn apply(&self, mut event: ImageEvent) {
        stored_labels(&mut event.labels);
        let mut state = self.lock();
        match event.kind {
            EventKind::Delete => {
                if state.images.remove(&event.name).is_none() {
                    return;
                }
            }
            EventKind::Create | EventKind::Update => {
                let digest = state
                    .images
                    .get(&event.name)
                    .and_then(|r| r.digest.clone())
                    .unwrap_or_else(|| Self::digest_of(&state, &event.name));
                let record = ImageRecord {
                    name: event.name.clone(),
                    labels: event.labels.clone(),
                    digest: Some(digest),
                };
                state.images.insert(event.name.clone(), record);
            }
        }
        Self::publish(&mut state, event);
    }

    /// Imports a record as containerd's importer does: a new one is created with its labels
    /// (`/images/create`); an existing one only gets the new target and keeps its labels
    /// (`Images.Update` of `target`, `/images/update` with the labels kept). Labels with an
    /// empty value are not stored (containerd drops them).
    pub fn create(&self, mut record: ImageRecord) {
        stored_labels(&mut record.labels);
        let mut state = self.lock();
        let kind = match state.images.get(&record.name) {
            Some(existing) => {
                record.labels = existing.labels.clone();
                if record.digest.is_none() {
                    record.digest = existing.digest.clone();
                }
                EventKind::Update
            }
            None => EventKind::Create,
        };
        let event = ImageEvent {
            kind,
            name: record.name.clone(),
            labels: record.labels.clone(),
        };
        state.images.insert(record.name.clone(), record);
        Self::publish(&mut state, event);
    }

    /// Deletes a record, publishing `/images/delete` (no labels); false if it did not exist.
    pub fn delete(&self, name: &str) -> bool {
        let exists = self.lock().images.contains_key(name);
        if exists {
            self.apply(ImageEvent {
                kind: EventKind::Delete,
                name: name.to_string(),
                labels: Labels::new(),
            });
        }
        exists
    }

    /// A whole-map label update (`paths = ["labels"]`, K3s's sweep); false if no such record.
    pub fn replace_labels(&self, name: &str, labels: Labels) -> bool {
        if !self.lock().images.contains_key(name) {
            return false;
        }
        self.apply(ImageEvent {
            kind: EventKind::Update,
            name: name.to_string(),
            labels,
        });
        true
    }

    /// A per-key label update (`paths = ["labels.KEY"]`); an empty value deletes the key.
    pub fn set_label(&self, name: &str, key: &str, value: &str) -> bool {
        let Some(mut labels) = self.labels(name) else {
            return false;
        };
        if value.is_empty() {
            labels.remove(key);
        } else {
            labels.insert(key.to_string(), value.to_string());
        }
        self.replace_labels(name, labels)
    }

    /// Replaces every record without an event (the state before a story starts, or what
    /// changed while nobody was subscribed).
    pub fn replace_all(&self, images: impl IntoIterator<Item = ImageRecord>) {
        self.lock().images = images
            .into_iter()
            .map(|mut r| {
                stored_labels(&mut r.labels);
                (r.name.clone(), r)
            })
            .collect();
    }

    /// Puts one record without an event.
    pub fn put(&self, mut record: ImageRecord) {
        stored_labels(&mut record.labels);
        self.lock().images.insert(record.name.clone(), record);
    }

    /// A record's labels.
    pub fn labels(&self, name: &str) -> Option<Labels> {
        self.lock().images.get(name).map(|r| r.labels.clone())
    }

    /// A record.
    pub fn record(&self, name: &str) -> Option<ImageRecord> {
        self.lock().images.get(name).cloned()
    }

    /// Every record, by name.
    pub fn images(&self) -> BTreeMap<String, ImageRecord> {
        self.lock().images.clone()
    }

    /// How many pins pinkeeper wrote (whether or not they found a record).
    pub fn pins_written(&self) -> usize {
        self.lock().pins_written
    }

    /// containerd restarts: every subscription breaks (records persist: they are in its
    /// metadata database).
    pub fn restart(&self) {
        let mut state = self.lock();
        for sub in &mut state.subscribers {
            sub.broken = true;
            if let Some(w) = sub.waker.take() {
                w.wake();
            }
        }
        state.subscribers.clear();
    }

    /// While `true`, committed events are held back from every subscriber (slow delivery);
    /// [`MemoryStore::release`] lets them through, in order.
    pub fn hold(&self, holding: bool) {
        self.lock().holding = holding;
    }

    /// Lets up to `count` held events through to each subscriber; `duplicate` delivers the
    /// first of them twice (a redelivery).
    pub fn release(&self, count: usize, duplicate: bool) {
        let mut state = self.lock();
        for sub in state.subscribers.iter_mut().filter(|s| !s.broken) {
            for i in 0..count {
                let Some(event) = sub.held.pop_front() else {
                    break;
                };
                if duplicate && i == 0 {
                    sub.ready.push_back(event.clone());
                }
                sub.ready.push_back(event);
            }
            if !sub.ready.is_empty() {
                if let Some(w) = sub.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Events committed and not yet delivered to the subscribers, held or ready.
    pub fn undelivered(&self) -> usize {
        let state = self.lock();
        state
            .subscribers
            .iter()
            .map(|s| s.ready.len() + s.held.len())
            .sum()
    }

    fn write_pin(&self, name: &str, pinned: bool, applied: bool) -> Result<(), ApplyError> {
        if pinned {
            self.lock().pins_written += 1;
        }
        if !applied {
            return Ok(());
        }
        let value = if pinned { PINNED } else { "" };
        if self.set_label(name, CRI_PIN, value) {
            Ok(())
        } else {
            Err(ApplyError::NotFound)
        }
    }

    async fn set_pin(&self, name: &str, pinned: bool) -> Result<(), ApplyError> {
        let call = if pinned {
            Call::Pin(name)
        } else {
            Call::Unpin(name)
        };
        let failed = || ApplyError::Failed(format!("in-memory store: {call:?} failed"));
        match self.fault(call) {
            Fault::None => self.write_pin(name, pinned, true),
            Fault::Slow { polls } => {
                not_yet(polls).await;
                self.write_pin(name, pinned, true)
            }
            Fault::Fail => Err(failed()),
            Fault::AppliedThenFail => {
                let _ = self.write_pin(name, pinned, true);
                Err(failed())
            }
            Fault::Hang { applied } => {
                let _ = self.write_pin(name, pinned, applied);
                std::future::pending().await
            }
        }
    }

    /// A read: works, fails, or hangs (a read changes nothing, so `applied` does not matter).
    async fn read<T>(
        &self,
        call: Call<'_>,
        answer: impl FnOnce(&State) -> T,
    ) -> Result<T, StoreError> {
        match self.fault(call) {
            Fault::None => Ok(answer(&self.lock())),
            Fault::Slow { polls } => {
                not_yet(polls).await;
                Ok(answer(&self.lock()))
            }
            Fault::Fail | Fault::AppliedThenFail => {
                Err(StoreError(format!("in-memory store: {call:?} failed")))
            }
            Fault::Hang { .. } => std::future::pending().await,
        }
    }
}

/// containerd never stores a label whose value is empty (its metadata store deletes the key
/// instead), and its create and update events carry the labels as stored.
fn stored_labels(labels: &mut Labels) {
    labels.retain(|_, value| !value.is_empty());
}

impl ImageStore for MemoryStore {
    type Events = MemoryEvents;

    async fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.read(Call::List, |s| s.images.values().cloned().collect())
            .await
    }

    async fn get(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.read(Call::Get(name), |s| s.images.get(name).cloned())
            .await
    }

    async fn pin(&self, name: &str) -> Result<(), ApplyError> {
        self.set_pin(name, true).await
    }

    async fn unpin(&self, name: &str) -> Result<(), ApplyError> {
        self.set_pin(name, false).await
    }

    async fn subscribe(&self) -> Result<MemoryEvents, StoreError> {
        self.read(Call::Subscribe, |_| ()).await?;
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.subscribers.push(Subscriber {
            id,
            ready: VecDeque::new(),
            held: VecDeque::new(),
            broken: false,
            waker: None,
        });
        Ok(MemoryEvents {
            store: self.clone(),
            id,
        })
    }
}

/// A subscription to a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryEvents {
    store: MemoryStore,
    id: u64,
}

impl MemoryEvents {
    /// The next event if one is ready, without waiting: `None` when there is none yet,
    /// `Some(Err)` once the subscription broke.
    pub fn try_next(&mut self) -> Option<Result<ImageEvent, StoreError>> {
        self.poll(None)
    }

    fn poll(&mut self, waker: Option<&Waker>) -> Option<Result<ImageEvent, StoreError>> {
        let mut state = self.store.lock();
        let Some(sub) = state.subscribers.iter_mut().find(|s| s.id == self.id) else {
            return Some(Err(StoreError(
                "in-memory store: the event stream broke (the store restarted)".into(),
            )));
        };
        match sub.ready.pop_front() {
            Some(event) => Some(Ok(event)),
            None => {
                if let Some(w) = waker {
                    sub.waker = Some(w.clone());
                }
                None
            }
        }
    }
}

impl EventStream for MemoryEvents {
    async fn next(&mut self) -> Result<Option<ImageEvent>, StoreError> {
        std::future::poll_fn(|cx| match self.poll(Some(cx.waker())) {
            Some(result) => Poll::Ready(result.map(Some)),
            None => Poll::Pending,
        })
        .await
    }
}

impl Drop for MemoryEvents {
    fn drop(&mut self) {
        self.store.lock().subscribers.retain(|s| s.id != self.id);
    }
}
