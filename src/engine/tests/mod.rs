//! Unit tests of the engine's rules, driven input by input with chosen instants.

use super::*;

const APP: &str = "docker.io/library/app:1";
const ALIAS: &str = "docker.io/library/app@sha256:aaaa";
const WEB: &str = "registry.example.com/team/web:2.3";

fn labels(pins: &[&str]) -> Labels {
    pins.iter()
        .map(|k| (k.to_string(), PINNED.to_string()))
        .collect()
}

fn both() -> Labels {
    labels(&[K3S_PIN, CRI_PIN])
}

fn update(name: &str, l: Labels) -> Input {
    Input::Event(ImageEvent {
        kind: EventKind::Update,
        name: name.into(),
        labels: l,
    })
}

fn event(kind: EventKind, name: &str, l: Labels) -> Input {
    Input::Event(ImageEvent {
        kind,
        name: name.into(),
        labels: l,
    })
}

fn record(name: &str, l: Labels, digest: &str) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        labels: l,
        digest: Some(digest.into()),
    }
}

fn inventory(entries: &[(&str, &str)]) -> Input {
    Input::Inventory(
        entries
            .iter()
            .map(|(n, f)| (n.to_string(), PathBuf::from(f)))
            .collect(),
    )
}

fn pins(out: &[Output]) -> Vec<(String, RestoreReason)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Pin { name, reason } => Some((name.to_string(), *reason)),
            _ => None,
        })
        .collect()
}

/// An engine that knows APP (provided by app.tar, with its alias) and WEB (web.tar), both pinned.
fn engine_with_two() -> Engine {
    let mut e = Engine::new(Config::default(), []);
    e.handle(0, inventory(&[(APP, "app.tar"), (WEB, "web.tar")]));
    e.handle(
        0,
        Input::Listing {
            images: vec![
                record(APP, both(), "sha256:aaaa"),
                record(ALIAS, both(), "sha256:aaaa"),
                record(WEB, both(), "sha256:bbbb"),
            ],
            cause: ListCause::Connected,
        },
    );
    e
}

#[test]
fn records_intents_with_digest_from_listing() {
    let e = engine_with_two();
    let app = e.intent(APP).unwrap();
    assert_eq!(app.state, IntentState::Held);
    assert!(app.digest.as_ref().is_some_and(|d| d.is("sha256:aaaa")));
    assert_eq!(app.source, Some(PathBuf::from("app.tar")));
    // The alias belongs to the archive of the image it aliases (same digest).
    assert_eq!(
        e.intent(ALIAS).unwrap().source,
        Some(PathBuf::from("app.tar"))
    );
    assert_eq!(e.next_wakeup(), None);
}

#[test]
fn a_new_intent_asks_for_its_digest_and_is_saved_as_new() {
    let mut e = Engine::new(Config::default(), []);
    let out = e.handle(5, update(APP, both()));
    assert!(matches!(&out[0], Output::Save { new: true, intent } if intent.name == APP));
    assert!(out.contains(&Output::Fetch { name: APP.into() }));
}

#[test]
fn an_import_costs_one_get_and_a_recreated_record_one_more() {
    let fetches = |out: &[Output]| {
        out.iter()
            .filter(|o| matches!(o, Output::Fetch { name } if name == APP))
            .count()
    };
    let mut e = Engine::new(Config::default(), []);
    // Recorded by its create: the digest is asked for once (it was twice: the record's Get
    // and the create's own, for a target that may have changed).
    assert_eq!(
        fetches(&e.handle(5, event(EventKind::Create, APP, both()))),
        1
    );
    // Created again over a held intent (K3s's forceCreateTag): its target may be new.
    assert_eq!(
        fetches(&e.handle(6, event(EventKind::Create, APP, both()))),
        1
    );
}

