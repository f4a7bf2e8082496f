//! The operator's calls (src/control/), answered between two batches of events: `status`,
//! `list` and `history` from the engine and the ledger; `pin`, `unpin` and `reconcile` as
//! inputs to the engine, carried out by the executor like any other; `reconcile --dry-run`
//! by the same executor on a copy of the engine against an in-memory copy of the listing.
//!
//! `pin` and `unpin` are generic over the store and the journal, so the simulation plays the
//! very code the daemon runs. It decides nothing about pins itself: the engine does.

use super::executor::{run_ready, Clock, Executor, FixedClock, Report};
use super::scan::OPERATOR_SCAN_WAIT;
use super::{now_ms, Daemon};
use crate::control::{self, pb, Call, Refusal, Reply, Request};
use crate::engine::{
    cri_pinned, Engine, ImageRecord, Input, IntentState, IntentView, ListCause, Now, Origin,
};
use crate::ledger::{Discard, Journal};
use crate::store::{ImageStore, MemoryStore, StoreError};

/// How many history entries `pinkeeper history` shows unless told.
const HISTORY_DEFAULT: usize = 100;

/// The operator's calls.
impl Daemon {
    /// Answers one call. Errors are the daemon's own (the ledger stopped): fatal.
    pub(super) async fn answer(&mut self, request: Request) {
        let result = match request.call {
            Call::Status => Ok(Reply::Status(Box::new(self.status()))),
            Call::List(req) => Ok(Reply::List(self.list_intents(&req))),
            Call::Pin(req) => self.operator_pin(req.name.trim()).await.map(Reply::Pin),
            Call::Unpin(req) => self
                .operator_unpin(req.name.trim(), req.all_names)
                .await
                .map(Reply::Unpin),
            Call::History(req) => self.history(req).await.map(Reply::History),
            Call::Reconcile(req) => self.reconcile(req.dry_run).await.map(Reply::Reconcile),
            Call::Reload => self.reload().await.map(Reply::Reload),
        };
        // The caller may have given up (timeout, Ctrl-C): nothing to do then.
        let _ = request.reply.send(result);
    }

