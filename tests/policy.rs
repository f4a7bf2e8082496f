//! Images kept by policy (contract rule 9) against real containerd 1.6, 1.7 and 2.x: the
//! config's `keep` patterns pin an image whenever it appears (here created as CRI's pull
//! creates it: no pin), put back a pin someone removes, refuse `pinkeeper unpin`, and a reload
//! (SIGHUP) that removes the pattern releases what it alone held.

mod common;

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{cri_pinned, has_entry, k3s_pinned, wall_ms, Action, Node, APP, SETTLE_MS};
use pinkeeper_testkit::Version;

const DB: &str = "registry.local/critical/db:5";
const OTHER: &str = "registry.local/other/tool:1";
const PATTERN: &str = "registry.local/critical/*";
/// K3s imports app:1 from app.tar, which stays: kept, it is restored at the sweep itself.
const KEPT_APP: &str = "docker.io/library/app:*";

on_every_version!(keeps_images_by_policy_and_reloads_the_patterns);
on_every_version!(keeps_an_image_pulled_through_cri_from_a_registry);

fn write_config(path: &Path, keep: &[&str]) -> Result<()> {
    let list: Vec<String> = keep.iter().map(|p| format!("{p:?}")).collect();
    std::fs::write(path, format!("keep = [{}]\n", list.join(", ")))?;
    Ok(())
}

