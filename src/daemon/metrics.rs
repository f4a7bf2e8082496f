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
            "io.cri-containerd.pinned restored by pinkeeper after K3s's sweep, by reason: archive-gone (no file provides the image any more), not-repinned (K3s did not pin it again once the start-up settled)",
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
        for reason in [RestoreReason::ArchiveGone, RestoreReason::NotRepinned] {
            let _ = pins_restored.get_or_create(&[("reason", reason.as_str())]);
        }
        for seen in ["live", "after-reconnect"] {
            let _ = sweeps_seen.get_or_create(&[("seen", seen)]);
        }
        Metrics {
            registry,
            intents,
            pins_restored,
            operator_pins,
            sweeps_seen,
            images_at_risk,
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
            RestoreReason::ArchiveGone | RestoreReason::NotRepinned => {
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

/// Publishes the metrics: counts the gauges and rewrites the textfile, throttled.
#[derive(Debug)]
pub(crate) struct Exporter {
    metrics: Arc<Metrics>,
    textfile: Option<PathBuf>,
    /// Whether anything reads the metrics (a textfile or the HTTP endpoint).
    enabled: bool,
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
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn ask(request: &[u8], metrics: &Metrics) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let limits = HttpLimits {
            max_request: 256,
            ..HttpLimits::default()
        };
        let serving = respond(server, metrics, limits);
        let asking = async {
            client.write_all(request).await.unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let (served, answer) = tokio::join!(serving, asking);
        served.unwrap();
        answer
    }

    fn split(answer: &str) -> (&str, &str) {
        answer.split_once("\r\n\r\n").unwrap()
    }

    #[tokio::test]
    async fn http_answers_metrics_in_both_formats_and_404_otherwise() {
        let metrics = Metrics::new();
        metrics.pinned(RestoreReason::ArchiveGone);
        let answer = ask(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
            &metrics,
        )
        .await;
        let (head, body) = split(&answer);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(OPENMETRICS_CONTENT_TYPE), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(
            body.contains("pinkeeper_pins_restored_total{reason=\"archive-gone\"} 1"),
            "{body}"
        );

        let answer = ask(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &metrics).await;
        let (head, body) = split(&answer);
        assert!(head.contains(TEXT_CONTENT_TYPE), "{head}");
        assert!(!body.contains("# EOF"), "{body}");
        assert!(
            body.contains("# TYPE pinkeeper_pins_restored_total counter"),
            "{body}"
        );

        let answer = ask(b"HEAD /metrics HTTP/1.1\r\n\r\n", &metrics).await;
        let (head, body) = split(&answer);
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && body.is_empty(),
            "{answer}"
        );

        for (request, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
            (
                b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                "405",
            ),
            (b"GET /metrics\r\n\r\n", "400"),
            (b"hello\r\n\r\n", "400"),
        ] {
            let answer = ask(request, &metrics).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{}: {answer}",
                String::from_utf8_lossy(request)
            );
        }
        // A head that never ends within the limit is refused, not read on.
        let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', 1000));
        let answer = ask(&long, &metrics).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    }

    #[tokio::test]
    async fn a_slow_client_is_dropped_and_others_are_served() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limits = HttpLimits {
            timeout: Duration::from_millis(200),
            connections: 2,
            ..HttpLimits::default()
        };
        let server = tokio::spawn(serve_http(listener, Arc::new(Metrics::new()), limits));
        // Two clients that send half a request and stall take every slot...
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
            slow.push(s);
        }
        // ... until the timeout closes them; then a real request is answered.
        let started = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
            .await
            .expect("answered once the slow clients timed out")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        for mut s in slow {
            let mut rest = Vec::new();
            // Closed by the server: end of stream, nothing answered.
            let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
                .await
                .unwrap()
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
        server.abort();
    }

    #[test]
    fn the_textfile_is_replaced_whole_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pinkeeper.prom");
        write_atomically(&path, b"a 1\n").unwrap();
        let first = std::fs::metadata(&path).unwrap();
        assert_eq!(first.mode() & 0o777, 0o644);
        // A reader that opened the old file keeps reading it whole.
        let mut reader = std::fs::File::open(&path).unwrap();
        write_atomically(&path, b"a 2\nb 3\n").unwrap();
        let mut old = String::new();
        std::io::Read::read_to_string(&mut reader, &mut old).unwrap();
        assert_eq!(old, "a 1\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\nb 3\n");
        let second = std::fs::metadata(&path).unwrap();
        assert_ne!(first.ino(), second.ino(), "replaced by a rename");
        assert_eq!(second.mode() & 0o777, 0o644);
        // Nothing left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pinkeeper.prom")]);
        // A directory that does not exist is named in the error.
        let missing = dir.path().join("nope/pinkeeper.prom");
        let err = write_atomically(&missing, b"x").unwrap_err().to_string();
        assert!(
            err.contains("nope/pinkeeper.prom") && err.contains("--metrics-textfile"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_exporter_writes_on_change_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pinkeeper.prom");
        let metrics = Arc::new(Metrics::new());
        let mut exporter = Exporter::new(metrics.clone(), Some(path.clone()), false);
        exporter.publish(Tally::default);
        let published = tokio::time::Instant::now();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("pinkeeper_containerd_connected 0"), "{text}");
        let ino = std::fs::metadata(&path).unwrap().ino();
        // A change right after: due one second after the last publication.
        metrics.subscribed();
        assert!(!exporter.is_due());
        exporter.due().await;
        assert!(tokio::time::Instant::now() - published >= MIN_INTERVAL);
        assert!(exporter.is_due());
        exporter.publish(Tally::default);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("pinkeeper_containerd_connected 1"));
        let ino2 = std::fs::metadata(&path).unwrap().ino();
        assert_ne!(ino, ino2);
        // Nothing changed since: never due, no timer.
        assert!(!exporter.is_due());
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), exporter.due())
                .await
                .is_err()
        );
        // A change long after the last publication is due at once.
        metrics.touch();
        let touched = tokio::time::Instant::now();
        exporter.due().await;
        assert_eq!(tokio::time::Instant::now(), touched);
        // A touch that changed no value does not rewrite the file.
        exporter.publish(Tally::default);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino2);
        // Disabled: never due.
        let off = Exporter::new(Arc::new(Metrics::new()), None, false);
        off.metrics().touch();
        assert!(!off.is_due());
        assert!(tokio::time::timeout(Duration::from_secs(3600), off.due())
            .await
            .is_err());
    }

    #[test]
    fn the_tally_counts_what_the_views_say() {
        use crate::engine::{
            Config, Engine, EventKind, ImageEvent, Input, Intent, IntentState, Labels, Origin,
            CRI_PIN, K3S_PIN, PINNED,
        };
        let intent = |name: &str, state, pins: &[&str]| Intent {
            name: name.into(),
            digest: Some(format!("sha256:{name}")),
            source: None,
            labels: pins
                .iter()
                .map(|k| (k.to_string(), PINNED.to_string()))
                .collect(),
            state,
            origin: Origin::SeenPinned,
            since: 1,
            restores: 0,
            last_restored: None,
            released_because: None,
            k3s_pinned: false,
        };
        let mut engine = Engine::new(
            Config::default(),
            [
                intent("held-pinned", IntentState::Held, &[CRI_PIN, K3S_PIN]),
                intent("held-unpinned", IntentState::Held, &[K3S_PIN]),
                intent("swept", IntentState::Swept, &[]),
                intent("released", IntentState::Released, &[]),
                intent("deleted", IntentState::Held, &[CRI_PIN]),
            ],
        );
        engine.handle(
            5,
            Input::Event(ImageEvent {
                kind: EventKind::Delete,
                name: "deleted".into(),
                labels: Labels::new(),
            }),
        );
        let views = engine.views();
        let state = |s| views.iter().filter(|v| v.intent.state == s).count();
        let expected = Tally {
            held: state(IntentState::Held),
            swept: state(IntentState::Swept),
            released: state(IntentState::Released),
            at_risk: views.iter().filter(|v| v.at_risk()).count(),
        };
        assert_eq!(engine.tally(), expected);
        // held-unpinned, swept and deleted (still in alias churn's window).
        assert_eq!(expected.at_risk, 3, "{views:#?}");
        let metrics = Metrics::new();
        metrics.count(expected);
        let text = metrics.openmetrics();
        assert!(text.contains("pinkeeper_images_at_risk 3\n"), "{text}");
    }

    #[test]
    fn every_metric_is_there_from_the_start() {
        let metrics = Metrics::new();
        metrics.ledger_observer()(Duration::from_millis(3));
        let text = metrics.openmetrics();
        for line in [
            "pinkeeper_intents{state=\"held\"} 0",
            "pinkeeper_intents{state=\"swept\"} 0",
            "pinkeeper_intents{state=\"released\"} 0",
            "pinkeeper_pins_restored_total{reason=\"archive-gone\"} 0",
            "pinkeeper_pins_restored_total{reason=\"not-repinned\"} 0",
            "pinkeeper_operator_pins_total 0",
            "pinkeeper_sweeps_seen_total{seen=\"live\"} 0",
            "pinkeeper_sweeps_seen_total{seen=\"after-reconnect\"} 0",
            "pinkeeper_images_at_risk 0",
            "pinkeeper_containerd_connected 0",
            "pinkeeper_reconnects_total 0",
            "pinkeeper_last_reconcile_timestamp_seconds 0",
            "pinkeeper_ledger_write_seconds_count 1",
            &format!(
                "pinkeeper_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
