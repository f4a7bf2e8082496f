//! What kubelet sees (contract rule 10) against real containerd 1.6, 1.7 and 2.x with CRI on:
//! after a K3s restart with an archive deleted and the pins restored, pinkeeper reads CRI's
//! `ListImages` and reports what CRI says of every held image in `status`, `list` and
//! `doctor`. containerd 1.6.20's CRI predates pin support and reports every image unpinned
//! (FACTS.md section 3a): pinkeeper says so; 1.7.24 and 2.1 report the restored pin.

mod common;

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use common::{cri_pinned, wall_ms, with_aliases, Node, APP, SETTLE_MS, WEB};
use pinkeeper_testkit::Version;

on_every_version!(reports_what_cri_sees_after_a_restore);
on_every_version!(says_so_and_carries_on_without_cri);

async fn reports_what_cri_sees_after_a_restore(version: Version) -> Result<()> {
    let mut node = Node::new(version, common::APP_AND_WEB, false, SETTLE_MS).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB]);
    node.wait_recorded(pinned.len()).await?;

    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    let restarted = wall_ms();
    node.restart_k3s().await?;
    let web = with_aliases(&first, &[WEB]);
    node.wait_until("web's pins restored", |i| {
        web.iter().all(|n| cri_pinned(i, n))
    })
    .await?;
    let after_sweep = node.wait_sweep_after(restarted).await?["started_ms"]
        .as_u64()
        .unwrap_or(0);
    // Read after the sweep's restores; CRI catches up with a label within a second or so.
    let held = pinned.len();
    let status = node
        .wait_status("CRI's view read after the sweep", |s| {
            let checked = s["cri_checked_ms"].as_u64().unwrap_or(0) >= after_sweep;
            let unpinned = s["cri_unpinned"].as_array().map_or(0, Vec::len);
            checked
                && s["cri_problem"] == ""
                && match version {
                    Version::V1_6 => unpinned == held,
                    _ => unpinned == 0,
                }
        })
        .await?;
    ensure!(status["cri_unlisted"] == 0, "{status}");

    // The disk report against containerd's content store, walked here by the images' own
    // manifests (not by the GC labels pinkeeper follows).
    let mut blobs = BTreeMap::new();
    for name in [APP, WEB] {
        let target = node.client.get(name).await?.target.context("a target")?;
        reach(&node, &target.digest, target.size, &mut blobs).await?;
    }
    let pinned: i64 = blobs.values().sum();
    let disk = &status["disk"];
    ensure!(
        disk["pinned_bytes"] == pinned && pinned > 0,
        "{pinned} vs {disk}"
    );
    ensure!(disk["content_bytes"].as_i64() >= Some(pinned), "{disk}");
    let (size, used) = (
        disk["imagefs_size_bytes"].as_u64().unwrap_or(0),
        disk["imagefs_used_bytes"].as_u64().unwrap_or(0),
    );
    ensure!(
        size > 0 && used <= size && disk["gc_low_percent"] == 80,
        "{disk}"
    );
    ensure!(disk["warning"] == "", "{disk}");
    // One line per image, its aliases counted.
    ensure!(
        disk["largest_pinned"].as_array().map(Vec::len) == Some(2)
            && disk["largest_pinned"][0]
                .as_str()
                .is_some_and(|l| l.contains("(+1 name)")),
        "{disk}"
    );
    let list = node.cli_json(&["list", WEB])?;
    let want = if version == Version::V1_6 {
        "unpinned"
    } else {
        "pinned"
    };
    ensure!(list["intents"][0]["cri"] == want, "{list}");
    let (code, text, _) = node.cli(&["list"])?;
    ensure!(code == 0 && text.contains("CRI"), "{text}");

    // `doctor` reads the daemon's check (its exit code is for the other checks: this node has
    // no K3s binary).
    let (socket, images, state) = (
        node.containerd.socket(),
        node.images_dir(),
        node.state_dir(),
    );
    let (_, out, err) = node.cli(&[
        "doctor",
        "--json",
        "--containerd-socket",
        &socket.to_string_lossy(),
        "--images-dir",
        &images.to_string_lossy(),
        "--state-dir",
        &state.to_string_lossy(),
    ])?;
    let doctor: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| anyhow::anyhow!("{e}: {out}{err}"))?;
    let kubelet = doctor["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "kubelet"))
        .cloned()
        .unwrap_or_default();
    let want = if version == Version::V1_6 {
        "warn"
    } else {
        "ok"
    };
    ensure!(kubelet["status"] == want, "{kubelet}");
    node.stop_pinkeeper()?;
    Ok(())
}

/// containerd without its CRI plugin: pinkeeper says CRI's view cannot be read, and restores as
/// ever.
async fn says_so_and_carries_on_without_cri(version: Version) -> Result<()> {
    let options = pinkeeper_testkit::Options {
        cri: pinkeeper_testkit::Cri::Off,
        ..Default::default()
    };
    let mut node =
        Node::with_options(version, common::APP_AND_WEB, false, SETTLE_MS, options).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    node.wait_recorded(with_aliases(&first, &[APP, WEB]).len())
        .await?;
    let status = node
        .wait_status("CRI's view found unreadable", |s| {
            s["cri_checked_ms"].as_u64().unwrap_or(0) > 0 && s["cri_problem"] != ""
        })
        .await?;
    ensure!(
        status["cri_problem"]
            .as_str()
            .is_some_and(|p| p.contains("serves no CRI")),
        "{status}"
    );
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let web = with_aliases(&first, &[WEB]);
    node.wait_until("web's pins restored without CRI", |i| {
        web.iter().all(|n| cri_pinned(i, n))
    })
    .await?;
    let (code, text, _) = node.cli(&["status"])?;
    ensure!(code == 0 && text.contains("cannot be read"), "{text}");
    node.stop_pinkeeper()?;
    Ok(())
}

/// The blobs an image's target reaches by its OCI (or Docker) index and manifests: digest ->
/// size.
async fn reach(
    node: &Node,
    digest: &str,
    size: i64,
    blobs: &mut BTreeMap<String, i64>,
) -> Result<()> {
    let mut todo = vec![(digest.to_string(), size)];
    while let Some((digest, size)) = todo.pop() {
        if blobs.insert(digest.clone(), size).is_some() {
            continue;
        }
        let Ok(bytes) = node.client.read_blob(&digest).await else {
            continue;
        };
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let descriptors = json["manifests"]
            .as_array()
            .into_iter()
            .chain(json["layers"].as_array())
            .flatten()
            .chain(json.get("config").filter(|c| c.is_object()));
        for d in descriptors {
            if let (Some(digest), Some(size)) = (d["digest"].as_str(), d["size"].as_i64()) {
                todo.push((digest.to_string(), size));
            }
        }
    }
    Ok(())
}