    fn status(&mut self) -> pb::StatusResponse {
        let summary = self.exec.engine.summary();
        let ledger = self.exec.journal.health();
        let facts = &self.status;
        pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms: facts.started,
            connected: self.client.is_some(),
            containerd_version: facts.containerd_version.clone(),
            containerd_socket: self.settings.containerd_socket.display().to_string(),
            namespace: self.settings.namespace.clone(),
            images_dir: self.settings.images_dir.display().to_string(),
            ledger_path: crate::escape::path(&facts.ledger_path).to_string(),
            last_sweep: facts.last_sweep.as_ref().map(|s| pb::SweepInfo {
                started_ms: s.started,
                seen_live: s.seen_live,
                swept: s.swept as u32,
                restored_archive_gone: s.restored_archive_gone as u32,
                restored_not_repinned: s.restored_not_repinned as u32,
                restored_policy: s.restored_policy as u32,
                repinned_by_k3s: s.repinned_by_k3s as u32,
            }),
            intents_held: summary.tally.held as u32,
            intents_swept: summary.tally.swept as u32,
            intents_released: summary.tally.released as u32,
            pins_restored: summary.restores,
            archives_gone: summary.archives_gone as u32,
            at_risk: summary.at_risk,
            last_reconcile_ms: facts.last_reconcile,
            connected_since_ms: facts.connected_since.unwrap_or(0),
            ledger_problem: ledger.problem.unwrap_or_default(),
            ledger_write_errors: ledger.write_errors,
            ledger_pending: u32::try_from(ledger.pending).unwrap_or(u32::MAX),
            ledger_recovered: ledger.recovered.unwrap_or_default(),
            images_dir_read_ms: facts.images_read,
            images_dir_broken: u32::try_from(facts.images_broken).unwrap_or(u32::MAX),
            images_dir_scans: self.scans_started - u64::from(self.scan_task.is_some()),
            verification_pending: self.exec.engine.verification_pending(),
            keep: self.settings.keep.clone(),
            cri_checked_ms: self.cri.checked,
            cri_problem: self.cri.problem.clone(),
            cri_unpinned: self
                .cri
                .view
                .unpinned
                .iter()
                .map(ToString::to_string)
                .collect(),
            cri_unlisted: u32::try_from(self.cri.view.unlisted.len()).unwrap_or(u32::MAX),
            disk: self.cri.disk.as_ref().ok().map(|d| pb::DiskInfo {
                imagefs: d.mountpoint.clone(),
                imagefs_size_bytes: d.fs.size,
                imagefs_used_bytes: d.fs.used,
                pinned_bytes: d.pinned,
                content_bytes: d.content,
                gc_high_percent: u32::from(d.thresholds.high),
                gc_low_percent: u32::from(d.thresholds.low),
                gc_thresholds_from: d.thresholds.from.clone(),
                thresholds_problem: d.thresholds_problem.clone(),
                warning: super::kubelet::disk_warning(d).unwrap_or_default(),
                largest_pinned: d
                    .largest
                    .iter()
                    .map(|(n, b, why)| format!("{n} ({}, {why})", crate::disk::human(*b)))
                    .collect(),
            }),
            disk_problem: self.cri.disk.as_ref().err().cloned().unwrap_or_default(),
            config_reloaded_ms: facts.config_reloaded,
            config_reload_error: facts.config_reload_error.clone(),
        }
    }

    fn list_intents(&mut self, req: &pb::ListRequest) -> pb::ListResponse {
        // One page (control::ListPage): the engine offers intents in name order.
        let page = control::ListPage::new(req);
        let intents = self
            .exec
            .engine
            .views_of(|i| {
                (req.all || i.state != IntentState::Released)
                    && control::matches(&req.pattern, &i.name)
                    && page.takes(&i.name)
            })
            .iter()
            .map(|view| self.with_cri(intent_info(view)))
            .collect();
        page.answer(intents)
    }

    /// `info` with CRI's view of it at the last check (empty when CRI could not be read).
    fn with_cri(&self, mut info: pb::IntentInfo) -> pb::IntentInfo {
        if self.cri.problem.is_empty() && info.state != IntentState::Released.as_str() {
            info.cri = self.cri.view.of(&info.name).unwrap_or_default().to_string();
        }
        info
    }

    fn connected(&self) -> Result<crate::containerd::Containerd, Refusal> {
        self.client.clone().ok_or_else(|| {
            Refusal::unavailable(format!(
                "pinkeeper is not connected to containerd at {} (K3s may be restarting); try again in a moment",
                self.settings.containerd_socket.display()
            ))
        })
    }

    async fn operator_pin(&mut self, name: &str) -> Result<pb::PinResponse, Refusal> {
        let client = self.connected()?;
        let namespace = self.settings.namespace.clone();
        let (answer, report) = pin(&mut self.exec, &client, &namespace, name).await;
        self.after(report);
        answer
    }

    async fn operator_unpin(
        &mut self,
        name: &str,
        all_names: bool,
    ) -> Result<pb::UnpinResponse, Refusal> {
        let client = self.connected()?;
        let namespace = self.settings.namespace.clone();
        let (answer, report) = unpin(&mut self.exec, &client, &namespace, name, all_names).await;
        self.after(report);
        answer
    }

    /// SIGHUP: reads the config again and applies its `keep` patterns (the other settings
    /// need a restart, and a change to one is said). A config that does not resolve changes
    /// nothing: pinkeeper keeps protecting with what it has.
    async fn reload(&mut self) -> Result<String, Refusal> {
        let Some(reload) = &self.reload else {
            return Err(Refusal::invalid("no config to read again"));
        };
        let new = reload();
        self.status.config_reloaded = now_ms();
        let new = match new {
            Ok(new) => {
                self.status.config_reload_error.clear();
                new
            }
            Err(e) => {
                self.status.config_reload_error = e.to_string();
                let why =
                    format!("config not reloaded: {e}; pinkeeper goes on with the settings it has");
                tracing::error!("{why}");
                return Err(Refusal::invalid(why));
            }
        };
        let others_changed = crate::config::Settings {
            keep: self.settings.keep.clone(),
            ..new.clone()
        } != self.settings;
        if others_changed {
            tracing::warn!(
                "config reloaded: only `keep` applies at once; restart pinkeeper for the other \
                 settings that changed"
            );
        }
        if new.keep == self.settings.keep {
            let said = "config reloaded: the keep patterns are unchanged".to_string();
            tracing::info!("{said}");
            return Ok(said);
        }
        self.settings.keep = new.keep.clone();
        let keep = crate::engine::Keep::new(&new.keep);
        self.process(vec![Input::Keep(keep)]).await;
        let said = format!("config reloaded: keep {:?}", self.settings.keep);
        tracing::info!("{said}");
        Ok(said)
    }

    async fn history(&mut self, req: pb::HistoryRequest) -> Result<pb::HistoryResponse, Refusal> {
        let limit = match req.limit {
            0 => HISTORY_DEFAULT,
            n => n as usize,
        };
        let name = Some(req.name.trim().to_string()).filter(|n| !n.is_empty());
        let entries = self
            .exec
            .journal
            .history(name, limit)
            .await
            .map_err(|e| Refusal::failed(format!("cannot read the ledger's history: {e}")))?;
        Ok(pb::HistoryResponse {
            entries: entries
                .into_iter()
                .map(|h| pb::HistoryEntry {
                    at_ms: h.at,
                    name: h.name.into(),
                    action: h.action.into(),
                    detail: h.detail.into_owned(),
                })
                .collect(),
        })
    }

    /// Reads the images directory and lists every image, as after a reconnection. With
    /// `dry_run`, a copy of the engine decides and nothing is written.
    async fn reconcile(&mut self, dry_run: bool) -> Result<pb::ReconcileResponse, Refusal> {
        let client = match self.connected() {
            Ok(c) => c,
            Err(r) => return Err(r),
        };
        let decisions = if dry_run {
            // The engine's copy has the last inventory (the watch keeps it fresh): a dry run
            // reads nothing that would change the real engine.
            let images = match client.list().await {
                Ok(images) => images,
                Err(e) => return Err(Refusal::unavailable(e.to_string())),
            };
            dry_run_decisions(&self.exec.engine, self.exec.clock.now(), images)
        } else {
            self.captured = Some(Vec::new());
            self.exec.keep_history = true;
            self.rescan_within(OPERATOR_SCAN_WAIT).await;
            self.list(ListCause::Connected).await;
            self.exec.keep_history = false;
            let captured = self.captured.take().unwrap_or_default();
            self.status.last_reconcile = now_ms();
            captured
                .into_iter()
                .map(|h| pb::Decision {
                    action: h.action.into(),
                    name: h.name.into(),
                    detail: h.detail.into_owned(),
                })
                .collect()
        };
        Ok(pb::ReconcileResponse { decisions, dry_run })
    }
}

