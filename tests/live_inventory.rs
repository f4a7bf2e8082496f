//! The live images directory, against real containerd daemons: archives deleted and added while
//! K3s runs are known to pinkeeper at once (inotify, debounced like K3s's two seconds), and
//! change nothing until K3s's next start. The `pinkeeper` binary runs as its own process, as
//! on a node; "K3s" is the testkit's emulator.

mod common;

use common::{APP, WEB};
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use common::{action, actions, has_entry, Action, Node};
use pinkeeper_testkit::archive::{write_archive, Layout, TestImage};
use pinkeeper_testkit::{ImageInfo, Version, CRI_PIN_LABEL, K3S_PIN_LABEL};

const EXTRA: &str = "docker.io/library/extra:7";
/// Long, so that a restore after the settle would be told apart from one at the sweep.
const SETTLE_MS: u64 = 3000;
/// The history's entry for an archive deleted at runtime.
const GONE: Action = Action::ArchiveGone;

const ARCHIVES: &[common::Archive<'static>] = common::APP_AND_WEB;

/// pinkeeper is up, has recorded what K3s pinned, and its watch is armed and settled.
async fn boot(version: Version, pinned: usize) -> Result<Node> {
    let mut node = Node::new(version, ARCHIVES, false, SETTLE_MS).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    node.wait_recorded(pinned).await?;
    // The watch reads the directory once after it is armed (after the read at connection):
    // wait for that, so the change under test is a burst of its own.
    node.wait_scans_after(1).await?;
    Ok(node)
}

/// `name` and its `repo@digest` alias.
fn with_alias(images: &BTreeMap<String, ImageInfo>, name: &str) -> Result<Vec<String>> {
    let info = images
        .get(name)
        .with_context(|| format!("{name} missing"))?;
    let repo = name.rsplit_once(':').map_or(name, |(r, _)| r);
    let alias = format!("{repo}@{}", info.digest);
    ensure!(images.contains_key(&alias), "{alias} missing");
    Ok(vec![name.to_string(), alias])
}

/// How many entries of `name`'s history have `action`.
fn actions_of(history: &[serde_json::Value], name: &str, want: Action) -> usize {
    history
        .iter()
        .filter(|e| e["name"] == name && action(e) == want)
        .count()
}

fn pins(images: &BTreeMap<String, ImageInfo>, name: &str) -> (bool, bool) {
    images.get(name).map_or((false, false), |i| {
        (i.has(K3S_PIN_LABEL), i.has(CRI_PIN_LABEL))
    })
}

on_every_version!(an_archive_deleted_at_runtime_is_known_before_the_next_start);

/// An archive deleted while K3s runs: pinkeeper notes it within the debounce, unpins nothing,
/// and at K3s's next start restores the image right at the sweep (not after the settle).
async fn an_archive_deleted_at_runtime_is_known_before_the_next_start(
    version: Version,
) -> Result<()> {
    let mut node = boot(version, 4).await?;
    let web = with_alias(&node.images().await?, WEB)?;

    let deleted = Instant::now();
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.wait_history("web's archive gone in the history", None, |h| {
        web.iter().all(|n| has_entry(h, n, GONE))
    })
    .await?;
    // A figure, not asserted (the debounce is two seconds of quiet).
    eprintln!(
        "{}: the deletion was noticed after {:?}",
        version.name(),
        deleted.elapsed()
    );

    // K3s unpins nothing at runtime, and neither does pinkeeper (the read that found the
    // archive gone is applied: whatever it decided is done).
    let images = node.images().await?;
    for name in &web {
        ensure!(pins(&images, name) == (true, true), "{name}: {images:?}");
    }
    ensure!(actions(&node.history(None)?, Action::Restored) == 0);

    let swept_before = node.last_sweep_started()?;
    node.restart_k3s().await?;
    let after = node
        .wait_until("web's pins restored", |images| {
            web.iter().all(|n| pins(images, n) == (false, true))
        })
        .await?;
    ensure!(pins(&after, APP) == (true, true), "K3s re-pins app itself");
    // At the sweep, because the archive is gone, not by the verification after the settle.
    let sweep = node.wait_sweep_after(swept_before).await?;
    ensure!(
        sweep["restored_archive_gone"] == 2 && sweep["restored_not_repinned"] == 0,
        "{sweep}"
    );
    node.stop_pinkeeper()?;
    Ok(())
}

/// K3s's runtime watcher imports an archive added to a new subdirectory; pinkeeper records the
/// new intents and, from its own read of the directory, the file that provides them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_added_at_runtime_is_recorded_as_provided() -> Result<()> {
    let mut node = boot(Version::V1_7, 4).await?;
    let scans = node.status()?["images_dir_scans"].as_u64().unwrap_or(0);

    let file = node.images_dir().join("more/extra.tar.zst");
    write_archive(&file, Layout::DockerSave, &[TestImage::new(EXTRA)])?;
    // K3s imports a new file about two seconds after it appears; pinkeeper's watch has read
    // it by then (both wait for the directory to be quiet; here: once pinkeeper has read it).
    node.wait_scans_after(scans).await?;
    let report = node.k3s.import_file(&file).await?;
    ensure!(report.images == [EXTRA], "{report:?}");
    node.wait_recorded(6).await?;
    let extra = with_alias(&node.images().await?, EXTRA)?;
    // The sources are in the engine...
    node.wait_status("extra's intents held", |s| s["intents_held"] == 6)
        .await?;
    // ... and a history answer comes from the ledger's writer after the writes before it.
    node.history(None)?;
    node.stop_pinkeeper()?;

    let ledger = pinkeeper::ledger::Ledger::open(&node.state_dir())?;
    let intents = ledger.intents()?;
    for name in &extra {
        let intent = intents
            .iter()
            .find(|i| i.name == *name)
            .with_context(|| format!("no intent for {name}: {intents:#?}"))?;
        ensure!(
            intent.source.as_deref() == Some(file.as_path()),
            "{name} is provided by {:?}, not {}",
            intent.source,
            file.display()
        );
    }
    drop(ledger);

    // And so, deleted again before K3s's next start, it is restored at the sweep.
    node.start_pinkeeper()?;
    node.wait_scans_after(1).await?;
    std::fs::remove_file(&file)?;
    node.wait_history("extra's archive gone in the history", None, |h| {
        extra.iter().all(|n| actions_of(h, n, GONE) >= 1)
    })
    .await?;
    node.restart_k3s().await?;
    node.wait_until("extra's pins restored", |images| {
        extra.iter().all(|n| pins(images, n) == (false, true))
    })
    .await?;
    node.stop_pinkeeper()?;
    Ok(())
}
