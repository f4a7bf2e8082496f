//! The live images directory: tells when it has changed, so the daemon reads it again at once
//! instead of only at the next connection.
//!
//! Owns: an inotify watch (through the `notify` crate) of the images directory, recursive,
//! new subdirectories included; re-arming it when the directory does not exist yet (K3s
//! creates it), is deleted, moved away or created again (then the nearest existing parent is
//! watched, non-recursively, until the directory is back); and the debounce that turns a
//! burst of file-system events into one "changed" signal. It never reads the files (the
//! [`super::Scanner`] does) and never touches the engine, containerd or the ledger.
//!
//! Idle cost: nothing. notify's thread blocks in `epoll_wait` and ours in a channel receive,
//! both without a timeout; a timer exists only while a burst is settling.
//!
//! K3s behaviour this mirrors (FACTS.md section 2, item 7; k3s `pkg/agent/containerd/watcher.go`):
//! K3s watches the images directory (from its parent, as it may not exist yet) and imports a
//! file two seconds after its first event. pinkeeper waits for two quiet seconds instead: a
//! file being copied produces an event per write, and reading a half-written archive would be
//! wasted I/O. A burst that never pauses is read after [`DEFAULT_MAX_DELAY`] at the latest.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tracing::{debug, warn};

/// Quiet time after the last change before the directory is read again (K3s waits 2 s).
pub(crate) const DEFAULT_QUIET: Duration = Duration::from_secs(2);
/// A directory that never stops changing is read again at least this often.
pub(crate) const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(60);

/// Raw notifications queued between notify's thread and ours; past that, only "something
/// changed" is kept (a flag), which is all the debounce needs.
const RAW_QUEUE: usize = 1024;
/// Re-arming attempts in a row while the directory keeps appearing and vanishing.
const REARM_ATTEMPTS: usize = 16;

/// Trailing-edge debounce with a cap: fires `quiet` after the last change, and at the latest
/// `max_delay` after the first change of a burst. Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub(crate) struct Debounce {
    quiet: Duration,
    max_delay: Duration,
    /// First and last change of the burst under way.
    burst: Option<(Instant, Instant)>,
}

impl Debounce {
    /// A debounce that fires after `quiet` without changes, or `max_delay` into a burst.
    pub(crate) fn new(quiet: Duration, max_delay: Duration) -> Self {
        Debounce {
            quiet,
            max_delay: max_delay.max(quiet),
            burst: None,
        }
    }

    /// Notes a change seen at `now`.
    pub(crate) fn change(&mut self, now: Instant) {
        self.burst = Some(match self.burst {
            Some((first, last)) => (first, last.max(now)),
            None => (now, now),
        });
    }

    /// When the burst under way settles, if there is one.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.burst
            .map(|(first, last)| (last + self.quiet).min(first + self.max_delay))
    }

    /// True (once) when the burst has settled at `now`; the next change starts a new burst.
    pub(crate) fn fire(&mut self, now: Instant) -> bool {
        if self.deadline().is_some_and(|at| at <= now) {
            self.burst = None;
            true
        } else {
            false
        }
    }
}

/// Messages to the debounce thread.
enum Msg {
    /// From notify's thread.
    Event(notify::Result<notify::Event>),
    /// From the daemon: check the watch (it may have failed for lack of inotify watches).
    Rearm,
    /// Wakes the thread to look at its flags.
    Wake,
}

/// Flags shared with the debounce thread.
#[derive(Default)]
struct Flags {
    /// Raw notifications were dropped because the queue was full.
    missed: AtomicBool,
    /// The [`Watcher`] was dropped.
    stop: AtomicBool,
}

/// A watch of the images directory. Dropping it stops the watch and its threads.
pub(crate) struct Watcher {
    to_thread: SyncSender<Msg>,
    flags: Arc<Flags>,
    changed: tokio::sync::mpsc::Receiver<()>,
    /// False once the watch thread has ended (then [`Watcher::changed`] never resolves).
    alive: bool,
}

impl Watcher {
    /// Watches `dir` with K3s's timing ([`DEFAULT_QUIET`], [`DEFAULT_MAX_DELAY`]).
    pub(crate) fn start(dir: &Path) -> io::Result<Watcher> {
        Watcher::with_timing(dir, Debounce::new(DEFAULT_QUIET, DEFAULT_MAX_DELAY))
    }

