//! An images directory on a node's worst day (issue 9): fifos where archives should be, names
//! that are not UTF-8 or hold a newline, 100,000 junk files, lists and manifests full of
//! duplicates. `pinkeeper inventory` (the real binary) and the library's scanner must return
//! promptly, report what they skip, show every name escaped, and keep bounded what they
//! remember. Nothing here asserts a time: a call that would block fails at a generous deadline
//! instead of hanging the suite; the timings are in README.md.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pinkeeper::inventory::{read_one, Problems, Scanner};
use serde_json::Value;

/// Far beyond what any of these takes; only a blocked call reaches it.
const DEADLINE: Duration = Duration::from_secs(120);

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {path:?}"
    );
}

/// Runs `pinkeeper inventory --images-dir DIR ARGS`, killed (and the test failed) at the
/// deadline.
fn inventory(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
        .arg("inventory")
        .arg("--images-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pinkeeper");
    // Read the pipes on threads, so a large output cannot stall the child.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut b).unwrap();
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut b).unwrap();
        b
    });
    let started = Instant::now();
    let exited =
        common::eventually_blocking("pinkeeper inventory to exit", || Ok(child.try_wait()?));
    let status = match exited {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pinkeeper inventory blocked ({e}) after {:?}",
                started.elapsed()
            );
        }
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn json(dir: &Path) -> Value {
    let out = inventory(dir, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Runs `f` on a thread; fails at the deadline instead of hanging.
fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE)
        .expect("blocked: no answer before the deadline")
}

/// A docker-save tar whose manifest names `tags`.
fn docker_tar(tags: &[String]) -> Vec<u8> {
    let manifest = serde_json::json!([{"Config": "c.json", "RepoTags": tags, "Layers": []}]);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in [("c.json", &b"{}"[..]), ("manifest.json", &manifest)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn fifos_named_like_archives_and_lists_are_skipped_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("x.tar"));
    mkfifo(&dir.path().join("y.txt"));
    mkfifo(&dir.path().join("sub-z.tar.zst"));
    fs::write(dir.path().join("pull.txt"), "busybox:1\n").unwrap();
    let report = json(dir.path());
    let files: Vec<&str> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["pull.txt"]);
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, ["sub-z.tar.zst", "x.tar", "y.txt"]);
    for s in report["skipped"].as_array().unwrap() {
        let reason = s["reason"].as_str().unwrap();
        assert!(reason.contains("not a regular file"), "{reason}");
    }
}

#[test]
fn a_fifo_swapped_in_after_the_walk_is_refused_by_the_reader_at_once() {
    // The walk saw a regular file; the reader is handed the path after a fifo replaced it.
    let dir = tempfile::tempdir().unwrap();
    for name in ["x.tar", "y.txt", "z.tar.gz"] {
        let path = dir.path().join(name);
        fs::write(&path, b"").unwrap();
        fs::remove_file(&path).unwrap();
        mkfifo(&path);
        let refused =
            within_deadline(move || read_one(&path)).expect_err("a fifo must not be read");
        assert!(
            refused.reason.contains("not a regular file"),
            "{name}: {refused:?}"
        );
    }
}

#[test]
fn names_that_are_not_utf8_or_hold_a_newline_are_shown_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let latin1 = dir.path().join(OsStr::from_bytes(b"caf\xe9.tar"));
    fs::write(&latin1, docker_tar(&["cafe:1".to_string()])).unwrap();
    fs::write(dir.path().join("a\nb.tar"), b"").unwrap();
    fs::write(dir.path().join("list\r.txt"), "busybox:1\n# forged\nline\n").unwrap();

    let report = json(dir.path());
    let files = report["files"].as_array().unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["a\\nb.tar", "caf\\xe9.tar", "list\\r.txt"]);
    assert!(files[0].get("path_bytes").is_none(), "UTF-8: no bytes");
    // the lossless form: the bytes in hex
    assert_eq!(files[1]["path_bytes"], "636166e92e746172");
    assert_eq!(
        files[1]["names"],
        serde_json::json!(["docker.io/library/cafe:1"])
    );

    let out = inventory(dir.path(), &[]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).expect("the table is UTF-8");
    // one line per file: no name starts a line of its own
    assert!(
        table.lines().any(|l| l.starts_with("a\\nb.tar ")),
        "{table}"
    );
    assert!(!table.lines().any(|l| l.starts_with("b.tar")), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("caf\\xe9.tar ")),
        "{table}"
    );
    assert!(!table.contains('\r'), "{table:?}");
}

