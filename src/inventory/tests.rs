//! Scanner and archive tests on archives built here, in every format and compression K3s reads.

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;

use super::archive::{read_archive, ArchiveError, ReadOptions};
use super::*;

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A tar made entry by entry: (name, contents); a `->` in the name makes a symlink.
pub(super) fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        if let Some((link, target)) = name.split_once("->") {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            builder
                .append_link(&mut header, link, target)
                .expect("append link");
        } else {
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, name, *data)
                .expect("append");
        }
    }
    builder.into_inner().expect("finish tar")
}

pub(super) fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => data.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        Compression::Lz4 => {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

pub(super) fn index_json(manifests: &[&[(&str, &str)]]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = manifests
        .iter()
        .map(|annotations| {
            let annotations: serde_json::Map<String, serde_json::Value> = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect();
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": DIGEST,
                "size": 123,
                "annotations": annotations,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests})).unwrap()
}

const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const LAYER: &[u8] = &[7u8; 3000];

pub(super) fn oci_tar(manifests: &[&[(&str, &str)]]) -> Vec<u8> {
    let index = index_json(manifests);
    tar_of(&[
        ("oci-layout", LAYOUT),
        ("index.json", &index),
        ("blobs/sha256/aaaa", LAYER),
    ])
}

pub(super) fn docker_manifest(images: &[(&str, &[&str])]) -> Vec<u8> {
    let items: Vec<serde_json::Value> = images
        .iter()
        .map(|(config, tags)| {
            serde_json::json!({"Config": config, "RepoTags": tags, "Layers": ["layer/layer.tar"]})
        })
        .collect();
    serde_json::to_vec(&items).unwrap()
}

pub(super) fn docker_tar(images: &[(&str, &[&str])], manifest_last: bool) -> Vec<u8> {
    let manifest = docker_manifest(images);
    let mut entries: Vec<(&str, &[u8])> = vec![("layer/layer.tar", LAYER)];
    for (config, _) in images {
        entries.push((config, b"{}"));
    }
    if manifest_last {
        entries.push(("manifest.json", &manifest));
    } else {
        entries.insert(0, ("manifest.json", &manifest));
    }
    tar_of(&entries)
}

fn read(bytes: &[u8], compression: Compression) -> archive::ArchiveRead {
    read_archive(
        std::io::Cursor::new(compress(bytes, compression)),
        compression,
        ReadOptions::default(),
    )
}

fn names(r: &archive::ArchiveRead) -> Vec<&str> {
    assert!(r.error.is_none(), "unexpected error {:?}", r.error);
    r.names.iter().map(String::as_str).collect()
}

pub(super) fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

const ALL: [Compression; 5] = [
    Compression::None,
    Compression::Gzip,
    Compression::Bzip2,
    Compression::Zstd,
    Compression::Lz4,
];

#[test]
fn classify_follows_k3s_suffixes() {
    use Compression::*;
    let archive = |c| {
        Some(FileKind::Archive {
            compression: c,
            layout: Option::None,
        })
    };
    for (name, want) in [
        ("a.tar", archive(None)),
        ("a.tar.gz", archive(Gzip)),
        ("a.tgz", archive(Gzip)),
        ("a.tar.bz2", archive(Bzip2)),
        ("a.tbz", archive(Bzip2)),
        ("a.tar.zst", archive(Zstd)),
        ("a.tzst", archive(Zstd)),
        ("a.tar.lz4", archive(Lz4)),
        ("images.txt", Some(FileKind::List)),
        // K3s's gate has no dotfile rule; .cache.json is out by its suffix
        (".hidden.tar", archive(None)),
        (".cache.json", Option::None),
        ("a.TAR", Option::None),
        ("a.Tar.gz", Option::None),
        ("a.TXT", Option::None),
        ("a.tar.xz", Option::None),
        ("a.gz", Option::None),
        ("a.zst", Option::None),
        ("atar.zst", Option::None),
        ("a.tar.gz.part", Option::None),
        ("README", Option::None),
    ] {
        assert_eq!(classify(Path::new(name)), want, "{name}");
        assert_eq!(
            classify(&Path::new("sub/dir").join(name)),
            want,
            "sub/dir/{name}"
        );
    }
}