/// Looks an image up by the name given, or by its normalized reference (`app:1` is
/// `docker.io/library/app:1`, as K3s names it).
async fn find<S: ImageStore>(store: &S, name: &str) -> Result<Option<ImageRecord>, Refusal> {
    let unavailable = |e: StoreError| Refusal::unavailable(e.to_string());
    if let Some(record) = store.get(name).await.map_err(unavailable)? {
        return Ok(Some(record));
    }
    match crate::inventory::reference::normalize_reference(name) {
        Ok(full) if full != name => store.get(&full).await.map_err(unavailable),
        _ => Ok(None),
    }
}

fn no_such_image(namespace: &str, name: &str) -> Refusal {
    Refusal::not_found(format!(
        "no image {name} in containerd namespace {namespace}; give the full name as `pinkeeper \
         list` or `ctr -n {namespace} images ls` shows it (docker.io/library/app:1)"
    ))
}

/// `pinkeeper pin NAME`: records an intent for the image as the store has it now and sets the
/// CRI pin, through the engine and the executor (the daemon's, or the simulation's). The
/// answer, and the executor's report for the caller.
pub async fn pin<J: Journal, C: Clock, S: ImageStore>(
    exec: &mut Executor<J, C>,
    store: &S,
    namespace: &str,
    name: &str,
) -> (Result<pb::PinResponse, Refusal>, Report) {
    let name = name.trim();
    if name.is_empty() {
        return (
            Err(Refusal::invalid("pin: give an image name")),
            Report::default(),
        );
    }
    let record = match find(store, name).await {
        Ok(Some(record)) => record,
        Ok(None) => return (Err(no_such_image(namespace, name)), Report::default()),
        Err(r) => return (Err(r), Report::default()),
    };
    let name = record.name.clone();
    let was_pinned = cri_pinned(&record.labels);
    let report = exec
        .process(Some(store), vec![Input::OperatorPin { record }])
        .await;
    let answer = match exec.engine.view(&name) {
        None => Err(Refusal::failed(format!(
            "{name}: the intent was not recorded"
        ))),
        Some(view) if !view.pinned_now => Err(Refusal::failed(format!(
            "recorded the intent for {name}, but could not set io.cri-containerd.pinned (see \
             pinkeeper's log); it is set again at the next `pinkeeper reconcile`"
        ))),
        Some(view) => Ok(pb::PinResponse {
            intent: Some(intent_info(&view)),
            was_pinned,
        }),
    };
    (answer, report)
}

