//! `pinkeeper inventory` names exactly the images containerd itself creates when it imports
//! the same files: every archive built here is imported with the real `ctr` of containerd
//! 1.6, 1.7 and 2.x (into a private daemon each) and the names containerd then lists are
//! compared with the names `pinkeeper inventory --json` reports for that file.
//!
//! `ctr images import --local` goes through the same Go client `Import` K3s calls (1.7 and
//! 2.x; without `--local` they use the transfer service, which K3s does not; 1.6 has only
//! the client). ctr creates no digest records (`import-<date>@sha256:…`) unless given
//! `--digests`, which is not passed. One difference of ctr's own remains, accounted for here:
//! ctr names an OCI manifest whose only name is a bare `org.opencontainers.image.ref.name`
//! (`1.0`, not a reference) `<base-name>:1.0` (`import-<yyyy-mm-dd>:1.0` without
//! `--base-name`), where K3s, which passes no ref translator, keeps `1.0` verbatim. That case
//! is imported with an explicit `--base-name`, checked against that prefix rule, and also
//! compared with the testkit's K3s emulator. A full reference in `ref.name` is kept verbatim
//! by both.
//!
//! containerd's importer reads plain tars only (`ctr images import` of a `.tar.gz` fails with
//! "archive/tar: invalid tar header" on all three versions): K3s's wharfie decompresses before
//! `Import`, and this test decompresses every compressed archive before handing it to ctr.
//! Each file is imported into a namespace of its own: names do not depend on the namespace,
//! and CRI (on in these daemons, as under K3s) watches only `k8s.io`, where it adds
//! `sha256:<config>` records and re-creates a name it was handling while a test deleted it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use pinkeeper_testkit::archive::{write_archive, Compression, Layout, OciNames, TestImage};
use pinkeeper_testkit::{Client, Containerd, K3s, K3sConfig, Version};

/// The base name given to ctr for the bare-tag case.
const BASE: &str = "pinkeeper.test/base";

struct Case {
    file: &'static str,
    layout: Layout,
    images: Vec<TestImage>,
    /// Bare ref.name tags: imported with `--base-name`.
    bare_tags: bool,
}

fn oci(names: OciNames, index_last: bool) -> Layout {
    Layout::Oci { names, index_last }
}

fn cases() -> Vec<Case> {
    let case = |file, layout, images| Case {
        file,
        layout,
        images,
        bare_tags: false,
    };
    vec![
        // docker save: short RepoTags, several images and tags, every compression
        case(
            "docker-short.tar",
            Layout::DockerSave,
            vec![
                TestImage::new("busybox:1").with_name("busybox:latest"),
                TestImage::new("rancher/mirrored-pause:3.6"),
            ],
        ),
        case(
            "docker-hub-aliases.tar.gz",
            Layout::DockerSave,
            vec![
                TestImage::new("index.docker.io/library/alpine:3.20"),
                TestImage::new("docker.io/foo/bar:1").with_name("foo/bar:2"),
            ],
        ),
        case(
            "k3s-airgap-images.tar.zst",
            Layout::DockerSave,
            vec![
                TestImage::new("docker.io/rancher/mirrored-pause:3.6"),
                TestImage::new("docker.io/rancher/klipper-helm:v0.9.3"),
                TestImage::new("docker.io/rancher/mirrored-coredns-coredns:1.12.0"),
            ],
        ),
        case(
            "docker-registry.tgz",
            Layout::DockerSave,
            vec![TestImage::new("registry.example.com:5000/team/web:2.3").layers(2)],
        ),
        case(
            "docker-localhost.tar.bz2",
            Layout::DockerSave,
            vec![
                TestImage::new("localhost/app:1"),
                TestImage::new("quay.io/x/y:0.1"),
            ],
        ),
        case(
            "docker-lz4.tar.lz4",
            Layout::DockerSave,
            vec![TestImage::new("nginx:1.27-alpine")],
        ),
        case(
            "docker-tzst.tzst",
            Layout::DockerSave,
            vec![TestImage::new("ghcr.io/owner/tool:v1").with_name("tool:v1")],
        ),
        case(
            "docker-tbz.tbz",
            Layout::DockerSave,
            vec![TestImage::new("redis:7")],
        ),
        // OCI: io.containerd.image.name (verbatim, even when short), both annotations as
        // `ctr images export` writes them, and a full ref.name alone
        case(
            "oci-containerd-name.tar",
            oci(OciNames::ContainerdName, false),
            vec![
                TestImage::new("docker.io/library/app:1"),
                TestImage::new("busybox:1.36"),
            ],
        ),
        case(
            "oci-both.tar.gz",
            oci(OciNames::Both, false),
            vec![
                TestImage::new("docker.io/library/web:2").with_name("docker.io/library/web:latest"),
                TestImage::new("registry.example.com/team/api:3.1"),
            ],
        ),
        case(
            "oci-ref-name.tar.zst",
            oci(OciNames::RefName, false),
            vec![
                TestImage::new("docker.io/library/db:15"),
                TestImage::new("quay.io/org/worker:2"),
            ],
        ),
        case(
            "oci-index-last.tgz",
            oci(OciNames::ContainerdName, true),
            vec![TestImage::new(
                "docker.io/rancher/local-path-provisioner:v0.0.30",
            )],
        ),
        case(
            "oci-ref-name.tar.lz4",
            oci(OciNames::RefName, true),
            vec![TestImage::new("docker.io/library/cache:6")],
        ),
        case(
            "oci-both.tar.bz2",
            oci(OciNames::Both, false),
            vec![TestImage::new("docker.io/library/queue:3")],
        ),
        Case {
            file: "oci-bare-tag.tar",
            layout: oci(OciNames::RefName, false),
            images: vec![TestImage::new("1.0"), TestImage::new("latest")],
            bare_tags: true,
        },
    ]
}

