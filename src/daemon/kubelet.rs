//! What kubelet sees (contract rule 10): after each sweep's restores, after connecting and after
//! an operator's reconcile, CRI's `ListImages` is read off the loop and compared with the
//! intents ([`Engine::cri_view`](crate::engine::Engine::cri_view)). What it found is in
//! `status`, `list` and the metric `pinkeeper_cri_unpinned_intents`.
//!
//! CRI learns a label change from its own event subscription, a fraction of a second after
//! containerd (FACTS.md section 4): a check that finds an intent unpinned is made again, at
//! most [`RECHECKS`] times a second apart, before the disagreement is logged.

use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{now_ms, Daemon};
use crate::containerd::cri::{self, CriError};
use crate::containerd::Containerd;
use crate::disk;
use crate::engine::{CriView, IntentState, Millis};

/// Checks made again, a second apart, while CRI reports an intent unpinned.
const RECHECKS: u8 = 3;
const RECHECK_AFTER: Duration = Duration::from_secs(1);
/// After connecting, CRI's view is read this long after `settle_ms` (K3s sweeps about a second
/// after its containerd starts).
pub(super) const AFTER_CONNECT: Duration = Duration::from_secs(2);
/// At most this many names in one log line.
const NAMED: usize = 10;

/// A check of what kubelet sees under way.
pub(super) type CriTask = JoinHandle<Checked>;
/// A check's end.
pub(super) type CriDone = Result<Checked, tokio::task::JoinError>;

/// What a check read, off the loop.
pub(super) struct Checked {
    /// CRI's images, or why they could not be read.
    images: Result<Vec<cri::Image>, CriError>,
    /// The disk the pins hold, or why it could not be worked out.
    disk: Result<DiskFacts, String>,
}

/// The disk the pins hold, as kubelet's image GC sees it.
#[derive(Debug, Default, Clone)]
pub(crate) struct DiskFacts {
    /// The image filesystem's directory (CRI's ImageFsInfo, else containerd's root).
    pub mountpoint: String,
    pub fs: disk::Filesystem,
    /// Bytes of the content store the held images reach, counted once.
    pub pinned: u64,
    /// Bytes of the whole content store.
    pub content: u64,
    pub thresholds: disk::Thresholds,
    /// A file with kubelet's thresholds could not be read: kubelet's defaults are assumed.
    pub thresholds_problem: String,
    /// Full the image filesystem would stay, in percent, with every unpinned image deleted,
    /// when that is above the low threshold.
    pub floor: Option<f64>,
    /// The largest held images: name, bytes, why held.
    pub largest: Vec<(String, u64, String)>,
}

/// A held image whose bytes count: name, target digest, why it is held.
type Root = (String, String, String);

/// How long the content store's listing, and the filesystem and files, may take.
const DISK_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest images named in a warning.
const LARGEST: usize = 5;

/// The last check of CRI's view.
#[derive(Debug)]
pub(super) struct CriFacts {
    /// When it ended (0: never).
    pub checked: Millis,
    /// Why CRI's view could not be read; empty when it was.
    pub problem: String,
    /// What it showed.
    pub view: CriView,
    /// Checks left before a disagreement is logged.
    rechecks: u8,
    /// The disagreement last logged (not logged twice in a row).
    logged: Vec<String>,
    /// The disk report, or why it could not be made.
    pub disk: Result<DiskFacts, String>,
    /// The disk warning last logged.
    disk_logged: Option<String>,
}

impl Default for CriFacts {
    fn default() -> Self {
        CriFacts {
            checked: 0,
            problem: String::new(),
            view: CriView::default(),
            rechecks: 0,
            logged: Vec::new(),
            disk: Err("not checked yet".into()),
            disk_logged: None,
        }
    }
}

impl Daemon {
    /// Reads CRI's view soon (after this batch), unless a read is under way.
    pub(super) fn want_cri_check(&mut self) {
        self.cri.rechecks = RECHECKS;
        self.start_cri_check();
    }

    /// [`Daemon::want_cri_check`] once `delay` has passed (unless a check comes first): after
    /// connecting, K3s is usually about to sweep, and CRI's listing and the content store's
    /// walk would compete with the restores. The sweep's own check, when it comes, is sooner.
    pub(super) fn want_cri_check_after(&mut self, delay: Duration) {
        self.cri.rechecks = RECHECKS;
        let at = tokio::time::Instant::now() + delay;
        if self.cri_recheck_at.is_none_or(|t| t > at) {
            self.cri_recheck_at = Some(at);
        }
    }

