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
                replay.ledger().contains_key(name),
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

#[test]
fn every_fixture_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 8, "fixtures missing from {}", dir.display());
    for path in &paths {
        let mut replay = run_fixture(path);
        check_invariants(path, &replay);
        check_idempotent(path, &mut replay);
    }
}