    /// [`Watcher::start`] for a caller that reads the directory right after: arming is no
    /// change then (anything before it is in that read), so a start does not read the
    /// directory twice (with 30,000 archives, ~150 ms and a second copy of the cache).
    pub(crate) fn start_before_read(dir: &Path) -> io::Result<Watcher> {
        Watcher::armed(dir, Debounce::new(DEFAULT_QUIET, DEFAULT_MAX_DELAY), false)
    }

    /// Watches `dir`, signalling settled changes as `debounce` decides. Works whether or not
    /// `dir` exists yet. Fails only when inotify itself cannot be set up (no inotify instance
    /// left for the user); a watch that cannot be added is retried at each change and at each
    /// [`Watcher::rearm`].
    pub(crate) fn with_timing(dir: &Path, debounce: Debounce) -> io::Result<Watcher> {
        Watcher::armed(dir, debounce, true)
    }

    /// Watches `dir`; `arming_is_change`: the directory may have changed before the watch was
    /// in place, and is read again once it settles.
    fn armed(dir: &Path, debounce: Debounce, arming_is_change: bool) -> io::Result<Watcher> {
        let dir = std::path::absolute(dir)?;
        let flags = Arc::new(Flags::default());
        let (to_thread, from_notify) = mpsc::sync_channel(RAW_QUEUE);
        let (changed_tx, changed) = tokio::sync::mpsc::channel(1);
        let handler = {
            let tx = to_thread.clone();
            let flags = flags.clone();
            move |event: notify::Result<notify::Event>| {
                if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Event(event)) {
                    flags.missed.store(true, Ordering::Release);
                }
            }
        };
        // Links are not followed: one pointing at `/` would watch the whole host. The scanner
        // reads only links that stay inside the directory, whose targets are watched anyway.
        let config = notify::Config::default().with_follow_symlinks(false);
        let notify = RecommendedWatcher::new(handler, config).map_err(notify_to_io)?;
        let mut state = State {
            dir,
            notify,
            armed: None,
            last_error: None,
            debounce,
            flags: flags.clone(),
            changed: changed_tx,
        };
        // Armed before returning: a change made after `start` is never missed.
        state.rearm(Instant::now());
        if !arming_is_change {
            state.debounce.burst = None;
        }
        std::thread::Builder::new()
            .name("pinkeeper-watch".into())
            .spawn(move || state.run(from_notify))?;
        Ok(Watcher {
            to_thread,
            flags,
            changed,
            alive: true,
        })
    }

    /// Resolves when the directory has changed and the change has settled; the caller then
    /// reads it again. Changes during the read are signalled again afterwards. Never resolves
    /// once the watch has stopped. Cancel-safe.
    pub(crate) async fn changed(&mut self) {
        if self.alive && self.changed.recv().await.is_some() {
            return;
        }
        self.alive = false;
        std::future::pending().await
    }

    /// Checks the watch again (cheap: one `stat`), re-adding it if it was lost or could not be
    /// added. The daemon calls this at each connection to containerd.
    pub(crate) fn rearm(&self) {
        let _ = self.to_thread.try_send(Msg::Rearm);
    }

    /// False once the watch thread has ended (it does on a bug only): make a new one.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive && !self.changed.is_closed()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::Release);
        // If the queue is full, the thread is awake anyway and sees the flag.
        let _ = self.to_thread.try_send(Msg::Wake);
    }
}

/// What is watched now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Armed {
    /// The images directory itself (recursively) or its nearest existing parent (not).
    path: PathBuf,
    recursive: bool,
    /// (device, inode) of `path` when armed: a directory deleted and created again is new.
    identity: (u64, u64),
}

/// The debounce thread's state.
struct State {
    dir: PathBuf,
    notify: RecommendedWatcher,
    armed: Option<Armed>,
    /// The last error adding a watch, reported once.
    last_error: Option<String>,
    debounce: Debounce,
    flags: Arc<Flags>,
    changed: tokio::sync::mpsc::Sender<()>,
}