#[test]
fn sweep_of_a_gone_archive_restores_at_once_and_of_a_present_one_waits() {
    let mut e = engine_with_two();
    e.handle(10, inventory(&[(APP, "app.tar")]));
    let out = e.handle(1000, update(WEB, Labels::new()));
    assert_eq!(
        pins(&out),
        vec![(WEB.to_string(), RestoreReason::ArchiveGone)]
    );
    let out = e.handle(1001, update(APP, Labels::new()));
    assert!(pins(&out).is_empty());
    let out = e.handle(1002, update(ALIAS, Labels::new()));
    assert!(pins(&out).is_empty(), "the alias shares app.tar's digest");
    // Verification comes after the quiet period, pushed back by every event of K3s's
    // imports, not by CRI's own bookkeeping on images without an intent.
    assert_eq!(e.next_wakeup(), Some(1002 + Config::default().settle));
    e.handle(2000, update("other", labels(&["io.cri-containerd.image"])));
    assert_eq!(e.next_wakeup(), Some(1002 + Config::default().settle));
    e.handle(3000, update("other", both()));
    assert_eq!(e.next_wakeup(), Some(3000 + Config::default().settle));
    assert_eq!(e.handle(8000, Input::Tick), vec![Output::Verify]);
    // K3s did not re-pin APP (cache bug): the verification listing restores it.
    let out = e.handle(
        8001,
        Input::Listing {
            images: vec![
                record(APP, Labels::new(), "sha256:aaaa"),
                record(ALIAS, both(), "sha256:aaaa"),
                record(WEB, labels(&[CRI_PIN]), "sha256:bbbb"),
            ],
            cause: ListCause::Verify,
        },
    );
    assert_eq!(
        pins(&out),
        vec![(APP.to_string(), RestoreReason::NotRepinned)]
    );
}

#[test]
fn no_archive_is_called_gone_before_the_directory_was_read() {
    let mut e = Engine::new(Config::default(), []);
    e.handle(0, update(WEB, both()));
    let out = e.handle(1, update(WEB, Labels::new()));
    assert!(pins(&out).is_empty());
    assert!(e.next_wakeup().is_some());
}

#[test]
fn swept_state_survives_a_restart_of_pinkeeper() {
    let mut e = engine_with_two();
    e.handle(1, update(WEB, Labels::new()));
    let saved: Vec<Intent> = e.intents().cloned().collect();
    // Crash before the restore was written: the ledger says swept.
    let mut e = Engine::new(Config::default(), saved);
    e.handle(2, inventory(&[(APP, "app.tar")]));
    let out = e.handle(
        3,
        Input::Listing {
            images: vec![
                record(APP, both(), "sha256:aaaa"),
                record(WEB, Labels::new(), "sha256:bbbb"),
            ],
            cause: ListCause::Connected,
        },
    );
    assert_eq!(
        pins(&out),
        vec![(WEB.to_string(), RestoreReason::ArchiveGone)]
    );
}

#[test]
fn images_nobody_pinned_get_no_intent() {
    let mut e = engine_with_two();
    let out = e.handle(1, update("docker.io/library/free:1", labels(&["other"])));
    assert!(out.is_empty());
    assert!(e.intent("docker.io/library/free:1").is_none());
}

fn history(out: &[Output], action: Action) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::History(h) if h.action == action => Some(h.name.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_archive_deleted_at_runtime_unpins_nothing_and_is_noted_once() {
    let mut e = engine_with_two();
    // web.tar deleted while K3s runs: a new inventory without it.
    let out = e.handle(10, inventory(&[(APP, "app.tar")]));
    assert!(pins(&out).is_empty());
    assert!(!out.iter().any(|o| matches!(o, Output::Save { .. })));
    assert_eq!(history(&out, Action::ArchiveGone), vec![WEB.to_string()]);
    let Some(Output::History(h)) = out.iter().find(|o| matches!(o, Output::History(_))) else {
        unreachable!()
    };
    assert_eq!(
        h.detail,
        format!(
            "archive of {WEB} is gone (web.tar); its pin stays, and is restored when K3s's start-up sweep removes it"
        )
    );
    let web = e.intent(WEB).unwrap();
    assert_eq!(web.state, IntentState::Held);
    assert_eq!(
        web.source,
        Some(PathBuf::from("web.tar")),
        "the last known file"
    );
    // Said once, not at every later read of the directory.
    let out = e.handle(20, inventory(&[(APP, "app.tar")]));
    assert!(out.is_empty(), "{out:?}");
    // The next sweep restores it at once.
    let out = e.handle(1000, update(WEB, Labels::new()));
    assert_eq!(
        pins(&out),
        vec![(WEB.to_string(), RestoreReason::ArchiveGone)]
    );
}

#[test]
fn an_archive_deleted_at_runtime_takes_its_aliases_along() {
    let mut e = engine_with_two();
    let out = e.handle(10, inventory(&[(WEB, "web.tar")]));
    assert_eq!(
        history(&out, Action::ArchiveGone),
        vec![APP.to_string(), ALIAS.to_string()]
    );
    assert!(pins(&out).is_empty());
}

#[test]
fn an_archive_added_at_runtime_becomes_the_source() {
    let mut e = engine_with_two();
    e.handle(10, inventory(&[(APP, "app.tar")]));
    // Put back, under another name.
    let out = e.handle(
        20,
        inventory(&[(APP, "app.tar"), (WEB, "more/web.tar.zst")]),
    );
    assert!(history(&out, Action::ArchiveGone).is_empty());
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Save { intent, new: false }
            if intent.name == WEB && intent.source == Some(PathBuf::from("more/web.tar.zst"))
    )));
    // A sweep now leaves it to K3s.
    let out = e.handle(1000, update(WEB, Labels::new()));
    assert!(pins(&out).is_empty());
}

