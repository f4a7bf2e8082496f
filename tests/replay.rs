//! Event-replay tests: every fixture under `tests/fixtures/` runs through the engine against the
//! in-memory containerd, and its `expect` lines must hold.

use std::path::Path;

use pinkeeper::engine::{Config, Output};
use pinkeeper::replay::Replay;

fn run_fixture(path: &Path) -> Replay {
    let text = std::fs::read_to_string(path).expect("fixture readable");
    let mut replay = Replay::new(Config::default());
    if let Err(e) = replay.run(&text) {
        panic!("{}: {e}\nhistory:\n{:#?}", path.display(), replay.history());
    }
    replay
}

/// Invariants every story must keep, whatever its expectations.
fn check_invariants(path: &Path, replay: &Replay) {
    for (_, output) in &replay.decisions {
        if let Output::Pin { name, .. } = output {
            // Only images with a recorded intent are ever pinned.
            assert!(
                replay.ledger().contains_key(name.as_str()),
                "{}: pinned {name} without an intent",
                path.display()
            );
        }
    }
}

/// Contract rule 8: once a story is over, reconnecting (a listing) and letting every timer fire
/// changes nothing further.
fn check_idempotent(path: &Path, replay: &mut Replay) {
    let store = replay.store.images();
    let pins = replay.pins_written.len();
    for _ in 0..2 {
        replay.connect();
        replay.settle();
    }
    assert_eq!(
        replay.pins_written.len(),
        pins,
        "{}: pinned again",
        path.display()
    );
    assert_eq!(
        replay.store.images(),
        store,
        "{}: labels changed",
        path.display()
    );
}

fn replays(file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    let mut replay = run_fixture(&path);
    check_invariants(&path, &replay);
    check_idempotent(&path, &mut replay);
}

/// One test per fixture, so that each failure is named; [`every_fixture_has_its_test`] keeps
/// the list and the directory in step.
macro_rules! fixtures {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                replays($file);
            }
        )*
        const FIXTURES: &[&str] = &[$($file),*];
    };
}

fixtures! {
    alias_churn => "alias-churn.jsonl",
    duplicates_reordered => "duplicates-reordered.jsonl",
    late_alias_delete => "late-alias-delete.jsonl",
    missed_sweep_1_7_cachebug => "missed-sweep-1.7-cachebug.jsonl",
    missed_sweep_1_7_plain => "missed-sweep-1.7-plain.jsonl",
    missed_sweep_2_1_cachebug => "missed-sweep-2.1-cachebug.jsonl",
    missed_sweep_2_1_plain => "missed-sweep-2.1-plain.jsonl",
    never_pinned => "never-pinned.jsonl",
    operator_unpin => "operator-unpin.jsonl",
    release_keeps_last_labels => "release-keeps-last-labels.jsonl",
    restart_1_7_cachebug => "restart-1.7-cachebug.jsonl",
    restart_1_7_plain => "restart-1.7-plain.jsonl",
    restart_2_1_cachebug => "restart-2.1-cachebug.jsonl",
    restart_2_1_plain => "restart-2.1-plain.jsonl",
    unpin_races_sweep => "unpin-races-sweep.jsonl",
    unpinned_before_pinkeeper => "unpinned-before-pinkeeper.jsonl",
    whole_map_writer => "whole-map-writer.jsonl",
}

#[test]
fn every_fixture_has_its_test() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.ends_with(".jsonl"))
        .collect();
    found.sort();
    assert_eq!(
        found,
        FIXTURES,
        "every fixture in {} needs a line in the fixtures! list of tests/replay.rs",
        dir.display()
    );
}
