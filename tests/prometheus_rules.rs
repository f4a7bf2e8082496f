//! The shipped alert rules (`packaging/prometheus/pinkeeper.rules.yaml`) are valid and behave as
//! their unit tests say: `promtool check rules` and `promtool test rules` (Debian's
//! `prometheus` package; `scripts/install-deps.sh` installs it). Every pinkeeper metric they
//! name is one pinkeeper exports: `src/daemon/metrics/tests.rs`.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

const PROMTOOL: &str = "/usr/bin/promtool";

fn promtool(args: &[&str]) -> Result<String> {
    ensure!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is missing: run scripts/install-deps.sh as root (Debian's prometheus)"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus");
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(&dir)
        .output()
        .context("running promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn the_rules_are_valid() -> Result<()> {
    let out = promtool(&["check", "rules", "pinkeeper.rules.yaml"])?;
    ensure!(out.contains("SUCCESS: 4 rules found"), "{out}");
    Ok(())
}

#[test]
fn each_alert_fires_when_it_should_and_not_otherwise() -> Result<()> {
    let out = promtool(&["test", "rules", "pinkeeper.rules.test.yaml"])?;
    ensure!(out.contains("SUCCESS"), "{out}");
    // Every alert of the rules has a test.
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus/pinkeeper.rules.yaml"),
    )?;
    let tests = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging/prometheus/pinkeeper.rules.test.yaml"),
    )?;
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            ensure!(
                tests.contains(&format!("alertname: {name}")),
                "alert {name} has no test in pinkeeper.rules.test.yaml"
            );
        }
    }
    Ok(())
}

/// Every query of the Grafana dashboard (`packaging/grafana/pinkeeper.json`) parses: each is
/// checked by `promtool check rules` as a recording rule. And the dashboard has the panels
/// the README promises.
#[test]
fn every_dashboard_query_parses() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana/pinkeeper.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut count = 0;
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("a target without expr")?;
            count += 1;
            rules.push_str(&format!(
                "      - record: dashboard:query_{count}\n        expr: {}\n",
                serde_json::to_string(expr)?
            ));
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Intents by state",
        "Images at risk",
        "Restores by reason",
        "Sweeps seen",
        "containerd connection",
        "Ledger write latency",
    ] {
        ensure!(titles.contains(&want), "no panel {want:?}: {titles:?}");
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dashboard.rules.yaml");
    std::fs::write(&file, rules)?;
    let out = promtool(&["check", "rules", &file.to_string_lossy()])?;
    ensure!(
        out.contains(&format!("SUCCESS: {count} rules found")),
        "{out}"
    );
    Ok(())
}