#[test]
fn the_first_inventory_and_released_intents_note_nothing() {
    let mut e = Engine::new(Config::default(), []);
    e.handle(
        0,
        Input::Listing {
            images: vec![record(WEB, both(), "sha256:bbbb")],
            cause: ListCause::Connected,
        },
    );
    let out = e.handle(1, inventory(&[]));
    assert!(history(&out, Action::ArchiveGone).is_empty());
    // Released, then its archive goes: nothing to restore, nothing to say.
    let mut e = engine_with_two();
    e.handle(1, update(WEB, labels(&[K3S_PIN])));
    e.handle(
        2,
        Input::Fetched {
            name: WEB.into(),
            record: Some(record(WEB, labels(&[K3S_PIN]), "sha256:bbbb")),
        },
    );
    assert_eq!(e.intent(WEB).unwrap().state, IntentState::Released);
    let out = e.handle(3, inventory(&[(APP, "app.tar")]));
    assert!(history(&out, Action::ArchiveGone).is_empty());
}

#[test]
fn operator_pin_records_an_intent_durably_and_pins_cri_only() {
    let mut e = engine_with_two();
    let extra = record("docker.io/library/extra:1", Labels::new(), "sha256:cccc");
    let out = e.handle(10, Input::OperatorPin { record: extra });
    let save_at = out
        .iter()
        .position(|o| matches!(o, Output::Save { new: true, intent } if intent.origin == Origin::Operator))
        .expect("a new operator intent");
    let pin_at = out
        .iter()
        .position(|o| matches!(o, Output::Pin { .. }))
        .expect("a pin");
    assert!(save_at < pin_at, "recorded before pinned: {out:?}");
    assert_eq!(
        pins(&out),
        vec![(
            "docker.io/library/extra:1".to_string(),
            RestoreReason::Operator
        )]
    );
    let out = e.handle(
        11,
        Input::Pinned {
            name: "docker.io/library/extra:1".into(),
            result: Ok(()),
        },
    );
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::History(h) if h.action == Action::Pinned)));
    let view = e.view("docker.io/library/extra:1").unwrap();
    assert!(view.pinned_now && !view.at_risk());
    assert_eq!(
        view.intent.restores, 0,
        "an operator's pin is not a restore"
    );
    assert_eq!(view.archive, ArchiveState::None);
    // Its own event changes nothing; K3s's sweep does not touch a CRI-only pin, and if the
    // pin goes anyway it is restored (the intent is held).
    let out = e.handle(12, update("docker.io/library/extra:1", labels(&[CRI_PIN])));
    assert!(pins(&out).is_empty());
}

#[test]
fn operator_pin_of_a_pinned_image_writes_no_pin() {
    let mut e = engine_with_two();
    let out = e.handle(
        10,
        Input::OperatorPin {
            record: record(APP, both(), "sha256:aaaa"),
        },
    );
    assert!(pins(&out).is_empty());
    assert_eq!(e.intent(APP).unwrap().origin, Origin::Operator);
    assert_eq!(e.intent(APP).unwrap().state, IntentState::Held);
}

