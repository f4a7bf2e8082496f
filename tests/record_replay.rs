//! `pinkeeper record` beside the daemon, against real containerd daemons (1.6, 1.7, 2.x): the
//! recording, replayed offline through the engine, must lead to the pins (name and reason) and
//! the final intents the daemon decided live. This is what makes a recording worth attaching
//! to a bug report: the replay sees what the daemon saw.

mod common;

use common::{APP, HELM, PAUSE, SETTLE_MS, WEB};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{anyhow, ensure, Context, Result};
use common::{action, cri_pinned, with_aliases, Node};
use pinkeeper::engine::{Action, Config, IntentState, Output, RestoreReason};
use pinkeeper::replay::Replay;
use pinkeeper_testkit::{Version, CRI_PIN_LABEL, K3S_PIN_LABEL};

const ARCHIVES: &[common::Archive<'static>] = common::README_NODE;

/// `pinkeeper record` running as its own process, as an operator would run it.
struct Recorder {
    child: Option<Child>,
    out: PathBuf,
    log: PathBuf,
}

impl Recorder {
    fn start(node: &Node) -> Result<Recorder> {
        let out = node.dir.path().join("recording.jsonl");
        let log = node.dir.path().join("record.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
            .arg("record")
            .arg("--out")
            .arg(&out)
            .arg("--containerd-socket")
            .arg(node.containerd.socket())
            .arg("--images-dir")
            .arg(node.images_dir())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting pinkeeper record")?;
        Ok(Recorder {
            child: Some(child),
            out,
            log,
        })
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the recording satisfies `check`.
    async fn wait_until(&self, what: &str, check: impl Fn(&str) -> bool) -> Result<()> {
        let check = &check;
        common::eventually(
            what,
            || async move { Ok(check(&self.text()).then_some(())) },
        )
        .await
        .map_err(|e| {
            anyhow!(
                "{e}: the recording:\n{}\nrecorder's log:\n{}",
                self.text(),
                self.log()
            )
        })
    }

    /// SIGTERM: the recorder must finish the file and exit 0.
    fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(child) => common::terminate(child, "pinkeeper record", || self.log()),
            None => Ok(()),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The envelopes of the recording for `name` (parsed), in order.
fn envelopes_of(text: &str, name: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["payload"]["name"] == name)
        .collect()
}

/// Which restore reason a `restored` history entry's detail explains.
fn reason_of(detail: &str) -> Result<RestoreReason> {
    [RestoreReason::ArchiveGone, RestoreReason::NotRepinned]
        .into_iter()
        .find(|r| r.explain() == detail)
        .ok_or_else(|| anyhow!("a restore for a reason this test does not expect: {detail}"))
}

/// A pin as the test compares them: the image and why (`RestoreReason` is not `Ord`).
fn pin(name: &str, reason: RestoreReason) -> (String, String) {
    (name.to_string(), format!("{reason:?}"))
}

on_every_version!(a_recording_replays_to_the_daemons_decisions);

/// First boot, an archive deleted, a K3s restart (the sweep and pinkeeper's restores), then an
/// operator's unpin of another image; the daemon and the recorder run side by side throughout.
async fn a_recording_replays_to_the_daemons_decisions(version: Version) -> Result<()> {
    let mut node = Node::new(version, ARCHIVES, false, SETTLE_MS).await?;
    let mut recorder = Recorder::start(&node)?;
    recorder
        .wait_until("its first listing", |t| t.contains(r#"{"connect":true"#))
        .await?;
    node.start_pinkeeper()?;
    node.wait_status("pinkeeper connected", |s| s["connected"] == true)
        .await?;

    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_recorded(pinned.len()).await?;

    let swept_before = node.last_sweep_started()?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    // Both followers are subscribed again before K3s sweeps (as they are on a node: K3s
    // sweeps about a second after starting containerd).
    node.restart_containerd().await?;
    recorder
        .wait_until("its second connection", |t| {
            t.matches(r#"{"connect":true"#).count() == 2
        })
        .await?;
    node.k3s_starts_again().await?;
    let web = with_aliases(&first, &[WEB]);
    node.wait_until("web's pins restored", |images| {
        web.iter().all(|n| cri_pinned(images, n))
    })
    .await?;
    // The verification of K3s's re-pins runs and ends the sweep episode.
    node.wait_sweep_after(swept_before).await?;

    node.client.ctr_remove_cri_pin(HELM).await?;
    node.wait_history("helm released", Some(HELM), |h| {
        h.iter().any(|e| action(e) == Action::Released)
    })
    .await?;
    recorder
        .wait_until("the operator's unpin", |t| {
            envelopes_of(t, HELM).iter().any(|e| {
                let labels = &e["payload"]["labels"];
                labels.get(K3S_PIN_LABEL).is_some() && labels.get(CRI_PIN_LABEL).is_none()
            })
        })
        .await?;
    // Nothing is pending in the daemon (no verification, nothing swept) once it stops.
    node.wait_status("nothing pending", |s| {
        s["verification_pending"] == false && s["intents_swept"] == 0
    })
    .await?;
    node.stop_pinkeeper()?;
    recorder.stop()?;
    let recording = recorder.text();
    ensure!(
        recording.matches(r#"{"disconnect":true"#).count() == 1
            && recording.matches(r#"{"connect":true"#).count() == 2,
        "the K3s restart should be one disconnection:\n{recording}"
    );

    // What the daemon decided live, from its ledger.
    let ledger = pinkeeper::ledger::Ledger::open(&node.state_dir())?;
    let history = ledger.history(None, usize::MAX)?;
    let mut live_pins = BTreeSet::new();
    for entry in history.iter().filter(|h| h.action == Action::Restored) {
        live_pins.insert(pin(&entry.name, reason_of(&entry.detail)?));
    }
    let live_intents: BTreeMap<String, IntentState> = ledger
        .intents()?
        .into_iter()
        .map(|i| (i.name.into(), i.state))
        .collect();
    drop(ledger);
    // The scenario did what it is meant to: web and its alias restored, helm released. On a
    // loaded machine K3s may import an archive later than the test's short settle time after
    // its last event: the verification then restores that image too ("not re-pinned"), which
    // is right, and the replay must decide the same.
    let expected: BTreeSet<_> = web
        .iter()
        .map(|n| pin(n, RestoreReason::ArchiveGone))
        .collect();
    let not_repinned = format!("{:?}", RestoreReason::NotRepinned);
    ensure!(
        expected.is_subset(&live_pins)
            && live_pins
                .difference(&expected)
                .all(|(_, why)| *why == not_repinned),
        "the daemon restored {live_pins:?}, expected {expected:?}\n{}",
        node.log()
    );
    ensure!(live_intents.get(HELM) == Some(&IntentState::Released));

    // What the engine decides offline from the recording.
    let mut replay = Replay::new(Config {
        settle: SETTLE_MS,
        ..Config::default()
    });
    replay
        .run(&recording)
        .map_err(|e| anyhow!("the recording does not replay: {e}\n{recording}"))?;
    let replayed_pins: BTreeSet<(String, String)> = replay
        .decisions
        .iter()
        .filter_map(|(_, o)| match o {
            Output::Pin { name, reason } => Some(pin(name, *reason)),
            _ => None,
        })
        .collect();
    let replayed_intents: BTreeMap<String, IntentState> = replay
        .ledger()
        .values()
        .map(|i| (i.name.to_string(), i.state))
        .collect();
    let decisions: Vec<String> = replay
        .decisions
        .iter()
        .filter_map(|(at, o)| pinkeeper::replay::describe(at.wall, o))
        .collect();
    ensure!(
        replayed_pins == live_pins,
        "pins: replayed {replayed_pins:?}, live {live_pins:?}\nreplay:\n{}\nlive history:\n{history:#?}",
        decisions.join("\n")
    );
    ensure!(
        replayed_intents == live_intents,
        "intents: replayed {replayed_intents:?}, live {live_intents:?}\nreplay:\n{}",
        decisions.join("\n")
    );

    // A recording is a fixture as it stands (the check of tests/replay.rs): reconnecting and
    // letting every timer fire changes nothing further.
    let pins = replay.pins_written.len();
    replay.connect();
    replay.settle();
    ensure!(
        replay.pins_written.len() == pins,
        "the replay pinned again: {:?}",
        replay.pins_written
    );

    // And `pinkeeper replay` prints the same decisions, as text and as JSON.
    let run = |json: bool| -> Result<String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pinkeeper"));
        command
            .arg("replay")
            .arg("--settle-ms")
            .arg(SETTLE_MS.to_string());
        if json {
            command.arg("--json");
        }
        let output = command.arg(&recorder.out).output()?;
        ensure!(
            output.status.success(),
            "pinkeeper replay failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };
    let text = run(false)?;
    for name in &web {
        ensure!(
            text.contains(&format!("pin {name} (archive-gone: ")),
            "pinkeeper replay did not show the pin of {name}:\n{text}"
        );
    }
    let json_pins = run(true)?
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|v| v["decision"] == "pin")
        .count();
    ensure!(
        json_pins == web.len(),
        "{json_pins} pins in the JSON output"
    );
    Ok(())
}

/// `--duration-secs` stops the recorder by itself (exit 0, a file that replays); an output file
/// that cannot be created is exit 1 with a message naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_after_its_duration_and_names_a_bad_output_file() -> Result<()> {
    let node = Node::new(Version::V1_6, ARCHIVES, false, SETTLE_MS).await?;
    let stderr_path = node.dir.path().join("record.stderr");
    let record = |out: &std::path::Path| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
            .arg("record")
            .arg("--out")
            .arg(out)
            .arg("--containerd-socket")
            .arg(node.containerd.socket())
            .arg("--images-dir")
            .arg(node.images_dir())
            .arg("--duration-secs")
            .arg("1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()?;
        // It must stop by itself: waited for with the tests' one deadline, else killed.
        let stopped = common::eventually_blocking("pinkeeper record to stop by itself", || {
            Ok(child.try_wait()?)
        });
        if stopped.is_err() {
            let _ = child.kill();
        }
        let status = child.wait()?;
        stopped?;
        Ok::<_, anyhow::Error>((status, std::fs::read_to_string(&stderr_path)?))
    };
    let bad = node.dir.path().join("no-such-dir/recording.jsonl");
    let (status, stderr) = record(&bad)?;
    ensure!(
        status.code() == Some(1) && stderr.contains(&bad.display().to_string()),
        "{status:?}: {stderr}"
    );

    let out = node.dir.path().join("recording.jsonl");
    let (status, stderr) = record(&out)?;
    ensure!(status.success(), "{status:?}: {stderr}");
    let text = std::fs::read_to_string(&out)?;
    ensure!(
        text.starts_with("// recorded by pinkeeper record ")
            && text.contains(r#""web.tar.gz":["registry.example.com/team/web:2.3"]"#)
            && text.contains(r#"{"connect":true"#),
        "{text}"
    );
    let mut replay = Replay::new(Config::default());
    replay.run(&text).map_err(|e| anyhow!("{e}\n{text}"))?;
    ensure!(replay.connected() && replay.files.len() == 3);
    Ok(())
}