/// `pinkeeper unpin NAME [--all-names]`: the engine decides which names to release
/// ([`Engine::unpin_plan`]); each is released (durably) and its CRI pin removed by the
/// executor. The answer, and the executor's report for the caller.
pub async fn unpin<J: Journal, C: Clock, S: ImageStore>(
    exec: &mut Executor<J, C>,
    store: &S,
    namespace: &str,
    name: &str,
    all_names: bool,
) -> (Result<pb::UnpinResponse, Refusal>, Report) {
    let name = name.trim();
    let mut report = Report::default();
    if name.is_empty() {
        return (Err(Refusal::invalid("unpin: give an image name")), report);
    }
    let record = match find(store, name).await {
        Ok(record) => record,
        Err(r) => return (Err(r), report),
    };
    // The other names of the same image can only be told by a listing.
    let mut listing = Vec::new();
    if exec.engine.image_digest(name, record.as_ref()).is_some() {
        match store.list().await {
            Ok(images) => listing = images,
            Err(e) => return (Err(Refusal::unavailable(e.to_string())), report),
        }
    }
    let plan = exec
        .engine
        .unpin_plan(name, record.as_ref(), &listing, all_names);
    if plan.targets.is_empty() {
        return (Err(no_such_image(namespace, name)), report);
    }
    // Contract rule 9: the policy decides for the images it keeps.
    let kept: Vec<String> = plan
        .targets
        .iter()
        .filter_map(|(t, _)| exec.engine.kept_by(t).map(|p| format!("{t} by {p:?}")))
        .collect();
    if !kept.is_empty() {
        let refusal = Refusal::failed(format!(
            "not unpinned: a keep pattern of pinkeeper's config holds {}; remove the pattern \
             from `keep` (/etc/pinkeeper/config.toml by default) and run `systemctl reload \
             pinkeeper`, which releases what it alone held",
            kept.join(", ")
        ));
        return (Err(refusal), report);
    }
    let mut names = Vec::new();
    for (target, record) in plan.targets {
        names.push(target.clone());
        let input = Input::OperatorUnpin {
            name: target,
            record,
        };
        report.merge(exec.process(Some(store), vec![input]).await);
    }
    if let Some(why) = &report.not_durable {
        // The operator must not believe in a release a restart would forget (and the next
        // sweep then undo); the pin stays (see the executor).
        let refusal = Refusal::failed(format!(
            "could not write the release of {} to the ledger ({why}): it would not survive a \
             restart, so io.cri-containerd.pinned stays; free space in pinkeeper's state \
             directory and run `pinkeeper unpin` again",
            names.join(", ")
        ));
        return (Err(refusal), report);
    }
    if !report.unpin_failures.is_empty() {
        let list: Vec<String> = report
            .unpin_failures
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        let refusal = Refusal::failed(format!(
            "released the intent, but could not remove io.cri-containerd.pinned from {}; run \
             `pinkeeper unpin` again",
            list.join("; ")
        ));
        return (Err(refusal), report);
    }
    let answer = pb::UnpinResponse {
        names,
        still_pinned_aliases: plan.still_pinned_aliases,
        warnings: plan.warnings,
    };
    (Ok(answer), report)
}

