//! The scanner's cache of reads: unchanged files read once, the records for the ledger and a
//! restart from them, the name index, junk kept compactly.

use std::path::Path;

use super::tests::{compress, docker_tar, oci_tar, write};
use super::*;

#[test]
fn cache_reads_unchanged_files_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "a.tar",
        &oci_tar(&[&[("io.containerd.image.name", "a")]]),
    );
    write(
        root,
        "b.tar.gz",
        &compress(&docker_tar(&[("c.json", &["b"])], false), Compression::Gzip),
    );
    write(root, "c.txt", b"c:1\n");
    let mut scanner = Scanner::new(root);
    let first = scanner.scan().unwrap();
    assert_eq!(scanner.files_read(), 3);
    let second = scanner.scan().unwrap();
    assert_eq!(
        scanner.files_read(),
        3,
        "an unchanged file must not be read again"
    );
    assert_eq!(first, second);

    // a changed file is read again, a deleted one drops out
    write(
        root,
        "a.tar",
        &oci_tar(&[&[("io.containerd.image.name", "a2")]]),
    );
    fs::remove_file(root.join("c.txt")).unwrap();
    let third = scanner.scan().unwrap();
    assert_eq!(scanner.files_read(), 4);
    assert_eq!(third.files.len(), 2);
    assert_eq!(third.files[0].names, ["a2"]);
    assert_eq!(scanner.cache_stats().reads, 2);

    // a rename keeps the identity: not read again
    fs::rename(root.join("b.tar.gz"), root.join("renamed.tar.gz")).unwrap();
    let fourth = scanner.scan().unwrap();
    assert_eq!(scanner.files_read(), 4);
    assert_eq!(
        fourth.provided()["docker.io/library/b:latest"],
        root.join("renamed.tar.gz")
    );
}

/// Gives a file a modification time of its own, so a rewrite within one clock tick still
/// changes its identity.
fn touch(path: &Path, secs: u64) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .unwrap();
}

/// What the ledger does with an entry: JSON without the path, path from the key.
fn stored(changes: &CacheChanges) -> Vec<CachedFile> {
    changes
        .updated
        .iter()
        .map(|f| {
            let mut back: CachedFile =
                serde_json::from_slice(&serde_json::to_vec(f).unwrap()).unwrap();
            back.path = f.path.clone();
            back
        })
        .collect()
}

#[test]
fn persisted_cache_carries_over_to_a_new_scanner() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "a.tar",
        &oci_tar(&[&[("io.containerd.image.name", "a")]]),
    );
    write(
        root,
        "sub/b.tar.gz",
        &compress(&docker_tar(&[("c.json", &["b"])], false), Compression::Gzip),
    );
    write(root, "c.txt", b"c:1\n# not a reference\n");
    // broken and large (not junk): its read is kept, so it is not decompressed at every start
    write(root, "d.tar.zst", &vec![b'x'; JUNK_MAX_SIZE as usize]);
    // junk: read again after a restart, never stored
    write(root, "junk.tar", b"");
    let mut first = Scanner::new(root);
    let inventory = first.scan().unwrap();
    assert_eq!(first.files_read(), 5);
    let changes = first.cache_changes();
    assert_eq!(changes.updated.len(), 4);
    assert!(changes
        .updated
        .iter()
        .all(|f| f.path != root.join("junk.tar")));
    assert!(changes.removed.is_empty());
    assert!(first.cache_changes().is_empty(), "nothing changed since");
    let saved = stored(&changes);
    assert_eq!(saved, changes.updated);

    // a restart: nothing is read, the inventory is the same, nothing to write
    let mut second = Scanner::new(root).with_cache(saved.clone());
    assert_eq!(second.scan().unwrap(), inventory);
    assert_eq!(second.files_read(), 1, "only the junk file is read again");
    assert!(second.cache_changes().is_empty());

    // modified, deleted and renamed while pinkeeper was stopped
    write(
        root,
        "a.tar",
        &oci_tar(&[&[("io.containerd.image.name", "a2")]]),
    );
    touch(&root.join("a.tar"), 1_000);
    fs::remove_file(root.join("c.txt")).unwrap();
    fs::rename(root.join("d.tar.zst"), root.join("e.tar.zst")).unwrap();
    fs::remove_file(root.join("junk.tar")).unwrap();
    let mut third = Scanner::new(root).with_cache(saved.clone());
    let inventory = third.scan().unwrap();
    assert_eq!(third.files_read(), 1, "only the modified file is read");
    assert_eq!(inventory.files[0].names, ["a2"]);
    // a cached error names the path the file has now
    let moved = inventory.files.iter().find(|f| f.error.is_some()).unwrap();
    assert_eq!(moved.path, root.join("e.tar.zst"));
    let prefix = format!("{}: ", root.join("e.tar.zst").display());
    assert!(
        moved.error.as_deref().unwrap().starts_with(&prefix),
        "{moved:?}"
    );
    let changes = third.cache_changes();
    let updated: Vec<_> = changes.updated.iter().map(|f| f.path.clone()).collect();
    assert_eq!(updated, [root.join("a.tar"), root.join("e.tar.zst")]);
    assert_eq!(
        changes.removed,
        [root.join("c.txt"), root.join("d.tar.zst")]
    );

    // entries another build made are not trusted: read again, and replaced
    let foreign: Vec<CachedFile> = saved
        .into_iter()
        .map(|mut f| {
            f.reader = "pinkeeper 0.0.0 reader 0".into();
            f
        })
        .collect();
    let mut fourth = Scanner::new(root).with_cache(foreign);
    fourth.scan().unwrap();
    assert_eq!(fourth.files_read(), 3);
    let changes = fourth.cache_changes();
    assert_eq!(changes.updated.len(), 3);
    assert_eq!(
        changes.removed,
        [root.join("c.txt"), root.join("d.tar.zst")]
    );
}