#[test]
fn oci_names_from_containerd_annotation_else_ref_name() {
    let tar = oci_tar(&[
        &[
            ("io.containerd.image.name", "docker.io/rancher/app:1"),
            ("org.opencontainers.image.ref.name", "1"),
        ],
        &[("org.opencontainers.image.ref.name", "latest")],
        &[
            ("io.containerd.image.name", ""),
            ("org.opencontainers.image.ref.name", "2"),
        ],
        &[("unrelated", "x")],
    ]);
    for c in ALL {
        let r = read(&tar, c);
        assert_eq!(r.layout, Some(Layout::Oci));
        // verbatim: K3s passes no name translator, so a bare ref.name stays bare
        assert_eq!(
            names(&r),
            ["docker.io/rancher/app:1", "latest", "2"],
            "{c:?}"
        );
    }
}

#[test]
fn oci_layout_after_index_json_still_oci() {
    let index = index_json(&[&[("io.containerd.image.name", "docker.io/library/a:1")]]);
    let tar = tar_of(&[
        ("blobs/sha256/aaaa", LAYER),
        ("./index.json", &index),
        ("oci-layout", LAYOUT),
    ]);
    let r = read(&tar, Compression::None);
    assert_eq!(r.layout, Some(Layout::Oci));
    assert_eq!(names(&r), ["docker.io/library/a:1"]);
}

#[test]
fn oci_wins_over_manifest_json() {
    // docker save >= 25 writes both; containerd uses the OCI index when oci-layout is there
    let index = index_json(&[&[("io.containerd.image.name", "docker.io/library/from-index:1")]]);
    let manifest = docker_manifest(&[("config.json", &["from-manifest:1"])]);
    let tar = tar_of(&[
        ("blobs/sha256/aaaa", LAYER),
        ("index.json", &index),
        ("manifest.json", &manifest),
        ("oci-layout", LAYOUT),
    ]);
    let r = read(&tar, Compression::Gzip);
    assert_eq!(r.layout, Some(Layout::Oci));
    assert_eq!(names(&r), ["docker.io/library/from-index:1"]);
}

#[test]
fn oci_failures() {
    let index = index_json(&[&[("io.containerd.image.name", "a")]]);
    let bad_version = tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion":"2.0.0"}"#),
        ("index.json", &index),
    ]);
    assert!(matches!(
        read(&bad_version, Compression::None).error,
        Some(ArchiveError::OciVersion(_))
    ));
    let no_index = tar_of(&[("oci-layout", LAYOUT), ("blobs/sha256/aaaa", LAYER)]);
    let r = read(&no_index, Compression::None);
    assert!(matches!(r.error, Some(ArchiveError::MissingIndex)), "{r:?}");
    // index.json without oci-layout and no manifest.json: not a format containerd knows
    let index_only = tar_of(&[("index.json", &index)]);
    assert!(matches!(
        read(&index_only, Compression::None).error,
        Some(ArchiveError::Unrecognized)
    ));
    let empty = tar_of(&[
        ("oci-layout", LAYOUT),
        ("index.json", br#"{"manifests":[]}"#),
    ]);
    assert!(matches!(
        read(&empty, Compression::None).error,
        Some(ArchiveError::EmptyIndex)
    ));
    let trailing = tar_of(&[
        ("oci-layout", LAYOUT),
        ("index.json", b"{\"manifests\":[]} x"),
    ]);
    assert!(matches!(
        read(&trailing, Compression::None).error,
        Some(ArchiveError::Json { .. })
    ));
    let no_media_type = tar_of(&[
        ("oci-layout", LAYOUT),
        (
            "index.json",
            format!(
                r#"{{"manifests":[{{"digest":"{DIGEST}","size":1,"annotations":{{"io.containerd.image.name":"a"}}}}]}}"#
            )
            .as_bytes(),
        ),
    ]);
    assert!(matches!(
        read(&no_media_type, Compression::None).error,
        Some(ArchiveError::BadTarget { .. })
    ));
    let bad_json = tar_of(&[("oci-layout", b"{not json"), ("index.json", &index)]);
    assert!(matches!(
        read(&bad_json, Compression::None).error,
        Some(ArchiveError::Json {
            file: "oci-layout",
            ..
        })
    ));
}

