//! The connection's event queue as the executor's inbox: what a drain takes while its calls
//! are in flight, and what a listing's reconcile takes once the listing is read. Both keep
//! systemd's watchdog alive while the executor waits on its calls.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tracing::debug;

use crate::containerd::queue::EventQueue;
use crate::engine::Input;

use super::executor::{Inbox, BATCH};

/// A gap between the wall clock's and the monotonic clock's time over a listing past which
/// the wall clock is taken to have been stepped.
const CLOCK_STEP: Duration = Duration::from_secs(1);
/// How long one drain of the event queue goes on taking new events.
pub(super) const DRAIN_TIME: Duration = Duration::from_millis(500);

/// Events shared between the stream reader task and the main loop.
pub(super) struct Shared {
    pub(super) queue: Mutex<EventQueue>,
    /// Why the connection must start over: set by the reader when the stream broke, or when
    /// a listing failed (the events cleared before it are then covered by nothing).
    pub(super) broken: Mutex<Option<String>>,
    pub(super) wake: Notify,
}

impl Shared {
    pub(super) fn new(queue: EventQueue) -> Self {
        Shared {
            queue: Mutex::new(queue),
            broken: Mutex::new(None),
            wake: Notify::new(),
        }
    }
}

/// When a listing began, by both clocks: the events containerd published before then are
/// shown by it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListingStart {
    pub(super) wall: SystemTime,
    pub(super) mono: tokio::time::Instant,
}

impl ListingStart {
    pub(super) fn now() -> Self {
        ListingStart {
            wall: SystemTime::now(),
            mono: tokio::time::Instant::now(),
        }
    }

    /// Whether the listing, read by now, shows what containerd published before it began:
    /// only if the wall clock kept pace with the monotonic one meanwhile; after a step,
    /// publication times say nothing about the listing.
    fn shows_the_past(&self) -> bool {
        listing_shows_the_past(
            SystemTime::now().duration_since(self.wall).ok(),
            self.mono.elapsed(),
        )
    }
}

/// [`ListingStart::shows_the_past`]: `wall_elapsed` is `None` if the wall clock went back.
fn listing_shows_the_past(wall_elapsed: Option<Duration>, mono_elapsed: Duration) -> bool {
    wall_elapsed.is_some_and(|w| w.abs_diff(mono_elapsed) <= CLOCK_STEP)
}

/// The event queue as the executor's inbox: events, a batch at a time, while its calls run.
pub(super) struct EventInbox<'a> {
    pub(super) shared: &'a Shared,
    /// When it stops taking events (a drain's: one timer for the whole drain); `None` for a
    /// listing's reconcile, which takes them as long as its calls run, so that a repair of
    /// 100,000 restores neither holds the events of a new sweep back for minutes nor lets
    /// its own events overflow the queue (and list everything again).
    pub(super) until: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// A listing's start: before the first take, the queued events containerd published
    /// before it are forgotten, since the listing, handled first, shows their state or a
    /// later one (applied after it, an image's pins from before K3s's sweep would read as
    /// news).
    pub(super) listed: Option<ListingStart>,
    /// Kept alive while the calls run ([`keep_watchdog`]).
    pub(super) watchdog: &'a mut Option<tokio::time::Interval>,
    /// What tells systemd ([`crate::daemon::notify::watchdog`]).
    pub(super) ping: fn(),
}

impl Inbox for EventInbox<'_> {
    fn take(&mut self) -> Vec<Input> {
        if let Some(start) = self.listed.take() {
            if start.shows_the_past() {
                let forgotten = lock(&self.shared.queue).forget_published_before(start.wall);
                if forgotten > 0 {
                    debug!(forgotten, "events the listing already showed");
                }
            }
        }
        if self.until.as_ref().is_some_and(|u| u.is_elapsed()) {
            return Vec::new();
        }
        let events = lock(&self.shared.queue).drain_up_to(BATCH);
        events.into_iter().map(Input::Event).collect()
    }

    async fn ready(&mut self) {
        let EventInbox {
            shared,
            until,
            watchdog,
            ping,
            ..
        } = self;
        let events = async {
            match until {
                Some(until) => tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = until.as_mut() => std::future::pending().await,
                },
                None => shared.wake.notified().await,
            }
        };
        tokio::select! {
            _ = events => {}
            _ = keep_watchdog(watchdog, *ping) => {}
        }
    }
}

/// Tells systemd's watchdog that pinkeeper lives whenever it is due; never resolves. While the
/// executor carries out a long run of calls (100,000 restores take minutes, each call bounded by
/// [`crate::containerd::CALL_TIMEOUT`]), the main loop does not get its turn, and without this
/// systemd would kill pinkeeper in the middle of a repair (`WatchdogSec=30s`).
async fn keep_watchdog(watchdog: &mut Option<tokio::time::Interval>, ping: fn()) {
    loop {
        watchdog_due(watchdog).await;
        ping();
    }
}