impl State {
    fn run(mut self, from_notify: mpsc::Receiver<Msg>) {
        loop {
            // No timeout while nothing is settling: an idle directory costs no wake-up.
            let msg = match self.debounce.deadline() {
                None => from_notify
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => from_notify.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            if self.flags.stop.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            match msg {
                Ok(Msg::Event(Ok(event))) => self.on_event(&event, now),
                Ok(Msg::Event(Err(e))) => {
                    // inotify's watch limit reached in a new subdirectory, or the like: some
                    // change may go unseen; read the directory and check the watch.
                    debug!(dir = %self.dir.display(), "watching the images directory: {e}");
                    self.debounce.change(now);
                    self.rearm(now);
                }
                Ok(Msg::Rearm) => self.rearm(now),
                Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.flags.missed.swap(false, Ordering::AcqRel) {
                self.debounce.change(now);
                self.rearm(now);
            }
            if self.debounce.fire(Instant::now()) {
                // The directory may have vanished or come back in the burst.
                self.rearm(Instant::now());
                match self.changed.try_send(()) {
                    // Full: a read is already due and will see this change too.
                    Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        }
    }

    fn on_event(&mut self, event: &notify::Event, now: Instant) {
        let watching_dir = self.armed.as_ref().is_some_and(|a| a.recursive);
        match event.kind {
            // Opening a file or listing a directory (the scanner does both) changes nothing.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            _ => {}
        }
        if !watching_dir {
            // Watching a parent: only the way down to the images directory matters.
            if event.need_rescan() || event.paths.iter().any(|p| self.dir.starts_with(p)) {
                self.rearm(now);
            }
            return;
        }
        self.debounce.change(now);
        let structural = event.need_rescan()
            || matches!(event.kind, EventKind::Any | EventKind::Other)
            || event.paths.contains(&self.dir);
        if structural {
            // The directory itself was deleted, moved or replaced, or events were lost.
            self.rearm(now);
        }
    }

    /// Makes the watch match the file system: the images directory, recursively, if it
    /// exists; else its nearest existing parent, to see it appear. After a change of what is
    /// watched, the directory may have changed unseen meanwhile: that counts as a change.
    fn rearm(&mut self, now: Instant) {
        for _ in 0..REARM_ATTEMPTS {
            let Some(wanted) = self.wanted() else {
                self.report("no parent of the images directory exists".into());
                return;
            };
            if self.armed.as_ref() == Some(&wanted) {
                return;
            }
            if let Some(old) = self.armed.take() {
                // Gone already when notify saw the directory deleted: nothing to undo then.
                let _ = self.notify.unwatch(&old.path);
            }
            let mode = if wanted.recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match self.notify.watch(&wanted.path, mode) {
                Ok(()) => {
                    debug!(
                        watched = %wanted.path.display(),
                        recursive = wanted.recursive,
                        "watching for changes of the images directory"
                    );
                    self.last_error = None;
                    // What happened before the watch was in place is read now.
                    self.debounce.change(now);
                    self.armed = Some(wanted);
                    // Checked again: the directory may have appeared or gone meanwhile.
                }
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {
                    // Vanished between the stat and the watch: look again.
                }
                Err(e) => {
                    self.report(format!(
                        "cannot watch {} ({e}); a file added or deleted will be seen at the \
                         next connection to containerd (raise fs.inotify.max_user_watches if \
                         the limit was reached)",
                        wanted.path.display()
                    ));
                    return;
                }
            }
        }
    }

    /// What should be watched now.
    fn wanted(&self) -> Option<Armed> {
        let mut path = self.dir.as_path();
        let mut recursive = true;
        loop {
            // Followed links, as K3s `os.Stat`s: the directory may be a link.
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.is_dir() {
                    return Some(Armed {
                        path: path.to_path_buf(),
                        recursive,
                        identity: (meta.dev(), meta.ino()),
                    });
                }
            }
            path = path.parent()?;
            recursive = false;
        }
    }

    fn report(&mut self, error: String) {
        if self.last_error.as_ref() != Some(&error) {
            warn!(dir = %self.dir.display(), "{error}");
            self.last_error = Some(error);
        }
    }
}

fn notify_to_io(e: notify::Error) -> io::Error {
    match e.kind {
        notify::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(60);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_fires_without_a_change() {
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, MAX);
        assert_eq!(d.deadline(), None);
        assert!(!d.fire(t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn one_change_fires_once_after_the_quiet_time() {
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, MAX);
        d.change(t0);
        assert_eq!(d.deadline(), Some(t0 + QUIET));
        assert!(!d.fire(t0 + ms(1999)));
        assert!(d.fire(t0 + QUIET));
        assert!(!d.fire(t0 + QUIET + ms(1)), "fires once");
        assert_eq!(d.deadline(), None);
    }

    #[test]
    fn a_burst_fires_once_after_its_last_change() {
        // A file being copied: an event every 100 ms for 5 s.
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, MAX);
        let mut fired = 0;
        for i in 0..=50 {
            let now = t0 + ms(100 * i);
            fired += usize::from(d.fire(now));
            d.change(now);
        }
        assert_eq!(fired, 0, "nothing while the copy goes on");
        assert_eq!(d.deadline(), Some(t0 + ms(5000) + QUIET));
        assert!(!d.fire(t0 + ms(6999)));
        assert!(d.fire(t0 + ms(7000)));
    }

    #[test]
    fn a_burst_that_never_pauses_fires_at_the_cap() {
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, Duration::from_secs(10));
        let mut fired_at = Vec::new();
        for i in 0..=250 {
            let now = t0 + ms(100 * i);
            if d.fire(now) {
                fired_at.push(now - t0);
            }
            d.change(now);
        }
        assert_eq!(fired_at, vec![ms(10_000), ms(20_000)]);
    }

    #[test]
    fn late_or_out_of_order_times_never_pull_the_deadline_earlier() {
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, MAX);
        d.change(t0 + ms(500));
        d.change(t0);
        assert_eq!(d.deadline(), Some(t0 + ms(500) + QUIET));
    }

    #[test]
    fn a_change_after_firing_starts_a_new_burst() {
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, ms(3000));
        d.change(t0);
        assert!(d.fire(t0 + QUIET));
        d.change(t0 + ms(2500));
        // The cap counts from the new burst's first change, not the old one.
        assert_eq!(d.deadline(), Some(t0 + ms(4500)));
    }

    #[test]
    fn the_cap_is_never_shorter_than_the_quiet_time() {
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, ms(10));
        d.change(t0);
        assert_eq!(d.deadline(), Some(t0 + QUIET));
    }

