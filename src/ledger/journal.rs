//! Where the engine's ledger changes go, as one trait: the daemon's [`Writer`] (redb, on its
//! own thread) implements it, and so does [`MemoryLedger`], which keeps in memory only what
//! was made durable, for the replay and the simulation.
//!
//! It owns the write semantics (ordered, background or durable); what to write is the
//! engine's business.

use std::collections::BTreeMap;

use super::{OwnedChange, Writer};
use crate::engine::{HistoryEntry, Intent, Name};

/// Where the engine's ledger changes go.
#[allow(async_fn_in_trait)]
pub trait Journal {
    /// Queues changes, written in order in the background. `Err` says the ledger cannot be
    /// written now: the changes are kept and retried (the daemon reports it).
    fn write(&mut self, changes: Vec<OwnedChange>) -> Result<(), String>;
    /// Writes changes after everything queued before them, and returns once all of it is
    /// durable, or `Err` when the disk refuses (kept and retried, as with
    /// [`Journal::write`]).
    async fn write_durably(&mut self, changes: Vec<OwnedChange>) -> Result<(), String>;
}

impl Journal for Writer {
    fn write(&mut self, changes: Vec<OwnedChange>) -> Result<(), String> {
        Writer::write(self, changes)
    }
    async fn write_durably(&mut self, changes: Vec<OwnedChange>) -> Result<(), String> {
        Writer::write_durably(self, changes).await
    }
}

/// A journal that keeps nothing (`reconcile --dry-run`).
#[derive(Debug, Default)]
pub struct Discard;

impl Journal for Discard {
    fn write(&mut self, _: Vec<OwnedChange>) -> Result<(), String> {
        Ok(())
    }
    async fn write_durably(&mut self, _: Vec<OwnedChange>) -> Result<(), String> {
        Ok(())
    }
}

/// What happens to a durable write of a [`MemoryLedger`] (a simulation's fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteFault {
    /// It is written.
    #[default]
    None,
    /// The disk is full: nothing is written, the changes stay pending.
    Full,
    /// It never returns (pinkeeper is killed while waiting); `applied` says whether the
    /// commit reached the disk first.
    Hang {
        /// Whether the changes are durable.
        applied: bool,
    },
}

type Injector = Box<dyn FnMut() -> WriteFault>;

/// A ledger in memory: what is durable, and what is written but not yet durable (lost to a
/// crash). With `background_durable`, a background write is durable at once (the replay);
/// otherwise it stays pending until [`MemoryLedger::flush`] (the writer thread's next
/// commit) or the next durable write.
#[derive(Default)]
pub struct MemoryLedger {
    /// Durable intents, by name.
    pub intents: BTreeMap<Name, Intent>,
    /// Durable history, in order.
    pub history: Vec<HistoryEntry>,
    /// Written and not yet durable.
    pub pending: Vec<OwnedChange>,
    /// Background writes are durable at once.
    pub background_durable: bool,
    injector: Option<Injector>,
}

impl std::fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLedger")
            .field("intents", &self.intents)
            .field("history", &self.history.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl MemoryLedger {
    /// An empty ledger whose background writes are durable at once.
    pub fn immediate() -> Self {
        MemoryLedger {
            background_durable: true,
            ..Self::default()
        }
    }

    /// Decides the fate of every durable write and flush from now on.
    pub fn inject(&mut self, injector: impl FnMut() -> WriteFault + 'static) {
        self.injector = Some(Box::new(injector));
    }

    /// Every write works again.
    pub fn heal(&mut self) {
        self.injector = None;
    }

    fn fault(&mut self) -> WriteFault {
        self.injector.as_mut().map_or(WriteFault::None, |f| f())
    }

    fn apply(&mut self, change: OwnedChange) {
        match change {
            OwnedChange::Save(intent) => {
                self.intents.insert(intent.name.clone(), *intent);
            }
            OwnedChange::Forget(name) => {
                self.intents.remove(name.as_str());
            }
            OwnedChange::History(h) => self.history.push(h),
            OwnedChange::CacheFile(_) | OwnedChange::ForgetFile(_) => {}
        }
    }

    /// The writer commits what is pending, unless the disk refuses (then it stays pending).
    pub fn flush(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        match self.fault() {
            WriteFault::None => {
                for change in std::mem::take(&mut self.pending) {
                    self.apply(change);
                }
                true
            }
            WriteFault::Full | WriteFault::Hang { .. } => false,
        }
    }

    /// pinkeeper is killed: what was not durable is lost.
    pub fn crash(&mut self) {
        self.pending.clear();
    }

    /// The file is lost, or comes back empty or unreadable: pinkeeper starts from nothing
    /// (a damaged file is moved aside, src/ledger/mod.rs) and re-learns from the listing.
    pub fn lose(&mut self) {
        self.intents.clear();
        self.pending.clear();
    }
}

impl Journal for MemoryLedger {
    fn write(&mut self, changes: Vec<OwnedChange>) -> Result<(), String> {
        self.pending.extend(changes);
        if self.background_durable {
            self.flush();
        }
        Ok(())
    }

    async fn write_durably(&mut self, changes: Vec<OwnedChange>) -> Result<(), String> {
        self.pending.extend(changes);
        match self.fault() {
            WriteFault::None => {
                for change in std::mem::take(&mut self.pending) {
                    self.apply(change);
                }
                Ok(())
            }
            WriteFault::Full => Err("in-memory ledger: no space left on device".into()),
            WriteFault::Hang { applied } => {
                if applied {
                    for change in std::mem::take(&mut self.pending) {
                        self.apply(change);
                    }
                }
                std::future::pending().await
            }
        }
    }
}