#[test]
fn oci_index_over_the_limit_is_reported() {
    let index = index_json(&[&[("io.containerd.image.name", "a")]]);
    let tar = tar_of(&[("oci-layout", LAYOUT), ("index.json", &index)]);
    let options = ReadOptions {
        json_limit: 64,
        ..ReadOptions::default()
    };
    let r = read_archive(std::io::Cursor::new(tar), Compression::None, options);
    assert!(
        matches!(
            r.error,
            Some(ArchiveError::TooLarge {
                file: "index.json",
                limit: 64,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn oci_stops_at_the_index_unless_verifying() {
    let index = index_json(&[&[("io.containerd.image.name", "a")]]);
    let mut tar = tar_of(&[
        ("oci-layout", LAYOUT),
        ("index.json", &index),
        ("blob", LAYER),
    ]);
    // cut the archive in the middle of the layer
    tar.truncate(3 * 512 + 1024 + 1000);
    let quick = read(&tar, Compression::Gzip);
    assert_eq!(names(&quick), ["a"]);
    let verified = read_archive(
        std::io::Cursor::new(compress(&tar, Compression::Gzip)),
        Compression::Gzip,
        ReadOptions {
            verify_whole_archive: true,
            ..ReadOptions::default()
        },
    );
    assert!(verified.error.is_some(), "{verified:?}");
}

#[test]
fn docker_save_several_images_and_tags() {
    let images: &[(&str, &[&str])] = &[
        ("c1.json", &["busybox", "busybox:1", "localhost:5000/x:1"]),
        (
            "c2.json",
            &[
                "registry.example.com/team/web:2.3",
                "foo/bar:1",
                "busybox:1",
            ],
        ),
        ("c3.json", &[]),
    ];
    for manifest_last in [false, true] {
        for c in ALL {
            let r = read(&docker_tar(images, manifest_last), c);
            assert_eq!(r.layout, Some(Layout::DockerSave));
            assert_eq!(
                names(&r),
                [
                    "docker.io/library/busybox:latest",
                    "docker.io/library/busybox:1",
                    "localhost:5000/x:1",
                    "registry.example.com/team/web:2.3",
                    "docker.io/foo/bar:1",
                ],
                "{c:?} manifest_last={manifest_last}"
            );
        }
    }
}

#[test]
fn docker_save_failures() {
    let manifest = docker_manifest(&[("config.json", &["a:1"])]);
    let no_config = tar_of(&[("manifest.json", &manifest), ("layer/layer.tar", LAYER)]);
    assert!(matches!(
        read(&no_config, Compression::None).error,
        Some(ArchiveError::MissingConfig(_))
    ));
    let no_layer = tar_of(&[("manifest.json", &manifest), ("config.json", b"{}")]);
    assert!(matches!(
        read(&no_layer, Compression::None).error,
        Some(ArchiveError::MissingLayer(_))
    ));
    // a symlinked layer (docker save dedups layers this way) resolves
    let symlinked = tar_of(&[
        ("manifest.json", &manifest),
        ("config.json", b"{}"),
        ("real/layer.tar", LAYER),
        ("layer/layer.tar->../real/layer.tar", b""),
    ]);
    assert_eq!(
        names(&read(&symlinked, Compression::None)),
        ["docker.io/library/a:1"]
    );
    let dangling = tar_of(&[
        ("manifest.json", &manifest),
        ("config.json", b"{}"),
        ("layer/layer.tar", LAYER),
        ("other->nowhere", b""),
    ]);
    assert!(matches!(
        read(&dangling, Compression::None).error,
        Some(ArchiveError::DanglingSymlink { .. })
    ));
    let bad_tag = docker_tar(&[("c.json", &["Busybox:1"])], false);
    assert!(matches!(
        read(&bad_tag, Compression::None).error,
        Some(ArchiveError::RepoTag(_))
    ));
    let empty = tar_of(&[("manifest.json", b"[]")]);
    assert!(matches!(
        read(&empty, Compression::None).error,
        Some(ArchiveError::EmptyIndex)
    ));
    let bad_json = tar_of(&[("manifest.json", b"[{")]);
    assert!(matches!(
        read(&bad_json, Compression::None).error,
        Some(ArchiveError::Json {
            file: "manifest.json",
            ..
        })
    ));
    let nothing = tar_of(&[("hello.txt", b"hi")]);
    assert!(matches!(
        read(&nothing, Compression::None).error,
        Some(ArchiveError::Unrecognized)
    ));
}

#[test]
fn zstd_window_over_k3s_limit_fails() {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    encoder.window_log(27).unwrap();
    encoder.include_contentsize(false).unwrap();
    encoder
        .write_all(&oci_tar(&[&[("io.containerd.image.name", "a")]]))
        .unwrap();
    let bytes = encoder.finish().unwrap();
    let r = read_archive(
        std::io::Cursor::new(bytes),
        Compression::Zstd,
        ReadOptions::default(),
    );
    assert!(
        matches!(r.error, Some(ArchiveError::Decompress { .. })),
        "{r:?}"
    );
}

#[test]
fn scan_every_suffix_nested_and_ignored_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let oci = |n: &str| oci_tar(&[&[("io.containerd.image.name", n)]]);
    write(root, "a.tar", &oci("a"));
    write(root, "b.tar.gz", &compress(&oci("b"), Compression::Gzip));
    write(root, "c.tgz", &compress(&oci("c"), Compression::Gzip));
    write(root, "d.tar.bz2", &compress(&oci("d"), Compression::Bzip2));
    write(root, "e.tbz", &compress(&oci("e"), Compression::Bzip2));
    write(root, "f.tar.zst", &compress(&oci("f"), Compression::Zstd));
    write(root, "g.tzst", &compress(&oci("g"), Compression::Zstd));
    write(root, "h.tar.lz4", &compress(&oci("h"), Compression::Lz4));
    write(root, "0sub/deeper/i.tar", &oci("i"));
    write(root, "0sub/j.tar", &oci("j"));
    write(root, ".cache.json", b"{}");
    write(root, "notes.md", b"hello");
    write(root, "k.tar.xz", b"whatever");
    write(
        root,
        "list.txt",
        b"busybox\n\n  # comment\r\nfoo/bar:1 \r\nbusybox\n",
    );

    let inventory = Scanner::new(root).scan().unwrap();
    let order: Vec<String> = inventory
        .files
        .iter()
        .map(|f| f.path.strip_prefix(root).unwrap().display().to_string())
        .collect();
    // K3s's queue: a directory's files in name order, subdirectories' contents after
    assert_eq!(
        order,
        [
            "a.tar",
            "b.tar.gz",
            "c.tgz",
            "d.tar.bz2",
            "e.tbz",
            "f.tar.zst",
            "g.tzst",
            "h.tar.lz4",
            "list.txt",
            "0sub/j.tar",
            "0sub/deeper/i.tar"
        ]
    );
    for f in &inventory.files {
        if f.kind == FileKind::List {
            assert_eq!(
                f.names,
                ["docker.io/library/busybox:latest", "docker.io/foo/bar:1"]
            );
            let note = f.error.as_deref().unwrap();
            assert!(
                note.contains("line 3") && note.contains("list.txt"),
                "{note}"
            );
        } else {
            assert!(f.error.is_none(), "{f:?}");
            assert!(matches!(
                f.kind,
                FileKind::Archive {
                    layout: Some(Layout::Oci),
                    ..
                }
            ));
            assert_eq!(f.names.len(), 1);
        }
    }
    let provided = inventory.provided();
    assert_eq!(provided["a"], root.join("a.tar"));
    assert_eq!(provided["i"], root.join("0sub/deeper/i.tar"));
    assert_eq!(provided.len(), 12);
}

#[test]
fn broken_files_are_error_entries_and_the_scan_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = oci_tar(&[&[("io.containerd.image.name", "good")]]);
    let gz = compress(&good, Compression::Gzip);
    let mut corrupt_gz = gz.clone();
    for b in corrupt_gz.iter_mut().skip(20).take(40) {
        *b ^= 0x5a;
    }
    let zst = compress(
        &docker_tar(&[("c.json", &["x:1"])], true),
        Compression::Zstd,
    );
    write(root, "1-corrupt.tar.gz", &corrupt_gz);
    write(root, "2-truncated.tar.zst", &zst[..zst.len() / 2]);
    write(
        root,
        "3-garbage.tar",
        b"this is not a tar archive at all, just some bytes",
    );
    write(root, "4-noindex.tar", &tar_of(&[("oci-layout", LAYOUT)]));
    write(root, "5-notgzip.tgz", b"plain text");
    let docker = docker_tar(&[("c.json", &["x:1"])], true);
    write(root, "6-truncated.tar", &docker[..docker.len() - 2048]);
    write(root, "7-good.tar.gz", &gz);
    // cut in the middle of the layer's body, which a plain tar skips by seeking
    let docker_first = docker_tar(&[("c.json", &["x:1"])], false);
    write(root, "8-cut.tar", &docker_first[..3000]);

    let inventory = Scanner::new(root).scan().unwrap();
    assert_eq!(inventory.files.len(), 8);
    let cut = inventory.files[7].error.as_deref().unwrap();
    assert!(cut.contains("truncated"), "{cut}");
    assert_eq!(inventory.files[6].names, ["good"]);
    for f in inventory.files[..6].iter().chain(&inventory.files[7..]) {
        let error = f
            .error
            .as_deref()
            .unwrap_or_else(|| panic!("no error for {f:?}"));
        assert!(
            error.starts_with(&format!("{}: ", f.path.display())),
            "{error}"
        );
        assert!(f.names.is_empty());
    }
    assert_eq!(inventory.errors().count(), 7);
    assert_eq!(
        inventory.provider_of("good"),
        Some(root.join("7-good.tar.gz").as_path())
    );
}

#[test]
fn scanner_can_verify_whole_archives() {
    let dir = tempfile::tempdir().unwrap();
    let index = index_json(&[&[("io.containerd.image.name", "a")]]);
    // an incompressible layer, so that cutting the file's tail cuts the layer
    let mut state = 0x2545_f491_u32;
    let noise: Vec<u8> = (0..20_000)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    let tar = tar_of(&[
        ("oci-layout", LAYOUT),
        ("index.json", &index),
        ("blob", &noise),
    ]);
    let gz = compress(&tar, Compression::Gzip);
    write(dir.path(), "a.tar.gz", &gz[..gz.len() - 2000]);
    let quick = Scanner::new(dir.path()).scan().unwrap();
    assert_eq!(quick.files[0].names, ["a"]);
    let full = Scanner::new(dir.path())
        .verify_whole_archives(true)
        .scan()
        .unwrap();
    assert!(full.files[0].error.is_some(), "{full:?}");
    assert!(full.files[0].names.is_empty());
}

#[test]
fn missing_dir_is_empty_and_unlistable_dir_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = Scanner::new(dir.path().join("nope")).scan().unwrap();
    assert!(inventory.files.is_empty());
    write(dir.path(), "file", b"x");
    let err = Scanner::new(dir.path().join("file/images"))
        .scan()
        .unwrap_err();
    assert!(err.to_string().contains("file/images"), "{err}");
}

#[test]
fn symlinks_inside_followed_outside_not() {
    use std::os::unix::fs::symlink;
    let outside = tempfile::tempdir().unwrap();
    write(
        outside.path(),
        "out.tar",
        &oci_tar(&[&[("io.containerd.image.name", "out")]]),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "store/in.tar",
        &oci_tar(&[&[("io.containerd.image.name", "in")]]),
    );
    symlink(root.join("store/in.tar"), root.join("link.tar")).unwrap();
    symlink(outside.path().join("out.tar"), root.join("escape.tar")).unwrap();
    symlink(outside.path(), root.join("escape-dir")).unwrap();
    symlink(root.join("missing.tar"), root.join("dangling.tar")).unwrap();
    symlink(root, root.join("store/loop")).unwrap();

    let mut scanner = Scanner::new(root);
    let inventory = scanner.scan().unwrap();
    let paths: Vec<_> = inventory.files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(paths, [root.join("link.tar"), root.join("store/in.tar")]);
    assert_eq!(inventory.provided()["in"], root.join("link.tar"));
    assert!(!inventory.provided().contains_key("out"));
    let skipped: Vec<_> = inventory.skipped.iter().map(|s| s.path.clone()).collect();
    for p in ["dangling.tar", "escape-dir", "escape.tar", "store/loop"] {
        assert!(skipped.contains(&root.join(p)), "{p} not in {skipped:?}");
    }
    // the same file reached twice is read once
    assert_eq!(scanner.files_read(), 1);
}

#[test]
fn list_parsing_follows_k3s() {
    let (names, problems) = parse_list(b"a\r\n\n   \t\nb:2\n#c\nd e\nregistry.io/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    assert_eq!(
        names,
        [
            "docker.io/library/a:latest",
            "docker.io/library/b:2",
            "registry.io/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        ]
    );
    assert_eq!(problems.len(), 2, "{problems:?}");
    let mut long = b"a\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', 70_000));
    long.extend(b"\nb\n");
    let (names, problems) = parse_list(&long);
    assert_eq!(names, ["docker.io/library/a:latest"]);
    assert!(problems[0].contains("line 2"), "{problems:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        for c in ALL {
            let r = read_archive(std::io::Cursor::new(&bytes), c, ReadOptions::default());
            prop_assert!(r.error.is_some() || r.names.is_empty() || r.layout.is_some());
        }
    }

    #[test]
    fn arbitrary_json_and_names_never_panic(
        json in proptest::collection::vec(any::<u8>(), 0..512),
        name in "[ -~]{0,80}",
        which in 0usize..3,
    ) {
        let file = ["index.json", "manifest.json", "oci-layout"][which];
        let tar = tar_of(&[("oci-layout", LAYOUT), (file, &json), ("config.json", b"{}")]);
        let _ = read(&tar, Compression::None);
        let manifest = docker_manifest(&[("config.json", &[name.as_str()])]);
        let tar = tar_of(&[("manifest.json", &manifest), ("config.json", b"{}"), ("layer/layer.tar", b"")]);
        let _ = read(&tar, Compression::None);
        let _ = normalize_reference(&name);
        let _ = parse_list(name.as_bytes());
    }

    #[test]
    fn corrupted_valid_archives_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        which in 0usize..5,
    ) {
        let c = ALL[which];
        let mut bytes = compress(&docker_tar(&[("c.json", &["a:1"])], true), c);
        let len = bytes.len();
        for (at, value) in flips {
            bytes[at % len] ^= value;
        }
        let _ = read_archive(std::io::Cursor::new(bytes), c, ReadOptions::default());
    }
}

/// Runs `f` on a thread and waits for it with a generous deadline: a call that blocks fails
/// the test instead of hanging it.
fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("blocked: no answer within 60 s")
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

#[test]
fn a_fifo_swapped_in_after_the_walk_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    // The walk saw regular files; by the time they are opened they are fifos with no writer.
    for (name, kind) in [
        ("x.tar", classify(Path::new("x.tar")).unwrap()),
        ("y.txt", FileKind::List),
        ("z.tar.gz", classify(Path::new("z.tar.gz")).unwrap()),
    ] {
        let path = root.join(name);
        mkfifo(&path);
        let read = within_deadline(move || read_file(&path, kind, ReadOptions::default()));
        match read {
            FileRead::NotRegular(reason) => assert!(reason.contains("not a regular"), "{reason}"),
            _ => panic!("{name}: a fifo must be refused"),
        }
    }
    // ... and a file replaced by a symbolic link is not followed.
    write(
        &root,
        "target.tar",
        &oci_tar(&[&[("io.containerd.image.name", "a")]]),
    );
    std::os::unix::fs::symlink(root.join("target.tar"), root.join("link.tar")).unwrap();
    let path = root.join("link.tar");
    let kind = classify(&path).unwrap();
    assert!(matches!(
        read_file(&path, kind, ReadOptions::default()),
        FileRead::NotRegular(_)
    ));
    // the public reader refuses the fifo the same way
    let fifo = root.join("x.tar");
    let refused = within_deadline(move || read_one(&fifo)).unwrap_err();
    assert!(refused.reason.contains("not a regular"), "{refused:?}");
}

