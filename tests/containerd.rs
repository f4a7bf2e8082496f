//! pinkeeper against real containerd daemons (Debian's 1.6, trixie's 1.7 and forky's 2.x,
//! private to each test), driven by the testkit's K3s emulator, which makes exactly K3s's calls.
//! The `pinkeeper` binary runs as its own process, as on a node.

mod common;

use common::{APP, HELM, PAUSE, SETTLE_MS, WEB};
use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use common::{action, cri_pinned, has_entry, k3s_pinned, with_aliases, Action, Node};
use pinkeeper_testkit::{
    ImageInfo, Version, CRI_MANAGED_LABEL, CRI_PIN_LABEL, K3S_PIN_LABEL, K8S_NAMESPACE,
};

const ARCHIVES: &[common::Archive<'static>] = common::README_NODE;

async fn node(version: Version, cache_json: bool) -> Result<Node> {
    Node::new(version, ARCHIVES, cache_json, SETTLE_MS).await
}

/// pinkeeper runs through K3s's first boot and records every pinned name; returns the
/// images after the boot and those names (the story's images and their aliases).
async fn first_boot(node: &mut Node) -> Result<(BTreeMap<String, ImageInfo>, Vec<String>)> {
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_recorded(pinned.len()).await?;
    Ok((first, pinned))
}

on_every_version!(restores_after_a_restart_with_an_archive_deleted);
on_every_version!(repairs_a_sweep_missed_while_stopped);
on_every_version!(respects_an_operator_unpin);
on_every_version!(restores_what_the_cache_bug_left_unpinned);
on_every_version!(follows_containerd_restarts_in_a_row);
on_every_version!(handles_a_whole_map_writer_outside_any_sweep);

/// FACTS.md section 2's restart: archives kept and deleted, pinkeeper running throughout.
async fn restores_after_a_restart_with_an_archive_deleted(version: Version) -> Result<()> {
    let mut node = node(version, false).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    // An image nobody pinned, with a label of its own.
    let target = node.client.get(APP).await?.target;
    let nobody = "docker.io/library/nobody:1";
    node.client
        .create_image(
            nobody,
            target.context("app's target")?,
            &[("team".to_string(), "x".to_string())].into(),
        )
        .await?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_recorded(pinned.len()).await?;

    let swept_before = node.last_sweep_started()?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let web = with_aliases(&first, &[WEB]);
    let after = node
        .wait_until("web's pins restored", |images| {
            web.iter().all(|n| cri_pinned(images, n))
        })
        .await?;
    for name in &web {
        let info = &after[name];
        ensure!(!info.has(K3S_PIN_LABEL), "{name} got K3s's label: {info:?}");
    }
    for name in pinned.iter().filter(|n| !web.contains(n)) {
        ensure!(
            cri_pinned(&after, name) && k3s_pinned(&after, name),
            "{name} should be pinned by K3s: {:?}",
            after.get(name)
        );
    }
    // Once the verification has run and summarised the sweep, nothing else moved.
    let sweep = node.wait_sweep_after(swept_before).await?;
    ensure!(
        sweep["swept"] == 8 && sweep["restored_archive_gone"] == 2,
        "{sweep}"
    );
    let settled = node.images().await?;
    let nobody_labels = &settled[nobody].labels;
    ensure!(
        !nobody_labels.contains_key(CRI_PIN_LABEL) && nobody_labels.get("team").is_some(),
        "the image nobody pinned changed: {nobody_labels:?}"
    );
    for name in &web {
        if version != Version::V1_6 {
            // CRI's own label survives pinkeeper's per-key write.
            ensure!(
                settled[name].labels.contains_key(CRI_MANAGED_LABEL),
                "{name}: {settled:?}"
            );
        }
    }
    node.stop_pinkeeper()?;
    Ok(())
}

/// pinkeeper is killed before K3s restarts and started again only after K3s is done.
async fn repairs_a_sweep_missed_while_stopped(version: Version) -> Result<()> {
    let mut node = node(version, false).await?;
    node.k3s.start().await?;
    let first = node.images().await?;
    // Started after the first boot: it learns the intents from its first listing.
    node.start_pinkeeper()?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_recorded(pinned.len()).await?;
    node.kill_pinkeeper()?;

    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let web = with_aliases(&first, &[WEB]);
    let swept = node.images().await?;
    ensure!(
        web.iter().all(|n| !cri_pinned(&swept, n)),
        "K3s left web pinned?"
    );
    node.start_pinkeeper()?;
    let after = node
        .wait_until("web's pins restored", |images| {
            web.iter().all(|n| cri_pinned(images, n))
        })
        .await?;
    ensure!(web.iter().all(|n| !k3s_pinned(&after, n)));
    // Its history says why.
    node.wait_history("web's missed sweep in its history", Some(WEB), |h| {
        h.iter().any(|e| {
            action(e) == Action::Swept
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("a missed K3s sweep"))
        })
    })
    .await?;
    Ok(())
}

