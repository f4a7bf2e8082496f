//! `pinkeeper-demo`: the story of the README, played against a private containerd.
//!
//! First boot imports three archives and pins them, pinkeeper runs beside "K3s", one archive is
//! deleted, K3s restarts (containerd restarted, sweep, re-import), and a table shows the images
//! and their pins before and after. Everything it starts or writes is removed at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use pinkeeper_testkit::archive::{write_archive, Layout, OciNames, TestImage};
use pinkeeper_testkit::{
    Containerd, ImageInfo, K3s, K3sConfig, Version, CRI_PIN_LABEL, K3S_PIN_LABEL, K8S_NAMESPACE,
};

#[derive(Parser)]
#[command(about = "Plays a K3s restart with a deleted archive, with pinkeeper running")]
struct Cli {
    /// The pinkeeper binary.
    #[arg(long, default_value = "target/release/pinkeeper")]
    pinkeeper: PathBuf,
    /// containerd version to run: 1.6 (Debian bookworm), 1.7 (trixie) or 2.x (forky).
    #[arg(long, default_value = "1.7")]
    containerd: String,
}

/// The archives of the story: file name, layout, image names.
fn archives() -> Vec<(&'static str, Layout, Vec<&'static str>)> {
    vec![
        (
            "app.tar",
            Layout::Oci {
                names: OciNames::ContainerdName,
                index_last: false,
            },
            vec!["docker.io/library/app:1"],
        ),
        (
            "web.tar.gz",
            Layout::DockerSave,
            vec!["registry.example.com/team/web:2.3"],
        ),
        (
            "k3s-airgap-images.tar.zst",
            Layout::DockerSave,
            vec![
                "docker.io/rancher/mirrored-pause:3.6",
                "docker.io/rancher/klipper-helm:v0.9.3",
            ],
        ),
    ]
}

const DELETED: &str = "web.tar.gz";

struct Pinkeeper {
    child: Child,
    log: PathBuf,
}

