//! The harness the integration tests share: a node with a private containerd (1.6, 1.7 or
//! 2.x), an images directory, the `pinkeeper` binary running as its own process, and the
//! testkit's K3s emulator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
pub use pinkeeper::engine::Action;
use pinkeeper_testkit::archive::{write_archive, Layout, OciNames, TestImage};
use pinkeeper_testkit::{
    Client, Containerd, ImageInfo, K3s, K3sConfig, Version, CRI_PIN_LABEL, K3S_PIN_LABEL,
    K8S_NAMESPACE,
};

/// How long any wait for state may take before the test fails: generous, for a loaded
/// 2-core machine (a green run never waits this long; only a broken one does).
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Between two looks at the state.
const POLL: Duration = Duration::from_millis(20);

/// The one wait of the integration tests: polls `probe` until it yields a value, and fails
/// after [`DEADLINE`] naming `what`. `probe` looks at state (the daemon's answers, the image
/// store, a process), never at the time.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for synchronous code (called from a test's runtime or from none): it waits on
/// a thread of its own, with a runtime of its own.
pub fn eventually_blocking<T: Send>(
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>> + Send,
) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()?
                    .block_on(eventually(what, || std::future::ready(probe())))
            })
            .join()
            .unwrap_or_else(|_| bail!("waiting for {what} panicked"))
    })
}

/// One archive of the images dir: file name, layout, image names.
pub type Archive<'a> = (&'a str, Layout, &'a [&'a str]);

pub const APP: &str = "docker.io/library/app:1";
pub const WEB: &str = "registry.example.com/team/web:2.3";
pub const PAUSE: &str = "docker.io/rancher/mirrored-pause:3.6";
pub const HELM: &str = "docker.io/rancher/klipper-helm:v0.9.3";
/// Quiet time pinkeeper waits before checking K3s's re-pins, short for the tests (a setting of
/// the daemon: no test waits for it; they wait for the verification's summary in `status`).
pub const SETTLE_MS: u64 = 400;

/// app.tar (OCI, containerd's name annotation) and web.tar.gz (docker save).
pub const APP_AND_WEB: &[Archive<'static>] = &[
    (
        "app.tar",
        Layout::Oci {
            names: OciNames::ContainerdName,
            index_last: false,
        },
        &[APP],
    ),
    ("web.tar.gz", Layout::DockerSave, &[WEB]),
];

/// The README's node: [`APP_AND_WEB`] and K3s's own air-gap images archive.
pub const README_NODE: &[Archive<'static>] = &[
    APP_AND_WEB[0],
    APP_AND_WEB[1],
    (
        "k3s-airgap-images.tar.zst",
        Layout::DockerSave,
        &[PAUSE, HELM],
    ),
];

/// A node: a private containerd, an images dir, a state dir, pinkeeper, and "K3s".
pub struct Node {
    pub containerd: Containerd,
    pub dir: tempfile::TempDir,
    pinkeeper: Option<Child>,
    pub k3s: K3s,
    pub client: Client,
    settle_ms: u64,
}

