//! The operator's CLI against a running daemon and a real containerd: every subcommand in
//! both output forms, and the control socket's guards (root only, stale and live sockets).

mod common;

use common::{APP, SETTLE_MS, WEB};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use common::{action, cri_pinned, eventually_blocking, k3s_pinned, with_aliases, Action, Node};
use pinkeeper_testkit::{Version, K3S_PIN_LABEL};
use serde_json::Value;

const EXTRA: &str = "docker.io/library/extra:1";
const ARCHIVES: &[common::Archive<'static>] = common::APP_AND_WEB;

fn names_of(list: &Value) -> Vec<String> {
    list["intents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn intent<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["intents"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

on_every_version!(every_subcommand_against_a_running_daemon);

async fn every_subcommand_against_a_running_daemon(version: Version) -> Result<()> {
    let mut node = Node::new(version, ARCHIVES, false, SETTLE_MS).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB]);
    node.wait_recorded(pinned.len()).await?;

    // status
    let status = node.cli_json(&["status"])?;
    ensure!(status["connected"] == true, "{status}");
    ensure!(
        !status["containerd_version"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{status}"
    );
    ensure!(status["intents_held"] == pinned.len(), "{status}");
    ensure!(
        status["at_risk"].as_array().is_some_and(|a| a.is_empty()),
        "{status}"
    );
    let (code, text, _) = node.cli(&["status"])?;
    ensure!(code == 0 && text.contains("connected to"), "{text}");

    // doctor asks the running daemon
    let socket = node.containerd.socket().display().to_string();
    let images_dir = node.images_dir().display().to_string();
    let state_dir = node.state_dir().display().to_string();
    let doctor_args = [
        "doctor",
        "--containerd-socket",
        socket.as_str(),
        "--images-dir",
        images_dir.as_str(),
        "--state-dir",
        state_dir.as_str(),
    ];
    let (_, out, err) = node.cli(&[&doctor_args[..], &["--json"]].concat())?;
    let doctor: Value = serde_json::from_str(&out).with_context(|| format!("{out}{err}"))?;
    let check = |name: &str| {
        doctor["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .map(|c| c["status"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    ensure!(check("control-socket") == "ok", "{doctor}");
    ensure!(
        check("ledger") == "ok" && check("at-risk") == "ok",
        "{doctor}"
    );

    // list, with a pattern
    let list = node.cli_json(&["list"])?;
    let mut listed = names_of(&list);
    listed.sort();
    let mut want = pinned.clone();
    want.sort();
    ensure!(listed == want, "list: {listed:?}, want {want:?}");
    let app = intent(&list, APP).context("APP listed")?;
    ensure!(
        app["archive"] == "present" && app["pinned_now"] == true && app["state"] == "held",
        "{app}"
    );
    ensure!(
        app["why"].as_str().unwrap_or("").contains("app.tar"),
        "{app}"
    );
    let webs = names_of(&node.cli_json(&["list", "*team/web*"])?);
    ensure!(
        webs.len() == 2 && webs.iter().all(|n| n.contains("team/web")),
        "{webs:?}"
    );
    let (code, text, _) = node.cli(&["list", "library/app"])?;
    ensure!(
        code == 0 && text.starts_with("IMAGE") && text.contains(APP) && !text.contains(WEB),
        "{text}"
    );

    // pin: an image nobody pinned; then one that does not exist
    let target = node.client.get(APP).await?.target;
    node.client
        .create_image(EXTRA, target.context("app's target")?, &Default::default())
        .await?;
    let pin = node.cli_json(&["pin", EXTRA])?;
    ensure!(
        pin["was_pinned"] == false && pin["intent"]["name"] == EXTRA,
        "{pin}"
    );
    let images = node.images().await?;
    ensure!(
        cri_pinned(&images, EXTRA) && !k3s_pinned(&images, EXTRA),
        "pin must set the CRI pin only: {:?}",
        images.get(EXTRA)
    );
    let list = node.cli_json(&["list", EXTRA])?;
    let extra = intent(&list, EXTRA).context("EXTRA listed")?;
    ensure!(
        // Same target as app:1, but not K3s's `repo@digest` alias: no file provides this
        // name, and K3s never pins it again (so it is restored at once after a sweep).
        extra["why"].as_str().unwrap_or("").contains("operator") && extra["archive"] == "none",
        "{extra}"
    );
    let (code, text, _) = node.cli(&["pin", EXTRA])?;
    ensure!(code == 0 && text.contains("already pinned"), "{text}");
    let (code, _, err) = node.cli(&["pin", "docker.io/library/missing:1"])?;
    ensure!(code == 1 && err.contains("no image"), "{code} {err}");

    // a restart with web's archive deleted: status tells the sweep, history the restore
    let swept_before = node.last_sweep_started()?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let web = with_aliases(&first, &[WEB]);
    node.wait_until("web restored", |images| {
        web.iter().all(|n| cri_pinned(images, n))
    })
    .await?;
    node.wait_sweep_after(swept_before).await?;
    let status = node.cli_json(&["status"])?;
    let sweep = &status["last_sweep"];
    ensure!(
        sweep["restored_archive_gone"] == 2 && sweep["seen_live"] == true,
        "{status}"
    );
    ensure!(
        status["pins_restored"] == 2 && status["archives_gone"] == 2,
        "{status}"
    );
    let (code, text, _) = node.cli(&["status"])?;
    ensure!(
        code == 0 && text.contains("2 restored by pinkeeper"),
        "{text}"
    );
    let list = node.cli_json(&["list", WEB])?;
    let w = intent(&list, WEB).context("WEB listed")?;
    ensure!(
        w["archive"] == "gone" && w["restores"] == 1 && w["last_restored_ms"] != 0,
        "{w}"
    );
    ensure!(
        intent(&node.cli_json(&["list"])?, EXTRA).is_some_and(|e| e["pinned_now"] == true),
        "K3s's sweep must leave the operator's CRI-only pin alone"
    );
    let history = node.cli_json(&["history", WEB])?;
    let entries = history["entries"].as_array().context("entries")?;
    ensure!(
        entries.iter().all(|e| e["name"] == WEB)
            && entries.iter().any(|e| action(e) == Action::Restored)
            && entries
                .last()
                .is_some_and(|e| action(e) == Action::Recorded),
        "history newest first, of WEB only: {history}"
    );
    let (code, text, _) = node.cli(&["history", "--limit", "3"])?;
    ensure!(
        code == 0 && text.starts_with("TIME") && text.lines().count() == 4,
        "{text}"
    );

    // unpin one name: the alias keeps the image pinned, and K3s will pin it again
    let app_names = with_aliases(&first, &[APP]);
    let unpin = node.cli_json(&["unpin", APP])?;
    ensure!(unpin["names"] == serde_json::json!([APP]), "{unpin}");
    // EXTRA was created on app:1's target: another name of the same image.
    ensure!(
        unpin["still_pinned_aliases"] == serde_json::json!([app_names[1], EXTRA]),
        "{unpin}"
    );
    let warnings = unpin["warnings"].to_string();
    ensure!(
        warnings.contains("again at its next start") && warnings.contains("--all-names"),
        "{unpin}"
    );
    let images = node.images().await?;
    ensure!(!cri_pinned(&images, APP) && cri_pinned(&images, &app_names[1]));
    ensure!(
        k3s_pinned(&images, APP),
        "unpin must leave K3s's label alone"
    );
    // ... then every name
    let (code, text, _) = node.cli(&["unpin", APP, "--all-names"])?;
    ensure!(
        code == 0 && text.contains(&format!("unpinned {}", app_names[1])),
        "{text}"
    );
    ensure!(text.contains(&format!("unpinned {EXTRA}")), "{text}");
    let images = node.images().await?;
    ensure!(app_names.iter().all(|n| !cri_pinned(&images, n)) && !cri_pinned(&images, EXTRA));
    let list = node.cli_json(&["list"])?;
    ensure!(
        intent(&list, APP).is_none(),
        "released intents are hidden: {list}"
    );
    let all = node.cli_json(&["list", "--all", APP])?;
    let a = intent(&all, APP).context("released APP listed with --all")?;
    ensure!(
        a["state"] == "released"
            && a["released_because"]
                .as_str()
                .unwrap_or("")
                .contains("unpin"),
        "{a}"
    );
    let (code, _, err) = node.cli(&["unpin", "docker.io/library/missing:1"])?;
    ensure!(code == 1 && err.contains("no image"), "{err}");
    // reconcile: a dry run changes nothing; a real one agrees
    let before = node.images().await?;
    let dry = node.cli_json(&["reconcile", "--dry-run"])?;
    ensure!(dry["dry_run"] == true, "{dry}");
    ensure!(
        node.images().await? == before,
        "a dry run changed containerd"
    );
    let (code, text, _) = node.cli(&["reconcile", "--dry-run"])?;
    ensure!(code == 0 && text.contains("would"), "{text}");
    let real = node.cli_json(&["reconcile"])?;
    ensure!(real["dry_run"] == false, "{real}");
    // The release survives a full reconcile: nothing re-pins it behind the operator's back.
    ensure!(!cri_pinned(&node.images().await?, APP));
    ensure!(node.cli_json(&["status"])?["last_reconcile_ms"] != 0);

    // containerd away: status says so, pin refuses with a reason
    node.containerd.stop()?;
    node.wait_status("status to notice containerd went away", |s| {
        s["connected"] == false
    })
    .await?;
    let (code, _, err) = node.cli(&["pin", APP])?;
    ensure!(code == 1 && err.contains("not connected"), "{err}");
    node.stop_pinkeeper()?;
    ensure!(
        !node.control_socket().exists(),
        "the socket is removed at exit"
    );
    let (code, _, err) = node.cli(&["status"])?;
    ensure!(code == 1 && err.contains("not running"), "{err}");
    let (code, _, _) = node.cli(&["pin"])?;
    ensure!(code == 2, "bad usage exits 2");
    let _ = K3S_PIN_LABEL;
    Ok(())
}

/// A daemon with no containerd at all: the API is served anyway.
fn spawn_daemon(dir: &std::path::Path, state: &str, log: &str) -> Result<std::process::Child> {
    let log = std::fs::File::create(dir.join(log))?;
    Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
        .arg("run")
        .arg("--containerd-socket")
        .arg(dir.join("no-containerd.sock"))
        .arg("--images-dir")
        .arg(dir.join("images"))
        .arg("--state-dir")
        .arg(dir.join(state))
        .arg("--control-socket")
        .arg(dir.join("run/pk.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting pinkeeper")
}

fn cli_as(uid: Option<u32>, socket: &std::path::Path, args: &[&str]) -> Result<(i32, String)> {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(env!("CARGO_BIN_EXE_pinkeeper"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_pinkeeper")),
    };
    let out = cmd
        .args(args)
        .arg("--control-socket")
        .arg(socket)
        .output()
        .context("running the CLI")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn wait_for(path: &std::path::Path) -> Result<()> {
    eventually_blocking(&format!("{} to appear", path.display()), || {
        Ok(path.exists().then_some(()))
    })
}

#[test]
fn the_control_socket_is_root_only_and_guarded() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to switch to an unprivileged user");
        return Ok(());
    }
    let dir = tempfile::Builder::new()
        .prefix("pkctl")
        .tempdir_in("/tmp")?;
    // Others may walk to the socket: only its own mode and the peer check keep them out.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir_all(dir.path().join("images"))?;
    std::fs::create_dir_all(dir.path().join("run"))?;
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let socket = dir.path().join("run/pk.sock");
    let mut daemon = spawn_daemon(dir.path(), "state", "first.log")?;
    wait_for(&socket)?;
    let meta = std::fs::metadata(&socket)?;
    ensure!(
        meta.mode() & 0o777 == 0o600 && meta.uid() == 0,
        "mode {:o}",
        meta.mode()
    );
    let (code, _) = cli_as(None, &socket, &["status"])?;
    ensure!(code == 0);

    // Not root: the socket's mode refuses...
    let (code, err) = cli_as(Some(65534), &socket, &["status"])?;
    ensure!(code == 1 && err.contains("permission denied"), "{err}");
    // ... and with the mode loosened, the daemon's peer check does.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let (code, err) = cli_as(Some(65534), &socket, &["list"])?;
    ensure!(code == 1 && err.contains("closed the connection"), "{err}");
    let log = std::fs::read_to_string(dir.path().join("first.log"))?;
    ensure!(
        log.contains("refused a control connection") && log.contains("uid=65534"),
        "{log}"
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;

    // A second pinkeeper on the same socket is refused, and leaves the first one alone.
    let second = spawn_daemon(dir.path(), "state2", "second.log")?;
    let status = second.wait_with_output()?.status;
    ensure!(status.code() == Some(1), "second pinkeeper: {status}");
    let log = std::fs::read_to_string(dir.path().join("second.log"))?;
    ensure!(log.contains("already serving the control socket"), "{log}");
    ensure!(
        cli_as(None, &socket, &["status"])?.0 == 0,
        "the first one still answers"
    );

    // kill -9 leaves a stale socket: the next start replaces it.
    daemon.kill()?;
    daemon.wait()?;
    ensure!(socket.exists());
    let (code, err) = cli_as(None, &socket, &["status"])?;
    ensure!(code == 1 && err.contains("not running"), "{err}");
    let mut daemon = spawn_daemon(dir.path(), "state", "third.log")?;
    eventually_blocking("the restarted daemon to answer", || {
        Ok((cli_as(None, &socket, &["status"])?.0 == 0).then_some(()))
    })?;
    let log = std::fs::read_to_string(dir.path().join("third.log"))?;
    ensure!(log.contains("replaced a stale control socket"), "{log}");

    // SIGTERM: exit 0, socket gone.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status()?;
    ensure!(status.success());
    ensure!(daemon.wait()?.success());
    ensure!(!socket.exists(), "the socket is removed at exit");
    Ok(())
}
