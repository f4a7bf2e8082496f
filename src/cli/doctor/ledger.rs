//! The checks of the ledger and of the images at risk (held intents whose image is unpinned or
//! gone), with the engine's at-risk rule.

use super::*;

/// What the doctor could learn of the ledger.
pub(super) enum LedgerRead {
    /// The running daemon answered: its own ledger.
    HeldByDaemon {
        path: PathBuf,
        intents: usize,
        /// Why the daemon cannot write it now; empty when it can.
        problem: String,
        /// A damaged ledger the daemon moved aside; empty if none.
        recovered: String,
    },
    /// No ledger file.
    Missing { path: PathBuf },
    /// Another process (a running pinkeeper) holds it.
    Busy { path: PathBuf },
    /// This user cannot open it.
    NoAccess { path: PathBuf, reason: String },
    /// It cannot be opened or read.
    Broken { path: PathBuf, error: String },
    /// Read.
    Read {
        path: PathBuf,
        intents: Vec<Intent>,
        cached: Box<StoredCache>,
    },
}

pub(super) fn read_ledger(state_dir: &Path) -> LedgerRead {
    let path = state_dir.join(FILE_NAME);
    // `Ledger::open` creates the directory and the file: a doctor must not, so it only
    // opens a ledger that is there.
    match path.try_exists() {
        Ok(true) => {}
        Ok(false) => return LedgerRead::Missing { path },
        Err(e) => {
            return LedgerRead::NoAccess {
                reason: e.to_string(),
                path,
            }
        }
    }
    // redb opens the file read-write; a permission problem is the user's, not a damaged file.
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        if e.kind() == ErrorKind::PermissionDenied {
            return LedgerRead::NoAccess {
                reason: e.to_string(),
                path,
            };
        }
    }
    // Read without writing (a damaged file is reported, never panicked on nor rewritten),
    // and closed at once: a pinkeeper starting now must not find it held.
    match Ledger::inspect(state_dir) {
        Ok(Some(contents)) => match contents.problem() {
            Some(problem) => LedgerRead::Broken {
                error: problem,
                path,
            },
            None => LedgerRead::Read {
                cached: Box::new(contents.cached),
                intents: contents.intents,
                path,
            },
        },
        Ok(None) => LedgerRead::Missing { path },
        Err(LedgerError::Busy { .. }) => LedgerRead::Busy { path },
        Err(e) => LedgerRead::Broken {
            error: e.to_string(),
            path,
        },
    }
}

pub(super) fn check_ledger(settings: &DoctorSettings, ledger: &LedgerRead) -> Check {
    const NAME: &str = "ledger";
    match ledger {
        LedgerRead::HeldByDaemon { path, problem, .. } if !problem.is_empty() => Check::new(
            NAME,
            Status::Fail,
            format!(
                "the running pinkeeper cannot write {}: {problem}. It keeps protecting from \
                 memory and retries; what it learns meanwhile is lost if it stops before the \
                 ledger can be written",
                crate::escape::path(path)
            ),
        ),
        LedgerRead::HeldByDaemon {
            path, recovered, ..
        } if !recovered.is_empty() => Check::new(
            NAME,
            Status::Warn,
            format!(
                "{} is in use by the running pinkeeper; at its start {recovered}",
                crate::escape::path(path)
            ),
        ),
        LedgerRead::HeldByDaemon { path, intents, .. } => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{} is in use by the running pinkeeper, with {intents} intent(s) held",
                path.display()
            ),
        ),
        LedgerRead::Missing { path } => Check::new(
            NAME,
            Status::Warn,
            format!(
                "no ledger at {}: pinkeeper has not run with --state-dir {} yet, so it holds no \
                 intent and protects nothing (the doctor does not create it)",
                path.display(),
                settings.state_dir.display()
            ),
        )
        .fix(
            "start pinkeeper while the archives are still in the images directory: it learns \
             every pinned image when it connects; if it runs with another --state-dir, pass that \
             one",
        ),
        LedgerRead::Busy { path } => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{} is in use by a running pinkeeper (it holds the file, so the doctor cannot \
                 read it; its control socket did not answer either)",
                path.display()
            ),
        ),
        LedgerRead::NoAccess { path, reason } => Check::new(
            NAME,
            Status::Warn,
            format!("cannot open the ledger {}: {reason}", path.display()),
        )
        .fix("run `pinkeeper doctor` as root"),
        LedgerRead::Broken { path, error } => {
            Check::new(NAME, Status::Fail, error.clone()).fix(format!(
                "stop pinkeeper, move the file aside (mv {p} {p}.broken) and start pinkeeper \
                 again: it re-learns every image that is pinned now, but forgets the intents of \
                 images that are unpinned right now",
                p = path.display()
            ))
        }
        LedgerRead::Read { path, intents, .. } => {
            let count = |state: IntentState| intents.iter().filter(|i| i.state == state).count();
            Check::new(
                NAME,
                Status::Ok,
                format!(
                    "{}: {} intent(s) held, {} swept by K3s and not restored yet, {} released",
                    path.display(),
                    count(IntentState::Held),
                    count(IntentState::Swept),
                    count(IntentState::Released)
                ),
            )
        }
    }
}

/// Intents held or swept whose image is unpinned right now, and those whose image is gone.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct AtRisk {
    pub(super) held: usize,
    pub(super) unpinned: Vec<String>,
    pub(super) gone: Vec<String>,
}

