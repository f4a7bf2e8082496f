//! `pinkeeper doctor` on a node with a private containerd (Debian's 1.6.20, trixie's 1.7.24,
//! forky's 2.1.9), run as its own process with the daemon stopped: containerd's version gate,
//! the ledger, and the images at risk worked out from the ledger and containerd's listing after
//! a sweep pinkeeper did not see.

mod common;

use common::{APP, WEB};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{cri_pinned, with_aliases, Node};
use pinkeeper_testkit::Version;
use serde_json::Value;

const ARCHIVES: &[common::Archive<'static>] = common::APP_AND_WEB;

/// Runs `pinkeeper doctor` against this node's containerd, images dir and state dir:
/// (exit code, stdout).
fn doctor(node: &Node, json: bool) -> Result<(i32, String)> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pinkeeper"));
    command
        .arg("doctor")
        .arg("--containerd-socket")
        .arg(node.containerd.socket())
        .arg("--images-dir")
        .arg(node.images_dir())
        .arg("--state-dir")
        .arg(node.state_dir())
        .arg("--control-socket")
        .arg(node.dir.path().join("pk.sock"));
    if json {
        command.arg("--json");
    }
    let out = command.output().context("running pinkeeper doctor")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.is_empty(),
        "pinkeeper doctor wrote to stderr: {stderr}"
    );
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// `pinkeeper doctor --json`: (exit code, the checks by name).
fn doctor_json(node: &Node) -> Result<(i32, serde_json::Map<String, Value>)> {
    let (code, out) = doctor(node, true)?;
    let report: Value =
        serde_json::from_str(&out).with_context(|| format!("doctor printed {out}"))?;
    ensure!(report["version"] == 1, "{report:#}");
    let mut checks = serde_json::Map::new();
    for check in report["checks"].as_array().context("no checks")? {
        let name = check["name"].as_str().context("a check without a name")?;
        for field in ["status", "detail", "fix"] {
            ensure!(check[field].is_string(), "{field} of {check:#}");
        }
        checks.insert(name.to_string(), check.clone());
    }
    let names: Vec<&str> = checks.keys().map(String::as_str).collect();
    ensure!(names.len() == 8, "checks: {names:?}");
    let worst = if checks.values().any(|c| c["status"] == "fail") {
        "fail"
    } else if checks.values().any(|c| c["status"] == "warn") {
        "warn"
    } else {
        "ok"
    };
    ensure!(report["status"] == worst, "{report:#}");
    ensure!(
        code == i32::from(worst == "fail"),
        "exit code {code}: {report:#}"
    );
    Ok((code, checks))
}

fn status<'a>(checks: &'a serde_json::Map<String, Value>, name: &str) -> &'a str {
    checks[name]["status"].as_str().unwrap_or_default()
}

fn detail<'a>(checks: &'a serde_json::Map<String, Value>, name: &str) -> &'a str {
    checks[name]["detail"].as_str().unwrap_or_default()
}

on_every_version!(doctor_checks_a_node_with_pinkeeper_stopped);

