//! pinkeeper against real containerd daemons (Debian's 1.6, trixie's 1.7 and forky's 2.x,
//! private to each test), driven by the testkit's K3s emulator, which makes exactly K3s's calls.
//! The `pinkeeper` binary runs as its own process, as on a node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pinkeeper_testkit::archive::{write_archive, Layout, OciNames, TestImage};
use pinkeeper_testkit::{
    Client, Containerd, ImageInfo, K3s, K3sConfig, Version, CRI_MANAGED_LABEL, CRI_PIN_LABEL,
    K3S_PIN_LABEL, K8S_NAMESPACE,
};

const APP: &str = "docker.io/library/app:1";
const WEB: &str = "registry.example.com/team/web:2.3";
const PAUSE: &str = "docker.io/rancher/mirrored-pause:3.6";
const HELM: &str = "docker.io/rancher/klipper-helm:v0.9.3";
/// Quiet time pinkeeper waits before checking K3s's re-pins, short for the tests.
const SETTLE_MS: u64 = 400;
/// How long K3s takes from starting containerd to its sweep (it waits for CRI first).
const K3S_SWEEP_DELAY: Duration = Duration::from_millis(1000);

/// A node: a private containerd, an images dir, a state dir, pinkeeper, and "K3s".
struct Node {
    containerd: Containerd,
    dir: tempfile::TempDir,
    pinkeeper: Option<Child>,
    k3s: K3s,
    client: Client,
}