    // The watch itself, on the real file system, with a short quiet time.

    const TEST_QUIET: Duration = Duration::from_millis(150);

    fn watcher(dir: &Path) -> Watcher {
        Watcher::with_timing(dir, Debounce::new(TEST_QUIET, Duration::from_secs(10)))
            .expect("inotify is available")
    }

    /// Waits for a settled change; false if none came within `within`.
    async fn changed_within(w: &mut Watcher, within: Duration) -> bool {
        tokio::time::timeout(within, w.changed()).await.is_ok()
    }

    /// Consumes the signal(s) of arming and of whatever was done so far.
    async fn drain(w: &mut Watcher) {
        while changed_within(w, TEST_QUIET * 3).await {}
    }

    #[tokio::test]
    async fn sees_files_added_and_deleted_in_new_subdirectories() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("images");
        std::fs::create_dir(&dir).unwrap();
        let mut w = watcher(&dir);
        drain(&mut w).await;

        std::fs::write(dir.join("app.tar"), b"x").unwrap();
        assert!(changed_within(&mut w, ms(3000)).await, "a file added");
        std::fs::create_dir_all(dir.join("more/deeper")).unwrap();
        drain(&mut w).await;
        std::fs::write(dir.join("more/deeper/web.tar.zst"), b"x").unwrap();
        assert!(
            changed_within(&mut w, ms(3000)).await,
            "a file in a new subdirectory"
        );
        std::fs::remove_file(dir.join("more/deeper/web.tar.zst")).unwrap();
        assert!(changed_within(&mut w, ms(3000)).await, "a file deleted");
        assert!(w.is_alive());
    }

    #[tokio::test]
    async fn a_burst_is_signalled_once_after_it_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut w = watcher(&dir);
        drain(&mut w).await;
        let started = Instant::now();
        let mut file = std::fs::File::create(dir.join("big.tar")).unwrap();
        for _ in 0..10 {
            use std::io::Write;
            file.write_all(&[0; 4096]).unwrap();
            tokio::time::sleep(TEST_QUIET / 3).await;
        }
        drop(file);
        let burst = started.elapsed();
        assert!(changed_within(&mut w, ms(3000)).await);
        assert!(
            started.elapsed() >= burst + TEST_QUIET / 2,
            "signalled {:?} into a burst of {burst:?}",
            started.elapsed()
        );
        assert!(!changed_within(&mut w, TEST_QUIET * 3).await, "only once");
    }

    #[tokio::test]
    async fn a_watch_started_before_a_read_signals_changes_after_it_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("before.tar"), b"x").unwrap();
        let mut w = Watcher::armed(
            &dir,
            Debounce::new(TEST_QUIET, Duration::from_secs(10)),
            false,
        )
        .expect("inotify is available");
        assert!(
            !changed_within(&mut w, TEST_QUIET * 3).await,
            "arming is no change: the caller reads the directory next"
        );
        std::fs::write(dir.join("after.tar"), b"x").unwrap();
        assert!(changed_within(&mut w, ms(3000)).await, "a file added");
    }

    #[tokio::test]
    async fn reading_the_directory_is_no_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/app.tar"), b"x").unwrap();
        let mut w = watcher(&dir);
        drain(&mut w).await;
        // What the scanner does: list every directory, open and read every file.
        for entry in std::fs::read_dir(&dir).unwrap() {
            let _ = entry.unwrap().metadata();
        }
        let _ = std::fs::read_dir(dir.join("sub")).unwrap().count();
        let _ = std::fs::read(dir.join("sub/app.tar")).unwrap();
        assert!(!changed_within(&mut w, TEST_QUIET * 4).await);
    }

    #[tokio::test]
    async fn follows_a_directory_created_late_deleted_and_created_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent/images");
        let mut w = watcher(&dir);
        drain(&mut w).await;

        // K3s creates it (with its parent) later.
        std::fs::create_dir_all(&dir).unwrap();
        assert!(changed_within(&mut w, ms(3000)).await, "created");
        drain(&mut w).await;
        std::fs::write(dir.join("app.tar"), b"x").unwrap();
        assert!(changed_within(&mut w, ms(3000)).await, "a file in it");

        // Deleted with its parent, then created again: the new directory is watched.
        std::fs::remove_dir_all(tmp.path().join("agent")).unwrap();
        assert!(changed_within(&mut w, ms(3000)).await, "deleted");
        std::fs::create_dir_all(&dir).unwrap();
        drain(&mut w).await;
        std::fs::write(dir.join("web.tar"), b"x").unwrap();
        assert!(
            changed_within(&mut w, ms(3000)).await,
            "a file in the new one"
        );

        // Replaced in one go (moved away, another moved in).
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::rename(&dir, tmp.path().join("old")).unwrap();
        std::fs::rename(&other, &dir).unwrap();
        drain(&mut w).await;
        std::fs::write(dir.join("db.tar"), b"x").unwrap();
        assert!(
            changed_within(&mut w, ms(3000)).await,
            "a file in the replacement"
        );
        std::fs::write(tmp.path().join("old/stale.tar"), b"x").unwrap();
        assert!(
            !changed_within(&mut w, TEST_QUIET * 4).await,
            "the old directory is no longer watched"
        );
    }

    #[tokio::test]
    async fn changes_beside_the_missing_directory_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("images");
        let mut w = watcher(&dir);
        drain(&mut w).await;
        std::fs::write(tmp.path().join("kubelet.kubeconfig"), b"x").unwrap();
        let _ = std::fs::read(tmp.path().join("kubelet.kubeconfig")).unwrap();
        assert!(!changed_within(&mut w, TEST_QUIET * 4).await);
    }

    #[tokio::test]
    async fn dropping_the_watcher_stops_both_threads() {
        let tmp = tempfile::tempdir().unwrap();
        let w = watcher(tmp.path());
        // Held by the watcher, its thread and notify's handler (on notify's thread).
        let flags = w.flags.clone();
        assert_eq!(Arc::strong_count(&flags), 4);
        drop(w);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&flags) > 1 && Instant::now() < deadline {
            tokio::time::sleep(ms(10)).await;
        }
        assert_eq!(Arc::strong_count(&flags), 1);
    }
}
