//! `pinkeeper run --program rke2` against real containerd daemons driven by the testkit's
//! emulator set to RKE2: RKE2 pins and sweeps with `io.cattle.rke2.pinned` (FACTS.md section 1),
//! and pinkeeper must take its sweep for a sweep, not for an operator's unpin.

mod common;

use anyhow::{ensure, Result};
use common::{actions, cri_pinned, has_entry, with_aliases, Action, Node};
use common::{APP, SETTLE_MS, WEB};
use pinkeeper_testkit::{K3s, Version, K3S_PIN_LABEL, RKE2_PIN_LABEL};

const ARCHIVES: &[common::Archive<'static>] = common::APP_AND_WEB;

/// A node whose "K3s" is RKE2.
async fn rke2_node(version: Version) -> Result<Node> {
    let mut node = Node::new(version, ARCHIVES, false, SETTLE_MS).await?;
    let mut config = node.k3s.config().clone();
    config.program = "rke2".into();
    node.k3s = K3s::new(config);
    Ok(node)
}

on_every_version!(restores_rke2s_sweep_with_program_rke2);

async fn restores_rke2s_sweep_with_program_rke2(version: Version) -> Result<()> {
    let mut node = rke2_node(version).await?;
    node.start_pinkeeper_with(&["--program", "rke2"])?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB]);
    for name in &pinned {
        ensure!(
            first[name].has(RKE2_PIN_LABEL) && !first[name].has(K3S_PIN_LABEL),
            "the emulator should pin {name} the RKE2 way: {:?}",
            first[name]
        );
    }
    node.wait_recorded(pinned.len()).await?;

    let swept_before = node.last_sweep_started()?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let web = with_aliases(&first, &[WEB]);
    let after = node
        .wait_until("web's pins restored after RKE2's sweep", |images| {
            web.iter().all(|n| cri_pinned(images, n))
        })
        .await?;
    for name in &web {
        let info = &after[name];
        ensure!(
            !info.has(RKE2_PIN_LABEL) && !info.has(K3S_PIN_LABEL),
            "{name} got a program's label: {info:?}"
        );
    }
    let app = with_aliases(&first, &[APP]);
    for name in &app {
        ensure!(
            cri_pinned(&after, name) && after[name].has(RKE2_PIN_LABEL),
            "{name} should be pinned by RKE2 again: {:?}",
            after.get(name)
        );
    }
    // Decided once the sweep is summarised (the verification has run).
    node.wait_sweep_after(swept_before).await?;
    let history = node.history(None)?;
    ensure!(
        actions(&history, Action::Released) == 0,
        "RKE2's sweep was taken for an unpin: {history:#?}"
    );
    node.stop_pinkeeper()
}

/// Why `--program` matters: left at k3s on an RKE2 node, pinkeeper cannot tell RKE2's sweep
/// from an operator's unpin (no K3s label was removed), so it releases the intents and the
/// image whose archive is gone stays unpinned. `pinkeeper doctor` fails on such a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn program_k3s_on_an_rke2_node_takes_the_sweep_for_an_unpin() -> Result<()> {
    let mut node = rke2_node(Version::V2).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB]);
    node.wait_recorded(pinned.len()).await?;

    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let web = with_aliases(&first, &[WEB]);
    // Every name's intent released by the sweep (app's come back as RKE2 pins it again):
    // nothing restores web's names after this.
    node.wait_history("web's intents released", None, |h| {
        web.iter().all(|n| has_entry(h, n, Action::Released))
    })
    .await?;
    let after = node.images().await?;
    for name in &web {
        ensure!(
            !cri_pinned(&after, name),
            "{name} was restored although pinkeeper follows K3s's label: {:?}",
            after[name]
        );
    }
    node.stop_pinkeeper()
}