/// The daemon's name index ([`Scanner::provided`]) is the inventory's, first file in import
/// order winning, through renames, hard links, removals and restarts.
#[test]
fn the_scanners_name_index_is_the_inventorys() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let index = |scanner: &Scanner| -> BTreeMap<String, PathBuf> {
        scanner
            .provided()
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_path_buf()))
            .collect()
    };
    write(root, "b.txt", b"shared:1\nb:1\n");
    write(root, "a.txt", b"shared:1\na:1\n");
    write(root, "sub/c.txt", b"shared:1\nc:1\n");
    write(root, "odd \u{7f}\n.txt", b"odd:1\n");
    fs::hard_link(root.join("a.txt"), root.join("z-link.txt")).unwrap();
    let mut scanner = Scanner::new(root);
    let inventory = scanner.scan().unwrap();
    assert_eq!(index(&scanner), inventory.provided());
    assert_eq!(
        inventory.provided()["docker.io/library/shared:1"],
        root.join("a.txt")
    );
    assert_eq!(scanner.files_read(), 4, "the second link is not read again");
    let changes = scanner.cache_changes();
    assert_eq!(changes.updated.len(), 5);

    // gone in one scan, back (changed) in the next, before the store hears of either
    fs::remove_file(root.join("a.txt")).unwrap();
    let inventory = scanner.scan().unwrap();
    assert_eq!(index(&scanner), inventory.provided());
    assert_eq!(
        inventory.provided()["docker.io/library/shared:1"],
        root.join("b.txt")
    );
    write(root, "a.txt", b"a:2\n");
    touch(&root.join("a.txt"), 3_000);
    let inventory = scanner.scan().unwrap();
    assert_eq!(index(&scanner), inventory.provided());
    let changes = scanner.cache_changes();
    assert!(changes.removed.is_empty(), "{changes:?}");
    assert_eq!(changes.updated.len(), 1);
    assert_eq!(changes.updated[0].names, ["docker.io/library/a:2"]);

    // a restart from the store reads nothing, and indexes the same
    let mut saved = stored(&scanner.cache_changes());
    assert!(saved.is_empty());
    let mut all = Scanner::new(root);
    all.scan().unwrap();
    saved = stored(&all.cache_changes());
    let mut restarted = Scanner::new(root).with_cache(saved);
    let again = restarted.scan().unwrap();
    assert_eq!(restarted.files_read(), 0);
    assert_eq!(again, inventory);
    assert_eq!(index(&restarted), inventory.provided());
    assert!(restarted.cache_changes().is_empty());
}

