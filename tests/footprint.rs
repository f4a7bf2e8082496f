//! Heap bytes per intent, counted by a counting allocator (not RSS, which depends on the
//! allocator's arenas and the machine, so this cannot flake): the engine holding 10,000
//! intents of K3s's imports (a tag and its `repo@digest` alias per image, both pins and CRI's
//! own label on each record, one archive per image), as a node has after a listing.
//!
//! The figure is printed; the test fails when it grows past the budget. The count is global to
//! the process, so this binary holds this one test.

use std::path::PathBuf;

use pinkeeper::engine::{
    Config, Engine, ImageRecord, Input, Labels, ListCause, Output, CRI_PIN, K3S_PIN, PINNED,
};

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

const IMAGES: usize = 5_000;

/// Heap bytes the engine keeps per intent once it has read the directory and a listing.
const BUDGET_PER_INTENT: isize = 720;

fn node() -> (Input, Vec<ImageRecord>) {
    let mut provided = Vec::new();
    let mut records = Vec::new();
    for i in 0..IMAGES {
        let name = format!("docker.io/rancher/mirrored-library-app-{i:05}:1.36.1");
        let digest = format!("sha256:{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15);
        let alias = format!("docker.io/rancher/mirrored-library-app-{i:05}@{digest}");
        let file = PathBuf::from(format!(
            "/var/lib/rancher/k3s/agent/images/app-{i:05}.tar.zst"
        ));
        let labels: Labels = [K3S_PIN, CRI_PIN, "io.cri-containerd.image"]
            .iter()
            .map(|k| {
                let v = if k.ends_with(".image") {
                    "managed"
                } else {
                    PINNED
                };
                (k.to_string(), v.to_string())
            })
            .collect();
        provided.push((name.clone(), file.clone()));
        provided.push((alias.clone(), file));
        for n in [name, alias] {
            records.push(ImageRecord {
                name: n,
                labels: labels.clone(),
                digest: Some(digest.clone()),
            });
        }
    }
    (Input::Inventory(provided.into_iter().collect()), records)
}

#[test]
fn heap_bytes_per_intent() {
    let before = counting::live();
    let engine = {
        let (inventory, images) = node();
        let mut engine = Engine::new(Config::default(), []);
        drop(engine.handle(0, inventory));
        let cause = ListCause::Connected;
        drop(engine.handle(1, Input::Listing { images, cause }));
        engine
    };
    let kept = counting::live() - before;
    // The same listing again (a verification, a reconnect): nothing changed, so the engine
    // saves nothing and keeps what it holds. Replacing names or files with equal copies would
    // put them among the listing's short-lived allocations, where the heap cannot give the
    // pages back (measured: 4.4 MiB more resident at 10,000 intents, when digests were
    // strings).
    let held = |engine: &Engine| -> Vec<*const u8> {
        engine
            .intents()
            .flat_map(|i| {
                let source = i.source.as_ref().map(|s| s.as_os_str().as_encoded_bytes());
                [Some(i.name.as_ptr()), source.map(<[u8]>::as_ptr)]
            })
            .flatten()
            .collect()
    };
    let mut engine = engine;
    assert!(engine.intents().all(|i| i.digest.is_some()));
    let before = held(&engine);
    assert_eq!(before.len(), 4 * IMAGES);
    let (_, images) = node();
    let cause = ListCause::Verify;
    let outputs = engine.handle(2, Input::Listing { images, cause });
    assert!(!outputs.iter().any(|o| matches!(o, Output::Save { .. })));
    assert!(
        held(&engine) == before,
        "a listing that changed nothing replaced the names or files the engine holds"
    );
    let intents = engine.intents().count() as isize;
    assert_eq!(intents, 2 * IMAGES as isize);
    let per_intent = kept / intents;
    eprintln!(
        "engine: {kept} heap bytes for {intents} intents ({per_intent} per intent, budget {BUDGET_PER_INTENT})"
    );
    assert!(
        per_intent <= BUDGET_PER_INTENT,
        "{per_intent} heap bytes per intent, over the budget of {BUDGET_PER_INTENT}"
    );
    drop(engine);
}