/// `ctr images label NAME io.cri-containerd.pinned=` releases the intent for good.
async fn respects_an_operator_unpin(version: Version) -> Result<()> {
    let mut node = node(version, false).await?;
    let (first, _) = first_boot(&mut node).await?;

    let swept_before = node.last_sweep_started()?;
    node.client.ctr_remove_cri_pin(WEB).await?;
    node.wait_history("web released", Some(WEB), |h| {
        has_entry(h, WEB, Action::Released)
    })
    .await?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    // The alias is still protected (the operator unpinned one name); WEB is not.
    let web_alias = with_aliases(&first, &[WEB])[1].clone();
    node.wait_until("the alias restored", |images| {
        cri_pinned(images, &web_alias)
    })
    .await?;
    // The verification has run (nothing else could restore WEB after it).
    let swept_at = node.wait_sweep_after(swept_before).await?["started_ms"]
        .as_u64()
        .unwrap_or(0);
    let images = node.images().await?;
    ensure!(
        !cri_pinned(&images, WEB) && !k3s_pinned(&images, WEB),
        "the operator's unpin was undone: {:?}",
        images.get(WEB)
    );
    // And not at the next restart either.
    node.restart_k3s().await?;
    node.wait_sweep_after(swept_at).await?;
    ensure!(!cri_pinned(&node.images().await?, WEB));
    Ok(())
}

/// K3s's `.cache.json` bug (k3s-io/k3s#14265): unchanged archives are skipped and left
/// unpinned; pinkeeper restores them once the start-up settles.
async fn restores_what_the_cache_bug_left_unpinned(version: Version) -> Result<()> {
    let mut node = node(version, true).await?;
    let (_, pinned) = first_boot(&mut node).await?;
    let swept_before = node.last_sweep_started()?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let after = node
        .wait_until("every image pinned again", |images| {
            pinned.iter().all(|n| cri_pinned(images, n))
        })
        .await?;
    ensure!(pinned.iter().all(|n| !k3s_pinned(&after, n)));
    let sweep = node.wait_sweep_after(swept_before).await?;
    ensure!(
        sweep["restored_not_repinned"].as_u64().unwrap_or(0) > 0,
        "{sweep}"
    );
    Ok(())
}

/// Restart after restart, with the archive put back and deleted again in turn: every sweep
/// of the deleted archive's image is repaired.
async fn follows_containerd_restarts_in_a_row(version: Version) -> Result<()> {
    let mut node = node(version, false).await?;
    let (first, _) = first_boot(&mut node).await?;
    let web_archive = node.images_dir().join("web.tar.gz");
    let saved = node.dir.path().join("web.tar.gz.saved");
    let web = with_aliases(&first, &[WEB]);
    for round in 0..4 {
        std::fs::rename(&web_archive, &saved)?;
        node.restart_k3s().await?;
        node.wait_until("web restored", |images| {
            web.iter().all(|n| cri_pinned(images, n))
        })
        .await
        .with_context(|| format!("round {round}"))?;
        // Put the archive back: K3s pins it itself at the next start.
        std::fs::rename(&saved, &web_archive)?;
        node.restart_k3s().await?;
        node.wait_until("web pinned by K3s", |images| {
            web.iter().all(|n| k3s_pinned(images, n))
        })
        .await?;
    }
    let restored = node.status()?["pins_restored"].as_u64().unwrap_or(0);
    ensure!(restored >= 8, "{restored} pins restored over 4 rounds");
    Ok(())
}

