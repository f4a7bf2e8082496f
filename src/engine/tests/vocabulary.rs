//! The engine's words as others read them: history actions on the wire, the pin rule, the
//! at-risk rule, and an intent as older ledgers stored it.

use super::*;
use crate::engine::pins;

/// Every action the engine (and the daemon) writes, with the word stored in ledgers since the
/// first release: these must never change, or old ledgers and replay fixtures read otherwise.
const WIRE: [(Action, &str); 10] = [
    (Action::Recorded, "recorded"),
    (Action::Swept, "swept"),
    (Action::Restored, "restored"),
    (Action::RestoreFailed, "restore-failed"),
    (Action::Released, "released"),
    (Action::Repinned, "repinned"),
    (Action::Pinned, "pinned"),
    (Action::ArchiveGone, "archive-gone"),
    (Action::OperatorPin, "operator-pin"),
    (Action::LedgerRecovered, "ledger-recovered"),
];

#[test]
fn actions_keep_their_wire_form() {
    for (action, word) in WIRE {
        assert_eq!(action.as_str(), word);
        assert_eq!(action.to_string(), word);
        assert_eq!(String::from(action.clone()), word);
        assert_eq!(Action::from(word), action);
        assert_eq!(word.parse::<Action>(), Ok(action.clone()));
        assert_eq!(
            serde_json::to_string(&action).unwrap(),
            format!("\"{word}\"")
        );
    }
}

#[test]
fn a_ledgers_history_entry_reads_and_writes_back_byte_identical() {
    let stored = r#"{"at":1700000000000,"name":"docker.io/library/app:1","action":"restore-failed","detail":"containerd busy"}"#;
    let entry: HistoryEntry = serde_json::from_str(stored).unwrap();
    assert_eq!(entry.action, Action::RestoreFailed);
    assert_eq!(serde_json::to_string(&entry).unwrap(), stored);
}

#[test]
fn an_unknown_action_reads_as_other_and_keeps_its_word() {
    let stored = r#"{"at":1,"name":"a","action":"forgotten-by-a-later-version","detail":""}"#;
    let entry: HistoryEntry = serde_json::from_str(stored).unwrap();
    assert_eq!(
        entry.action,
        Action::Other("forgotten-by-a-later-version".into())
    );
    assert_eq!(entry.action.as_str(), "forgotten-by-a-later-version");
    assert_eq!(serde_json::to_string(&entry).unwrap(), stored);
    // Not a string at all: an error, not a panic (the ledger skips such an entry).
    assert!(
        serde_json::from_str::<HistoryEntry>(r#"{"at":1,"name":"a","action":7,"detail":""}"#)
            .is_err()
    );
}

#[test]
fn pins_count_only_the_pin_labels_with_their_value() {
    let labels = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let both = labels(&[(K3S_PIN, PINNED), (CRI_PIN, PINNED)]);
    assert_eq!(
        pins(&both, K3S_PIN),
        Pins {
            program: true,
            cri: true
        }
    );
    let rke2 = "io.cattle.rke2.pinned";
    assert_eq!(
        pins(&both, rke2),
        Pins {
            program: false,
            cri: true
        }
    );
    let odd = labels(&[(K3S_PIN, "yes"), ("io.cri.containerd.pinned", PINNED)]);
    assert_eq!(pins(&odd, K3S_PIN), Pins::default());
    assert!(!pins(&odd, K3S_PIN).any());
    assert!(pins(&labels(&[(rke2, PINNED)]), rke2).any());
    assert_eq!(cri_pinned(&both), pins(&both, rke2).cri);
}

#[test]
fn the_at_risk_rule() {
    use IntentState::*;
    assert_eq!(risk(Held, true, true), None);
    assert_eq!(risk(Held, false, true), Some(Risk::Unpinned));
    assert_eq!(risk(Swept, false, true), Some(Risk::Unpinned));
    assert_eq!(risk(Held, true, false), Some(Risk::Gone));
    assert_eq!(risk(Swept, false, false), Some(Risk::Gone));
    assert_eq!(risk(Released, false, false), None);
    assert!(Held.keeps_pinned() && Swept.keeps_pinned() && !Released.keeps_pinned());
}

#[test]
fn states_and_reasons_show_their_serde_form() {
    for state in [IntentState::Held, IntentState::Swept, IntentState::Released] {
        let serde = serde_json::to_string(&state).unwrap();
        assert_eq!(serde, format!("\"{}\"", state.as_str()));
    }
    for reason in [
        RestoreReason::ArchiveGone,
        RestoreReason::NotRepinned,
        RestoreReason::Operator,
    ] {
        let serde = serde_json::to_string(&reason).unwrap();
        assert_eq!(serde, format!("\"{}\"", reason.as_str()));
    }
}

/// Ledgers before 0.x kept each intent's whole label map: it is read into the pins, with the
/// program's own label (RKE2's here), and never written again.
#[test]
fn an_intent_from_an_older_ledger_keeps_its_pins() {
    const RKE2_PIN: &str = "io.cattle.rke2.pinned";
    let engine = engine_with_two();
    let mut old = serde_json::to_value(engine.intent(APP).unwrap()).unwrap();
    let fields = old.as_object_mut().unwrap();
    fields.remove("pins");
    fields.insert(
        "labels".into(),
        serde_json::json!({RKE2_PIN: PINNED, "io.cri-containerd.image": "managed"}),
    );
    let intent: Intent = serde_json::from_value(old).unwrap();
    let config = Config {
        program_label: RKE2_PIN.into(),
        ..Config::default()
    };
    let e = Engine::new(config, [intent]);
    let read = e.intent(APP).unwrap();
    assert_eq!(
        read.pins,
        Pins {
            program: true,
            cri: false
        }
    );
    assert_eq!(read.legacy_labels, None);
    let written = serde_json::to_value(read).unwrap();
    assert!(written.get("labels").is_none(), "{written}");
}
