//! Unit tests of `ledger`.

use super::*;
use crate::engine::{Action, IntentState, Origin};

/// A held intent for `name`, as the ledger's tests (here and in `writer.rs`) store it.
pub(super) fn intent(name: &str) -> Intent {
    Intent {
        name: name.into(),
        digest: Some("sha256:abc".into()),
        source: None,
        pins: Default::default(),
        legacy_labels: None,
        state: IntentState::Held,
        origin: Origin::SeenPinned,
        since: 1,
        restores: 0,
        last_restored: None,
        released_because: None,
        k3s_pinned: false,
    }
}

#[test]
fn survives_reopen_and_keeps_history_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let a = intent("a");
        let h = HistoryEntry {
            at: 5,
            name: "a".into(),
            action: Action::Recorded,
            detail: "x".into(),
        };
        ledger
            .apply(&[Change::Save(&a), Change::History(&h), Change::History(&h)])
            .unwrap();
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(ledger.intents().unwrap(), vec![intent("a")]);
    assert_eq!(ledger.history(Some("a"), 10).unwrap().len(), 2);
    assert_eq!(ledger.history(Some("b"), 10).unwrap().len(), 0);
    assert_eq!(ledger.next_seq, 2);
}

pub(crate) fn cached(path: &Path, names: &[&str]) -> CachedFile {
    use crate::inventory::{Compression, FileIdentity, FileKind, Layout};
    CachedFile {
        path: path.to_path_buf(),
        reader: "test".into(),
        identity: FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            // past 2262, so over i64 nanoseconds
            mtime_ns: i128::from(i64::MAX) * 4 + 5,
        },
        kind: FileKind::Archive {
            compression: Compression::Zstd,
            layout: Some(Layout::DockerSave),
        },
        names: names.iter().map(|n| n.to_string()).collect(),
        error: None,
    }
}

#[test]
fn cached_files_round_trip_and_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let odd = PathBuf::from(OsStr::from_bytes(b"/images/not-utf8-\xff.tar"));
    let a = cached(Path::new("/images/a.tar.zst"), &["docker.io/library/a:1"]);
    let mut b = cached(&odd, &[]);
    b.kind = crate::inventory::FileKind::List;
    b.error = Some("line 2 skipped by K3s".into());
    {
        let mut ledger = Ledger::open(dir.path()).unwrap();
        ledger
            .apply(&[Change::CacheFile(&a), Change::CacheFile(&b)])
            .unwrap();
        // a record another version cannot decode is left out, not an error
        ledger
            .write(|txn| {
                txn.open_table(FILES)?
                    .insert(b"/images/garbage.tar".as_slice(), b"{".as_slice())?;
                Ok(())
            })
            .unwrap();
    }
    let mut ledger = Ledger::open(dir.path()).unwrap();
    let mut files = ledger.cached_files().unwrap();
    files.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(files, vec![a.clone(), b.clone()]);
    let changes = [OwnedChange::ForgetFile(odd.clone())];
    let batch: Vec<Change<'_>> = changes.iter().map(OwnedChange::as_change).collect();
    ledger.apply(&batch).unwrap();
    assert_eq!(ledger.cached_files().unwrap(), vec![a]);
    // the cache does not disturb the intents
    assert!(ledger.intents().unwrap().is_empty());
}

#[test]
fn second_open_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Ledger::open(dir.path()).unwrap();
    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("another pinkeeper"), "{err}");
}

#[test]
fn a_file_that_is_not_a_ledger_is_damaged_never_new() {
    for (what, bytes) in [
        ("garbage", b"not a database at all, just bytes".to_vec()),
        ("empty", Vec::new()),
        ("magic only", REDB_MAGIC.to_vec()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let err = Ledger::open(dir.path()).unwrap_err();
        assert!(matches!(err, LedgerError::Damaged { .. }), "{what}: {err}");
        assert!(err.to_string().contains("moves it aside"), "{what}: {err}");
        let err = Ledger::inspect(dir.path()).unwrap_err();
        assert!(matches!(err, LedgerError::Damaged { .. }), "{what}: {err}");
        // Neither open nor inspect touched it.
        assert_eq!(
            std::fs::read(dir.path().join(FILE_NAME)).unwrap(),
            bytes,
            "{what}"
        );
    }
}

#[test]
fn a_database_that_is_not_pinkeepers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let other: TableDefinition<&str, &str> = TableDefinition::new("someone-else");
        txn.open_table(other).unwrap().insert("k", "v").unwrap();
        txn.commit().unwrap();
    }
    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not pinkeeper's"), "{err}");
}