/// The daemon waits for a containerd that is not there yet, then does its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_containerd() -> Result<()> {
    let mut node = node(Version::V1_6, false).await?;
    node.k3s.start().await?;
    node.containerd.stop()?;
    node.start_pinkeeper()?;
    // It serves its API and says it is not connected.
    node.wait_status("pinkeeper up, not connected", |s| s["connected"] == false)
        .await?;
    node.containerd.resume().await?;
    node.client = node.containerd.client(K8S_NAMESPACE).await?;
    node.wait_recorded(8).await?;
    node.stop_pinkeeper()?;
    Ok(())
}

/// `kill -9` at random moments of a first boot never leaves a ledger that cannot be opened,
/// and never loses a committed intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_breaks_the_ledger() -> Result<()> {
    let mut node = node(Version::V1_6, false).await?;
    let state = node.dir.path().join("state");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut committed = 0;
    for round in 0..12 {
        node.start_pinkeeper()?;
        if round == 0 {
            node.k3s.start().await?;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Killed at a point of the story chosen at random: at once, once its API answers, or
        // once it holds some of the intents (while it may be writing others).
        match seed % 4 {
            0 => {}
            1 => {
                node.wait_status("pinkeeper answering", |_| true).await?;
            }
            _ => {
                let some = seed % 9;
                node.wait_status(&format!("{some} intent(s) held"), |s| {
                    s["intents_held"].as_u64().unwrap_or(0) >= some
                })
                .await?;
            }
        }
        node.kill_pinkeeper()?;
        let ledger = pinkeeper::ledger::Ledger::open(&state)
            .with_context(|| format!("round {round}: the ledger does not open"))?;
        let now = ledger.intents()?.len();
        ensure!(
            now >= committed,
            "round {round}: intents went from {committed} to {now}"
        );
        committed = now;
    }
    // And a last run records everything.
    node.start_pinkeeper()?;
    node.wait_status("every intent held", |s| {
        s["intents_held"].as_u64().unwrap_or(0) >= 8
    })
    .await?;
    // A history answer comes from the ledger's writer after the writes queued before it.
    node.history(None)?;
    node.stop_pinkeeper()?;
    let ledger = pinkeeper::ledger::Ledger::open(&state)?;
    ensure!(ledger.intents()?.len() >= 8);
    Ok(())
}

/// A tool rewrites label maps from a stale copy (`paths = ["labels"]`) while K3s is running:
/// dropping both pins of an image with K3s's label reads as a sweep (restored once settled),
/// dropping only the CRI pin as a deliberate unpin (released, left alone).
async fn handles_a_whole_map_writer_outside_any_sweep(version: Version) -> Result<()> {
    let mut node = node(version, false).await?;
    let (first, _) = first_boot(&mut node).await?;

    let without = |name: &str, keys: &[&str]| {
        let mut labels = first[name].labels.clone();
        for k in keys {
            labels.remove(*k);
        }
        labels
    };
    let swept_before = node.last_sweep_started()?;
    node.client
        .replace_labels(APP, &without(APP, &[K3S_PIN_LABEL, CRI_PIN_LABEL]))
        .await?;
    node.client
        .replace_labels(HELM, &without(HELM, &[CRI_PIN_LABEL]))
        .await?;
    let after = node
        .wait_until("app restored", |images| cri_pinned(images, APP))
        .await?;
    ensure!(!k3s_pinned(&after, APP), "{:?}", after.get(APP));
    node.wait_history("helm released", Some(HELM), |h| {
        has_entry(h, HELM, Action::Released)
    })
    .await?;
    // APP's episode verified and summarised: nothing restores HELM after this.
    node.wait_sweep_after(swept_before).await?;
    let settled = node.images().await?;
    ensure!(
        !cri_pinned(&settled, HELM) && k3s_pinned(&settled, HELM),
        "helm: {:?}",
        settled.get(HELM)
    );
    Ok(())
}