/// Runs a reconcile on a copy of the engine, with the executor against an in-memory copy of
/// the listing: every Get answered from it, every pin applied to it, the churn window let
/// pass. What it decided, in order. The real engine, ledger and store are not touched.
fn dry_run_decisions(engine: &Engine, now: Now, images: Vec<ImageRecord>) -> Vec<pb::Decision> {
    let store = MemoryStore::with_images(images.clone());
    let clock = FixedClock::at(now);
    let mut what_if = Executor::new(engine.clone(), Discard, clock.clone());
    what_if.keep_history = true;
    let listing = Input::Listing {
        images,
        cause: ListCause::Connected,
    };
    let mut report = Report::default();
    // Every call of the in-memory store and journal is answered at once.
    if let Some(done) = run_ready(what_if.process(Some(&store), vec![listing])) {
        report.merge(done);
    }
    clock.set(Now {
        mono: now.mono + engine.config().churn_window + 1,
        wall: now.wall,
    });
    if let Some(done) = run_ready(what_if.process(Some(&store), vec![Input::Tick])) {
        report.merge(done);
    }
    let mut decisions: Vec<pb::Decision> = report
        .history
        .into_iter()
        .map(|h| pb::Decision {
            action: h.action.into(),
            name: h.name.into(),
            detail: h.detail.into_owned(),
        })
        .collect();
    if report.verify {
        decisions.push(pb::Decision {
            action: "verify".into(),
            name: String::new(),
            detail: "once the start-up settles, pinkeeper checks that K3s pinned again every \
                     swept image whose archive is still there"
                .into(),
        });
    }
    decisions
}

/// Why an intent exists, in words (`pinkeeper list`'s WHY, the disk report's largest images).
pub(super) fn why(view: &IntentView) -> String {
    let i = &view.intent;
    let source = i
        .source
        .as_ref()
        .map(|p| crate::escape::path(p).to_string());
    match (i.origin, &source) {
        _ if view.kept_by.is_some() => {
            format!("policy: {}", view.kept_by.as_deref().unwrap_or_default())
        }
        (Origin::Policy, _) => "kept by a keep pattern since removed".to_string(),
        (Origin::Operator, _) => "pinned by an operator (pinkeeper pin)".to_string(),
        (Origin::SeenPinned, Some(file)) => format!("seen pinned; imported by K3s from {file}"),
        (Origin::SeenPinned, None) => {
            "seen pinned (not from a file of the images directory)".into()
        }
    }
}

/// The API's view of an intent.
fn intent_info(view: &IntentView) -> pb::IntentInfo {
    let i = &view.intent;
    let state = i.state.as_str();
    let source = i
        .source
        .as_ref()
        .map(|p| crate::escape::path(p).to_string());
    let why = why(view);
    pb::IntentInfo {
        name: i.name.to_string(),
        digest: i
            .digest
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        state: state.into(),
        archive: view.archive.as_str().into(),
        source: source.unwrap_or_default(),
        pinned_now: view.pinned_now,
        exists: view.exists,
        why,
        since_ms: i.since,
        restores: i.restores,
        last_restored_ms: i.last_restored.unwrap_or(0),
        released_because: i.released_because.clone().unwrap_or_default(),
        // Filled in by the daemon from its last check ([`Daemon::with_cri`]).
        cri: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{self, Action, Labels, CRI_PIN, PINNED};

    fn pinned(both: bool) -> Labels {
        let mut labels = Labels::new();
        labels.insert(CRI_PIN.into(), PINNED.into());
        if both {
            labels.insert(engine::K3S_PIN.into(), PINNED.into());
        }
        labels
    }

    #[test]
    fn a_dry_run_tells_a_missed_sweep_and_changes_nothing() {
        let record = |name: &str, labels| ImageRecord {
            name: name.into(),
            labels,
            digest: Some(format!("sha256:{name}")),
        };
        let mut engine = Engine::new(engine::Config::default(), []);
        // No archive provides either.
        engine.handle(0, Input::Inventory(Default::default()));
        engine.handle(
            0,
            Input::Listing {
                images: vec![record("a", pinned(true)), record("b", pinned(true))],
                cause: ListCause::Connected,
            },
        );
        let before: Vec<_> = engine.intents().cloned().collect();
        // K3s swept both while pinkeeper was away; b's record is gone.
        let decisions = dry_run_decisions(&engine, 1_000.into(), vec![record("a", Labels::new())]);
        let said: Vec<(Action, &str)> = decisions
            .iter()
            .map(|d| (Action::from(d.action.as_str()), d.name.as_str()))
            .collect();
        assert!(said.contains(&(Action::Swept, "a")), "{said:?}");
        assert!(said.contains(&(Action::Restored, "a")), "{said:?}");
        assert!(said.contains(&(Action::Released, "b")), "{said:?}");
        let after: Vec<_> = engine.intents().cloned().collect();
        assert_eq!(before, after);
    }
}
