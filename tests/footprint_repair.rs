//! The heap a repair takes beyond what the engine keeps, counted by a counting allocator (not
//! RSS, which depends on the allocator's arenas and the machine, so this cannot flake): the
//! engine holding 10,000 intents whose archives are gone reads the listing of a sweep it
//! missed (every record without its pins) and its outputs are taken one at a time, as the
//! executor takes them. The most bytes live at once, beyond what the engine held before, is the
//! repair's peak: the listing's records (given back a part at a time as they are applied), the
//! restores, history lines and ledger records it decides, and what it keeps to decide them
//! (which images the episode swept, the pins in flight, the names listed).
//!
//! The figure is printed; the test fails when it grows past the budget. The count is global to
//! the process, so this binary holds this one test.

use pinkeeper::engine::{
    Config, Engine, ImageRecord, Input, Labels, ListCause, Output, CRI_PIN, K3S_PIN, PINNED,
};

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

const IMAGES: usize = 10_000;

/// Heap bytes per swept image a repair holds at its peak, beyond what the engine held.
const BUDGET_PER_IMAGE: isize = 330;

fn records(pinned: bool) -> Vec<ImageRecord> {
    (0..IMAGES)
        .map(|i| {
            let labels: Labels = if pinned {
                [K3S_PIN, CRI_PIN]
                    .iter()
                    .map(|k| (k.to_string(), PINNED.to_string()))
                    .collect()
            } else {
                Labels::default()
            };
            ImageRecord {
                name: format!("docker.io/rancher/mirrored-library-app-{i:05}:1.36.1"),
                labels,
                digest: Some(format!("sha256:{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15)),
            }
        })
        .collect()
}

#[test]
fn heap_bytes_a_repair_holds_at_its_peak() {
    let mut engine = Engine::new(Config::default(), []);
    // The images directory read, empty: every archive is gone.
    drop(engine.handle(0, Input::Inventory(Default::default())));
    let listing = |pinned| Input::Listing {
        images: records(pinned),
        cause: ListCause::Connected,
    };
    drop(engine.handle(1, listing(true)));
    assert_eq!(engine.intents().count(), IMAGES);
    // The sweep, missed: the next connection's listing finds every pin gone.
    let before = counting::live();
    counting::reset_peak();
    let swept = listing(false);
    let records = counting::live() - before;
    let mut pins = 0;
    for output in engine.outputs(2, swept) {
        if matches!(output, Output::Pin { .. }) {
            pins += 1;
        }
        drop(output);
    }
    assert_eq!(
        pins, IMAGES,
        "every swept image of a gone archive is restored"
    );
    let peak = counting::peak() - before;
    let per_image = peak / IMAGES as isize;
    eprintln!(
        "repair: {peak} heap bytes at its peak beyond what the engine held, for {IMAGES} swept \
         images ({per_image} per image, budget {BUDGET_PER_IMAGE}; the listing's records alone \
         {records})"
    );
    assert!(
        per_image <= BUDGET_PER_IMAGE,
        "{per_image} heap bytes per swept image at the repair's peak, over the budget of \
         {BUDGET_PER_IMAGE}"
    );
}