    pub(super) fn start_cri_check(&mut self) {
        self.cri_recheck_at = None;
        if self.cri_task.is_some() {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let roots: Vec<Root> = self
            .exec
            .engine
            .views_of(|i| i.state != IntentState::Released)
            .iter()
            .filter(|v| v.exists)
            .filter_map(|v| {
                let digest = v.intent.digest.as_ref()?.to_string();
                Some((v.intent.name.to_string(), digest, super::operator::why(v)))
            })
            .collect();
        let program = self.settings.program;
        let images_dir = self.settings.images_dir.clone();
        self.cri_task = Some(tokio::spawn(async move {
            let images = cri::list_images(client.channel()).await;
            let disk = disk_facts(&client, roots, program, &images_dir).await;
            Checked { images, disk }
        }));
    }

    /// A check ended: compares, records, logs a disagreement that lasted.
    pub(super) fn cri_checked(&mut self, done: CriDone) {
        self.cri.checked = now_ms();
        let images = match done {
            Ok(Checked { images, disk }) => {
                self.disk_checked(disk);
                images
            }
            Err(e) => {
                self.cri.disk = Err(format!("the check failed: {e}"));
                Err(CriError::Failed(format!("the check failed: {e}")))
            }
        };
        let images = match images {
            Ok(images) => images,
            Err(e) => return self.cri_unreadable(e.to_string()),
        };
        let names = images.iter().flat_map(|image| {
            image
                .repo_tags
                .iter()
                .chain(&image.repo_digests)
                .map(move |name| (name.as_str(), image.pinned))
        });
        let view = self.exec.engine.cri_view(names);
        self.cri.problem.clear();
        self.metrics.metrics().cri_checked(view.unpinned.len());
        let unpinned: Vec<String> = view.unpinned.iter().map(ToString::to_string).collect();
        self.cri.view = view;
        if unpinned.is_empty() {
            if !self.cri.logged.is_empty() {
                info!("CRI reports every image pinkeeper holds pinned again");
            }
            self.cri.logged.clear();
            self.cri.rechecks = 0;
            return;
        }
        if self.cri.rechecks > 0 {
            self.cri.rechecks -= 1;
            self.cri_recheck_at = Some(tokio::time::Instant::now() + RECHECK_AFTER);
            return;
        }
        if unpinned != self.cri.logged {
            let shown: Vec<&str> = unpinned.iter().take(NAMED).map(String::as_str).collect();
            warn!(
                count = unpinned.len(),
                "CRI (what kubelet sees) reports {} image(s) pinkeeper holds as unpinned although \
                 they carry io.cri-containerd.pinned: {}{}; kubelet's image GC may delete them. \
                 containerd 1.6.22-1.6.24 and 1.7.3-1.7.9 learn a label change only at their \
                 next restart, and versions before 1.6.22 / 1.7.3 ignore the label: run \
                 `pinkeeper doctor`",
                unpinned.len(),
                shown.join(", "),
                if unpinned.len() > NAMED { ", ..." } else { "" }
            );
            self.cri.logged = unpinned;
        }
    }

    fn cri_unreadable(&mut self, why: String) {
        if self.cri.problem != why {
            warn!("cannot read what kubelet sees: {why}; pinkeeper carries on protecting by the label");
        }
        self.cri.problem = why;
        self.cri.view = CriView::default();
        self.metrics.metrics().cri_checked(0);
    }
}

impl Daemon {
    fn disk_checked(&mut self, disk: Result<DiskFacts, String>) {
        if let Ok(facts) = &disk {
            self.metrics.metrics().disk_checked(facts);
            let warning = disk_warning(facts);
            if warning != self.cri.disk_logged {
                if let Some(w) = &warning {
                    warn!("{w}");
                }
                self.cri.disk_logged = warning;
            }
        }
        self.cri.disk = disk;
    }
}

/// The warning of a disk report, if the pins keep kubelet's image GC above its low threshold.
pub(super) fn disk_warning(d: &DiskFacts) -> Option<String> {
    let floor = d.floor?;
    let largest: Vec<String> = d
        .largest
        .iter()
        .map(|(name, bytes, why)| format!("{name} ({}, {why})", disk::human(*bytes)))
        .collect();
    Some(format!(
        "the pinned images hold {} of the image filesystem {} ({} of {} used): with every \
         unpinned image deleted it would still be {floor:.0}% full, above kubelet's image GC low \
         threshold of {}% ({}), so GC cannot free enough and kubelet evicts pods instead. \
         Largest pinned images: {}. Unpin what is no longer needed (`pinkeeper unpin`, or remove \
         a `keep` pattern), or give the image filesystem more room",
        disk::human(d.pinned),
        d.mountpoint,
        disk::human(d.fs.used),
        disk::human(d.fs.size),
        d.thresholds.low,
        d.thresholds.from,
        largest.join(", ")
    ))
}

/// Reads what the disk report needs: the content store, the image filesystem, kubelet's
/// thresholds. Off the loop.
async fn disk_facts(
    client: &Containerd,
    roots: Vec<Root>,
    program: crate::config::Program,
    images_dir: &std::path::Path,
) -> Result<DiskFacts, String> {
    // <data-dir>/agent/images
    let data_dir = images_dir
        .parent()
        .and_then(std::path::Path::parent)
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let mountpoint = match cri::image_fs(client.channel()).await {
        Ok(m) => m,
        Err(_) => data_dir.join("agent/containerd").display().to_string(),
    };
    let blobs = match tokio::time::timeout(DISK_TIMEOUT, client.content_blobs()).await {
        Ok(listed) => listed.map_err(|e| e.to_string())?,
        Err(_) => {
            return Err(format!(
                "containerd did not list its content within {DISK_TIMEOUT:?}"
            ))
        }
    };
    let etc = std::path::PathBuf::from(format!("/etc/rancher/{}", program.as_str()));
    // A filesystem that hangs (a dead network mount) must not hold every later check.
    let work = tokio::task::spawn_blocking(move || {
        let fs = match rustix::fs::statvfs(mountpoint.as_str()) {
            Ok(s) => disk::Filesystem {
                size: s.f_blocks.saturating_mul(s.f_frsize),
                used: s
                    .f_blocks
                    .saturating_sub(s.f_bfree)
                    .saturating_mul(s.f_frsize),
            },
            Err(e) => return Err(format!("cannot read the filesystem of {mountpoint}: {e}")),
        };
        let mut files = Vec::new();
        let mut thresholds_problem = String::new();
        for path in disk::threshold_sources(&etc, &data_dir) {
            match read_small(&path) {
                Ok(Some(text)) => files.push((path, text)),
                Ok(None) => {}
                Err(e) => thresholds_problem = e,
            }
        }
        let thresholds = disk::thresholds(&files).unwrap_or_else(|e| {
            thresholds_problem = e;
            disk::Thresholds::default()
        });
        let pinned = disk::unique_bytes(roots.iter().map(|(_, d, _)| d.as_str()), &blobs);
        let content = blobs.values().map(|b| b.size).sum();
        let floor = disk::gc_floor(pinned, content, fs, &thresholds);
        // One entry per image (K3s's aliases share their image's target): its first name in
        // name order, and how many more it has.
        let mut images: std::collections::BTreeMap<&str, (&str, usize, &str)> = Default::default();
        for (name, digest, why) in &roots {
            let entry = images.entry(digest).or_insert((name, 0, why));
            if name.as_str() < entry.0 {
                *entry = (name, entry.1, why);
            }
            entry.1 += 1;
        }
        let mut largest: Vec<(String, u64, String)> = images
            .into_iter()
            .map(|(digest, (name, names, why))| {
                let shown = match names {
                    1 => name.to_string(),
                    n => format!("{name} (+{} name{})", n - 1, if n == 2 { "" } else { "s" }),
                };
                (shown, disk::image_bytes(digest, &blobs), why.to_string())
            })
            .collect();
        largest.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        largest.truncate(LARGEST);
        Ok(DiskFacts {
            mountpoint,
            fs,
            pinned,
            content,
            thresholds,
            thresholds_problem,
            floor,
            largest,
        })
    });
    match tokio::time::timeout(DISK_TIMEOUT, work).await {
        Ok(done) => done.map_err(|e| format!("the disk report failed: {e}"))?,
        Err(_) => Err(format!(
            "the image filesystem or kubelet's config files did not answer within {DISK_TIMEOUT:?}"
        )),
    }
}

/// A thresholds file's text; `None` when it does not exist. Read as pinkeeper's own config is
/// (`config::read_regular`): a FIFO, a device or a huge file is an error, never a wait.
fn read_small(path: &std::path::Path) -> Result<Option<String>, String> {
    match crate::config::read_regular(path) {
        Ok(text) => Ok(Some(text)),
        Err(crate::config::ConfigError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(crate::config::ConfigError::NotAFile { path, what }) => {
            Err(format!("{} {what}: not read", crate::escape::path(&path)))
        }
        Err(crate::config::ConfigError::Parse { path, message }) => Err(format!(
            "{} {message}: not read",
            crate::escape::path(&path)
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::read_small;

    /// A FIFO where K3s's config should be is an error at once, never a read that waits for a
    /// writer (which would hold every later check of what kubelet sees).
    #[test]
    fn a_thresholds_file_that_is_a_fifo_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.yaml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = read_small(&fifo).unwrap_err();
        assert!(err.contains("FIFO") && err.ends_with("not read"), "{err}");
        assert_eq!(read_small(&dir.path().join("none.yaml")), Ok(None));
        std::fs::write(dir.path().join("a.yaml"), "kubelet-arg: []\n").unwrap();
        assert_eq!(
            read_small(&dir.path().join("a.yaml")),
            Ok(Some("kubelet-arg: []\n".to_string()))
        );
    }
}