#[test]
fn operator_unpin_releases_and_removes_the_cri_pin_and_the_sweep_leaves_it() {
    let mut e = engine_with_two();
    e.handle(5, inventory(&[(WEB, "web.tar")]));
    let out = e.handle(
        10,
        Input::OperatorUnpin {
            name: APP.into(),
            record: Some(record(APP, both(), "sha256:aaaa")),
        },
    );
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Unpin { name } if name == APP)));
    assert_eq!(e.intent(APP).unwrap().state, IntentState::Released);
    // Its own event, then K3s's sweep: nothing is pinned again.
    let out = e.handle(11, update(APP, labels(&[K3S_PIN])));
    assert!(out.is_empty(), "{out:?}");
    let out = e.handle(20, update(APP, Labels::new()));
    assert!(pins(&out).is_empty(), "{out:?}");
    // The alias keeps its own intent and is restored (its archive is gone).
    let out = e.handle(21, update(ALIAS, Labels::new()));
    assert_eq!(
        pins(&out),
        vec![(ALIAS.to_string(), RestoreReason::ArchiveGone)]
    );
    let views = e.views();
    assert!(views
        .iter()
        .any(|v| v.intent.name == ALIAS && v.archive == ArchiveState::Gone));
}

#[test]
fn operator_unpin_of_an_image_without_intent_keeps_the_decision() {
    let mut e = engine_with_two();
    let name = "docker.io/library/other:1";
    let out = e.handle(
        10,
        Input::OperatorUnpin {
            name: name.into(),
            record: Some(record(name, labels(&[CRI_PIN]), "sha256:dddd")),
        },
    );
    assert!(out.iter().any(|o| matches!(o, Output::Unpin { .. })));
    assert_eq!(e.intent(name).unwrap().state, IntentState::Released);
    // Its own event does not bring the intent back; a pin put on again does.
    assert!(pins(&e.handle(11, update(name, Labels::new()))).is_empty());
    assert_eq!(e.intent(name).unwrap().state, IntentState::Released);
    // A live event is confirmed with a Get first: it may be a late delivery.
    let out = e.handle(12, update(name, labels(&[CRI_PIN])));
    assert_eq!(out, vec![Output::Fetch { name: name.into() }]);
    e.handle(
        13,
        Input::Fetched {
            name: name.into(),
            record: Some(record(name, labels(&[CRI_PIN]), "sha256:dddd")),
        },
    );
    assert_eq!(e.intent(name).unwrap().state, IntentState::Held);
}

#[test]
fn a_clone_decides_without_touching_the_original() {
    let mut e = engine_with_two();
    e.handle(5, inventory(&[(APP, "app.tar")]));
    let mut what_if = e.clone();
    let out = what_if.handle(
        10,
        Input::Listing {
            images: vec![
                record(APP, both(), "sha256:aaaa"),
                record(ALIAS, both(), "sha256:aaaa"),
                record(WEB, Labels::new(), "sha256:bbbb"),
            ],
            cause: ListCause::Connected,
        },
    );
    assert_eq!(
        pins(&out),
        vec![(WEB.to_string(), RestoreReason::ArchiveGone)]
    );
    assert_eq!(e.intent(WEB).unwrap().state, IntentState::Held);
    assert_eq!(what_if.intent(WEB).unwrap().state, IntentState::Swept);
}

#[test]
fn the_summary_says_what_the_views_say() {
    let mut e = engine_with_two();
    e.handle(1, inventory(&[(APP, "app.tar")]));
    e.handle(2, update(WEB, Labels::new()));
    e.handle(
        3,
        Input::Pinned {
            name: WEB.into(),
            result: Ok(()),
        },
    );
    e.handle(4, update(APP, Labels::new()));
    let views = e.views();
    let summary = e.summary();
    let at_risk: Vec<String> = views
        .iter()
        .filter(|v| v.at_risk())
        .map(|v| v.intent.name.to_string())
        .collect();
    assert_eq!(summary.at_risk, at_risk);
    assert_eq!(summary.at_risk, vec![APP.to_string()]);
    assert_eq!(
        summary.archives_gone,
        views
            .iter()
            .filter(|v| v.archive == ArchiveState::Gone && v.intent.state != IntentState::Released)
            .count()
    );
    assert_eq!(summary.archives_gone, 1);
    assert_eq!(summary.restores, 1);
    assert_eq!(summary.tally, e.tally());
    let only_web = e.views_of(|i| i.name == WEB);
    assert_eq!(only_web.len(), 1);
    assert_eq!(only_web[0].archive, ArchiveState::Gone);
}