impl Node {
    /// A node whose images dir holds `archives`; pinkeeper (once started) verifies K3s's
    /// re-pins `settle_ms` after a start-up's last event.
    pub async fn new(
        version: Version,
        archives: &[Archive<'_>],
        cache_json: bool,
        settle_ms: u64,
    ) -> Result<Node> {
        Node::with_options(version, archives, cache_json, settle_ms, Default::default()).await
    }

    /// [`Node::new`] with containerd configured by `options` (CRI off, ...).
    pub async fn with_options(
        version: Version,
        archives: &[Archive<'_>],
        cache_json: bool,
        settle_ms: u64,
        options: pinkeeper_testkit::Options,
    ) -> Result<Node> {
        let containerd = Containerd::start_with(version, options).await?;
        let dir = tempfile::Builder::new().prefix("pkit").tempdir_in("/tmp")?;
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images)?;
        for (file, layout, names) in archives {
            let images_of: Vec<TestImage> = names.iter().map(|n| TestImage::new(*n)).collect();
            write_archive(&images.join(file), *layout, &images_of)?;
        }
        let mut config = K3sConfig::new(containerd.socket(), &images);
        config.cache_json = cache_json;
        config.poll_interval = Duration::from_millis(100);
        let client = containerd.client(K8S_NAMESPACE).await?;
        Ok(Node {
            k3s: K3s::new(config),
            containerd,
            dir,
            pinkeeper: None,
            client,
            settle_ms,
        })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("pk.sock")
    }

    /// Runs `pinkeeper ARGS --control-socket <this node's>`: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
            .args(args)
            .arg("--control-socket")
            .arg(self.control_socket())
            .output()
            .context("running the pinkeeper CLI")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs the CLI with `--json`, expects exit 0 and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let (code, out, err) = self.cli(&all)?;
        ensure!(
            code == 0,
            "pinkeeper {all:?} exited {code}: {err}\npinkeeper log:\n{}",
            self.log()
        );
        serde_json::from_str(&out).with_context(|| format!("pinkeeper {all:?} printed {out}"))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pinkeeper.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn start_pinkeeper(&mut self) -> Result<()> {
        self.start_pinkeeper_with(&[])
    }

    /// Starts pinkeeper with `extra` arguments after this node's own.
    pub fn start_pinkeeper_with(&mut self, extra: &[&str]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
            .arg("run")
            .arg("--containerd-socket")
            .arg(self.containerd.socket())
            .arg("--images-dir")
            .arg(self.images_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--control-socket")
            .arg(self.control_socket())
            .arg("--settle-ms")
            .arg(self.settle_ms.to_string())
            .args(extra)
            .env("PINKEEPER_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting pinkeeper")?;
        self.pinkeeper = Some(child);
        Ok(())
    }

    /// The running pinkeeper's pid.
    pub fn pinkeeper_pid(&self) -> Option<u32> {
        self.pinkeeper.as_ref().map(Child::id)
    }

    /// `kill -9`.
    pub fn kill_pinkeeper(&mut self) -> Result<()> {
        if let Some(mut child) = self.pinkeeper.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM; pinkeeper must exit 0.
    pub fn stop_pinkeeper(&mut self) -> Result<()> {
        match self.pinkeeper.take() {
            Some(child) => terminate(child, "pinkeeper", || self.log()),
            None => Ok(()),
        }
    }

    /// `pinkeeper status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.cli_json(&["status"])
    }

    /// Waits until pinkeeper answers `status` and `check` holds on it.
    pub async fn wait_status(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let check = &check;
        let waited = eventually(what, || {
            let answer = self.cli(&["status", "--json"]);
            async move {
                let (code, out, _) = answer?;
                if code != 0 {
                    return Ok(None);
                }
                let status: serde_json::Value = serde_json::from_str(&out)?;
                Ok(check(&status).then_some(status))
            }
        })
        .await;
        waited.map_err(|e| {
            let now = self.cli(&["status"]).map(|(_, out, err)| out + &err);
            anyhow::anyhow!("{e}; status now: {now:?}\npinkeeper log:\n{}", self.log())
        })
    }

    /// The ledger's history (`pinkeeper history --json`), of `name` or of all, newest first.
    pub fn history(&self, name: Option<&str>) -> Result<Vec<serde_json::Value>> {
        let mut args = vec!["history", "--limit", "1000000"];
        args.extend(name);
        let history = self.cli_json(&args)?;
        Ok(history["entries"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `check` holds on the history of `name` (or of all).
    pub async fn wait_history(
        &self,
        what: &str,
        name: Option<&str>,
        check: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<Vec<serde_json::Value>> {
        let check = &check;
        let waited = eventually(what, || {
            // Not answering yet (starting) is not an error: the deadline tells.
            let entries = self.history(name).ok();
            async move { Ok(entries.filter(|e| check(e))) }
        })
        .await;
        waited.map_err(|e| {
            let now = self.history(name).unwrap_or_default();
            anyhow::anyhow!("{e}; history now: {now:#?}\npinkeeper log:\n{}", self.log())
        })
    }

    /// Waits until pinkeeper has recorded `count` intents (its history's `recorded` entries).
    pub async fn wait_recorded(&self, count: usize) -> Result<Vec<serde_json::Value>> {
        self.wait_history(&format!("{count} intent(s) recorded"), None, |h| {
            actions(h, Action::Recorded) >= count
        })
        .await
    }

    /// Waits until a sweep episode that started after `after_ms` (0: any) has been verified
    /// and summarised; returns status's `last_sweep`. What the verification could restore is
    /// decided (and written) by then.
    pub async fn wait_sweep_after(&self, after_ms: u64) -> Result<serde_json::Value> {
        let status = self
            .wait_status("a sweep summarised", |s| {
                s["last_sweep"]["started_ms"]
                    .as_u64()
                    .is_some_and(|t| t > after_ms)
            })
            .await?;
        Ok(status["last_sweep"].clone())
    }

    /// When the last summarised sweep started (0: none since pinkeeper started).
    pub fn last_sweep_started(&self) -> Result<u64> {
        Ok(self.status()?["last_sweep"]["started_ms"]
            .as_u64()
            .unwrap_or(0))
    }

    /// Waits until pinkeeper has finished more than `after` reads of the images directory.
    pub async fn wait_scans_after(&self, after: u64) -> Result<u64> {
        let status = self
            .wait_status(
                &format!("a read of the images directory after read {after}"),
                |s| s["images_dir_scans"].as_u64().unwrap_or(0) > after,
            )
            .await?;
        Ok(status["images_dir_scans"].as_u64().unwrap_or(0))
    }

    pub async fn images(&self) -> Result<BTreeMap<String, ImageInfo>> {
        match self.client.images_by_name().await {
            Ok(images) => Ok(images),
            Err(e) => bail!(
                "{e:#}\ncontainerd log:\n{}\npinkeeper log:\n{}",
                self.containerd.log_tail(),
                self.log()
            ),
        }
    }

    /// K3s restarts: its containerd is killed and started again; once pinkeeper (if it runs
    /// and answers) has subscribed to the new containerd, K3s sweeps and re-imports the
    /// images dir. (K3s sweeps about a second after starting containerd, and pinkeeper
    /// reconnects within a few hundred ms: the tests wait for that state, not for a second.)
    pub async fn restart_k3s(&mut self) -> Result<()> {
        self.restart_containerd().await?;
        self.k3s_starts_again().await
    }

    /// The first half of [`Node::restart_k3s`]: containerd restarted, and pinkeeper (if it
    /// runs and answers) subscribed to it again. A test with another follower (`pinkeeper
    /// record`) waits for it too before [`Node::k3s_starts_again`].
    pub async fn restart_containerd(&mut self) -> Result<()> {
        let watching = self.pinkeeper.is_some() && self.cli(&["status"])?.0 == 0;
        let restarted_ms = wall_ms();
        self.containerd.restart().await?;
        self.client = self.containerd.client(K8S_NAMESPACE).await?;
        if watching {
            self.wait_status("pinkeeper subscribed to the restarted containerd", |s| {
                s["connected"] == true
                    && s["connected_since_ms"]
                        .as_u64()
                        .is_some_and(|t| t >= restarted_ms)
            })
            .await?;
        }
        Ok(())
    }

    /// The second half of [`Node::restart_k3s`]: K3s sweeps and re-imports the images dir.
    pub async fn k3s_starts_again(&mut self) -> Result<()> {
        if let Err(e) = self.k3s.start().await {
            bail!(
                "K3s's start failed: {e:#}\ncontainerd log:\n{}\npinkeeper log:\n{}",
                self.containerd.log_tail(),
                self.log()
            );
        }
        Ok(())
    }

    /// Waits until `check` holds on the image records.
    pub async fn wait_until(
        &self,
        what: &str,
        check: impl Fn(&BTreeMap<String, ImageInfo>) -> bool,
    ) -> Result<BTreeMap<String, ImageInfo>> {
        let check = &check;
        let waited = eventually(what, || async move {
            let images = self.images().await?;
            Ok(check(&images).then_some(images))
        })
        .await;
        match waited {
            Ok(images) => Ok(images),
            Err(e) => bail!(
                "{e}; images: {:#?}\npinkeeper log:\n{}",
                self.images().await,
                self.log()
            ),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill_pinkeeper();
    }
}

/// The wall clock in ms, as pinkeeper's status shows times.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The action of an entry of `pinkeeper history --json`, read as the engine's enum.
pub fn action(entry: &serde_json::Value) -> Action {
    Action::from(entry["action"].as_str().unwrap_or_default())
}

/// How many history entries have `action`.
pub fn actions(history: &[serde_json::Value], want: Action) -> usize {
    history.iter().filter(|e| action(e) == want).count()
}

/// Whether the history has an entry of `name` with `action`.
pub fn has_entry(history: &[serde_json::Value], name: &str, want: Action) -> bool {
    history
        .iter()
        .any(|e| e["name"] == name && action(e) == want)
}

/// Names of the images of `wanted` plus their `repo@digest` aliases.
pub fn with_aliases(images: &BTreeMap<String, ImageInfo>, wanted: &[&str]) -> Vec<String> {
    let mut names = Vec::new();
    for name in wanted {
        names.push(name.to_string());
        if let Some(info) = images.get(*name) {
            let repo = name.rsplit_once(':').map_or(*name, |(r, _)| r);
            let alias = format!("{repo}@{}", info.digest);
            if images.contains_key(&alias) {
                names.push(alias);
            }
        }
    }
    names
}

pub fn cri_pinned(images: &BTreeMap<String, ImageInfo>, name: &str) -> bool {
    images.get(name).is_some_and(|i| i.has(CRI_PIN_LABEL))
}

pub fn k3s_pinned(images: &BTreeMap<String, ImageInfo>, name: &str) -> bool {
    images.get(name).is_some_and(|i| i.has(K3S_PIN_LABEL))
}

/// Every scenario runs on each containerd version.
#[macro_export]
macro_rules! on_every_version {
    ($scenario:ident) => {
        mod $scenario {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_1_6() -> Result<()> {
                super::$scenario(Version::V1_6).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_1_7() -> Result<()> {
                super::$scenario(Version::V1_7).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_2_x() -> Result<()> {
                super::$scenario(Version::V2).await
            }
        }
    };
}

/// Sends SIGTERM to `child` (`what`) and waits up to 10 s for it to exit 0; `log` says what it
/// printed when it did not.
pub fn terminate(mut child: Child, what: &str, log: impl Fn() -> String) -> Result<()> {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    ensure!(status.success(), "kill -TERM failed");
    let exited = eventually_blocking(&format!("{what} to exit on SIGTERM"), || {
        Ok(child.try_wait()?)
    })?;
    ensure!(
        exited.success(),
        "{what} exited with {exited} on SIGTERM:\n{}",
        log()
    );
    Ok(())
}