/// Resolves when the watchdog is due; never without one.
pub(super) async fn watchdog_due(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EventKind, ImageEvent};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static LISTING_PINGS: AtomicUsize = AtomicUsize::new(0);
    static DRAIN_PINGS: AtomicUsize = AtomicUsize::new(0);

    fn watchdog_every_second() -> Option<tokio::time::Interval> {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(interval)
    }

    fn shared() -> Shared {
        Shared::new(EventQueue::new(crate::engine::K3S_PIN))
    }

    fn event(name: &str) -> ImageEvent {
        ImageEvent {
            kind: EventKind::Update,
            name: name.into(),
            labels: Default::default(),
        }
    }

    /// The executor waits on its inbox while calls are in flight: a reconcile whose calls
    /// take 10.5 s (simulated time) still tells systemd every second, and takes the events
    /// that come meanwhile, however long it runs.
    #[tokio::test(start_paused = true)]
    async fn a_long_reconcile_keeps_the_watchdog_alive_and_takes_events() {
        let shared = shared();
        let mut watchdog = watchdog_every_second();
        let mut inbox = EventInbox {
            shared: &shared,
            until: None,
            listed: None,
            watchdog: &mut watchdog,
            ping: || {
                LISTING_PINGS.fetch_add(1, Ordering::SeqCst);
            },
        };
        let waited = tokio::time::timeout(Duration::from_millis(10_500), inbox.ready()).await;
        assert!(waited.is_err(), "no event came");
        // At 0, 1, ..., 10 s.
        assert_eq!(LISTING_PINGS.load(Ordering::SeqCst), 11);
        lock(&shared.queue).push(event("docker.io/library/late:1"), Some(SystemTime::now()));
        shared.wake.notify_one();
        let woke = tokio::time::timeout(Duration::from_millis(10), inbox.ready()).await;
        assert!(woke.is_ok(), "an event wakes a reconcile's inbox");
        assert_eq!(inbox.take().len(), 1, "taken after 10.5 s");
    }

    /// A drain's inbox too, also once it has stopped taking events; an event still wakes it.
    #[tokio::test(start_paused = true)]
    async fn a_long_drain_keeps_the_watchdog_alive() {
        let shared = shared();
        let mut watchdog = watchdog_every_second();
        let mut inbox = EventInbox {
            shared: &shared,
            until: Some(Box::pin(tokio::time::sleep(DRAIN_TIME))),
            listed: None,
            watchdog: &mut watchdog,
            ping: || {
                DRAIN_PINGS.fetch_add(1, Ordering::SeqCst);
            },
        };
        let waited = tokio::time::timeout(Duration::from_millis(10_500), inbox.ready()).await;
        assert!(waited.is_err());
        assert_eq!(DRAIN_PINGS.load(Ordering::SeqCst), 11);
        let mut inbox = EventInbox {
            shared: &shared,
            until: Some(Box::pin(tokio::time::sleep(DRAIN_TIME))),
            listed: None,
            watchdog: &mut watchdog,
            ping: || {},
        };
        shared.wake.notify_one();
        let woke = tokio::time::timeout(Duration::from_millis(10), inbox.ready()).await;
        assert!(woke.is_ok(), "an event wakes the drain's inbox");
    }

    /// A listing's inbox forgets, before its first take, the events published before the
    /// listing began, and keeps the later ones and those without a time.
    #[tokio::test]
    async fn a_listings_inbox_forgets_what_the_listing_shows() {
        let shared = shared();
        let start = ListingStart::now();
        {
            let mut queue = lock(&shared.queue);
            queue.push(
                event("docker.io/library/before:1"),
                Some(start.wall - Duration::from_secs(1)),
            );
            queue.push(
                event("docker.io/library/after:1"),
                Some(start.wall + Duration::from_millis(1)),
            );
            queue.push(event("docker.io/library/untimed:1"), None);
        }
        let mut watchdog = None;
        let mut inbox = EventInbox {
            shared: &shared,
            until: None,
            listed: Some(start),
            watchdog: &mut watchdog,
            ping: || {},
        };
        let names: Vec<String> = inbox
            .take()
            .into_iter()
            .filter_map(|i| match i {
                Input::Event(e) => Some(e.name),
                _ => None,
            })
            .collect();
        assert_eq!(
            names,
            ["docker.io/library/after:1", "docker.io/library/untimed:1"]
        );
    }

    #[test]
    fn only_a_listing_read_with_a_steady_clock_forgets_events() {
        let ms = Duration::from_millis;
        assert!(listing_shows_the_past(Some(ms(40)), ms(42)));
        // The wall clock stepped back, or forward, meanwhile.
        assert!(!listing_shows_the_past(None, ms(42)));
        assert!(!listing_shows_the_past(Some(ms(5_000)), ms(42)));
    }
}