#[test]
fn a_name_that_only_shares_the_digest_is_restored_at_once() {
    // Another tag of app's image, not K3s's `repo@digest` alias: K3s re-pins nothing of it.
    const RETAG: &str = "registry.example.com/mirror/app:1";
    let mut e = engine_with_two();
    e.handle(
        0,
        Input::Listing {
            images: vec![
                record(APP, both(), "sha256:aaaa"),
                record(ALIAS, both(), "sha256:aaaa"),
                record(RETAG, both(), "sha256:aaaa"),
                record(WEB, both(), "sha256:bbbb"),
            ],
            cause: ListCause::Connected,
        },
    );
    assert!(pins(&e.handle(1, update(ALIAS, Labels::new()))).is_empty());
    assert_eq!(
        pins(&e.handle(2, update(RETAG, Labels::new()))),
        vec![(RETAG.to_string(), RestoreReason::ArchiveGone)]
    );
    assert_eq!(e.archive_of(RETAG), None);
    assert_eq!(e.archive_of(ALIAS), Some(PathBuf::from("app.tar")));
}

#[test]
fn an_inventory_that_shows_an_archive_gone_restores_a_swept_image_at_once() {
    let mut e = engine_with_two();
    // The sweep comes while the last inventory still has web.tar ...
    assert!(pins(&e.handle(1, update(WEB, Labels::new()))).is_empty());
    // ... and the scan that ends next shows it deleted: no wait for the verification.
    let out = e.handle(2, inventory(&[(APP, "app.tar")]));
    assert_eq!(
        pins(&out),
        vec![(WEB.to_string(), RestoreReason::ArchiveGone)]
    );
}

fn forgotten(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Forget { name } => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

/// A tick whose Gets (the churn window's end asks whether a deleted record is really gone)
/// answer that the records are gone.
pub(super) fn tick_gone<N: Into<Now> + Copy>(e: &mut Engine, now: N) -> Vec<Output> {
    let mut out = e.handle(now, Input::Tick);
    let asked: Vec<String> = out
        .iter()
        .filter_map(|o| match o {
            Output::Fetch { name } => Some(name.to_string()),
            _ => None,
        })
        .collect();
    for name in asked {
        let record = None;
        out.extend(e.handle(now, Input::Fetched { name, record }));
    }
    out
}

/// Deletes `name` for good: released once the churn window is over.
fn delete_for_good(e: &mut Engine, at: Millis, name: &str) -> Millis {
    e.handle(at, event(EventKind::Delete, name, Labels::new()));
    e.handle(
        at,
        Input::Fetched {
            name: name.into(),
            record: None,
        },
    );
    let released = at + e.config().churn_window;
    tick_gone(e, released);
    assert_eq!(e.intent(name).unwrap().state, IntentState::Released);
    released
}

#[test]
fn a_released_intent_is_forgotten_after_the_retention_and_recorded_again_when_pinned() {
    let mut e = engine_with_two();
    let retention = e.config().retention;
    assert_eq!(retention, DEFAULT_RETENTION);
    let released = delete_for_good(&mut e, 1_000, WEB);
    // The release time is the intent's `since`, and the next wakeup is its forgetting.
    assert_eq!(e.intent(WEB).unwrap().since, released);
    assert_eq!(e.next_wakeup(), Some(released + retention));
    assert!(forgotten(&e.handle(released + retention - 1, Input::Tick)).is_empty());
    let out = e.handle(released + retention, Input::Tick);
    assert_eq!(forgotten(&out), [WEB]);
    assert!(e.intent(WEB).is_none());
    assert_eq!(e.next_wakeup(), None);
    assert_eq!(e.tally().released, 0);
    // Contract rule 1: seen pinned again, it is recorded like any new name.
    let later = released + retention + 5;
    let out = e.handle(later, event(EventKind::Create, WEB, both()));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Save { new: true, intent } if intent.name == WEB)));
    assert_eq!(e.intent(WEB).unwrap().state, IntentState::Held);
    assert_eq!(e.intent(WEB).unwrap().since, later);
    // Seen again without a pin, it stays unknown, as it would have stayed released.
    let mut f = engine_with_two();
    let released = delete_for_good(&mut f, 1_000, WEB);
    f.handle(released + retention, Input::Tick);
    assert!(f
        .handle(
            released + retention + 1,
            event(EventKind::Create, WEB, Labels::new())
        )
        .is_empty());
    assert!(f.intent(WEB).is_none());
}

