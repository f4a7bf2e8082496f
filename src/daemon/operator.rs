//! The operator's calls (src/control/), answered between two batches of events: `status`,
//! `list` and `history` from the engine and the ledger; `pin`, `unpin` and `reconcile` as
//! inputs to the engine, carried out by the executor like any other; `reconcile --dry-run`
//! by the same executor on a copy of the engine against an in-memory copy of the listing.
//!
//! It decides nothing about pins itself: the engine does.

use super::executor::{run_ready, Executor, FixedClock, Report};
use super::scan::OPERATOR_SCAN_WAIT;
use super::{now_ms, Daemon};
use crate::control::{self, pb, Call, Refusal, Reply, Request};
use crate::engine::{
    Engine, ImageRecord, Input, IntentState, IntentView, ListCause, Millis, Origin, CRI_PIN, PINNED,
};
use crate::ledger::Discard;
use crate::store::MemoryStore;

/// How many history entries `pinkeeper history` shows unless told.
const HISTORY_DEFAULT: usize = 100;

/// The operator's calls.
impl Daemon {
    /// Answers one call. Errors are the daemon's own (the ledger stopped): fatal.
    pub(super) async fn answer(&mut self, request: Request) {
        let result = match request.call {
            Call::Status => Ok(Reply::Status(self.status())),
            Call::List(req) => Ok(Reply::List(self.list_intents(&req))),
            Call::Pin(req) => self.operator_pin(req.name.trim()).await.map(Reply::Pin),
            Call::Unpin(req) => self
                .operator_unpin(req.name.trim(), req.all_names)
                .await
                .map(Reply::Unpin),
            Call::History(req) => self.history(req).await.map(Reply::History),
            Call::Reconcile(req) => self.reconcile(req.dry_run).await.map(Reply::Reconcile),
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
            .map(intent_info)
            .collect();
        page.answer(intents)
    }

    fn connected(&self) -> Result<crate::containerd::Containerd, Refusal> {
        self.client.clone().ok_or_else(|| {
            Refusal::unavailable(format!(
                "pinkeeper is not connected to containerd at {} (K3s may be restarting); try again in a moment",
                self.settings.containerd_socket.display()
            ))
        })
    }

    /// Looks an image up by the name given, or by its normalized reference (`app:1` is
    /// `docker.io/library/app:1`, as K3s names it).
    async fn find(
        &self,
        client: &crate::containerd::Containerd,
        name: &str,
    ) -> Result<Option<ImageRecord>, Refusal> {
        let unavailable =
            |e: crate::containerd::ContainerdError| Refusal::unavailable(e.to_string());
        if let Some(record) = client.get(name).await.map_err(unavailable)? {
            return Ok(Some(record));
        }
        match crate::inventory::reference::normalize_reference(name) {
            Ok(full) if full != name => client.get(&full).await.map_err(unavailable),
            _ => Ok(None),
        }
    }

    fn no_such_image(&self, name: &str) -> Refusal {
        Refusal::not_found(format!(
            "no image {name} in containerd namespace {}; give the full name as `pinkeeper list` \
             or `ctr -n {} images ls` shows it (docker.io/library/app:1)",
            self.settings.namespace, self.settings.namespace
        ))
    }

    async fn operator_pin(&mut self, name: &str) -> Result<pb::PinResponse, Refusal> {
        if name.is_empty() {
            return Err(Refusal::invalid("pin: give an image name"));
        }
        let client = match self.connected() {
            Ok(c) => c,
            Err(r) => return Err(r),
        };
        let record = match self.find(&client, name).await {
            Ok(Some(record)) => record,
            Ok(None) => return Err(self.no_such_image(name)),
            Err(r) => return Err(r),
        };
        let name = record.name.clone();
        let was_pinned = record.labels.get(CRI_PIN).map(String::as_str) == Some(PINNED);
        self.process(vec![Input::OperatorPin { record }]).await;
        let Some(view) = self.exec.engine.view(&name) else {
            return Err(Refusal::failed(format!(
                "{name}: the intent was not recorded"
            )));
        };
        if !view.pinned_now {
            return Err(Refusal::failed(format!(
                "recorded the intent for {name}, but could not set io.cri-containerd.pinned (see \
                 pinkeeper's log); it is set again at the next `pinkeeper reconcile`"
            )));
        }
        Ok(pb::PinResponse {
            intent: Some(intent_info(&view)),
            was_pinned,
        })
    }

    async fn operator_unpin(
        &mut self,
        name: &str,
        all_names: bool,
    ) -> Result<pb::UnpinResponse, Refusal> {
        if name.is_empty() {
            return Err(Refusal::invalid("unpin: give an image name"));
        }
        let client = match self.connected() {
            Ok(c) => c,
            Err(r) => return Err(r),
        };
        let record = match self.find(&client, name).await {
            Ok(r) => r,
            Err(r) => return Err(r),
        };
        let name = record.as_ref().map_or(name.to_string(), |r| r.name.clone());
        if record.is_none() && self.exec.engine.intent(&name).is_none() {
            return Err(self.no_such_image(&name));
        }
        let digest = record.as_ref().and_then(|r| r.digest.clone()).or_else(|| {
            self.exec
                .engine
                .intent(&name)
                .and_then(|i| i.digest.clone())
        });
        // The other names of the same image: CRI keeps it pinned while any of them is.
        let mut same_image: Vec<ImageRecord> = Vec::new();
        if let Some(digest) = &digest {
            match client.list().await {
                Ok(images) => {
                    same_image = images
                        .into_iter()
                        .filter(|r| r.name != name && r.digest.as_ref() == Some(digest))
                        .collect()
                }
                Err(e) => return Err(Refusal::unavailable(e.to_string())),
            }
        }
        let mut targets = vec![(name.clone(), record)];
        if all_names {
            targets.extend(same_image.iter().map(|r| (r.name.clone(), Some(r.clone()))));
        }
        self.unpin_failures.clear();
        let mut names = Vec::new();
        let mut warnings = Vec::new();
        for (target, record) in targets {
            let k3s_label = record.as_ref().is_some_and(|r| {
                r.labels
                    .get(&self.exec.engine.config().program_label)
                    .map(String::as_str)
                    == Some(PINNED)
            });
            self.process(vec![Input::OperatorUnpin {
                name: target.clone(),
                record,
            }])
            .await;
            if k3s_label {
                if let Some(file) = self.exec.engine.archive_of(&target) {
                    warnings.push(format!(
                        "K3s pins {target} again at its next start: {} provides it; delete that \
                         file too if the image may be garbage-collected",
                        crate::escape::path(&file)
                    ));
                }
            }
            names.push(target);
        }
        let failures = std::mem::take(&mut self.unpin_failures);
        if !failures.is_empty() {
            let list: Vec<String> = failures
                .iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect();
            return Err(Refusal::failed(format!(
                "released the intent, but could not remove io.cri-containerd.pinned from {}; run \
                 `pinkeeper unpin` again",
                list.join("; ")
            )));
        }
        let still_pinned_aliases: Vec<String> = if all_names {
            Vec::new()
        } else {
            same_image
                .iter()
                .filter(|r| r.labels.get(CRI_PIN).map(String::as_str) == Some(PINNED))
                .map(|r| r.name.clone())
                .collect()
        };
        if !still_pinned_aliases.is_empty() {
            warnings.push(format!(
                "the image stays pinned: CRI pins an image while any of its names is, and {} \
                 still carry the pin; use --all-names to unpin every name",
                still_pinned_aliases.join(", ")
            ));
        }
        Ok(pb::UnpinResponse {
            names,
            still_pinned_aliases,
            warnings,
        })
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
                    name: h.name,
                    action: h.action,
                    detail: h.detail,
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
            dry_run_decisions(&self.exec.engine, now_ms(), images)
        } else {
            self.captured = Some(Vec::new());
            self.rescan_within(OPERATOR_SCAN_WAIT).await;
            self.list(ListCause::Connected).await;
            let captured = self.captured.take().unwrap_or_default();
            self.status.last_reconcile = now_ms();
            captured
                .into_iter()
                .map(|h| pb::Decision {
                    action: h.action,
                    name: h.name,
                    detail: h.detail,
                })
                .collect()
        };
        Ok(pb::ReconcileResponse { decisions, dry_run })
    }
}