impl Node {
    async fn new(version: Version, cache_json: bool) -> Result<Node> {
        let containerd = Containerd::start(version).await?;
        let dir = tempfile::Builder::new().prefix("pkit").tempdir_in("/tmp")?;
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images)?;
        write_archive(
            &images.join("app.tar"),
            Layout::Oci {
                names: OciNames::ContainerdName,
                index_last: false,
            },
            &[TestImage::new(APP)],
        )?;
        write_archive(
            &images.join("web.tar.gz"),
            Layout::DockerSave,
            &[TestImage::new(WEB)],
        )?;
        write_archive(
            &images.join("k3s-airgap-images.tar.zst"),
            Layout::DockerSave,
            &[TestImage::new(PAUSE), TestImage::new(HELM)],
        )?;
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
        })
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pinkeeper.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn start_pinkeeper(&mut self) -> Result<()> {
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
            .arg(self.dir.path().join("state"))
            .arg("--control-socket")
            .arg(self.dir.path().join("pk.sock"))
            .arg("--settle-ms")
            .arg(SETTLE_MS.to_string())
            .env("PINKEEPER_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting pinkeeper")?;
        self.pinkeeper = Some(child);
        Ok(())
    }

    /// `kill -9`.
    fn kill_pinkeeper(&mut self) -> Result<()> {
        if let Some(mut child) = self.pinkeeper.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM; pinkeeper must exit 0.
    fn stop_pinkeeper(&mut self) -> Result<()> {
        if let Some(mut child) = self.pinkeeper.take() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()?;
            ensure!(status.success(), "kill -TERM failed");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait()? {
                    ensure!(
                        status.success(),
                        "pinkeeper exited with {status} on SIGTERM"
                    );
                    return Ok(());
                }
                ensure!(Instant::now() < deadline, "pinkeeper ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Waits until pinkeeper's log shows `count` lines containing `needle`.
    async fn wait_log(&self, needle: &str, count: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches(needle).count() < count {
            if Instant::now() > deadline {
                bail!(
                    "pinkeeper's log never showed {count} x {needle:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn images(&self) -> Result<BTreeMap<String, ImageInfo>> {
        match self.client.images_by_name().await {
            Ok(images) => Ok(images),
            Err(e) => bail!(
                "{e:#}\ncontainerd log:\n{}\npinkeeper log:\n{}",
                self.containerd.log_tail(),
                self.log()
            ),
        }
    }

    /// K3s restarts: its containerd is killed and started again, about a second later K3s
    /// sweeps and re-imports the images dir.
    async fn restart_k3s(&mut self) -> Result<()> {
        self.containerd.restart().await?;
        self.client = self.containerd.client(K8S_NAMESPACE).await?;
        tokio::time::sleep(K3S_SWEEP_DELAY).await;
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
    async fn wait_until(
        &self,
        what: &str,
        check: impl Fn(&BTreeMap<String, ImageInfo>) -> bool,
    ) -> Result<BTreeMap<String, ImageInfo>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let images = self.images().await?;
            if check(&images) {
                return Ok(images);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; images: {images:#?}\npinkeeper log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill_pinkeeper();
    }
}

/// Names of the images of `wanted` plus their `repo@digest` aliases.
fn with_aliases(images: &BTreeMap<String, ImageInfo>, wanted: &[&str]) -> Vec<String> {
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

fn cri_pinned(images: &BTreeMap<String, ImageInfo>, name: &str) -> bool {
    images.get(name).is_some_and(|i| i.has(CRI_PIN_LABEL))
}

fn k3s_pinned(images: &BTreeMap<String, ImageInfo>, name: &str) -> bool {
    images.get(name).is_some_and(|i| i.has(K3S_PIN_LABEL))
}

/// Every scenario runs on each containerd version.
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

on_every_version!(restores_after_a_restart_with_an_archive_deleted);
on_every_version!(repairs_a_sweep_missed_while_stopped);
on_every_version!(respects_an_operator_unpin);
on_every_version!(restores_what_the_cache_bug_left_unpinned);
on_every_version!(follows_containerd_restarts_in_a_row);
on_every_version!(handles_a_whole_map_writer_outside_any_sweep);

/// FACTS.md section 2's restart: archives kept and deleted, pinkeeper running throughout.
async fn restores_after_a_restart_with_an_archive_deleted(version: Version) -> Result<()> {
    let mut node = Node::new(version, false).await?;
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
    node.wait_log("action=recorded", pinned.len()).await?;

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
    // Let the verification run, then check nothing else moved.
    tokio::time::sleep(Duration::from_millis(SETTLE_MS * 3)).await;
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
    ensure!(node
        .log()
        .contains("K3s startup sweep: 8 pinned image(s) swept, 2 restored"));
    node.stop_pinkeeper()?;
    Ok(())
}

/// pinkeeper is killed before K3s restarts and started again only after K3s is done.
async fn repairs_a_sweep_missed_while_stopped(version: Version) -> Result<()> {
    let mut node = Node::new(version, false).await?;
    node.k3s.start().await?;
    let first = node.images().await?;
    // Started after the first boot: it learns the intents from its first listing.
    node.start_pinkeeper()?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_log("action=recorded", pinned.len()).await?;
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
    // Its history says why (logged once the ledger has it).
    node.wait_log("a missed K3s sweep", 1).await?;
    Ok(())
}

/// `ctr images label NAME io.cri-containerd.pinned=` releases the intent for good.
async fn respects_an_operator_unpin(version: Version) -> Result<()> {
    let mut node = Node::new(version, false).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_log("action=recorded", pinned.len()).await?;

    node.client.ctr_remove_cri_pin(WEB).await?;
    node.wait_log("intent released", 1).await?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    // The alias is still protected (the operator unpinned one name); WEB is not.
    let web_alias = with_aliases(&first, &[WEB])[1].clone();
    node.wait_until("the alias restored", |images| {
        cri_pinned(images, &web_alias)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(SETTLE_MS * 3)).await;
    let images = node.images().await?;
    ensure!(
        !cri_pinned(&images, WEB) && !k3s_pinned(&images, WEB),
        "the operator's unpin was undone: {:?}",
        images.get(WEB)
    );
    // And not at the next restart either.
    node.restart_k3s().await?;
    tokio::time::sleep(Duration::from_millis(SETTLE_MS * 3)).await;
    ensure!(!cri_pinned(&node.images().await?, WEB));
    Ok(())
}

/// K3s's `.cache.json` bug (k3s-io/k3s#14265): unchanged archives are skipped and left
/// unpinned; pinkeeper restores them once the start-up settles.
async fn restores_what_the_cache_bug_left_unpinned(version: Version) -> Result<()> {
    let mut node = Node::new(version, true).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_log("action=recorded", pinned.len()).await?;
    std::fs::remove_file(node.images_dir().join("web.tar.gz"))?;
    node.restart_k3s().await?;
    let after = node
        .wait_until("every image pinned again", |images| {
            pinned.iter().all(|n| cri_pinned(images, n))
        })
        .await?;
    ensure!(pinned.iter().all(|n| !k3s_pinned(&after, n)));
    node.wait_log("K3s did not pin it again", 1).await?;
    Ok(())
}

/// Restart after restart, with the archive put back and deleted again in turn: every sweep
/// of the deleted archive's image is repaired.
async fn follows_containerd_restarts_in_a_row(version: Version) -> Result<()> {
    let mut node = Node::new(version, false).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_log("action=recorded", pinned.len()).await?;
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
    ensure!(
        node.log()
            .matches("restored io.cri-containerd.pinned")
            .count()
            >= 8
    );
    Ok(())
}

/// The daemon waits for a containerd that is not there yet, then does its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_containerd() -> Result<()> {
    let mut node = Node::new(Version::V1_6, false).await?;
    node.k3s.start().await?;
    node.containerd.stop()?;
    node.start_pinkeeper()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        node.log().contains("waiting for containerd"),
        "{}",
        node.log()
    );
    node.containerd.resume().await?;
    node.client = node.containerd.client(K8S_NAMESPACE).await?;
    node.wait_log("action=recorded", 8).await?;
    node.stop_pinkeeper()?;
    Ok(())
}

/// `kill -9` at random moments of a first boot never leaves a ledger that cannot be opened,
/// and never loses a committed intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_breaks_the_ledger() -> Result<()> {
    let mut node = Node::new(Version::V1_6, false).await?;
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
        tokio::time::sleep(Duration::from_millis(seed % 120)).await;
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
    node.wait_log("reconciled after connecting", 1).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.stop_pinkeeper()?;
    let ledger = pinkeeper::ledger::Ledger::open(&state)?;
    ensure!(ledger.intents()?.len() >= 8);
    Ok(())
}

/// A tool rewrites label maps from a stale copy (`paths = ["labels"]`) while K3s is running:
/// dropping both pins of an image with K3s's label reads as a sweep (restored once settled),
/// dropping only the CRI pin as a deliberate unpin (released, left alone).
async fn handles_a_whole_map_writer_outside_any_sweep(version: Version) -> Result<()> {
    let mut node = Node::new(version, false).await?;
    node.start_pinkeeper()?;
    node.k3s.start().await?;
    let first = node.images().await?;
    let pinned = with_aliases(&first, &[APP, WEB, PAUSE, HELM]);
    node.wait_log("action=recorded", pinned.len()).await?;

    let without = |name: &str, keys: &[&str]| {
        let mut labels = first[name].labels.clone();
        for k in keys {
            labels.remove(*k);
        }
        labels
    };
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
    node.wait_log("intent released", 1).await?;
    tokio::time::sleep(Duration::from_millis(SETTLE_MS * 3)).await;
    let settled = node.images().await?;
    ensure!(
        !cri_pinned(&settled, HELM) && k3s_pinned(&settled, HELM),
        "helm: {:?}",
        settled.get(HELM)
    );
    Ok(())
}
