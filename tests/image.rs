//! pinkeeper's own image (`make image`, `scripts/make-image.py`) on containerd 1.6, 1.7 and 2.x:
//! K3s imports it from its images directory and pins it like any air-gap image, `pinkeeper
//! inventory` names it, `ctr images import` names it exactly as the manifests refer to it
//! (`packaging/kubernetes/daemonset.yaml`, `packaging/k3s/`), and `ctr run` starts it: it
//! answers `pinkeeper --version`. Built here from the test's own binary (a debug build, so the
//! quick compression levels).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{cri_pinned, k3s_pinned, Node, SETTLE_MS};
use pinkeeper_testkit::Version;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn image_name() -> String {
    format!("docker.io/pinkeeper/pinkeeper:{VERSION}")
}

on_every_version!(the_image_is_imported_pinned_and_runs);

/// Builds the image into `dir`: the archive's path.
fn build(dir: &Path) -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("scripts/make-image.py"))
        .arg(env!("CARGO_BIN_EXE_pinkeeper"))
        .arg(dir)
        .arg(VERSION)
        .arg("test")
        .env("PINKEEPER_IMAGE_FAST", "1")
        .output()
        .context("running scripts/make-image.py")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "make-image.py failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(text.contains(&image_name()), "{text}");
    Ok(dir.join(format!("pinkeeper-{VERSION}-amd64.tar")))
}

fn ctr(version: Version, socket: &Path, args: &[&str]) -> Result<String> {
    let ctr = version.binary_path().with_file_name("ctr");
    let out = Command::new(&ctr)
        .arg("--address")
        .arg(socket)
        .arg("--connect-timeout")
        .arg("5s")
        .args(args)
        .output()
        .with_context(|| format!("running {}", ctr.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "ctr {args:?}: {text}");
    Ok(text)
}

async fn the_image_is_imported_pinned_and_runs(version: Version) -> Result<()> {
    let node = Node::new(version, &[], false, SETTLE_MS).await?;
    let built = tempfile::tempdir()?;
    let archive = build(built.path())?;
    let name = image_name();

    // The manifests refer to it by this name, with IfNotPresent.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for manifest in [
        "packaging/kubernetes/daemonset.yaml",
        "packaging/k3s/pinkeeper.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(manifest))?;
        ensure!(
            text.contains(&format!("image: {name}"))
                && text.contains("imagePullPolicy: IfNotPresent"),
            "{manifest} does not use {name}"
        );
    }

    // Into K3s's images directory, as the README says: imported and pinned like any archive.
    let zst = archive.with_extension("tar.zst");
    std::fs::copy(
        &zst,
        node.images_dir().join(zst.file_name().context("a name")?),
    )?;
    node.k3s.start().await?;
    let images = node.images().await?;
    ensure!(
        cri_pinned(&images, &name) && k3s_pinned(&images, &name),
        "{name} not imported and pinned by K3s: {:?}",
        images.keys().collect::<Vec<_>>()
    );
    let inventory = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
        .args(["inventory", "--json", "--images-dir"])
        .arg(node.images_dir())
        .output()?;
    let inventory = String::from_utf8_lossy(&inventory.stdout);
    ensure!(
        inventory.contains(&name),
        "pinkeeper inventory: {inventory}"
    );

    // `ctr images import` names it as the manifests do; `ctr run` starts it. runc keeps its
    // state under /run/containerd/runc/<namespace>/<id> whatever the containerd, so the three
    // versions' tests, run at once, each take a namespace and an id of their own.
    let socket = node.containerd.socket().to_path_buf();
    let ns = format!(
        "pkimage-{}-{}",
        std::process::id(),
        version.name().replace('.', "")
    );
    let result = import_and_run(version, &socket, &ns, &archive, &name);
    // runc leaves the namespace's directory behind, empty.
    let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&ns));
    result
}

fn import_and_run(
    version: Version,
    socket: &Path,
    ns: &str,
    archive: &Path,
    name: &str,
) -> Result<()> {
    let imported = ctr(
        version,
        socket,
        &["-n", ns, "images", "import", &archive.to_string_lossy()],
    )?;
    ensure!(imported.contains(name), "{imported}");
    let listed = ctr(version, socket, &["-n", ns, "images", "ls", "-q"])?;
    ensure!(listed.lines().any(|l| l == name), "{listed}");
    let answer = ctr(
        version,
        socket,
        &[
            "-n",
            ns,
            "run",
            "--rm",
            name,
            ns,
            "/usr/bin/pinkeeper",
            "--version",
        ],
    )?;
    ensure!(answer.trim() == format!("pinkeeper {VERSION}"), "{answer}");
    Ok(())
}
