//! What the daemon and `pinkeeper record` share while they follow containerd: the backoff of
//! reconnection attempts and the images directory's change notice. (A task that dies with its
//! owner is tokio-util's `AbortOnDropHandle`.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::inventory::watch::Watcher;

/// First retry delay while containerd is away.
const RETRY_MIN: Duration = Duration::from_millis(20);
/// Retry delay cap during the first minute of an outage: K3s sweeps about a second after it
/// starts containerd, and pinkeeper wants to be subscribed by then.
pub(crate) const RETRY_MAX_FAST: Duration = Duration::from_millis(100);
/// Retry delay cap once containerd has been away for a while (K3s stopped).
const RETRY_MAX_SLOW: Duration = Duration::from_millis(1000);
/// How long an outage counts as "just restarting".
const FAST_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// Capped, jittered, doubling delays between attempts to reach containerd.
#[derive(Debug)]
pub(crate) struct Backoff {
    started: Instant,
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            started: Instant::now(),
            delay: RETRY_MIN,
        }
    }
}

impl Backoff {
    /// The wait before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let wait = jitter(self.delay);
        let cap = if self.started.elapsed() < FAST_RETRY_WINDOW {
            RETRY_MAX_FAST
        } else {
            RETRY_MAX_SLOW
        };
        self.delay = (self.delay * 2).min(cap);
        wait
    }
}

/// Up to a quarter more, so a fleet of nodes does not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| u64::from(t.subsec_nanos()));
    d + Duration::from_nanos(nanos % (d.as_nanos() as u64 / 4 + 1))
}

/// Resolves when the images directory changed and settled; never without a watch.
pub(crate) async fn images_dir_changed(watch: &mut Option<Watcher>) {
    match watch {
        Some(watch) => {
            watch.changed().await;
            tracing::debug!("the images directory changed: reading it again");
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_to_100_ms_then_to_1_s_after_a_minute() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first >= RETRY_MIN && first <= RETRY_MIN + RETRY_MIN / 4);
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() <= RETRY_MAX_FAST + RETRY_MAX_FAST / 4);
        tokio::time::advance(FAST_RETRY_WINDOW).await;
        for _ in 0..10 {
            backoff.next_delay();
        }
        let late = backoff.next_delay();
        assert!(late >= RETRY_MAX_SLOW && late <= RETRY_MAX_SLOW + RETRY_MAX_SLOW / 4);
    }
}