#[test]
fn a_hundred_thousand_junk_files_are_remembered_compactly() {
    const JUNK: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..JUNK {
        fs::File::create(dir.path().join(format!("junk-{i:06}.tar"))).unwrap();
    }
    fs::write(dir.path().join("pull.txt"), "busybox:1\n").unwrap();

    let root = dir.path().to_path_buf();
    let (scanner, inventory, changes) = within_deadline(move || {
        let mut scanner = Scanner::new(root);
        let inventory = scanner.scan().unwrap();
        let changes = scanner.cache_changes();
        (scanner, inventory, changes)
    });
    assert_eq!(inventory.files.len(), JUNK + 1);
    assert_eq!(inventory.errors().count(), JUNK);
    // the store (the ledger) gets the list only: junk does not grow it
    assert_eq!(changes.updated.len(), 1);
    let stats = scanner.cache_stats();
    assert_eq!(stats.junk, JUNK, "{stats:?}");
    assert_eq!(stats.reads, 1, "{stats:?}");
    assert_eq!(stats.paths, 1, "pull.txt, once: {stats:?}");
    assert_eq!(stats.junk_texts, 1, "one error text, shared: {stats:?}");
    assert!(
        stats.approx_bytes < 4 << 20,
        "100,000 junk files must take a few MiB at most: {stats:?}"
    );

    // the log: one summary and at most 10 file lines + one "more", not 100,000 warnings
    let mut problems = Problems::new();
    let report = problems.observe(&inventory);
    assert_eq!(report.count, JUNK);
    assert!(report.lines().len() <= 12, "{:#?}", report.lines());
    let again = problems.observe(&inventory);
    assert_eq!(again.lines().len(), 1, "{:#?}", again.lines());

    // the binary reads it too, and counts every broken file
    let out = inventory_tail(dir.path());
    assert!(
        out.contains("100001 file(s), 1 image name(s), 100000 file(s) with errors"),
        "{out}"
    );
}

/// The table's last line.
fn inventory_tail(dir: &Path) -> String {
    let out = inventory(dir, &[]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn duplicate_heavy_lists_and_manifests_give_each_name_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut list = fs::File::create(dir.path().join("pull.txt")).unwrap();
    for i in 0..100_000 {
        writeln!(list, "registry.example.com/app-{}:v1", i % 1_000).unwrap();
    }
    drop(list);
    let tags: Vec<String> = (0..100_000)
        .map(|i| format!("registry.example.com/img-{}:v1", (i * 7) % 3_000))
        .collect();
    fs::write(dir.path().join("images.tar"), docker_tar(&tags)).unwrap();

    let report = json(dir.path());
    let files = report["files"].as_array().unwrap();
    let names = |path: &str| -> Vec<String> {
        let file = files.iter().find(|f| f["path"] == path).unwrap();
        assert!(file["error"].is_null(), "{path}: {}", file["error"]);
        serde_json::from_value(file["names"].clone()).unwrap()
    };
    let listed = names("pull.txt");
    assert_eq!(listed.len(), 1_000);
    assert_eq!(listed[0], "registry.example.com/app-0:v1");
    assert_eq!(listed[999], "registry.example.com/app-999:v1");
    let tagged = names("images.tar");
    let expected: Vec<String> = {
        let mut seen = std::collections::HashSet::new();
        tags.iter().filter(|t| seen.insert(*t)).cloned().collect()
    };
    assert_eq!(tagged.len(), 3_000);
    assert_eq!(tagged, expected);
}