async fn doctor_checks_a_node_with_pinkeeper_stopped(version: Version) -> Result<()> {
    let mut node = Node::new(version, ARCHIVES, false, 400).await?;
    let reported = node.containerd.reported_version().to_string();
    // FACTS.md section 4: Debian's 1.6.20 predates the pin (1.6.22); 1.7.24 and 2.1.9 pass.
    let gate = if version == Version::V1_6 {
        "fail"
    } else {
        "ok"
    };
    let expected_exit = i32::from(gate == "fail");

    // Before pinkeeper ever ran: no ledger, and the doctor does not create one.
    node.k3s.start().await?;
    let (code, checks) = doctor_json(&node)?;
    ensure!(code == expected_exit, "{version}: exit {code}: {checks:#?}");
    ensure!(status(&checks, "containerd") == gate, "{checks:#?}");
    ensure!(
        detail(&checks, "containerd").contains(&reported),
        "containerd reported {reported:?}: {checks:#?}"
    );
    ensure!(detail(&checks, "containerd").contains("1.29"));
    ensure!(status(&checks, "control-socket") == "warn");
    ensure!(status(&checks, "ledger") == "warn", "{checks:#?}");
    ensure!(detail(&checks, "ledger").contains("no ledger"));
    ensure!(
        !node.state_dir().exists(),
        "the doctor created the state dir"
    );
    ensure!(status(&checks, "images-dir") == "ok", "{checks:#?}");
    ensure!(
        detail(&checks, "images-dir").contains("2 file(s)"),
        "{checks:#?}"
    );
    ensure!(status(&checks, "at-risk") == "warn");

    // pinkeeper learns the pinned images, then stops cleanly.
    node.start_pinkeeper()?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB]);
    node.wait_recorded(pinned.len()).await?;
    node.stop_pinkeeper()?;
    let (code, checks) = doctor_json(&node)?;
    ensure!(code == expected_exit, "{version}: exit {code}: {checks:#?}");
    ensure!(status(&checks, "ledger") == "ok", "{checks:#?}");
    ensure!(
        detail(&checks, "ledger").contains(&format!("{} intent(s) held", pinned.len())),
        "{checks:#?}"
    );
    ensure!(status(&checks, "at-risk") == "ok", "{checks:#?}");
    // What kubelet sees, read here from CRI against the ledger: 1.6.20's CRI predates pins;
    // 1.7 and 2.x report the pins once CRI has caught up with K3s's imports.
    let kubelet = if version == Version::V1_6 {
        "warn"
    } else {
        "ok"
    };
    let checks = common::eventually(&format!("doctor's kubelet check {kubelet}"), || async {
        let (_, checks) = doctor_json(&node)?;
        Ok((status(&checks, "kubelet") == kubelet).then_some(checks))
    })
    .await?;
    ensure!(
        detail(&checks, "kubelet").contains("against the ledger"),
        "{checks:#?}"
    );

    // web's archive is deleted and K3s restarts while pinkeeper is stopped: the sweep leaves
    // web unpinned, and only the ledger knows it should not be.
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let swept = node.images().await?;
    let web = with_aliases(&first, &[WEB]);
    ensure!(web.iter().all(|n| !cri_pinned(&swept, n)), "{swept:#?}");
    let (code, checks) = doctor_json(&node)?;
    ensure!(code == 1, "{version}: exit {code}: {checks:#?}");
    ensure!(status(&checks, "at-risk") == "fail", "{checks:#?}");
    let risk = detail(&checks, "at-risk");
    for name in &web {
        ensure!(risk.contains(name.as_str()), "{name} not named: {risk}");
    }
    ensure!(!risk.contains(APP), "app was re-pinned by K3s: {risk}");
    ensure!(checks["at-risk"]["fix"]
        .as_str()
        .is_some_and(|f| f.contains("pinkeeper reconcile")));
    ensure!(
        detail(&checks, "images-dir").contains("1 file(s)"),
        "{checks:#?}"
    );

    // The text output: one block per check, readable at a glance.
    let (text_code, text) = doctor(&node, false)?;
    ensure!(text_code == 1);
    for header in [
        "control-socket",
        "containerd",
        "images-dir",
        "ledger",
        "program",
    ] {
        ensure!(
            text.lines().any(|l| l.ends_with(&format!(" {header}"))),
            "no {header} block:\n{text}"
        );
    }
    ensure!(text.contains("FAIL   at-risk\n"), "{text}");
    ensure!(text.contains(&format!("  - {WEB}\n")), "{text}");
    ensure!(text.contains("fix: run `pinkeeper reconcile`"), "{text}");
    ensure!(
        text.trim_end().ends_with(" ok") && text.contains(" failed, "),
        "{text}"
    );
    // Wrapped to 96 columns, but for a single word (a long name, as the `repo@digest` alias)
    // that cannot be broken; a list item keeps its marker.
    for line in text.lines() {
        let words = line.trim().trim_start_matches("- ");
        ensure!(
            line.chars().count() <= 96 || !words.contains(' '),
            "line too long: {line:?}"
        );
    }

    // pinkeeper repairs the missed sweep as soon as it runs; the doctor then finds nothing.
    node.start_pinkeeper()?;
    node.wait_until("web's pins restored", |images| {
        web.iter().all(|n| cri_pinned(images, n))
    })
    .await?;
    node.stop_pinkeeper()?;
    let (code, checks) = doctor_json(&node)?;
    ensure!(status(&checks, "at-risk") == "ok", "{checks:#?}");
    ensure!(code == expected_exit, "{version}: exit {code}: {checks:#?}");
    Ok(())
}