/// `pinkeeper inventory --json` over `dir`: relative path -> names.
fn inventory(dir: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let out = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
        .arg("inventory")
        .arg("--images-dir")
        .arg(dir)
        .arg("--json")
        .output()
        .context("running pinkeeper inventory")?;
    ensure!(
        out.status.success(),
        "pinkeeper inventory failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}", String::from_utf8_lossy(&out.stdout)))?;
    let mut files = BTreeMap::new();
    for file in json["files"].as_array().context("no files array")? {
        let path = file["path"].as_str().context("no path")?.to_string();
        ensure!(file["error"].is_null(), "{path}: {}", file["error"]);
        let names = file["names"]
            .as_array()
            .context("no names")?
            .iter()
            .map(|n| {
                n.as_str()
                    .map(str::to_string)
                    .context("a name is not a string")
            })
            .collect::<Result<Vec<_>>>()?;
        files.insert(path, names);
    }
    Ok(files)
}

fn ctr_binary(version: Version) -> PathBuf {
    version.binary_path().with_file_name("ctr")
}

/// Imports `file` with the real ctr and returns the names containerd created.
async fn ctr_import(
    containerd: &Containerd,
    client: &Client,
    file: &Path,
    base_name: Option<&str>,
    scratch: &Path,
) -> Result<Vec<String>> {
    ensure!(
        client.images_by_name().await?.is_empty(),
        "namespace {} is not empty",
        client.namespace()
    );
    // containerd's importer (`archive.ImportIndex`) reads a plain tar only: K3s's wharfie
    // decompresses every suffix before it calls Import, and so does this test.
    let compression = Compression::from_path(file).context("not an archive")?;
    let input = if compression == Compression::Tar {
        file.to_path_buf()
    } else {
        let mut tar = Vec::new();
        compression
            .decompressor(std::fs::File::open(file)?)?
            .read_to_end(&mut tar)?;
        let plain = scratch.join("decompressed.tar");
        std::fs::write(&plain, tar)?;
        plain
    };
    let version = containerd.version();
    let mut cmd = Command::new(ctr_binary(version));
    cmd.arg("--address")
        .arg(containerd.socket())
        .args(["--connect-timeout", "5s", "-n", client.namespace()])
        .args(["images", "import", "--all-platforms", "--no-unpack"]);
    if version != Version::V1_6 {
        cmd.arg("--local");
    }
    if let Some(base) = base_name {
        cmd.args(["--base-name", base]);
    }
    let out = cmd.arg(&input).output().context("running ctr")?;
    if !out.status.success() {
        bail!(
            "{version}: ctr images import {} failed ({}): {}{}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut names: Vec<String> = client.images_by_name().await?.into_keys().collect();
    names.sort();
    Ok(names)
}

async fn names_match_containerd(version: Version) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("pkin").tempdir_in("/tmp")?;
    let images_dir = dir.path().join("images");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let cases = cases();
    for case in &cases {
        write_archive(&images_dir.join(case.file), case.layout, &case.images)?;
    }
    let ours = inventory(&images_dir)?;
    ensure!(
        ours.len() == cases.len(),
        "inventory lists {} files: {ours:?}",
        ours.len()
    );

    let containerd = Containerd::start(version).await?;
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let client = containerd.client(&format!("pk-names-{index}")).await?;
        let file = images_dir.join(case.file);
        let mut expected = ours[case.file].clone();
        expected.sort();
        ensure!(!expected.is_empty(), "{}: no names", case.file);
        let base = case.bare_tags.then_some(BASE);
        let created = ctr_import(&containerd, &client, &file, base, &scratch).await?;
        let expected_from_ctr: Vec<String> = match base {
            // ctr's translator puts the base name in front of a bare tag; K3s does not.
            Some(base) => {
                let mut v: Vec<String> = expected.iter().map(|n| format!("{base}:{n}")).collect();
                v.sort();
                v
            }
            None => expected.clone(),
        };
        if created != expected_from_ctr {
            failures.push(format!(
                "{}: containerd created {created:?}, pinkeeper inventory says {expected:?}",
                case.file
            ));
        }
        if case.bare_tags {
            // What K3s itself (no translator) creates: the emulator's Import.
            let client = containerd.client(&format!("pk-names-{index}-k3s")).await?;
            let mut config = K3sConfig::new(containerd.socket(), &images_dir);
            config.namespace = client.namespace().to_string();
            let k3s = K3s::new(config);
            // K3s's retagImages fails on such names ("not a tagged reference"), after
            // Import created them: the file's import is reported failed, the records stay.
            let imported = k3s.import_file(&file).await;
            let emulated: Vec<String> = client
                .images_by_name()
                .await?
                .into_keys()
                .filter(|n| !n.contains('@'))
                .collect();
            ensure!(
                imported.is_ok() || !emulated.is_empty(),
                "{}: the K3s emulator imported nothing: {imported:?}",
                case.file
            );
            ensure!(
                emulated == expected,
                "{}: the K3s emulator created {emulated:?}, pinkeeper inventory says {expected:?}",
                case.file
            );
        }
    }
    ensure!(
        failures.is_empty(),
        "{version}: names differ:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_match_containerd_1_6() -> Result<()> {
    names_match_containerd(Version::V1_6).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_match_containerd_1_7() -> Result<()> {
    names_match_containerd(Version::V1_7).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_match_containerd_2() -> Result<()> {
    names_match_containerd(Version::V2).await
}