/// A scan hands out its records as it goes: all of them, each once, and a restart from them
/// reads nothing.
#[test]
fn a_scan_stores_its_records_as_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..5 {
        write(root, &format!("l{i}.txt"), format!("app{i}:1\n").as_bytes());
    }
    write(root, "junk.tar", b"");
    let mut scanner = Scanner::new(root);
    let mut batches = Vec::new();
    let inventory = scanner
        .scan_problems_storing(2, &mut |changes| batches.push(changes))
        .unwrap();
    assert_eq!(
        inventory.files.len(),
        1,
        "the junk file only: {inventory:?}"
    );
    assert_eq!(batches.len(), 2);
    assert!(batches
        .iter()
        .all(|b| b.updated.len() == 2 && b.removed.is_empty()));
    let last = scanner.cache_changes();
    assert_eq!(last.updated.len(), 1);
    let mut all: Vec<CachedFile> = batches.iter().flat_map(stored).collect();
    all.extend(stored(&last));
    let mut paths: Vec<PathBuf> = all.iter().map(|f| f.path.clone()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 5);
    assert!(scanner.cache_changes().is_empty());

    let mut restarted = Scanner::new(root).with_cache(all);
    let again = restarted.scan().unwrap();
    assert_eq!(restarted.files_read(), 1, "the junk file only");
    assert_eq!(again.provided(), scanner.scan().unwrap().provided());
    assert!(restarted.cache_changes().is_empty());
}

#[test]
fn a_file_that_cannot_be_opened_is_not_cached() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a.txt", b"a:1\n");
    let mut scanner = Scanner::new(root);
    scanner.scan().unwrap();
    assert_eq!(scanner.cache_changes().updated.len(), 1);
    fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    if fs::read(root.join("a.txt")).is_ok() {
        return; // running as root: permissions do not stop the read
    }
    touch(&root.join("a.txt"), 2_000);
    let inventory = scanner.scan().unwrap();
    assert!(inventory.files[0].error.is_some());
    assert_eq!(scanner.cache_changes().removed, [root.join("a.txt")]);
}

#[test]
fn junk_is_kept_compactly_and_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    const JUNK: usize = 2_000;
    for i in 0..JUNK {
        write(root, &format!("junk-{i:05}.tar"), b"");
    }
    write(root, "empty.txt", b"");
    write(root, "bad.txt", b"# only a comment\n");
    write(
        root,
        "a.tar",
        &oci_tar(&[&[("io.containerd.image.name", "a")]]),
    );
    let mut scanner = Scanner::new(root);
    let inventory = scanner.scan().unwrap();
    assert_eq!(inventory.files.len(), JUNK + 3);
    assert_eq!(inventory.errors().count(), JUNK + 1);
    let stats = scanner.cache_stats();
    assert_eq!(stats.reads, 1, "{stats:?}");
    assert_eq!(stats.junk, JUNK + 2, "{stats:?}");
    assert_eq!(stats.paths, 1, "{stats:?}");
    assert!(stats.junk_texts <= 3, "{stats:?}");
    // 16-odd bytes a junk file, not a path and a message each
    assert!(stats.approx_bytes < 64 * JUNK, "{stats:?}");
    let changes = scanner.cache_changes();
    assert_eq!(changes.updated.len(), 1, "only a.tar is stored");

    // unchanged junk is not read again, and reads the same
    let again = scanner.scan().unwrap();
    assert_eq!(scanner.files_read(), JUNK as u64 + 3);
    assert_eq!(again, inventory);
    assert!(scanner.cache_changes().is_empty());

    // junk an earlier version stored is dropped from the store
    let stored = CachedFile {
        path: root.join("junk-00000.tar"),
        reader: reader_name(),
        identity: FileIdentity::of(&fs::metadata(root.join("junk-00000.tar")).unwrap()),
        kind: classify(Path::new("x.tar")).unwrap(),
        names: Vec::new(),
        error: Some("old".into()),
    };
    let mut restarted = Scanner::new(root).with_cache([stored]);
    restarted.scan().unwrap();
    assert_eq!(
        restarted.cache_changes().removed,
        [root.join("junk-00000.tar")]
    );
}

#[test]
fn junk_error_texts_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // every list has a different error text (a different line number)
    let count = MAX_JUNK_TEXTS + 50;
    for i in 0..count {
        let mut list = "\n".repeat(i);
        list.push_str("#\n");
        write(root, &format!("l{i:05}.txt"), list.as_bytes());
    }
    let mut scanner = Scanner::new(root);
    scanner.scan().unwrap();
    let stats = scanner.cache_stats();
    assert!(stats.junk_texts <= MAX_JUNK_TEXTS, "{stats:?}");
    assert_eq!(stats.junk, MAX_JUNK_TEXTS, "{stats:?}");
    // the rest is read again at the next scan, and still reported
    let inventory = scanner.scan().unwrap();
    assert_eq!(inventory.errors().count(), count);
    assert_eq!(scanner.files_read(), (2 * count - MAX_JUNK_TEXTS) as u64);
}
