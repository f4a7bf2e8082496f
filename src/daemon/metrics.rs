//! Prometheus metrics: what pinkeeper did and where it stands, for node-exporter's textfile
//! collector and an optional loopback HTTP endpoint. Off unless `metrics_textfile` or
//! `metrics_address` is set.
//!
//! It owns the registry ([`Metrics`], built on the Prometheus project's `prometheus-client`),
//! the textfile ([`Exporter`]: rewritten atomically, only when a value changed, at most once a
//! second, never on a timer while idle) and the HTTP responder ([`serve_http`]). It decides
//! nothing and touches neither containerd nor the ledger: the daemon tells it what happened
//! (counters, connection) and hands it the engine's tally of the intents (gauges).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::engine::{IntentState, RestoreReason, Tally};

/// The textfile is rewritten at most this often (node-exporter reads it at each scrape, 15 s or
/// more apart; a burst of a K3s restart is one or two rewrites).
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// `Content-Type` of the OpenMetrics text that [`text::encode`] writes.
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format 0.0.4 that [`prometheus_text::encode`] writes.
pub(crate) const TEXT_CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// One label, as a family's label set.
type Label = [(&'static str, &'static str); 1];

/// Something changed since the metrics were last published: set by every update, cleared by
/// [`Exporter::publish`]. Shared with the ledger's writer thread.
#[derive(Debug, Default)]
struct Changed {
    flag: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Changed {
    fn mark(&self) {
        self.flag.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Resolves once something changed (at once if it already has).
    async fn wait(&self) {
        // notify_one keeps a permit when nobody waits: a change between the check and the
        // wait is not lost.
        while !self.flag.load(Ordering::Acquire) {
            self.wake.notified().await;
        }
    }
}

/// pinkeeper's metrics. Updates are atomic and cheap; every one marks the metrics changed.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    intents: Family<Label, Gauge>,
    pins_restored: Family<Label, Counter>,
    operator_pins: Counter,
    sweeps_seen: Family<Label, Counter>,
    images_at_risk: Gauge,
    pin_failures: Counter,
    cri_unpinned: Gauge,
    pinned_bytes: Gauge,
    imagefs: Family<[(&'static str, &'static str); 1], Gauge>,
    gc_threshold: Family<[(&'static str, &'static str); 1], Gauge>,
    containerd_connected: Gauge,
    reconnects: Counter,
    last_reconcile: Gauge<f64, AtomicU64>,
    ledger_write: Histogram,
    ledger_degraded: Gauge,
    ledger_pending: Gauge,
    ledger_write_errors: Counter,
    /// The writer's error count already added to `ledger_write_errors`.
    ledger_errors_seen: AtomicU64,
    subscribed_before: AtomicBool,
    changed: Arc<Changed>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric registered, at zero (the labelled ones with each label value, so a query
    /// finds a 0 rather than nothing).
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pinkeeper");
        let intents = Family::<Label, Gauge>::default();
        registry.register(
            "intents",
            "Pin intents in the ledger by state: held (kept pinned), swept (K3s's sweep removed the pins; restore or re-import due), released (operator's unpin or record deleted)",
            intents.clone(),
        );
        let pins_restored = Family::<Label, Counter>::default();
        registry.register(
            "pins_restored",
            "io.cri-containerd.pinned restored by pinkeeper after K3s's sweep, by reason: archive-gone (no file provides the image any more), not-repinned (K3s did not pin it again once the start-up settled), policy (a keep pattern of the config matches it: after a sweep, or when it appeared or lost its pin otherwise)",
            pins_restored.clone(),
        );
        let operator_pins = Counter::default();
        registry.register(
            "operator_pins",
            "Pins set for an operator's `pinkeeper pin`",
            operator_pins.clone(),
        );
        let sweeps_seen = Family::<Label, Counter>::default();
        registry.register(
            "sweeps_seen",
            "K3s start-up sweeps seen: live on the event stream, or after-reconnect (found by the listing after a reconnection)",
            sweeps_seen.clone(),
        );
        let images_at_risk = Gauge::default();
        registry.register(
            "images_at_risk",
            "Images with an intent held that are unpinned or gone right now: kubelet's image GC may delete them",
            images_at_risk.clone(),
        );
        let pin_failures = Counter::default();
        registry.register(
            "pin_failures",
            "Pins pinkeeper could not write (containerd refused, or was going away); each is retried at a verification or the next connection",
            pin_failures.clone(),
        );
        let cri_unpinned = Gauge::default();
        registry.register(
            "cri_unpinned_intents",
            "Images with an intent held that CRI (kubelet's view) reported unpinned at its last check, after each sweep's restores; 0 before the first check and while CRI cannot be read",
            cri_unpinned.clone(),
        );
        let pinned_bytes = Gauge::default();
        registry.register_with_unit(
            "pinned",
            "Bytes of containerd's content store the images pinkeeper holds reach, each blob counted once (after connecting, each sweep and each reconcile)",
            Unit::Bytes,
            pinned_bytes.clone(),
        );
        let imagefs = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register_with_unit(
            "imagefs",
            "The image filesystem kubelet's image GC watches: its size and the bytes used on it",
            Unit::Bytes,
            imagefs.clone(),
        );
        let gc_threshold = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register(
            "image_gc_threshold_percent",
            "Kubelet's image GC thresholds as pinkeeper found them (K3s's kubelet-arg, kubelet's config drop-ins, else 85 / 80)",
            gc_threshold.clone(),
        );
        let containerd_connected = Gauge::default();
        registry.register(
            "containerd_connected",
            "1 while pinkeeper is subscribed to containerd's events, else 0 (K3s restarting, or stopped)",
            containerd_connected.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "Subscriptions to containerd's events after the first (one per K3s restart, usually)",
            reconnects.clone(),
        );
        let last_reconcile = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "last_reconcile_timestamp",
            "When pinkeeper last listed every image and reconciled them against the ledger (after connecting, or an operator's reconcile), in seconds since the epoch; 0 before the first",
            Unit::Seconds,
            last_reconcile.clone(),
        );
        // A commit is one fsync: well under a millisecond on tmpfs, milliseconds on a disk.
        let ledger_write = Histogram::new(exponential_buckets(0.0001, 4.0, 9));
        registry.register_with_unit(
            "ledger_write",
            "Time of each ledger commit (one transaction and its fsync) on the writer thread",
            Unit::Seconds,
            ledger_write.clone(),
        );
        let ledger_degraded = Gauge::default();
        registry.register(
            "ledger_degraded",
            "1 while the ledger cannot be written (full disk, I/O error, damaged file moved aside and no new one yet): pinkeeper protects from memory and retries; else 0",
            ledger_degraded.clone(),
        );
        let ledger_pending = Gauge::default();
        registry.register(
            "ledger_pending_changes",
            "Changes held in memory until the ledger can be written again",
            ledger_pending.clone(),
        );
        let ledger_write_errors = Counter::default();
        registry.register(
            "ledger_write_errors",
            "Ledger commits (or openings of the ledger) that failed; each is retried",
            ledger_write_errors.clone(),
        );
        let build_info = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the label version is pinkeeper's",
            build_info.clone(),
        );
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        for state in [IntentState::Held, IntentState::Swept, IntentState::Released] {
            let _ = intents.get_or_create(&[("state", state.as_str())]);
        }
        for reason in [
            RestoreReason::ArchiveGone,
            RestoreReason::NotRepinned,
            RestoreReason::Policy,
        ] {
            let _ = pins_restored.get_or_create(&[("reason", reason.as_str())]);
        }
        for seen in ["live", "after-reconnect"] {
            let _ = sweeps_seen.get_or_create(&[("seen", seen)]);
        }
        // 0 until the first disk report (after connecting): exported from the start, so that a
        // query over them always finds them.
        for kind in ["size", "used"] {
            let _ = imagefs.get_or_create(&[("kind", kind)]);
        }
        for threshold in ["high", "low"] {
            let _ = gc_threshold.get_or_create(&[("threshold", threshold)]);
        }
        Metrics {
            registry,
            intents,
            pins_restored,
            operator_pins,
            sweeps_seen,
            images_at_risk,
            pin_failures,
            cri_unpinned,
            pinned_bytes,
            imagefs,
            gc_threshold,
            containerd_connected,
            reconnects,
            last_reconcile,
            ledger_write,
            ledger_degraded,
            ledger_pending,
            ledger_write_errors,
            ledger_errors_seen: AtomicU64::new(0),
            subscribed_before: AtomicBool::new(false),
            changed: Arc::new(Changed::default()),
        }
    }

    /// Marks the metrics changed: the gauges counted from the engine are counted again at the
    /// next publication. The daemon calls it after every batch it processed.
    pub(crate) fn touch(&self) {
        self.changed.mark();
    }

    /// A pin was set (`Input::Pinned` with `Ok`).
    pub(crate) fn pinned(&self, reason: RestoreReason) {
        match reason {
            RestoreReason::ArchiveGone | RestoreReason::NotRepinned | RestoreReason::Policy => {
                self.pins_restored
                    .get_or_create(&[("reason", reason.as_str())])
                    .inc();
            }
            RestoreReason::Operator => {
                self.operator_pins.inc();
            }
        }
        self.touch();
    }

    /// A sweep episode ended.
    pub(crate) fn sweep_seen(&self, live: bool) {
        let seen = if live { "live" } else { "after-reconnect" };
        self.sweeps_seen.get_or_create(&[("seen", seen)]).inc();
        self.touch();
    }

    /// Subscribed to containerd's events; every subscription after the first is a reconnect.
    pub(crate) fn subscribed(&self) {
        if self.subscribed_before.swap(true, Ordering::Relaxed) {
            self.reconnects.inc();
        }
        self.containerd_connected.set(1);
        self.touch();
    }

    /// The event stream is gone (or pinkeeper stops).
    pub(crate) fn disconnected(&self) {
        self.containerd_connected.set(0);
        self.touch();
    }

    /// CRI's view was read: this many held intents it reports unpinned (0 when it could not
    /// be read).
    pub(crate) fn cri_checked(&self, unpinned: usize) {
        self.cri_unpinned
            .set(i64::try_from(unpinned).unwrap_or(i64::MAX));
        self.touch();
    }

    /// Pins that could not be written.
    pub(crate) fn pins_failed(&self, count: usize) {
        self.pin_failures
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
        self.touch();
    }

    /// The disk the pins hold was worked out.
    pub(crate) fn disk_checked(&self, d: &crate::daemon::kubelet::DiskFacts) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.pinned_bytes.set(gauge(d.pinned));
        self.imagefs
            .get_or_create(&[("kind", "size")])
            .set(gauge(d.fs.size));
        self.imagefs
            .get_or_create(&[("kind", "used")])
            .set(gauge(d.fs.used));
        self.gc_threshold
            .get_or_create(&[("threshold", "high")])
            .set(i64::from(d.thresholds.high));
        self.gc_threshold
            .get_or_create(&[("threshold", "low")])
            .set(i64::from(d.thresholds.low));
        self.touch();
    }

    /// A listing of every image was reconciled just now.
    pub(crate) fn reconciled(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reconcile.set(now);
        self.touch();
    }

    /// What the ledger's writer thread calls after each commit (it knows nothing of
    /// Prometheus): observes the time and marks the metrics changed.
    pub(crate) fn ledger_observer(&self) -> Box<dyn Fn(Duration) + Send> {
        let histogram = self.ledger_write.clone();
        let changed = self.changed.clone();
        Box::new(move |took| {
            histogram.observe(took.as_secs_f64());
            changed.mark();
        })
    }

    /// How the ledger is doing (the writer's [`crate::ledger::Health`]).
    pub(crate) fn ledger(&self, health: &crate::ledger::Health) {
        self.ledger_degraded
            .set(i64::from(health.problem.is_some()));
        self.ledger_pending
            .set(i64::try_from(health.pending).unwrap_or(i64::MAX));
        let seen = self
            .ledger_errors_seen
            .swap(health.write_errors, Ordering::Relaxed);
        if health.write_errors > seen {
            self.ledger_write_errors.inc_by(health.write_errors - seen);
        }
    }

    /// Sets the gauges of the intents by state and of those at risk.
    pub(crate) fn count(&self, tally: Tally) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (state, n) in [
            (IntentState::Held, tally.held),
            (IntentState::Swept, tally.swept),
            (IntentState::Released, tally.released),
        ] {
            self.intents
                .get_or_create(&[("state", state.as_str())])
                .set(gauge(n));
        }
        self.images_at_risk.set(gauge(tally.at_risk));
    }

    /// OpenMetrics text (ends with `# EOF`), what Prometheus asks for when it scrapes.
    pub(crate) fn openmetrics(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format 0.0.4: what node-exporter's textfile collector parses
    /// (Go's `expfmt.TextParser`, which reads an OpenMetrics counter as an untyped metric).
    pub(crate) fn prometheus_text(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// How old an unchanged textfile may get before the watchdog's ping rewrites it.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(60);

/// Publishes the metrics: counts the gauges and rewrites the textfile, throttled.
#[derive(Debug)]
pub(crate) struct Exporter {
    metrics: Arc<Metrics>,
    textfile: Option<PathBuf>,
    /// Whether anything reads the metrics (a textfile or the HTTP endpoint).
    enabled: bool,
    /// When the textfile was last written.
    last_written: Option<tokio::time::Instant>,
    last_published: Option<tokio::time::Instant>,
    /// What the textfile holds now: an unchanged text is not written again.
    written: Option<String>,
    /// The last textfile error reported: said once, not every second.
    reported: Option<String>,
}

impl Exporter {
    /// An exporter of `metrics`; `textfile` if set, and `served` when the HTTP endpoint is up.
    pub(crate) fn new(metrics: Arc<Metrics>, textfile: Option<PathBuf>, served: bool) -> Exporter {
        Exporter {
            metrics,
            enabled: served || textfile.is_some(),
            textfile,
            last_published: None,
            last_written: None,
            written: None,
            reported: None,
        }
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Resolves when something changed and the last publication is at least
    /// [`MIN_INTERVAL`] old; never when nothing reads the metrics. No timer runs while idle.
    pub(crate) async fn due(&self) {
        if !self.enabled {
            return std::future::pending().await;
        }
        self.metrics.changed.wait().await;
        if let Some(last) = self.last_published {
            tokio::time::sleep_until(last + MIN_INTERVAL).await;
        }
    }

    /// Rewrites an unchanged textfile at most every [`HEARTBEAT`], so that its age tells a dead
    /// pinkeeper from an idle one (node-exporter's `node_textfile_mtime_seconds`). Called with
    /// systemd's watchdog ping, which wakes the loop anyway: no timer of its own.
    pub(crate) fn heartbeat(&mut self) {
        let (Some(path), Some(text)) = (&self.textfile, &self.written) else {
            return;
        };
        if self.last_written.is_some_and(|t| t.elapsed() < HEARTBEAT) {
            return;
        }
        if write_atomically(path, text.as_bytes()).is_ok() {
            self.last_written = Some(tokio::time::Instant::now());
        }
    }

    /// [`Exporter::due`], without waiting.
    pub(crate) fn is_due(&self) -> bool {
        self.enabled
            && self.metrics.changed.flag.load(Ordering::Acquire)
            && self
                .last_published
                .is_none_or(|last| last.elapsed() >= MIN_INTERVAL)
    }

    /// Counts the gauges with `tally` (called only when something reads them; O(intents),
    /// so once per publication, not per event) and rewrites the textfile if its text changed.
    /// A write that fails is logged (once per distinct error) and tried again at the next
    /// change.
    pub(crate) fn publish(&mut self, tally: impl FnOnce() -> Tally) {
        if !self.enabled {
            return;
        }
        self.metrics.changed.flag.store(false, Ordering::Release);
        self.last_published = Some(tokio::time::Instant::now());
        self.metrics.count(tally());
        let Some(path) = &self.textfile else {
            return;
        };
        let text = self.metrics.prometheus_text();
        if self.written.as_ref() == Some(&text) {
            return;
        }
        match write_atomically(path, text.as_bytes()) {
            Ok(()) => {
                debug!(file = %path.display(), "wrote the metrics textfile");
                self.last_written = Some(tokio::time::Instant::now());
                self.written = Some(text);
                self.reported = None;
            }
            Err(e) => {
                let e = e.to_string();
                if self.reported.as_ref() != Some(&e) {
                    warn!("{e}");
                    self.reported = Some(e);
                }
                // Tried again at the next change.
                self.written = None;
            }
        }
    }
}

/// A textfile that cannot be written, naming it and what to do.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the metrics textfile {path}: {source}; check that its directory exists and is writable (with ProtectSystem=strict, list it in ReadWritePaths=), or change --metrics-textfile")]
pub(crate) struct TextfileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// Replaces `path` with `contents` so that a reader sees the old file or the new one, never a
/// part: a temp file beside it (`.NAME.tmp`, not `*.prom`, so node-exporter skips it),
/// mode 0644 whatever the umask (node-exporter does not run as root), then a rename. No fsync:
/// after a power loss the next change rewrites it.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), TextfileError> {
    let err = |source| TextfileError {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(".tmp");
    let temp = path.with_file_name(temp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            // Not through a link someone else put there.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(contents)?;
        drop(file);
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(err)
}

/// Serves the metrics on `address` (see [`serve_http`]) in a task of its own. A listener
/// that cannot be set up is reported and pinkeeper runs on without it: keeping images pinned
/// matters more than telling about it.
pub(crate) async fn listen(
    address: std::net::SocketAddr,
    metrics: Arc<Metrics>,
) -> Option<tokio::task::JoinHandle<()>> {
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            tracing::info!("serving metrics on http://{address}/metrics");
            Some(tokio::spawn(serve_http(
                listener,
                metrics,
                HttpLimits::default(),
            )))
        }
        Err(e) => {
            warn!(
                "cannot serve metrics on {address}: {e}; pinkeeper runs on without it. Free the \
                 port or pass another --metrics-address; under systemd, the unit needs \
                 PrivateNetwork=no and AF_INET/AF_INET6 in RestrictAddressFamilies= (README, \
                 Metrics)"
            );
            None
        }
    }
}

/// Limits of the HTTP responder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpLimits {
    /// Longest request head (request line and headers) read.
    pub max_request: usize,
    /// A connection is closed if its request and the answer take longer.
    pub timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_request: 8 * 1024,
            timeout: Duration::from_secs(5),
            connections: 4,
        }
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped, one connection per request
/// (see [`respond`]), at most [`HttpLimits::connections`] at once, each within
/// [`HttpLimits::timeout`].
pub(crate) async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: HttpLimits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                debug!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(limits.timeout, respond(stream, &metrics, limits)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "metrics request: {e}"),
                Err(_) => debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

/// Answers one request on `stream` with hyper's HTTP/1.1 server (`Connection: close`):
/// OpenMetrics when the client accepts it (Prometheus does), else the text format 0.0.4; 404
/// for any other path, 405 for another method. hyper itself answers a malformed request (400)
/// and a head longer than [`HttpLimits::max_request`] (431); those count as answered.
pub(crate) async fn respond<S>(
    stream: S,
    metrics: &Metrics,
    limits: HttpLimits,
) -> hyper::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let service =
        hyper::service::service_fn(|request| std::future::ready(answer(&request, metrics)));
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .title_case_headers(true)
        .auto_date_header(false)
        .max_header_size(limits.max_request)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
    match served {
        Err(e) if e.is_parse() => {
            debug!("metrics request refused: {e}");
            Ok(())
        }
        other => other,
    }
}

/// The answer to `request` (building it fails only on a bad header value, and these are ours).
fn answer<B>(request: &Request<B>, metrics: &Metrics) -> hyper::http::Result<Response<String>> {
    let plain = Response::builder().header(CONTENT_TYPE, "text/plain; charset=utf-8");
    if request.uri().path() != "/metrics" {
        let body = "not found: pinkeeper serves /metrics\n";
        return plain.status(StatusCode::NOT_FOUND).body(body.into());
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let plain = plain.status(StatusCode::METHOD_NOT_ALLOWED);
        return plain.header(ALLOW, "GET, HEAD").body("use GET\n".into());
    }
    let openmetrics = request.headers().get_all(ACCEPT).iter().any(|value| {
        String::from_utf8_lossy(value.as_bytes()).contains("application/openmetrics-text")
    });
    let (content_type, body) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, metrics.openmetrics())
    } else {
        (TEXT_CONTENT_TYPE, metrics.prometheus_text())
    };
    Response::builder()
        .header(CONTENT_TYPE, content_type)
        .body(body)
}

#[cfg(test)]
mod tests;