pub(super) fn at_risk(intents: &[Intent], images: &[ImageRecord]) -> AtRisk {
    let by_name: BTreeMap<&str, &ImageRecord> =
        images.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut risk = AtRisk::default();
    for intent in intents.iter().filter(|i| i.state.keeps_pinned()) {
        risk.held += 1;
        let record = by_name.get(intent.name.as_str());
        let pinned_now = record.is_some_and(|r| cri_pinned(&r.labels));
        match engine::risk(intent.state, pinned_now, record.is_some()) {
            Some(Risk::Gone) => risk.gone.push(intent.name.to_string()),
            Some(Risk::Unpinned) => risk.unpinned.push(intent.name.to_string()),
            None => {}
        }
    }
    risk.unpinned.sort();
    risk.gone.sort();
    risk
}

/// `a, b, c` or the first [`MAX_NAMED`] one per line and a count of the rest.
pub(super) fn name_list(names: &[String]) -> String {
    let mut out = String::new();
    for name in names.iter().take(MAX_NAMED) {
        out.push_str(&format!("\n  - {name}"));
    }
    if names.len() > MAX_NAMED {
        out.push_str(&format!("\n  - and {} more", names.len() - MAX_NAMED));
    }
    out
}

pub(super) const REPAIR: &str =
    "run `pinkeeper reconcile` to restore their pins now (or `pinkeeper pin \
                      NAME` for one image); a stopped pinkeeper repairs them as soon as it \
                      starts and connects (`systemctl start pinkeeper`)";

pub(super) async fn check_at_risk(
    daemon: &Result<DaemonView, String>,
    probe: &Probe,
    ledger: &LedgerRead,
) -> Check {
    const NAME: &str = "at-risk";
    if let Ok(view) = daemon {
        if view.at_risk.is_empty() {
            return Check::new(
                NAME,
                Status::Ok,
                format!(
                    "the running pinkeeper reports every one of its {} intent(s) pinned",
                    view.intents_held
                ),
            );
        }
        return Check::new(
            NAME,
            Status::Fail,
            format!(
                "{} of the {} image(s) pinkeeper keeps pinned are unpinned right now, so \
                 kubelet's image GC may delete them:{}",
                view.at_risk.len(),
                view.intents_held,
                name_list(&view.at_risk)
            ),
        )
        .fix(REPAIR);
    }
    let cannot_tell = |why: String, fix: &str| {
        Check::new(
            NAME,
            Status::Warn,
            format!("cannot tell which images are at risk: {why}"),
        )
        .fix(fix)
    };
    let intents = match ledger {
        LedgerRead::Read { intents, .. } => intents,
        LedgerRead::Missing { .. } => {
            return cannot_tell(
                "there is no ledger, so pinkeeper holds no intent".into(),
                "see the ledger check",
            )
        }
        LedgerRead::Busy { .. } => {
            return cannot_tell(
                "a running pinkeeper holds the ledger and its control socket did not answer".into(),
                "check again once `pinkeeper doctor` can reach the daemon's control socket",
            )
        }
        LedgerRead::NoAccess { .. }
        | LedgerRead::Broken { .. }
        | LedgerRead::HeldByDaemon { .. } => {
            return cannot_tell("the ledger cannot be read".into(), "see the ledger check")
        }
    };
    let Probe::Reached { client, .. } = probe else {
        return cannot_tell(
            "containerd cannot be reached".into(),
            "see the containerd check",
        );
    };
    let images = match tokio::time::timeout(LIST_TIMEOUT, client.list()).await {
        Ok(Ok(images)) => images,
        Ok(Err(e)) => return cannot_tell(e.to_string(), "run `pinkeeper doctor` again"),
        Err(_) => {
            return cannot_tell(
                format!(
                    "containerd did not list its images within {} s",
                    LIST_TIMEOUT.as_secs()
                ),
                "run `pinkeeper doctor` again; if containerd stays this slow, check K3s's \
                 containerd log (/var/lib/rancher/k3s/agent/containerd/containerd.log)",
            )
        }
    };
    let risk = at_risk(intents, &images);
    if risk.unpinned.is_empty() && risk.gone.is_empty() {
        return Check::new(
            NAME,
            Status::Ok,
            format!(
                "every one of the {} image(s) with an intent in the ledger carries {CRI_PIN}",
                risk.held
            ),
        );
    }
    let mut detail = format!(
        "{} of the {} image(s) pinkeeper keeps pinned are at risk (from the ledger and \
         containerd's listing: pinkeeper is not answering, so nothing restores them until it \
         runs).",
        risk.unpinned.len() + risk.gone.len(),
        risk.held
    );
    let mut fix = Vec::new();
    if !risk.unpinned.is_empty() {
        detail.push_str(&format!(
            "\n{} lack {CRI_PIN}={PINNED}, so kubelet's image GC may delete them:{}",
            risk.unpinned.len(),
            name_list(&risk.unpinned)
        ));
        fix.push(REPAIR.to_string());
    }
    if !risk.gone.is_empty() {
        detail.push_str(&format!(
            "\n{} are no longer in containerd at all:{}",
            risk.gone.len(),
            name_list(&risk.gone)
        ));
        fix.push(
            "an image that is gone cannot be pinned again: put its archive back into the images \
             directory (or pull it) if it is still needed; pinkeeper releases its intent when it \
             next runs"
                .to_string(),
        );
    }
    Check::new(NAME, Status::Fail, detail).fix(fix.join("; "))
}
