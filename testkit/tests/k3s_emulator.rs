//! The emulator against real containerd 1.6, 1.7 and 2.x: first boot pins everything; after an
//! archive is deleted and containerd restarts, the next start leaves that archive's images
//! unpinned (the bug pinkeeper fixes); with `.cache.json` everything stays unpinned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pinkeeper_testkit::archive::{write_archive, Compression, Layout, OciNames, TestImage};
use pinkeeper_testkit::reference::parse_normalized;
use pinkeeper_testkit::{
    Client, Containerd, ImageInfo, K3s, K3sConfig, StartReport, Version, CRI_MANAGED_LABEL,
    CRI_PIN_LABEL, K3S_PIN_LABEL,
};

/// One archive of the images dir and the names its images get.
struct Fixture {
    path: PathBuf,
    names: Vec<String>,
}

/// Every compression (each with a different layout), a multi-image docker-save archive with
/// short RepoTags, a multi-image OCI archive, one archive in a subdir, plus files K3s ignores.
fn build_images_dir(dir: &Path) -> Result<Vec<Fixture>> {
    let layouts = Layout::all();
    let mut fixtures = Vec::new();
    for (i, compression) in Compression::all().into_iter().enumerate() {
        let layout = layouts[i % layouts.len()];
        let path = dir.join(format!("single-{i}{}", compression.suffix()));
        let image = TestImage::new(format!("registry.test:5000/pk/single{i}:v{i}"));
        let names = write_archive(&path, layout, &[image])?;
        fixtures.push(Fixture { path, names });
    }
    let path = dir.join("multi-docker.tar.zst");
    let names = write_archive(
        &path,
        Layout::DockerSave,
        &[
            // Two names of one image in different repos. Two tags of the SAME repo would give
            // the same `<repo>@<digest>` alias twice in one import; K3s's delete+create of it
            // then races CRI re-creating the record (seen as "failed to tag after deleting
            // existing image ... already exists" on every version): real, but not testable.
            TestImage::new("busybox:1").with_name("mirror.local:5000/busybox:1.36"),
            TestImage::new("team/app:2").layers(2),
        ],
    )?;
    assert_eq!(names[0], "docker.io/library/busybox:1");
    fixtures.push(Fixture { path, names });
    let path = dir.join("multi-oci.tar.gz");
    let names = write_archive(
        &path,
        Layout::Oci {
            names: OciNames::Both,
            index_last: true,
        },
        &[
            TestImage::new("docker.io/library/alpine:3"),
            TestImage::new("quay.io/pk/tool:0.1"),
        ],
    )?;
    fixtures.push(Fixture { path, names });
    let path = dir.join("sub/nested.tgz");
    let names = write_archive(
        &path,
        Layout::oci(),
        &[TestImage::new("docker.io/pk/nested:1")],
    )?;
    fixtures.push(Fixture { path, names });
    // Not archives to K3s: a pull list (not emulated), an upper-case suffix, a stray file.
    std::fs::write(dir.join("pull.txt"), "docker.io/library/never:1\n")?;
    write_archive(
        &dir.join("tmp-upper.tar"),
        Layout::oci(),
        &[TestImage::new("docker.io/pk/upper:1")],
    )?;
    std::fs::rename(dir.join("tmp-upper.tar"), dir.join("upper.TAR"))?;
    std::fs::write(dir.join("notes.md"), "not an archive")?;
    Ok(fixtures)
}

/// Every name K3s pins for these primary names: the name and its `<repo>@<digest>` alias.
fn with_aliases(names: &[String], images: &BTreeMap<String, ImageInfo>) -> Result<Vec<String>> {
    let mut all = Vec::new();
    for name in names {
        let info = images
            .get(name)
            .with_context(|| format!("image {name} missing"))?;
        all.push(name.clone());
        all.push(format!(
            "{}@{}",
            parse_normalized(name)?.name(),
            info.digest
        ));
    }
    Ok(all)
}

fn pinned(info: &ImageInfo) -> bool {
    info.has(K3S_PIN_LABEL) && info.has(CRI_PIN_LABEL)
}

fn unpinned(info: &ImageInfo) -> bool {
    !info.labels.contains_key(K3S_PIN_LABEL) && !info.labels.contains_key(CRI_PIN_LABEL)
}

fn check_report(report: &StartReport) -> Result<()> {
    ensure!(
        report.failed.is_empty(),
        "imports failed: {:?}",
        report.failed
    );
    ensure!(
        report.ignored.len() == 1,
        "the .txt list is reported as ignored: {:?}",
        report.ignored
    );
    Ok(())
}

