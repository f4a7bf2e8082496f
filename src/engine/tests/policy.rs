//! Contract rule 9: images kept by the config's `keep` patterns.

use super::*;

const NGINX: &str = "docker.io/library/nginx:1.27";
const CRITICAL: &str = "registry.local/critical/db:5";

fn kept(patterns: &[&str]) -> Engine {
    let config = Config {
        keep: Keep::new(patterns),
        ..Config::default()
    };
    let mut e = Engine::new(config, []);
    e.handle(0, inventory(&[(APP, "app.tar")]));
    e
}

fn pinned_ok(e: &mut Engine, at: Millis, name: &str) -> Vec<Output> {
    e.handle(
        at,
        Input::Pinned {
            name: name.into(),
            result: Ok(()),
        },
    )
}

fn actions(out: &[Output]) -> Vec<Action> {
    out.iter()
        .filter_map(|o| match o {
            Output::History(h) => Some(h.action.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_image_pulled_without_a_pin_is_pinned_by_the_pattern_that_matches_it() {
    let mut e = kept(&["registry.local/critical/*", "docker.io/library/nginx:*"]);
    // CRI pulls it: created with CRI's own labels, no pin.
    let out = e.handle(5, event(EventKind::Create, NGINX, Labels::new()));
    assert!(out.iter().any(
        |o| matches!(o, Output::Save { new: true, intent } if intent.origin == Origin::Policy)
    ));
    assert_eq!(pins(&out), [(NGINX.to_string(), RestoreReason::Policy)]);
    // Durable before the pin goes out.
    let commit = out.iter().position(|o| *o == Output::Commit).unwrap();
    let pin = out
        .iter()
        .position(|o| matches!(o, Output::Pin { .. }))
        .unwrap();
    assert!(commit < pin);
    // A first pin, not a restore.
    let out = pinned_ok(&mut e, 6, NGINX);
    assert_eq!(actions(&out), [Action::Pinned]);
    let intent = e.intent(NGINX).unwrap();
    assert_eq!((intent.state, intent.restores), (IntentState::Held, 0));
    assert!(intent.pins.cri);
    let view = e.view(NGINX).unwrap();
    assert_eq!(view.kept_by.as_deref(), Some("docker.io/library/nginx:*"));
    // An image no pattern matches is left alone.
    let out = e.handle(7, event(EventKind::Create, WEB, Labels::new()));
    assert!(out.is_empty(), "{out:?}");
    assert!(e.intent(WEB).is_none());
}

#[test]
fn a_kept_image_is_restored_after_the_sweep_even_while_its_archive_is_there() {
    let mut e = kept(&["docker.io/library/app:*"]);
    e.handle(
        1,
        Input::Listing {
            images: vec![record(APP, both(), "sha256:aaaa")],
            cause: ListCause::Connected,
        },
    );
    assert_eq!(e.intent(APP).unwrap().origin, Origin::SeenPinned);
    // app.tar is still there: without the policy the restore would wait for K3s.
    let out = e.handle(1000, update(APP, Labels::new()));
    assert_eq!(pins(&out), [(APP.to_string(), RestoreReason::Policy)]);
    assert_eq!(e.intent(APP).unwrap().state, IntentState::Swept);
    let out = pinned_ok(&mut e, 1001, APP);
    assert_eq!(actions(&out), [Action::Restored]);
    assert_eq!(e.intent(APP).unwrap().restores, 1);
    // K3s's re-import pins it again, both labels: nothing more to do.
    let out = e.handle(1200, update(APP, both()));
    assert!(pins(&out).is_empty());
    // The episode's summary counts it as kept by policy.
    let due = e.next_wakeup().expect("the verification");
    assert_eq!(e.handle(due, Input::Tick), [Output::Verify]);
    let out = e.handle(
        due + 1,
        Input::Listing {
            images: vec![record(APP, both(), "sha256:aaaa")],
            cause: ListCause::Verify,
        },
    );
    let summary = out.iter().find_map(|o| match o {
        Output::SweepSummary(s) => Some(s.clone()),
        _ => None,
    });
    let summary = summary.expect("a summary");
    assert_eq!(
        (summary.swept, summary.restored_policy, summary.restored()),
        (1, 1, 1)
    );
}

#[test]
fn someone_elses_unpin_of_a_kept_image_is_put_back_and_pinkeepers_is_refused() {
    let mut e = kept(&[CRITICAL]);
    e.handle(5, event(EventKind::Create, CRITICAL, Labels::new()));
    pinned_ok(&mut e, 6, CRITICAL);
    e.handle(7, update(CRITICAL, labels(&[CRI_PIN])));
    // `ctr images label ... io.cri-containerd.pinned=`: pinned again, no Get to confirm.
    let out = e.handle(10, update(CRITICAL, Labels::new()));
    assert_eq!(pins(&out), [(CRITICAL.to_string(), RestoreReason::Policy)]);
    assert!(!out.iter().any(|o| matches!(o, Output::Fetch { .. })));
    assert_eq!(e.intent(CRITICAL).unwrap().state, IntentState::Held);
    pinned_ok(&mut e, 11, CRITICAL);
    // `pinkeeper unpin` (the daemon refuses it first): the engine changes nothing.
    let out = e.handle(
        20,
        Input::OperatorUnpin {
            name: CRITICAL.into(),
            record: Some(record(CRITICAL, labels(&[CRI_PIN]), "sha256:cccc")),
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(e.intent(CRITICAL).unwrap().state, IntentState::Held);
}

#[test]
fn a_listing_pins_kept_images_it_finds_unpinned_and_released_ones_come_back() {
    let mut e = kept(&["*/critical/*"]);
    let released = Intent {
        released_because: Some("an operator ran `pinkeeper unpin`".into()),
        ..Intent::bare(CRITICAL, IntentState::Released, Origin::SeenPinned)
    };
    e = Engine::new(e.config().clone(), [released]);
    let out = e.handle(
        1,
        Input::Listing {
            images: vec![
                record(CRITICAL, Labels::new(), "sha256:cccc"),
                record(WEB, labels(&[K3S_PIN]), "sha256:bbbb"),
            ],
            cause: ListCause::Connected,
        },
    );
    assert_eq!(pins(&out), [(CRITICAL.to_string(), RestoreReason::Policy)]);
    let intent = e.intent(CRITICAL).unwrap();
    assert_eq!(
        (intent.state, intent.origin),
        (IntentState::Held, Origin::Policy)
    );
}

#[test]
fn removing_a_pattern_releases_what_it_alone_held() {
    let mut e = kept(&[CRITICAL, "docker.io/library/app:*"]);
    e.handle(5, event(EventKind::Create, CRITICAL, Labels::new()));
    pinned_ok(&mut e, 6, CRITICAL);
    e.handle(
        7,
        Input::Listing {
            images: vec![
                record(CRITICAL, labels(&[CRI_PIN]), "sha256:cccc"),
                record(APP, both(), "sha256:aaaa"),
            ],
            cause: ListCause::Connected,
        },
    );
    // A reload is applied by a verification's listing, which reads every record.
    assert!(e
        .handle(100, Input::Keep(Keep::new::<&str>(&[])))
        .is_empty());
    let due = e.next_wakeup().expect("a verification is due");
    assert_eq!(e.handle(due, Input::Tick), [Output::Verify]);
    let out = e.handle(
        due + 1,
        Input::Listing {
            images: vec![
                record(CRITICAL, labels(&[CRI_PIN]), "sha256:cccc"),
                record(APP, both(), "sha256:aaaa"),
            ],
            cause: ListCause::Verify,
        },
    );
    // The policy's own intent: released (on disk first), then its CRI pin removed.
    let commit = out.iter().position(|o| *o == Output::Commit).unwrap();
    let unpin = out
        .iter()
        .position(|o| {
            *o == Output::Unpin {
                name: CRITICAL.into(),
            }
        })
        .unwrap();
    assert!(commit < unpin, "{out:?}");
    let critical = e.intent(CRITICAL).unwrap();
    assert_eq!(critical.state, IntentState::Released);
    assert_eq!(
        critical.released_because.as_deref(),
        Some("no keep pattern of the config matches it any more")
    );
    // K3s pins APP: the pattern was not all that held it.
    assert_eq!(e.intent(APP).unwrap().state, IntentState::Held);
    assert_eq!(e.view(APP).unwrap().kept_by, None);
    // Its unpin's event changes nothing further; a new pattern finds it by a listing.
    assert!(e
        .handle(due + 2, update(CRITICAL, Labels::new()))
        .is_empty());
    e.handle(due + 100, Input::Keep(Keep::new(&["registry.local/*"])));
    let due = e.next_wakeup().expect("a verification is due");
    assert_eq!(e.handle(due, Input::Tick), [Output::Verify]);
    let out = e.handle(
        due + 1,
        Input::Listing {
            images: vec![
                record(CRITICAL, Labels::new(), "sha256:cccc"),
                record(APP, both(), "sha256:aaaa"),
            ],
            cause: ListCause::Verify,
        },
    );
    assert_eq!(pins(&out), [(CRITICAL.to_string(), RestoreReason::Policy)]);
}

#[test]
fn a_kept_policy_intent_k3s_pins_too_stays_when_its_pattern_goes() {
    let mut e = kept(&["docker.io/library/app:*"]);
    e.handle(5, event(EventKind::Create, APP, Labels::new()));
    pinned_ok(&mut e, 6, APP);
    assert_eq!(e.intent(APP).unwrap().origin, Origin::Policy);
    // K3s imports it since: both labels. The policy no longer holds it alone.
    e.handle(7, update(APP, both()));
    assert_eq!(e.intent(APP).unwrap().origin, Origin::SeenPinned);
    e.handle(100, Input::Keep(Keep::new::<&str>(&[])));
    let out = e.handle(
        5000,
        Input::Listing {
            images: vec![record(APP, both(), "sha256:aaaa")],
            cause: ListCause::Verify,
        },
    );
    assert!(
        !out.iter().any(|o| matches!(o, Output::Unpin { .. })),
        "{out:?}"
    );
    let app = e.intent(APP).unwrap();
    assert_eq!(
        (app.state, app.origin),
        (IntentState::Held, Origin::SeenPinned)
    );
}

#[test]
fn a_start_with_the_pattern_gone_keeps_what_the_policy_held() {
    // The ledger says the policy held CRITICAL, and its pin was never seen done; the config
    // read at this start has no pattern. Only a reload releases: the ledger may be older
    // than the record (simulation seeds 4499, 3272).
    let held = Intent::bare(CRITICAL, IntentState::Held, Origin::Policy);
    let mut e = Engine::new(Config::default(), [held]);
    let out = e.handle(
        1,
        Input::Listing {
            images: vec![record(CRITICAL, Labels::new(), "sha256:cccc")],
            cause: ListCause::Connected,
        },
    );
    assert_eq!(pins(&out), [(CRITICAL.to_string(), RestoreReason::Policy)]);
    assert_eq!(e.intent(CRITICAL).unwrap().state, IntentState::Held);
    assert_eq!(e.view(CRITICAL).unwrap().kept_by, None);
}
