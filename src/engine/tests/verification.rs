//! When the verification after a start-up comes: put off by K3s's import burst, not by CRI's
//! own events or for ever, and never without a connection to list with.

use super::*;

#[test]
fn verification_cannot_be_put_off_forever() {
    let mut e = engine_with_two();
    e.handle(0, update(APP, Labels::new()));
    for t in (1000..200_000).step_by(1000) {
        // K3s importing the same image again and again.
        e.handle(t, update("busy", both()));
        e.handle(t, update("busy", Labels::new()));
    }
    assert_eq!(e.next_wakeup(), Some(Config::default().settle_max));
}

/// CRI labels every image it manages, at its start and whenever it reads one: thousands of
/// events that change no pin, for images pinkeeper holds no intent for and for those it holds,
/// which put the verification off by up to `settle_max` (two minutes) on containerd 2.1 with
/// 10,000 images.
#[test]
fn events_that_change_no_pin_do_not_put_the_verification_off() {
    let mut e = engine_with_two();
    e.handle(0, update(APP, Labels::new()));
    let due = Some(Config::default().settle);
    assert_eq!(e.next_wakeup(), due);
    let mut managed = both();
    managed.insert("io.cri-containerd.image".into(), "managed".into());
    for t in 1..2_000 {
        let name = format!("docker.io/library/pulled-{t}:1");
        e.handle(t, event(EventKind::Create, &name, Labels::new()));
        e.handle(t, update(&name, labels(&["io.cri-containerd.image"])));
        e.handle(t, event(EventKind::Delete, &name, Labels::new()));
        e.handle(t, update(WEB, managed.clone()));
    }
    assert_eq!(e.next_wakeup(), due);
    assert_eq!(
        e.handle(Config::default().settle, Input::Tick),
        vec![Output::Verify]
    );
}

/// Found by the replay running on the daemon's executor (a verification asked for while
/// disconnected never gets its listing): a verification in flight made `next_wakeup` answer a
/// time already past for as long as the listing took, and the daemon's loop spun on ticks.
#[test]
fn a_verification_in_flight_asks_for_no_wakeup() {
    let mut e = engine_with_two();
    e.handle(10, inventory(&[(APP, "app.tar")]));
    e.handle(1000, update(APP, Labels::new()));
    let due = e.next_wakeup().expect("a verification is due");
    assert_eq!(e.handle(due, Input::Tick), vec![Output::Verify]);
    // More of the start-up burst while the verification's listing is awaited.
    e.handle(due + 1, update(WEB, Labels::new()));
    // The listing is slow (a scan of the images directory first): time passes.
    let later = due + 1 + Config::default().settle_max;
    assert!(e.handle(later, Input::Tick).is_empty());
    let wakeup = e.next_wakeup();
    assert!(
        wakeup.is_none_or(|at| at > later),
        "nothing can fire before the listing comes: {wakeup:?}"
    );
}

/// A verification due (or asked for) while containerd is away waits for the connection: its
/// listing cannot be taken, and an engine waiting for it would never verify again.
#[test]
fn a_verification_waits_for_the_connection() {
    let mut e = engine_with_two();
    e.handle(10, inventory(&[(APP, "app.tar")]));
    e.handle(1000, update(APP, Labels::new()));
    let due = e.next_wakeup().expect("a verification is due");
    assert_eq!(e.handle(due, Input::Tick), vec![Output::Verify]);
    // The stream breaks before the verification's listing.
    e.handle(due + 1, Input::Disconnected);
    assert_eq!(e.next_wakeup(), None, "nothing to do while away");
    assert!(e.handle(due + 60_000, Input::Tick).is_empty());
    // Connected again: the verification is asked again after the connection's listing.
    e.handle(
        due + 60_001,
        Input::Listing {
            images: vec![record(APP, Labels::new(), "sha256:aaaa")],
            cause: ListCause::Connected,
        },
    );
    let again = e.next_wakeup().expect("the verification is due again");
    assert!(again <= due + 60_001 + Config::default().settle);
    assert!(e.handle(again, Input::Tick).contains(&Output::Verify));
}