#[test]
fn fifos_in_the_directory_are_skipped_and_the_scan_returns() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    mkfifo(&root.join("x.tar"));
    mkfifo(&root.join("y.txt"));
    write(&root, "z.txt", b"z:1\n");
    let inventory = within_deadline(move || Scanner::new(root).scan().unwrap());
    assert_eq!(inventory.files.len(), 1);
    let skipped: Vec<_> = inventory
        .skipped
        .iter()
        .map(|s| s.path.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(skipped, ["x.tar", "y.txt"]);
}

#[test]
fn duplicates_are_dropped_in_linear_time() {
    // 50,000 lines naming 5,000 images: quadratic checks took seconds here
    let mut list = String::new();
    for i in 0..50_000 {
        list.push_str(&format!("registry.example/img{}:v1\n", i % 5_000));
    }
    let (names, problems) = parse_list(list.as_bytes());
    assert!(problems.is_empty());
    assert_eq!(names.len(), 5_000);
    assert_eq!(names[0], "registry.example/img0:v1");
    assert_eq!(names[4_999], "registry.example/img4999:v1");

    let tags: Vec<String> = (0..20_000).map(|i| format!("t{}:1", i % 2_000)).collect();
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    let read = read(&docker_tar(&[("c.json", &tags)], true), Compression::None);
    assert!(read.error.is_none(), "{:?}", read.error);
    assert_eq!(read.names.len(), 2_000);
    assert_eq!(read.names[1], "docker.io/library/t1:1");
}

