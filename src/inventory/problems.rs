//! Bounded reporting of the images directory's problems (broken files, paths not read) across
//! scans, so that 100,000 junk files give a handful of log lines, not 100,000 at every start.
//!
//! Owns: what was wrong at the last scan, kept compactly (a 64-bit hash of each path and of
//! its problem: 16 bytes a file, no path, no text), and the lines to log for one scan: one
//! summary when there are problems (a count and the first few paths), a warning for each file
//! whose state changed (newly broken, or broken differently), a note for each one fixed, at
//! most [`MAX_CHANGE_LINES`] of those, then one line for the rest. It reads nothing and keeps
//! no path: a file that is gone is only counted.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::Path;

use tracing::{info, warn, Level};

use super::Inventory;
use crate::escape;

/// Paths named in the summary line.
pub const SUMMARY_FILES: usize = 5;

/// Per-file lines (newly broken, changed, fixed) logged for one scan; the rest are counted.
pub const MAX_CHANGE_LINES: usize = 10;

/// What the images directory's problems were at the last scan.
#[derive(Debug, Default, Clone)]
pub struct Problems {
    /// Hash of the path -> hash of the problem.
    known: HashMap<u64, u64>,
}

/// A file whose state changed since the previous scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemChange {
    /// Broken now, not at the previous scan (or the first scan since the start).
    New {
        /// Escaped ([`crate::escape::path`]).
        path: String,
        /// What is wrong, escaped.
        problem: String,
    },
    /// Broken before, and differently now.
    Changed {
        /// Escaped.
        path: String,
        /// What is wrong now, escaped.
        problem: String,
    },
    /// Broken before, fine now.
    Fixed {
        /// Escaped.
        path: String,
    },
}

/// What one scan's problems were, and what changed; [`ProblemReport::log`] logs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProblemReport {
    /// Files with an error and paths not read, in this scan.
    pub count: usize,
    /// The first [`SUMMARY_FILES`] of them, escaped, in import order (files, then paths not
    /// read).
    pub first: Vec<String>,
    /// Files whose state changed, the first [`MAX_CHANGE_LINES`].
    pub changes: Vec<ProblemChange>,
    /// Further files whose state changed (not listed).
    pub more_changes: usize,
    /// Files broken at the previous scan and no longer in the directory (removed, renamed),
    /// or no longer considered.
    pub gone: usize,
}

fn hash64(value: impl Hash) -> u64 {
    // SipHash with fixed keys: stable for the process's life, which is all this needs.
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn path_hash(path: &Path) -> u64 {
    hash64(path.as_os_str())
}

impl Problems {
    /// Nothing known: the first [`Problems::observe`] reports every problem as new (within
    /// the cap).
    pub fn new() -> Self {
        Problems::default()
    }

    /// How many problems the last scan had.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// True when the last scan had none.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Compares `inventory` with the previous scan and remembers it for the next.
    pub fn observe(&mut self, inventory: &Inventory) -> ProblemReport {
        let mut report = ProblemReport::default();
        let mut now: HashMap<u64, u64> = HashMap::new();
        let mut fixed = HashSet::new();
        let change = |report: &mut ProblemReport, c: ProblemChange| {
            if report.changes.len() < MAX_CHANGE_LINES {
                report.changes.push(c);
            } else {
                report.more_changes += 1;
            }
        };
        let broken = inventory
            .files
            .iter()
            .filter_map(|f| Some((f.path.as_path(), f.error.as_deref()?)));
        let skipped = inventory
            .skipped
            .iter()
            .map(|s| (s.path.as_path(), s.reason.as_str()));
        for (path, problem) in broken.chain(skipped) {
            let key = path_hash(path);
            let value = hash64(problem);
            if now.insert(key, value).is_some() {
                continue; // the same path twice (cannot happen in a scan): once is enough
            }
            report.count += 1;
            if report.first.len() < SUMMARY_FILES {
                report.first.push(escape::path(path).to_string());
            }
            // A file's error starts with its path, which the line shows once.
            let shown = escape::path(path).to_string();
            let problem = problem
                .strip_prefix(shown.as_str())
                .and_then(|p| p.strip_prefix(": "))
                .unwrap_or(problem);
            match self.known.get(&key) {
                Some(&before) if before == value => {}
                Some(_) => change(
                    &mut report,
                    ProblemChange::Changed {
                        path: escape::path(path).to_string(),
                        problem: escape::text(problem).to_string(),
                    },
                ),
                None => change(
                    &mut report,
                    ProblemChange::New {
                        path: escape::path(path).to_string(),
                        problem: escape::text(problem).to_string(),
                    },
                ),
            }
        }
        if !self.known.is_empty() {
            for file in inventory.files.iter().filter(|f| f.error.is_none()) {
                let key = path_hash(&file.path);
                if self.known.contains_key(&key) && fixed.insert(key) {
                    change(
                        &mut report,
                        ProblemChange::Fixed {
                            path: escape::path(&file.path).to_string(),
                        },
                    );
                }
            }
        }
        report.gone = self
            .known
            .keys()
            .filter(|k| !now.contains_key(*k) && !fixed.contains(*k))
            .count();
        now.shrink_to_fit();
        self.known = now;
        report
    }
}

impl ProblemReport {
    /// True when there is nothing to log.
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.changes.is_empty() && self.more_changes == 0 && self.gone == 0
    }

    /// The lines [`ProblemReport::log`] logs, with their levels: at most
    /// [`MAX_CHANGE_LINES`] + 3, whatever the number of files.
    pub fn lines(&self) -> Vec<(Level, String)> {
        let mut lines = Vec::new();
        let news = self
            .changes
            .iter()
            .any(|c| !matches!(c, ProblemChange::Fixed { .. }));
        if self.count > 0 {
            let more = if self.count > self.first.len() {
                format!(" and {} more", self.count - self.first.len())
            } else {
                String::new()
            };
            lines.push((
                if news || self.more_changes > 0 {
                    Level::WARN
                } else {
                    Level::INFO
                },
                format!(
                    "images directory: {} file(s) K3s cannot import or pinkeeper did not read: \
                     {}{more} (`pinkeeper inventory` lists them all with the reasons)",
                    self.count,
                    self.first.join(", ")
                ),
            ));
        }
        for c in &self.changes {
            lines.push(match c {
                ProblemChange::New { path, problem } => (
                    Level::WARN,
                    format!("images directory: {path}: skipped: {problem}"),
                ),
                ProblemChange::Changed { path, problem } => (
                    Level::WARN,
                    format!("images directory: {path}: skipped, now because: {problem}"),
                ),
                ProblemChange::Fixed { path } => (
                    Level::INFO,
                    format!("images directory: {path}: fixed, read again without error"),
                ),
            });
        }
        if self.more_changes > 0 {
            lines.push((
                Level::WARN,
                format!(
                    "images directory: and {} more file(s) broken, changed or fixed since the \
                     last scan (not listed here; see `pinkeeper inventory`)",
                    self.more_changes
                ),
            ));
        }
        if self.gone > 0 {
            lines.push((
                Level::INFO,
                format!(
                    "images directory: {} broken file(s) of the last scan are gone",
                    self.gone
                ),
            ));
        }
        lines
    }

    /// Logs [`ProblemReport::lines`] through `tracing`.
    pub fn log(&self) {
        for (level, line) in self.lines() {
            if level == Level::WARN {
                warn!("{line}");
            } else {
                info!("{line}");
            }
        }
    }
}
