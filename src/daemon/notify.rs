//! systemd's notify protocol (`Type=notify`): READY=1 once pinkeeper can be asked (ledger open,
//! control socket listening — not when containerd answers, it is away during every K3s
//! restart), STATUS= with the containerd connection, WATCHDOG=1 from the main loop.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing. A failed send is
//! logged once at debug: the daemon's work never depends on it.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        debug!("cannot notify systemd: {e}");
    }
}

/// pinkeeper can be asked now.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new status line for `systemctl status`.
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// pinkeeper is stopping.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The main loop is alive.
pub(crate) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to send WATCHDOG=1: half of systemd's `WatchdogSec=`, if it is set for this
/// process.
pub(crate) fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .filter(|d| !d.is_zero())
}