/// CRI (1.7, 2.x) marks imported images `managed`; 1.6.20 too (FACTS.md 3). Poll briefly.
async fn wait_managed(client: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = client
            .image(name)
            .await?
            .with_context(|| format!("{name} missing"))?;
        if info.labels.get(CRI_MANAGED_LABEL).map(String::as_str) == Some("managed") {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "CRI never marked {name} managed: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn restart_loses_pins(version: Version) -> Result<()> {
    let mut containerd = Containerd::start(version).await?;
    let start_time = containerd.last_start();
    let images_dir = tempfile::tempdir()?;
    let fixtures = build_images_dir(images_dir.path())?;
    let client = containerd.client("k8s.io").await?;
    let k3s = K3s::new(K3sConfig::new(containerd.socket(), images_dir.path()));

    // First boot: everything imported, pinned, aliased.
    let first = k3s.start().await?;
    check_report(&first)?;
    ensure!(
        first.swept.is_empty(),
        "nothing to sweep on a fresh containerd: {:?}",
        first.swept
    );
    ensure!(
        first.imported.len() == fixtures.len(),
        "imported {:?}",
        first.imported
    );
    ensure!(
        first
            .imported
            .last()
            .map(|f| f.file.ends_with("sub/nested.tgz"))
            == Some(true),
        "the subdir is imported after the top-level files"
    );
    let images = client.images_by_name().await?;
    let primary: Vec<String> = fixtures.iter().flat_map(|f| f.names.clone()).collect();
    for name in with_aliases(&primary, &images)? {
        let info = images
            .get(&name)
            .with_context(|| format!("{name} missing after boot"))?;
        ensure!(
            pinned(info),
            "{version}: {name} not pinned after first boot: {info:?}"
        );
    }
    ensure!(
        !images.contains_key("docker.io/pk/upper:1"),
        "upper-case suffix must be ignored"
    );
    wait_managed(&client, &primary[0]).await?;

    // Delete the multi-image docker archive; K3s restarts (containerd with it).
    let gone = fixtures
        .iter()
        .find(|f| f.path.ends_with("multi-docker.tar.zst"))
        .context("fixture")?;
    std::fs::remove_file(&gone.path)?;
    let gone_names = with_aliases(&gone.names, &images)?;
    containerd.restart().await?;
    let restart_time = containerd.last_start();
    let second = k3s.start().await?;
    check_report(&second)?;
    ensure!(
        second.swept.len() >= primary.len(),
        "the sweep lists every K3s-pinned record"
    );
    let after = client.images_by_name().await?;
    for name in &gone_names {
        let info = after
            .get(name)
            .with_context(|| format!("{name} vanished"))?;
        ensure!(
            unpinned(info),
            "{version}: {name} of the deleted archive still pinned: {info:?}"
        );
    }
    let kept: Vec<String> = fixtures
        .iter()
        .filter(|f| f.path != gone.path)
        .flat_map(|f| f.names.clone())
        .collect();
    for name in with_aliases(&kept, &after)? {
        ensure!(
            pinned(&after[&name]),
            "{version}: {name} not re-pinned: {:?}",
            after[&name]
        );
    }
    println!(
        "{version} ({}): start {start_time:?}, restart {restart_time:?}, first boot {:?} \
         ({} files, {} names), second boot {:?}",
        containerd.reported_version(),
        first.elapsed,
        first.imported.len(),
        first.pinned_names().len(),
        second.elapsed
    );
    Ok(())
}

async fn cache_json_leaves_all_unpinned(version: Version) -> Result<()> {
    let mut containerd = Containerd::start(version).await?;
    let images_dir = tempfile::tempdir()?;
    let a = write_archive(
        &images_dir.path().join("a.tar"),
        Layout::oci(),
        &[TestImage::new("docker.io/pk/a:1")],
    )?;
    let b = write_archive(
        &images_dir.path().join("b.tar.gz"),
        Layout::DockerSave,
        &[TestImage::new("pk/b:1")],
    )?;
    let mut config = K3sConfig::new(containerd.socket(), images_dir.path());
    config.cache_json = true;
    let k3s = K3s::new(config);
    let first = k3s.start().await?;
    ensure!(
        first.imported.len() == 2 && first.failed.is_empty(),
        "{first:?}"
    );
    let client = containerd.client("k8s.io").await?;
    let images = client.images_by_name().await?;
    let names = with_aliases(&[a, b].concat(), &images)?;
    for name in &names {
        ensure!(pinned(&images[name]), "{name} not pinned at first boot");
    }
    containerd.restart().await?;
    let second = k3s.start().await?;
    ensure!(
        second.imported.is_empty(),
        "unchanged files are skipped: {second:?}"
    );
    ensure!(second.skipped_by_cache.len() == 2, "{second:?}");
    let after = client.images_by_name().await?;
    for name in &names {
        ensure!(
            unpinned(&after[name]),
            "{version}: {name} should be unpinned (k3s#14265)"
        );
    }
    Ok(())
}

macro_rules! per_version {
    ($($v:ident => $restart:ident, $cache:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $restart() -> Result<()> {
            restart_loses_pins(Version::$v).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $cache() -> Result<()> {
            cache_json_leaves_all_unpinned(Version::$v).await
        }
    )*};
}

per_version! {
    V1_6 => restart_unpins_deleted_archives_1_6, cache_json_unpins_all_1_6;
    V1_7 => restart_unpins_deleted_archives_1_7, cache_json_unpins_all_1_7;
    V2 => restart_unpins_deleted_archives_2_x, cache_json_unpins_all_2_x;
}