#[test]
fn pinned_again_before_the_retention_the_intent_is_not_forgotten() {
    let mut e = engine_with_two();
    let retention = e.config().retention;
    let released = delete_for_good(&mut e, 1_000, WEB);
    e.handle(released + 10, event(EventKind::Create, WEB, both()));
    e.handle(
        released + 11,
        Input::Fetched {
            name: WEB.into(),
            record: Some(record(WEB, both(), "sha256:bbbb")),
        },
    );
    assert_eq!(e.intent(WEB).unwrap().state, IntentState::Held);
    assert_eq!(e.next_wakeup(), None);
    let out = e.handle(released + retention + 1, Input::Tick);
    assert!(forgotten(&out).is_empty());
    assert!(e.intent(WEB).is_some());
}

#[test]
fn a_released_intent_whose_record_keeps_k3s_label_stays_until_the_record_is_gone() {
    let mut e = engine_with_two();
    let retention = e.config().retention;
    // An operator removes the CRI pin only: K3s's label stays on the record.
    e.handle(100, update(WEB, labels(&[K3S_PIN])));
    e.handle(
        100,
        Input::Fetched {
            name: WEB.into(),
            record: Some(record(WEB, labels(&[K3S_PIN]), "sha256:bbbb")),
        },
    );
    assert_eq!(e.intent(WEB).unwrap().state, IntentState::Released);
    // Forgotten, it would be recorded and released again at every listing.
    assert_eq!(e.next_wakeup(), None);
    assert!(forgotten(&e.handle(100 + retention + 1, Input::Tick)).is_empty());
    // Its record is deleted: now it can go, a retention after its release.
    let out = e.handle(
        200 + retention,
        event(EventKind::Delete, WEB, Labels::new()),
    );
    assert!(out.iter().any(|o| matches!(o, Output::Save { .. })));
    assert_eq!(e.next_wakeup(), Some(100 + retention));
    assert_eq!(forgotten(&e.handle(200 + retention, Input::Tick)), [WEB]);
    // The same when a listing finds the record gone.
    let mut f = engine_with_two();
    f.handle(
        100,
        Input::OperatorUnpin {
            name: WEB.into(),
            record: Some(record(WEB, both(), "sha256:bbbb")),
        },
    );
    assert_eq!(f.next_wakeup(), None);
    f.handle(
        200,
        Input::Listing {
            images: vec![record(APP, both(), "sha256:aaaa")],
            cause: ListCause::Connected,
        },
    );
    assert_eq!(f.intent(WEB).unwrap().pins, Pins::default());
    f.handle(100 + retention, Input::Tick);
    assert!(f.intent(WEB).is_none());
}

#[test]
fn intents_past_their_retention_in_the_ledger_go_at_the_first_tick() {
    let mut e = engine_with_two();
    let retention = e.config().retention;
    delete_for_good(&mut e, 1_000, WEB);
    let intents: Vec<Intent> = e.intents().cloned().collect();
    // Restarted a week later.
    let mut e = Engine::new(Config::default(), intents);
    let due = e.next_wakeup().unwrap();
    assert!(due <= 1_000 + 3_000 + retention);
    assert_eq!(forgotten(&e.handle(7 * retention, Input::Tick)), [WEB]);
    assert_eq!(e.intents().count(), 2);
    assert_eq!(e.next_wakeup(), None);
}