#[test]
fn providers_index_matches_provider_of() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a.txt", b"x:1\ny:1\n");
    write(root, "b.txt", b"y:1\nz:1\n");
    let inventory = Scanner::new(root).scan().unwrap();
    let providers = inventory.providers();
    for name in [
        "docker.io/library/x:1",
        "docker.io/library/y:1",
        "docker.io/library/z:1",
    ] {
        assert_eq!(
            providers.get(name).copied(),
            inventory.provider_of(name),
            "{name}"
        );
    }
    assert_eq!(providers["docker.io/library/y:1"], root.join("a.txt"));
}

#[test]
fn odd_names_are_read_and_shown_escaped() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let latin1 = root.join(std::ffi::OsStr::from_bytes(b"caf\xe9.tar"));
    fs::write(&latin1, oci_tar(&[&[("io.containerd.image.name", "cafe")]])).unwrap();
    write(root, "a\nb.tar", b"");
    let inventory = Scanner::new(root).scan().unwrap();
    assert_eq!(inventory.provided()["cafe"], latin1);
    let report = report::Report::new(root, &inventory);
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    let files = json["files"].as_array().unwrap();
    assert_eq!(files[0]["path"], "a\\nb.tar");
    assert!(files[0].get("path_bytes").is_none());
    assert_eq!(files[1]["path"], "caf\\xe9.tar");
    assert_eq!(files[1]["path_bytes"], "636166e92e746172");
    let table = report.to_table();
    assert!(table.contains("a\\nb.tar"), "{table}");
    assert!(table.contains("caf\\xe9.tar  oci"), "{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with("b.tar")).count(), 0);
    let line = inventory.files[0].error.as_deref().unwrap();
    assert!(
        line.starts_with("a\\nb.tar: ") || line.contains("/a\\nb.tar: "),
        "{line}"
    );
    assert!(!line.contains('\n'), "{line}");
}

