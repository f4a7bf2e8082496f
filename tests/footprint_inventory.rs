//! Heap bytes per file of the images directory, counted by a counting allocator (not RSS, so
//! this cannot flake): what the daemon keeps of a scan of 5,000 files that each provide a name
//! (the scanner's cache and the name index the engine holds), beyond the bytes of the paths
//! (as kept: relative to the images directory) and names themselves. The maps of owned
//! strings of earlier builds took 735 bytes a file here in all; the table takes 99, 56 of them
//! beyond the text.
//!
//! The figure is printed; the test fails when it grows past the budget. The count is global to
//! the process, so this binary holds this one test.

use pinkeeper::inventory::Scanner;

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

const FILES: usize = 5_000;

/// Heap bytes kept per file besides its path (relative to the images directory) and names
/// (measured: 56).
const BUDGET_PER_FILE: isize = 80;

#[test]
fn heap_bytes_per_file_of_the_images_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = 0;
    for i in 0..FILES {
        let file = format!("list-{i:05}.txt");
        let name = format!("registry.example/app-{i:05}:v1");
        std::fs::write(dir.path().join(&file), format!("{name}\n")).unwrap();
        // Paths are kept relative to the images directory.
        text += file.len() + name.len();
    }
    let text = text as isize;

    let before = counting::live();
    let mut scanner = Scanner::new(dir.path());
    let problems = scanner.scan_problems().unwrap();
    assert!(problems.files.is_empty() && problems.skipped.is_empty());
    drop(problems);
    let provided = scanner.provided();
    assert_eq!(provided.len(), FILES);
    assert_eq!(
        provided.get("registry.example/app-00042:v1").as_deref(),
        Some(dir.path().join("list-00042.txt").as_path())
    );
    let changes = scanner.cache_changes();
    assert_eq!(changes.updated.len(), FILES);
    drop(changes);
    let kept = counting::live() - before;
    let per_file = (kept - text) / FILES as isize;
    eprintln!(
        "inventory: {kept} heap bytes for {FILES} files, {text} of them paths and names \
         ({per_file} more per file, budget {BUDGET_PER_FILE})"
    );
    assert!(
        per_file <= BUDGET_PER_FILE,
        "{per_file} heap bytes per file beyond its path and names, over the budget of \
         {BUDGET_PER_FILE}"
    );

    // Scanning the unchanged directory again reads nothing and keeps no more per file.
    drop(provided);
    let problems = scanner.scan_problems().unwrap();
    drop(problems);
    let provided = scanner.provided();
    assert!(scanner.cache_changes().is_empty());
    assert_eq!(scanner.files_read(), FILES as u64);
    let again = counting::live() - before;
    eprintln!("inventory: {again} heap bytes after a second scan");
    // (A few hundred bytes of the process's own may be set up lazily meanwhile.)
    assert!(
        again - kept < FILES as isize,
        "a second scan of an unchanged directory kept {again} bytes, the first {kept}"
    );
    drop(provided);
    drop(scanner);
}