/// 20,000 create+delete cycles of pinned images: with forgetting, the engine holds only the
/// intents released within the retention (issue 9, item 10).
#[test]
fn churn_does_not_accumulate_released_intents() {
    let config = Config {
        retention: 60_000,
        ..Config::default()
    };
    let mut e = Engine::new(config, []);
    e.handle(0, inventory(&[]));
    let mut now = 0;
    let mut most = 0;
    for n in 0..20_000u64 {
        now += 100;
        let name = format!("docker.io/library/churn:{n}");
        e.handle(now, event(EventKind::Create, &name, labels(&[CRI_PIN])));
        e.handle(
            now,
            Input::Fetched {
                name: name.clone(),
                record: Some(record(&name, labels(&[CRI_PIN]), "sha256:cccc")),
            },
        );
        e.handle(now + 1, event(EventKind::Delete, &name, Labels::new()));
        while let Some(at) = e.next_wakeup().filter(|at| *at <= now + 50) {
            tick_gone(&mut e, at);
        }
        most = most.max(e.intents().count());
    }
    // One release every 100 ms, kept 60 s (+ the 3 s churn window): about 630 at once.
    assert!(most <= 700, "{most}");
    while let Some(at) = e.next_wakeup() {
        tick_gone(&mut e, at);
    }
    assert_eq!(e.intents().count(), 0);
}

/// K3s's alias answered before the name it aliases: the alias still learns which archive
/// provides it, so that once the archive is deleted both count as gone (the flake of
/// tests/control.rs on containerd 2.x: `archives_gone` 1 instead of 2).
#[test]
fn an_alias_fetched_before_its_name_learns_its_archive() {
    let mut e = Engine::new(Config::default(), []);
    e.handle(0, inventory(&[(APP, "app.tar")]));
    e.handle(1, event(EventKind::Create, APP, Labels::new()));
    e.handle(2, update(APP, both()));
    e.handle(3, event(EventKind::Create, ALIAS, both()));
    e.handle(
        4,
        Input::Fetched {
            name: ALIAS.into(),
            record: Some(record(ALIAS, both(), "sha256:aaaa")),
        },
    );
    e.handle(
        5,
        Input::Fetched {
            name: APP.into(),
            record: Some(record(APP, both(), "sha256:aaaa")),
        },
    );
    assert_eq!(
        e.intent(ALIAS).and_then(|i| i.source.clone()),
        Some(PathBuf::from("app.tar"))
    );
    e.handle(6, inventory(&[]));
    assert_eq!(e.summary().archives_gone, 2);
}

mod deliveries;
mod policy;
mod verification;
mod vocabulary;

/// A listing larger than a part: its outputs are decided a part at a time as they are taken,
/// and are the same whole. Dropped after its first output, the rest is applied all the same.
#[test]
fn a_large_listing_is_applied_a_part_at_a_time() {
    let n = LISTING_PART * 2 + 7;
    let names: Vec<String> = (0..n)
        .map(|i| format!("docker.io/library/app{i:05}:1"))
        .collect();
    let listing = |l: fn() -> Labels| Input::Listing {
        images: names
            .iter()
            .map(|n| record(n, l(), "sha256:aaaa"))
            .collect(),
        cause: ListCause::Connected,
    };
    let mut e = Engine::new(Config::default(), []);
    e.handle(0, inventory(&[]));
    e.handle(0, listing(both));
    assert_eq!(e.intents.len(), n);
    let (mut whole, mut dropped) = (e.clone(), e);

    // Swept while pinkeeper was away: every one is restored, in listing order.
    let out = whole.handle(10, listing(Labels::new));
    let restored: Vec<String> = pins(&out).into_iter().map(|(name, _)| name).collect();
    assert_eq!(restored, names);

    let mut outputs = dropped.outputs(10, listing(Labels::new));
    let first = outputs.next().expect("the first part's outputs");
    let taken = outputs.ready.len() + 1;
    assert!(
        taken < out.len(),
        "only a part decided: {taken} of {}",
        out.len()
    );
    assert_eq!(first, out[0]);
    drop(outputs);
    assert_eq!(format!("{dropped:?}"), format!("{whole:?}"));
}