#[test]
fn problems_are_reported_once_and_bounded() {
    use tracing::Level;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..100 {
        write(root, &format!("junk-{i:03}.tar"), b"");
    }
    write(root, "a\nforged.tar", b"");
    let mut scanner = Scanner::new(root);
    let mut problems = Problems::new();

    // at start every broken file is new, but the lines are capped
    let report = problems.observe(&scanner.scan().unwrap());
    assert_eq!(report.count, 101);
    assert_eq!(report.first.len(), problems::SUMMARY_FILES);
    assert_eq!(report.changes.len(), problems::MAX_CHANGE_LINES);
    assert_eq!(report.more_changes, 101 - problems::MAX_CHANGE_LINES);
    let lines = report.lines();
    assert_eq!(
        lines.len(),
        1 + problems::MAX_CHANGE_LINES + 1,
        "{lines:#?}"
    );
    assert!(lines.iter().all(|(_, l)| !l.contains('\n')), "{lines:#?}");
    assert!(lines[0].1.contains("101 file(s)"), "{}", lines[0].1);
    assert!(lines[0].1.contains("a\\nforged.tar"), "{}", lines[0].1);

    // the same state again: only the summary
    let report = problems.observe(&scanner.scan().unwrap());
    assert!(report.changes.is_empty() && report.more_changes == 0);
    assert_eq!(report.lines().len(), 1);
    assert_eq!(report.lines()[0].0, Level::INFO);

    // one fixed, one gone, one broken differently
    write(
        root,
        "junk-000.tar",
        &oci_tar(&[&[("io.containerd.image.name", "a")]]),
    );
    fs::remove_file(root.join("junk-001.tar")).unwrap();
    write(
        root,
        "junk-002.tar",
        b"not a tar archive, and not empty either",
    );
    let report = problems.observe(&scanner.scan().unwrap());
    assert_eq!(report.count, 99);
    assert_eq!(report.gone, 1);
    assert_eq!(report.changes.len(), 2, "{report:?}");
    assert!(report.changes.contains(&ProblemChange::Fixed {
        path: escape::path(&root.join("junk-000.tar")).to_string()
    }));
    assert!(report.changes.iter().any(
        |c| matches!(c, ProblemChange::Changed { path, .. } if path.ends_with("junk-002.tar"))
    ));
    let levels: Vec<_> = report.lines().into_iter().map(|(l, _)| l).collect();
    assert_eq!(
        levels,
        [Level::WARN, Level::WARN, Level::INFO, Level::INFO],
        "{:#?}",
        report.lines()
    );
    assert!(problems.len() == 99);
}