/// SIGHUP, then waits for `status` to show a reload after `after_ms`; its error, if any.
async fn reload(node: &Node, after_ms: u64) -> Result<String> {
    let pid = node.pinkeeper_pid().context("pinkeeper runs")?;
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -HUP {pid}");
    let s = node
        .wait_status("the config reloaded", |s| {
            s["config_reloaded_ms"]
                .as_u64()
                .is_some_and(|t| t >= after_ms)
        })
        .await?;
    Ok(s["config_reload_error"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

async fn keeps_images_by_policy_and_reloads_the_patterns(version: Version) -> Result<()> {
    let mut node = Node::new(version, common::APP_AND_WEB, false, SETTLE_MS).await?;
    let config = node.dir.path().join("config.toml");
    write_config(&config, &[PATTERN, KEPT_APP])?;
    node.k3s.start().await?;
    let target = node.client.get(APP).await?.target.context("app's target")?;
    // Pulled while pinkeeper was not running: found by its first listing.
    node.client
        .create_image(DB, target.clone(), &Default::default())
        .await?;
    node.start_pinkeeper_with(&["--config", config.to_str().context("utf-8 path")?])?;
    node.wait_until("db pinned by the policy", |i| cri_pinned(i, DB))
        .await?;
    let status = node.status()?;
    ensure!(
        status["keep"] == serde_json::json!([PATTERN, KEPT_APP]),
        "{status}"
    );

    // Pulled while it runs; an image no pattern matches stays as it is.
    node.client.delete_image(DB).await?;
    node.client
        .create_image(OTHER, target.clone(), &Default::default())
        .await?;
    node.client
        .create_image(DB, target.clone(), &Default::default())
        .await?;
    let images = node
        .wait_until("db pinned again once pulled again", |i| cri_pinned(i, DB))
        .await?;
    ensure!(
        !k3s_pinned(&images, DB),
        "never K3s's label: {:?}",
        images[DB]
    );
    ensure!(!cri_pinned(&images, OTHER), "{:?}", images[OTHER]);
    let listed = node.cli_json(&["list", DB])?;
    ensure!(
        listed["intents"][0]["why"] == format!("policy: {PATTERN}"),
        "{listed}"
    );

    // `pinkeeper unpin` is refused, naming the pattern; `ctr`'s unpin is put back.
    let (code, _, err) = node.cli(&["unpin", DB])?;
    ensure!(code == 1 && err.contains(PATTERN), "exit {code}: {err}");
    ensure!(cri_pinned(&node.images().await?, DB));
    node.client.ctr_remove_cri_pin(DB).await?;
    node.wait_until("db's removed pin put back", |i| cri_pinned(i, DB))
        .await?;

    // A K3s restart: db's record has no K3s label, the sweep leaves it alone, and it stays.
    // app:1 is swept and restored at once by its pattern, its archive still there (K3s pins
    // it again too); the sweep's summary counts it.
    let restarted = wall_ms();
    node.restart_k3s().await?;
    node.wait_until("db pinned after the restart", |i| cri_pinned(i, DB))
        .await?;
    let sweep = node.wait_sweep_after(restarted).await?;
    ensure!(sweep["restored_policy"].as_u64() >= Some(1), "{sweep}");
    node.wait_history("app restored by its pattern", Some(APP), |h| {
        h.iter().any(|e| {
            common::action(e) == Action::Restored
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("keep pattern"))
        })
    })
    .await?;

    // A config that does not read changes nothing.
    std::fs::write(&config, "keep = [\"db:5\"]\n")?;
    let error = reload(&node, wall_ms()).await?;
    ensure!(error.contains("docker.io/library/db:5"), "{error}");
    ensure!(node.status()?["keep"] == serde_json::json!([PATTERN, KEPT_APP]));

    // The pattern removed: db is released and its pin removed; its history says why.
    write_config(&config, &[])?;
    let error = reload(&node, wall_ms()).await?;
    ensure!(error.is_empty(), "{error}");
    node.wait_until("db's pin removed", |i| {
        i.contains_key(DB) && !cri_pinned(i, DB)
    })
    .await?;
    node.wait_history("db released", Some(DB), |h| {
        has_entry(h, DB, Action::Released)
    })
    .await?;
    let (code, out, err) = node.cli(&["list", "--all", DB])?;
    ensure!(
        code == 0 && out.contains("no keep pattern of the config matches it any more"),
        "{out}{err}"
    );
    node.stop_pinkeeper()?;
    Ok(())
}

/// A kept image pulled the way kubelet pulls it: CRI's `PullImage` from a real registry on
/// loopback (Debian's docker-registry). pinkeeper pins it (CRI label only); a whole-map update
/// that takes its pins away, as K3s's sweep writes one, is undone; a K3s restart leaves it
/// pinned; CRI reports it pinned (1.7 and 2.x; 1.6.20's CRI predates pins).
async fn keeps_an_image_pulled_through_cri_from_a_registry(version: Version) -> Result<()> {
    let registry = pinkeeper_testkit::Registry::start()?;
    let reference = format!("{}/critical/app:1", registry.host());
    registry.push(
        "critical/app",
        "1",
        &pinkeeper_testkit::TestImage::new(reference.as_str()),
    )?;
    let mut node = Node::new(version, common::APP_AND_WEB, false, SETTLE_MS).await?;
    let config = node.dir.path().join("config.toml");
    write_config(&config, &["localhost:*/critical/*"])?;
    node.start_pinkeeper_with(&["--config", config.to_str().context("utf-8 path")?])?;
    node.k3s.start().await?;

    pinkeeper::containerd::cri::pull_image(node.client.channel(), &reference)
        .await
        .with_context(|| format!("CRI's PullImage {reference}"))?;
    let images = node
        .wait_until("the pulled image pinned by the policy", |i| {
            cri_pinned(i, &reference)
        })
        .await?;
    ensure!(!k3s_pinned(&images, &reference), "{:?}", images[&reference]);

    // Its pins taken away by a whole-map update, as K3s's sweep writes one.
    let mut labels = images[&reference].labels.clone();
    labels.retain(|k, _| k != pinkeeper_testkit::CRI_PIN_LABEL);
    node.client.replace_labels(&reference, &labels).await?;
    node.wait_until("the pulled image pinned again", |i| {
        cri_pinned(i, &reference)
    })
    .await?;

    let restarted = wall_ms();
    node.restart_k3s().await?;
    node.wait_sweep_after(restarted).await?;
    ensure!(cri_pinned(&node.images().await?, &reference));
    if version != Version::V1_6 {
        node.wait_status("CRI reports the pulled image pinned", |s| {
            s["cri_checked_ms"].as_u64().unwrap_or(0) >= restarted
                && s["cri_unpinned"].as_array().is_some_and(Vec::is_empty)
        })
        .await?;
        let list = node.cli_json(&["list", &reference])?;
        ensure!(list["intents"][0]["cri"] == "pinned", "{list}");
    }
    node.stop_pinkeeper()?;
    Ok(())
}
