//! The `kubelet` check: what CRI, and so kubelet's image GC, sees of the images pinkeeper
//! holds (contract rule 10). The running daemon's last check when it answers; else CRI's
//! `ListImages` read here and compared with the ledger.

use super::*;
use crate::containerd::cri;

const NAME: &str = "kubelet";

/// What to do when CRI reports a held image unpinned.
const CRI_FIX: &str = "containerd honours io.cri-containerd.pinned from 1.6.22 / 1.7.3, and \
     before 1.6.25 / 1.7.10 CRI learns a label change only when containerd restarts: upgrade \
     K3s (or restart it, which restarts its containerd); if CRI still disagrees after that, run \
     `pinkeeper reconcile` and look at `pinkeeper list` (column CRI)";

/// The daemon's last check of CRI's view, from its status.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DaemonCri {
    /// When (0: not yet).
    pub checked_ms: u64,
    /// Why CRI could not be read; empty when it was.
    pub problem: String,
    /// Held intents CRI reported unpinned.
    pub unpinned: Vec<String>,
    /// The disk report, when it was made.
    pub disk: Option<crate::control::pb::DiskInfo>,
    /// Why it could not be made.
    pub disk_problem: String,
}

/// The `disk` check: what kubelet's image GC can still free around the pins, from the running
/// daemon's last check.
pub(super) fn check_disk(daemon: &Result<DaemonView, String>) -> Check {
    const DISK: &str = "disk";
    let Ok(view) = daemon else {
        return Check::new(
            DISK,
            Status::Warn,
            "cannot tell what the pins hold on disk: pinkeeper works it out after it connects, \
             and it is not answering",
        )
        .fix("start pinkeeper (see the control-socket check)");
    };
    let Some(d) = &view.cri.disk else {
        let why = if view.cri.disk_problem.is_empty() {
            "not worked out yet"
        } else {
            view.cri.disk_problem.as_str()
        };
        return Check::new(
            DISK,
            Status::Warn,
            format!("cannot tell what the pins hold on disk: {why}"),
        )
        .fix("run `pinkeeper reconcile`, then `pinkeeper doctor` again");
    };
    let summary = format!(
        "pinned images hold {} of the image filesystem {} ({} used of {}); kubelet's image GC \
         thresholds {}% / {}% ({})",
        crate::disk::human(d.pinned_bytes),
        d.imagefs,
        crate::disk::human(d.imagefs_used_bytes),
        crate::disk::human(d.imagefs_size_bytes),
        d.gc_high_percent,
        d.gc_low_percent,
        d.gc_thresholds_from
    );
    if !d.warning.is_empty() {
        return Check::new(DISK, Status::Warn, d.warning.clone()).fix(
            "unpin images no longer needed (`pinkeeper unpin`, or remove a `keep` pattern and \
             `systemctl reload pinkeeper`), or give the image filesystem more room",
        );
    }
    if !d.thresholds_problem.is_empty() {
        return Check::new(
            DISK,
            Status::Warn,
            format!("{summary}; {}", d.thresholds_problem),
        )
        .fix("fix that file: kubelet reads it too");
    }
    Check::new(DISK, Status::Ok, summary)
}

pub(super) async fn check_kubelet(
    daemon: &Result<DaemonView, String>,
    probe: &Probe,
    ledger: &LedgerRead,
) -> Check {
    if let Some(cri) = daemon
        .as_ref()
        .ok()
        .map(|v| &v.cri)
        .filter(|c| c.checked_ms != 0)
    {
        return verdict(
            cri.problem.as_str(),
            &cri.unpinned,
            "the running pinkeeper's last check",
        );
    }
    let cannot_tell = |why: &str| {
        Check::new(
            NAME,
            Status::Warn,
            format!("cannot tell what kubelet sees: {why}"),
        )
    };
    let LedgerRead::Read { intents, .. } = ledger else {
        return cannot_tell("the ledger cannot be read here (see the ledger check)")
            .fix("check again once pinkeeper runs: it reads CRI's view after each sweep");
    };
    let Probe::Reached { client, .. } = probe else {
        return cannot_tell("containerd cannot be reached (see the containerd check)");
    };
    let images = match cri::list_images(client.channel()).await {
        Ok(images) => images,
        Err(e) => return verdict(&e.to_string(), &[], ""),
    };
    let pinned: std::collections::HashMap<&str, bool> = images
        .iter()
        .flat_map(|i| {
            i.repo_tags
                .iter()
                .chain(&i.repo_digests)
                .map(move |n| (n.as_str(), i.pinned))
        })
        .collect();
    let unpinned: Vec<String> = intents
        .iter()
        .filter(|i| i.state != IntentState::Released)
        .filter(|i| pinned.get(&*i.name) == Some(&false))
        .map(|i| i.name.to_string())
        .collect();
    verdict(
        "",
        &unpinned,
        "CRI's ListImages read now against the ledger",
    )
}

fn verdict(problem: &str, unpinned: &[String], from: &str) -> Check {
    if !problem.is_empty() {
        // CriError::Absent's words, from the daemon's status or from here.
        let absent = problem.contains("serves no CRI");
        return Check::new(
            NAME,
            Status::Warn,
            format!("CRI's view cannot be read: {problem}"),
        )
        .fix(if absent {
            "pinkeeper protects by the label; if kubelet runs on this containerd, enable its CRI \
             plugin (K3s always does)"
        } else {
            "run `pinkeeper doctor` again; pinkeeper protects by the label meanwhile"
        });
    }
    if unpinned.is_empty() {
        return Check::new(
            NAME,
            Status::Ok,
            format!("CRI (what kubelet sees) reports every image pinkeeper holds pinned ({from})"),
        );
    }
    Check::new(
        NAME,
        Status::Warn,
        format!(
            "CRI (what kubelet sees) reports {} image(s) pinkeeper holds as unpinned ({from}), \
             so kubelet's image GC may delete them:{}",
            unpinned.len(),
            name_list(unpinned)
        ),
    )
    .fix(CRI_FIX)
}
