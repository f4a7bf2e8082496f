//! What operators read of the intents (`pinkeeper list`, `status`, the metrics): each intent
//! with what pinkeeper knows of it now, listed or counted.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Engine, Intent, IntentState, Name, DELETED};

/// Where the archive of an intent stands (`pinkeeper list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveState {
    /// A file of the images directory provides the image.
    Present,
    /// A file provided it and none does any more.
    Gone,
    /// No file ever provided it (pulled, or pinned by an operator).
    None,
    /// The images directory has not been read yet.
    Unknown,
}

impl ArchiveState {
    /// The word `pinkeeper list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveState::Present => "present",
            ArchiveState::Gone => "gone",
            ArchiveState::None => "none",
            ArchiveState::Unknown => "unknown",
        }
    }
}

/// An intent as an operator sees it: the ledger's record and what pinkeeper knows now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentView {
    /// The ledger's record.
    pub intent: Intent,
    /// Its archive.
    pub archive: ArchiveState,
    /// The record carries `io.cri-containerd.pinned=pinned` (as last seen).
    pub pinned_now: bool,
    /// The record exists (as last seen).
    pub exists: bool,
    /// The `keep` pattern that holds it, if any (contract rule 9).
    pub kept_by: Option<String>,
}

impl IntentView {
    /// An intent held and its image unpinned or gone: kubelet's GC may delete it.
    pub fn at_risk(&self) -> bool {
        at_risk(self.intent.state, self.pinned_now, self.exists)
    }
}

/// Why an intent is at risk ([`risk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Risk {
    /// Its image record exists without CRI's pin: kubelet's image GC may delete it.
    Unpinned,
    /// Its image record is gone.
    Gone,
}

/// The at-risk rule, for the engine's views and for whoever reads a ledger and a listing
/// (`pinkeeper doctor`): an intent not released ([`IntentState::keeps_pinned`]) whose image
/// record is gone (`exists` false), or exists without CRI's pin (`pinned_now` false,
/// [`cri_pinned`](super::cri_pinned)).
pub fn risk(state: IntentState, pinned_now: bool, exists: bool) -> Option<Risk> {
    if !state.keeps_pinned() {
        None
    } else if !exists {
        Some(Risk::Gone)
    } else if !pinned_now {
        Some(Risk::Unpinned)
    } else {
        None
    }
}

fn at_risk(state: IntentState, pinned_now: bool, exists: bool) -> bool {
    risk(state, pinned_now, exists).is_some()
}

/// The intents counted by state, and those at risk ([`IntentView::at_risk`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Intents held.
    pub held: usize,
    /// Intents swept.
    pub swept: usize,
    /// Intents released.
    pub released: usize,
    /// Intents not released whose image is unpinned or gone now.
    pub at_risk: usize,
}

/// What `pinkeeper status` shows of the intents, gathered without copying them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The intents by state, and how many are at risk.
    pub tally: Tally,
    /// The names at risk ([`IntentView::at_risk`]).
    pub at_risk: Vec<String>,
    /// Pins restored so far, over every intent.
    pub restores: u64,
    /// Intents not released whose archive is gone ([`ArchiveState::Gone`]).
    pub archives_gone: usize,
}

impl Engine {
    /// One intent with what pinkeeper knows of it now.
    pub fn view(&mut self, name: &str) -> Option<IntentView> {
        let intent = self.intents.get(name)?.clone();
        let read = self.provided.is_some();
        let archive = match (read, self.source_of(name)) {
            (false, _) => ArchiveState::Unknown,
            (true, Some(_)) => ArchiveState::Present,
            (true, None) if intent.source.is_some() => ArchiveState::Gone,
            (true, None) => ArchiveState::None,
        };
        let exists = self.exists(name, &intent);
        Some(IntentView {
            kept_by: self.kept_by(name).map(str::to_string),
            pinned_now: intent.pins.cri,
            exists,
            archive,
            intent,
        })
    }

    /// Whether the image record of an intent exists (as last seen).
    pub(super) fn exists(&self, name: &str, intent: &Intent) -> bool {
        !self.deleted.contains_key(name) && intent.released_because.as_deref() != Some(DELETED)
    }

    /// What counting [`Engine::views`] gives, without building them: no copy, no archive
    /// lookup (the daemon's metrics, with 10,000 intents, several times a minute).
    pub fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        for (name, intent) in &self.intents {
            match intent.state {
                IntentState::Held => tally.held += 1,
                IntentState::Swept => tally.swept += 1,
                IntentState::Released => tally.released += 1,
            }
            let pinned_now = intent.pins.cri;
            if at_risk(intent.state, pinned_now, self.exists(name, intent)) {
                tally.at_risk += 1;
            }
        }
        tally
    }

    /// Every intent (released ones included) with what pinkeeper knows of it now.
    pub fn views(&mut self) -> Vec<IntentView> {
        self.views_of(|_| true)
    }

    /// The intents `keep` accepts, with what pinkeeper knows of them now: only those are
    /// copied and have their archive looked up.
    pub fn views_of(&mut self, keep: impl Fn(&Intent) -> bool) -> Vec<IntentView> {
        let names: Vec<Name> = self
            .intents
            .values()
            .filter(|i| keep(i))
            .map(|i| i.name.clone())
            .collect();
        names.iter().filter_map(|n| self.view(n)).collect()
    }

    /// [`Engine::tally`] with the names at risk, the pins restored and the archives gone.
    pub fn summary(&mut self) -> Summary {
        let tally = self.tally();
        let mut summary = Summary {
            tally,
            ..Summary::default()
        };
        let mut had_archive = Vec::new();
        for (name, intent) in &self.intents {
            summary.restores += u64::from(intent.restores);
            if intent.state == IntentState::Released {
                continue;
            }
            if at_risk(intent.state, intent.pins.cri, self.exists(name, intent)) {
                summary.at_risk.push(name.to_string());
            }
            if intent.source.is_some() {
                had_archive.push(name.clone());
            }
        }
        if self.provided.is_some() {
            summary.archives_gone = had_archive
                .iter()
                .filter(|n| self.source_of(n).is_none())
                .count();
        }
        summary
    }

    /// The file of the images directory that provides `name` now (by name, or by digest for
    /// K3s's aliases), if the directory was read.
    pub fn archive_of(&mut self, name: &str) -> Option<PathBuf> {
        self.source_of(name)
    }
}