/// Runs a reconcile on a copy of the engine, with the executor against an in-memory copy of
/// the listing: every Get answered from it, every pin applied to it, the churn window let
/// pass. What it decided, in order. The real engine, ledger and store are not touched.
fn dry_run_decisions(engine: &Engine, now: Millis, images: Vec<ImageRecord>) -> Vec<pb::Decision> {
    let store = MemoryStore::with_images(images.clone());
    let clock = FixedClock::at(now);
    let mut what_if = Executor::new(engine.clone(), Discard, clock.clone());
    let listing = Input::Listing {
        images,
        cause: ListCause::Connected,
    };
    let mut report = Report::default();
    // Every call of the in-memory store and journal is answered at once.
    if let Some(done) = run_ready(what_if.process(Some(&store), vec![listing])) {
        report.merge(done);
    }
    clock.set(now + engine.config().churn_window + 1);
    if let Some(done) = run_ready(what_if.process(Some(&store), vec![Input::Tick])) {
        report.merge(done);
    }
    let mut decisions: Vec<pb::Decision> = report
        .history
        .into_iter()
        .map(|h| pb::Decision {
            action: h.action,
            name: h.name,
            detail: h.detail,
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

/// The API's view of an intent.
fn intent_info(view: &IntentView) -> pb::IntentInfo {
    let i = &view.intent;
    let state = match i.state {
        IntentState::Held => "held",
        IntentState::Swept => "swept",
        IntentState::Released => "released",
    };
    let source = i
        .source
        .as_ref()
        .map(|p| crate::escape::path(p).to_string());
    let why = match (i.origin, &source) {
        (Origin::Operator, _) => "pinned by an operator (pinkeeper pin)".to_string(),
        (Origin::SeenPinned, Some(file)) => format!("seen pinned; imported by K3s from {file}"),
        (Origin::SeenPinned, None) => {
            "seen pinned (not from a file of the images directory)".into()
        }
    };
    pb::IntentInfo {
        name: i.name.clone(),
        digest: i.digest.clone().unwrap_or_default(),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{self, Labels};

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
        let decisions = dry_run_decisions(&engine, 1_000, vec![record("a", Labels::new())]);
        let said: Vec<(&str, &str)> = decisions
            .iter()
            .map(|d| (d.action.as_str(), d.name.as_str()))
            .collect();
        assert!(said.contains(&("swept", "a")), "{said:?}");
        assert!(said.contains(&("restored", "a")), "{said:?}");
        assert!(said.contains(&("released", "b")), "{said:?}");
        let after: Vec<_> = engine.intents().cloned().collect();
        assert_eq!(before, after);
    }
}