impl Pinkeeper {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("pinkeeper did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Pinkeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli).await {
        eprintln!("pinkeeper-demo: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: &Cli) -> Result<()> {
    let started = Instant::now();
    let pinkeeper_bin = cli.pinkeeper.canonicalize().with_context(|| {
        format!(
            "no pinkeeper binary at {}: build it first (make build)",
            cli.pinkeeper.display()
        )
    })?;
    let version = Version::parse(&cli.containerd)?;
    let dir = tempfile::Builder::new()
        .prefix("pkdemo")
        .tempdir_in("/tmp")?;
    let images_dir = dir.path().join("images");
    std::fs::create_dir_all(&images_dir)?;
    for (file, layout, names) in archives() {
        let images: Vec<TestImage> = names.iter().map(|n| TestImage::new(*n)).collect();
        write_archive(&images_dir.join(file), layout, &images)?;
    }

    let mut containerd = Containerd::start(version).await?;
    println!(
        "containerd {} started in {} (socket {})",
        containerd.reported_version(),
        dir.path().display(),
        containerd.socket().display()
    );
    let log = dir.path().join("pinkeeper.log");
    let child = Command::new(&pinkeeper_bin)
        .arg("run")
        .arg("--containerd-socket")
        .arg(containerd.socket())
        .arg("--images-dir")
        .arg(&images_dir)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--control-socket")
        .arg(dir.path().join("pinkeeper.sock"))
        .arg("--settle-ms")
        .arg("1000")
        .env("PINKEEPER_LOG", "info,pinkeeper=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", pinkeeper_bin.display()))?;
    let pinkeeper = Pinkeeper { child, log };

    let mut config = K3sConfig::new(containerd.socket(), &images_dir);
    config.poll_interval = Duration::from_millis(100);
    let k3s = K3s::new(config);
    println!(
        "\n1. K3s's first boot imports and pins {} archives",
        archives().len()
    );
    k3s.start().await?;
    let before = labels(&containerd).await?;
    let pinned = before.values().filter(|i| i.has(CRI_PIN_LABEL)).count();
    wait_for(&pinkeeper, "action=recorded", pinned).await?;
    table(&before, &images_dir);

    println!("\n2. The operator deletes {DELETED} to save disk; K3s restarts (containerd too): sweep, re-import");
    std::fs::remove_file(images_dir.join(DELETED))?;
    containerd.restart().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    k3s.start().await?;
    wait_for(&pinkeeper, "K3s startup sweep:", 1).await?;
    let after = labels(&containerd).await?;
    table(&after, &images_dir);

    println!("\n3. What pinkeeper said:");
    for line in pinkeeper.log().lines().filter(|l| l.contains(" INFO ")) {
        if line.contains("restored") || line.contains("sweep") {
            let text = line.split_once("daemon: ").map_or(line, |(_, t)| t);
            println!("   {text}");
        }
    }
    let restored: Vec<&String> = after
        .iter()
        .filter(|(_, i)| i.has(CRI_PIN_LABEL) && !i.has(K3S_PIN_LABEL))
        .map(|(n, _)| n)
        .collect();
    let unprotected: Vec<&String> = after
        .iter()
        .filter(|(n, i)| {
            before.get(*n).is_some_and(|b| b.has(CRI_PIN_LABEL)) && !i.has(CRI_PIN_LABEL)
        })
        .map(|(n, _)| n)
        .collect();
    pinkeeper.stop()?;
    drop(containerd);
    let dir_path = dir.path().to_path_buf();
    dir.close()?;
    println!(
        "\n{} image(s) of the deleted archive kept their pin thanks to pinkeeper; {} left unpinned. \
         Cleaned up {} and every process ({:.1} s).",
        restored.len(),
        unprotected.len(),
        dir_path.display(),
        started.elapsed().as_secs_f64()
    );
    if restored.is_empty() || !unprotected.is_empty() {
        bail!("the demo did not end as it should: restored {restored:?}, unpinned {unprotected:?}");
    }
    Ok(())
}

async fn labels(containerd: &Containerd) -> Result<BTreeMap<String, ImageInfo>> {
    let client = containerd.client(K8S_NAMESPACE).await?;
    let mut images = client.images_by_name().await?;
    // CRI's own `sha256:<config>` records are not what the operator looks at.
    images.retain(|name, _| !name.starts_with("sha256:"));
    Ok(images)
}

async fn wait_for(pinkeeper: &Pinkeeper, needle: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pinkeeper.log().matches(needle).count() < count {
        if Instant::now() > deadline {
            bail!(
                "pinkeeper never logged {needle:?}; its log:\n{}",
                pinkeeper.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

fn table(images: &BTreeMap<String, ImageInfo>, images_dir: &Path) {
    let present: Vec<String> = archives()
        .into_iter()
        .filter(|(f, _, _)| images_dir.join(f).exists())
        .flat_map(|(_, _, names)| names.into_iter().map(String::from))
        .collect();
    let width = images
        .keys()
        .map(|n| short(n).len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "   {:<width$}  {:<8}  {:<9}  {:<8}",
        "image", "archive", "K3s pin", "CRI pin"
    );
    for (name, info) in images {
        let repo_of = |n: &str| n.split(['@', ':']).next().map(String::from);
        let archive = if present
            .iter()
            .any(|p| p == name || repo_of(p) == repo_of(name) && name.contains('@'))
        {
            "present"
        } else {
            "gone"
        };
        let mark = |b: bool| if b { "pinned" } else { "-" };
        println!(
            "   {:<width$}  {:<8}  {:<9}  {:<8}",
            short(name),
            archive,
            mark(info.has(K3S_PIN_LABEL)),
            mark(info.has(CRI_PIN_LABEL)),
        );
    }
}

/// `repo@sha256:0123456789ab…` for the aliases, so the table fits a terminal.
fn short(name: &str) -> String {
    match name.split_once("@sha256:") {
        Some((repo, digest)) => format!("{repo}@sha256:{}…", &digest[..digest.len().min(12)]),
        None => name.to_string(),
    }
}