/// A ledger with `intents` intents and some history, closed cleanly.
fn ledger_with(dir: &Path, intents: usize) -> Vec<u8> {
    let mut ledger = Ledger::open(dir).unwrap();
    let all: Vec<Intent> = (0..intents)
        .map(|i| intent(&format!("img-{i:04}")))
        .collect();
    let h = HistoryEntry {
        at: 5,
        name: "a".into(),
        action: Action::Recorded,
        detail: "x".repeat(200).into(),
    };
    let mut changes: Vec<Change<'_>> = all.iter().map(Change::Save).collect();
    changes.extend(std::iter::repeat_n(Change::History(&h), 500));
    ledger.apply(&changes).unwrap();
    drop(ledger);
    std::fs::read(dir.join(FILE_NAME)).unwrap()
}

#[test]
fn random_damage_never_panics_and_start_keeps_what_it_can() {
    // The damage of issue 9: 4 KiB of random bytes in the middle of the file.
    let mut detected = 0;
    for seed in 0..16u64 {
        let dir = tempfile::tempdir().unwrap();
        let good = ledger_with(dir.path(), 300);
        let mut bytes = good.clone();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let at = bytes.len() / 4 + (next() as usize % (bytes.len() / 2));
        let end = (at + 4096).min(bytes.len());
        for b in &mut bytes[at..end] {
            *b = next() as u8;
        }
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, &bytes).unwrap();
        // Neither panics (a panic fails this test).
        let _ = Ledger::inspect(dir.path());
        let _ = Ledger::open(dir.path());
        std::fs::write(&path, &bytes).unwrap();
        let start = Ledger::start(dir.path(), 1234).unwrap();
        let ledger = start.ledger.expect("a writable ledger after recovery");
        let kept = ledger.intents().unwrap();
        if let Some(recovered) = &start.recovered {
            detected += 1;
            // The damaged file is kept aside, byte for byte, and what was read is kept.
            let aside = dir.path().join(format!("{FILE_NAME}.damaged-1234"));
            assert_eq!(std::fs::read(&aside).unwrap(), bytes, "seed {seed}");
            assert!(recovered.contains("moved aside"), "{recovered}");
            assert_eq!(kept.len(), start.contents.intents.len(), "seed {seed}");
        } else {
            assert_eq!(kept.len(), 300, "seed {seed}: undamaged intents");
        }
    }
    eprintln!("damage detected in {detected} of 16 files");
    assert!(detected > 0);
}

#[test]
fn start_moves_an_empty_ledger_aside_instead_of_taking_it_for_new() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), b"").unwrap();
    let start = Ledger::start(dir.path(), 77).unwrap();
    assert!(start.ledger.is_some());
    let recovered = start.recovered.expect("said");
    assert!(recovered.contains("empty"), "{recovered}");
    assert!(dir.path().join("ledger.redb.damaged-77").exists());
}

#[test]
fn start_without_a_writable_state_dir_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the state directory should be: it cannot be created.
    let state = dir.path().join("state");
    std::fs::write(&state, b"").unwrap();
    let start = Ledger::start(&state, 1).unwrap();
    assert!(start.ledger.is_none());
    assert!(start.problem.is_some());
}

#[test]
fn a_non_utf8_source_is_stored_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = intent("a");
    a.source = Some(PathBuf::from(OsStr::from_bytes(b"/images/caf\xe9.tar")));
    Ledger::open(dir.path())
        .unwrap()
        .apply(&[Change::Save(&a)])
        .unwrap();
    assert_eq!(
        Ledger::open(dir.path()).unwrap().intents().unwrap(),
        vec![a]
    );
}
