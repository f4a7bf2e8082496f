//! The operator API, `pinkeeper.v1` (proto/pinkeeper/v1/control.proto), over ttrpc on a
//! root-only unix socket.
//!
//! It owns the control socket (stale and live sockets, mode 0600, the peer's uid checked on
//! every connection) and turns each call into a [`Request`] for the daemon's loop, which
//! answers from the engine and the ledger. It decides nothing itself and never touches
//! containerd or the ledger. [`client`] is the CLI's side.

pub(crate) mod client;
mod list;

pub use list::{matches, ListPage, LIST_PAGE, LIST_PAGE_BYTES, LIST_PAGE_MAX};

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};
use ttrpc::asynchronous::{Server, TtrpcContext};

pub use pinkeeper_proto::pinkeeper::v1 as pb;

/// A control socket that cannot be served. Fatal at start: exit 1.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process answers on the socket.
    #[error(
        "another pinkeeper{peer} is already serving the control socket {path}; stop it first \
         (systemctl stop pinkeeper), or give this one another --control-socket"
    )]
    InUse {
        /// The socket.
        path: PathBuf,
        /// " (pid N)" when known.
        peer: String,
    },
    /// Something that is not a socket is in the way.
    #[error("{path} exists and is not a socket; remove it or pass another --control-socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Any other failure, with what to do.
    #[error("cannot serve the control socket {path}: {reason}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
}

/// Why a call was not carried out, as the CLI shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// ttrpc status code.
    pub code: ttrpc::Code,
    /// What went wrong and what to do.
    pub message: String,
}

impl Refusal {
    /// The image (or entry) does not exist.
    pub fn not_found(message: impl Into<String>) -> Refusal {
        Refusal {
            code: ttrpc::Code::NOT_FOUND,
            message: message.into(),
        }
    }
    /// containerd is away, or the daemon is stopping.
    pub fn unavailable(message: impl Into<String>) -> Refusal {
        Refusal {
            code: ttrpc::Code::UNAVAILABLE,
            message: message.into(),
        }
    }
    /// The request itself is wrong.
    pub fn invalid(message: impl Into<String>) -> Refusal {
        Refusal {
            code: ttrpc::Code::INVALID_ARGUMENT,
            message: message.into(),
        }
    }
    /// Something failed on the daemon's side.
    pub fn failed(message: impl Into<String>) -> Refusal {
        Refusal {
            code: ttrpc::Code::INTERNAL,
            message: message.into(),
        }
    }
}

/// One call for the daemon's loop.
#[derive(Debug)]
pub enum Call {
    /// `Status`.
    Status,
    /// `List`.
    List(pb::ListRequest),
    /// `Pin`.
    Pin(pb::PinRequest),
    /// `Unpin`.
    Unpin(pb::UnpinRequest),
    /// `History`.
    History(pb::HistoryRequest),
    /// `Reconcile`.
    Reconcile(pb::ReconcileRequest),
    /// SIGHUP (not on the socket): read the config again.
    Reload,
}

/// The daemon's answer to a [`Call`] of the same kind.
#[derive(Debug)]
pub enum Reply {
    /// To `Status`.
    Status(Box<pb::StatusResponse>),
    /// To `List`.
    List(pb::ListResponse),
    /// To `Pin`.
    Pin(pb::PinResponse),
    /// To `Unpin`.
    Unpin(pb::UnpinResponse),
    /// To `History`.
    History(pb::HistoryResponse),
    /// To `Reconcile`.
    Reconcile(pb::ReconcileResponse),
    /// To a reload: what changed, in words.
    Reload(String),
}

/// A call and where its answer goes.
#[derive(Debug)]
pub struct Request {
    /// What is asked.
    pub call: Call,
    /// The answer.
    pub reply: oneshot::Sender<Result<Reply, Refusal>>,
}

/// Requests waiting for the daemon's loop: a few operators at once at most.
const QUEUE: usize = 16;

/// Connections served at once. The CLI opens one per command and an operator runs a few at a
/// time; a monitoring script adds one. A connection over the limit is accepted and closed at
/// once (logged at most once per [`LOG_INTERVAL`], with a count), so a flood of connections
/// costs neither file descriptors nor memory (the shape of mini-redis's `MAX_CONNECTIONS` and
/// its semaphore). 64 leaves the daemon's own fds (containerd, ledger, inotify) far below any
/// usual fd limit.
pub const MAX_CONNECTIONS: usize = 64;

/// The largest request the daemon reads, in bytes (the length in a ttrpc frame header). The
/// API's requests are a name or a pattern, well under 1 KiB. ttrpc's own limit is 4 MiB and it
/// allocates the announced length before reading it: 200 connections announcing 4 MiB took
/// the daemon to 838 MB. A frame announcing more is refused when its header is read, before
/// ttrpc sees it, and the connection is closed.
pub const MAX_FRAME: u32 = 64 << 10;

/// The recurring problems of the socket (accept errors, connections over the limit, frames
/// over [`MAX_FRAME`], refused peers) are logged at most once per interval each, with a count.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// After an accept error (EMFILE, ENFILE, ENOBUFS...) the loop waits, doubling from the first
/// delay up to the cap; a successful accept resets it. Capped low so that `status` is answered
/// within a second of fds being free again.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The served control socket. Dropping it (or [`ControlServer::stop`]) stops serving; `stop`
/// also removes the socket file if it is still this one.
pub struct ControlServer {
    server: Server,
    accept: tokio::task::JoinHandle<()>,
    path: PathBuf,
    inode: u64,
}

/// Binds the control socket: mode 0600 from the start, a stale socket left by a crash
/// replaced, a live one (another pinkeeper) refused.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |reason: String| ControlError::Io {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            io(format!(
                "cannot create its directory {}: {e}; create it (as root) or pass another \
                 --control-socket",
                parent.display()
            ))
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(stream) => {
                let peer = peer_pid(&stream)
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                    peer,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| io(format!("cannot remove the stale socket: {e}")))?;
                info!(socket = %path.display(), "replaced a stale control socket (left by a crash)");
            }
            Err(e) => return Err(io(format!("cannot check the existing socket: {e}"))),
        },
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e.to_string())),
    }
    // The socket file is created by bind() with the process umask: no window in which it is
    // reachable by others. umask is process-wide, so this runs before any thread is started.
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(previous);
    let listener = bound.map_err(|e| {
        io(format!(
            "{e}; pinkeeper must run as root (or pass a --control-socket it can create)"
        ))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io(format!("cannot set mode 0600: {e}")))?;
    Ok(listener)
}

/// Serves the API on a socket from [`bind`]; calls go to `requests`. Must run inside the
/// tokio runtime.
///
/// pinkeeper owns the accept loop (ttrpc's logs every accept error and retries at once: 11,671
/// lines a second at the fd limit) and hands ttrpc only connections that are under
/// [`MAX_CONNECTIONS`], come from root, and are read through [`Bounded`].
pub async fn serve(
    listener: UnixListener,
    path: &Path,
    requests: mpsc::Sender<Request>,
) -> Result<ControlServer, ControlError> {
    let io = |reason: String| ControlError::Io {
        path: path.to_path_buf(),
        reason,
    };
    let inode = std::fs::metadata(path)
        .map_err(|e| io(e.to_string()))?
        .ino();
    listener
        .set_nonblocking(true)
        .map_err(|e| io(e.to_string()))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| io(e.to_string()))?;
    let (accepted, mut incoming) = mpsc::channel(1);
    let accept = tokio::spawn(accept_loop(listener, accepted));
    let incoming =
        ttrpc::asynchronous::transport::Listener::new(futures::stream::poll_fn(move |cx| {
            incoming.poll_recv(cx)
        }));
    let service: Arc<dyn pb::Control + Send + Sync> = Arc::new(Service { requests });
    let mut server = Server::new()
        .add_listener(incoming)
        .register_service(pb::create_control(service));
    if let Err(e) = server.start().await {
        accept.abort();
        return Err(io(format!("{e:?}")));
    }
    info!(socket = %path.display(), "serving the control API");
    Ok(ControlServer {
        server,
        accept,
        path: path.to_path_buf(),
        inode,
    })
}

impl ControlServer {
    /// Stops serving and removes the socket file, unless another process replaced it.
    pub async fn stop(mut self) {
        // ttrpc's accept loop first: it panics in shutdown() when its listener (our channel)
        // has already ended. Then ours, which ends anyway once ttrpc drops the channel.
        self.server.shutdown().await.ok();
        self.accept.abort();
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            std::fs::remove_file(&self.path).ok();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The queue's size, for the daemon to create the channel.
pub fn channel() -> (mpsc::Sender<Request>, mpsc::Receiver<Request>) {
    mpsc::channel(QUEUE)
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit, and logs it. The
/// daemon calls it once at start. Many systems start services with a soft limit of 1024 and a
/// far higher hard one; pinkeeper uses no `select()`, so the hard limit is safe. Under the
/// packaged unit, `LimitNOFILE=` sets both to the same value, so there is nothing to raise. A
/// failure is logged and harmless (the control socket's accept loop backs off at the limit).
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    // `None` is unlimited (RLIM_INFINITY).
    let mut limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (limit.current, limit.maximum);
    if soft.unwrap_or(u64::MAX) >= hard.unwrap_or(u64::MAX) {
        return;
    }
    let (soft, hard) = (soft.unwrap_or(u64::MAX), hard.unwrap_or(u64::MAX));
    limit.current = limit.maximum;
    // Raising the soft limit up to the hard one needs no privilege.
    if let Err(e) = setrlimit(Resource::Nofile, limit) {
        warn!(
            soft,
            hard,
            "cannot raise the open-file limit to the hard limit: {}; set LimitNOFILE= in the unit",
            std::io::Error::from(e)
        );
        return;
    }
    info!(
        from = soft,
        to = hard,
        "raised the open-file limit (soft) to the hard limit"
    );
}

/// Logs a recurring event at most once per [`LOG_INTERVAL`], with how many were not logged.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(n)` when this occurrence is to be logged, `n` the ones not logged since the last.
    fn tick(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Throttles shared by the accept loop and the connections.
#[derive(Debug, Default)]
struct Throttles {
    frames: Mutex<Throttle>,
}

/// Accepts connections until `accepted` is closed (the server stopped): backs off on errors,
/// closes connections over [`MAX_CONNECTIONS`] and those of other users, hands the rest to ttrpc.
async fn accept_loop(
    listener: tokio::net::UnixListener,
    accepted: mpsc::Sender<std::io::Result<Bounded>>,
) {
    let own_uid = rustix::process::geteuid().as_raw();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let throttles = Arc::new(Throttles::default());
    let (mut errors, mut over, mut refused) = (
        Throttle::default(),
        Throttle::default(),
        Throttle::default(),
    );
    let mut failing = 0u64;
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let next = tokio::select! {
            next = listener.accept() => next,
            _ = accepted.closed() => return,
        };
        let stream = match next {
            Ok((stream, _)) => stream,
            Err(e) => {
                failing += 1;
                if let Some(more) = errors.tick(Instant::now()) {
                    warn!(
                        retry_ms = backoff.as_millis() as u64,
                        not_logged = more,
                        "cannot accept a control connection: {e}; retrying with backoff, logged \
                         at most once per {}s (raise LimitNOFILE= if it is the fd limit)",
                        LOG_INTERVAL.as_secs()
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = accepted.closed() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if failing > 0 {
            info!(
                errors = failing,
                "accepting control connections again after accept errors"
            );
            failing = 0;
            errors = Throttle::default();
        }
        backoff = ACCEPT_BACKOFF_FIRST;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(more) = over.tick(Instant::now()) {
                warn!(
                    limit = MAX_CONNECTIONS,
                    not_logged = more,
                    "closed a control connection: {MAX_CONNECTIONS} are open already (the \
                     connection limit); logged at most once per {}s",
                    LOG_INTERVAL.as_secs()
                );
            }
            drop(stream);
            continue;
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {}
            Ok(cred) => {
                if let Some(more) = refused.tick(Instant::now()) {
                    warn!(
                        uid = cred.uid(),
                        pid = cred.pid().unwrap_or(0),
                        not_logged = more,
                        "refused a control connection: only root may use pinkeeper's API"
                    );
                }
                continue;
            }
            Err(e) => {
                if let Some(more) = refused.tick(Instant::now()) {
                    warn!(
                        not_logged = more,
                        "refused a control connection: cannot read its credentials: {e}"
                    );
                }
                continue;
            }
        }
        let bounded = Bounded {
            inner: stream,
            frame: FrameCheck::default(),
            throttles: throttles.clone(),
            _permit: permit,
        };
        if accepted.send(Ok(bounded)).await.is_err() {
            return;
        }
    }
}

/// Follows the ttrpc frames read from a connection (a 10-byte header whose first 4 bytes are
/// the payload's length, big-endian, then the payload) and finds a header announcing more than
/// [`MAX_FRAME`] as soon as its last byte is read.
#[derive(Debug, Default)]
struct FrameCheck {
    header: [u8; ttrpc::proto::MESSAGE_HEADER_LENGTH],
    have: usize,
    body_left: u64,
    refused: Option<u32>,
}

impl FrameCheck {
    /// Takes the bytes just read; `Err(length)` when a header announces more than the limit.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), u32> {
        if let Some(len) = self.refused {
            return Err(len);
        }
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                bytes = &bytes[n..];
                self.body_left -= n as u64;
                continue;
            }
            let n = (self.header.len() - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.header.len() {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.header[0],
                    self.header[1],
                    self.header[2],
                    self.header[3],
                ]);
                if len > MAX_FRAME {
                    self.refused = Some(len);
                    return Err(len);
                }
                self.body_left = u64::from(len);
            }
        }
        Ok(())
    }
}

/// An accepted connection as ttrpc reads it: frames over [`MAX_FRAME`] end it with an error
/// before ttrpc allocates them, and it holds its place under [`MAX_CONNECTIONS`] until ttrpc
/// drops it.
struct Bounded {
    inner: tokio::net::UnixStream,
    frame: FrameCheck,
    throttles: Arc<Throttles>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Bounded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(len) = this.frame.refused {
            return Poll::Ready(Err(frame_too_large(len)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        match this.frame.feed(&buf.filled()[before..]) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(len) => {
                let logged = this
                    .throttles
                    .frames
                    .lock()
                    .map(|mut t| t.tick(Instant::now()))
                    .unwrap_or(None);
                if let Some(more) = logged {
                    warn!(
                        length = len,
                        limit = MAX_FRAME,
                        not_logged = more,
                        "closed a control connection: its frame announces {len} bytes, over the \
                         limit of {MAX_FRAME} (the API's requests are small); logged at most \
                         once per {}s",
                        LOG_INTERVAL.as_secs()
                    );
                }
                Poll::Ready(Err(frame_too_large(len)))
            }
        }
    }
}

fn frame_too_large(len: u32) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("control frame of {len} bytes, over the limit of {MAX_FRAME}"),
    )
}

impl AsyncWrite for Bounded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The pid of the process at the other end of `stream` (`SO_PEERCRED`; 0 when it is in a pid
/// namespace this one cannot see). Through nix, not rustix: rustix 1.1's `UCred` holds the pid
/// as a non-zero type, which a pid of 0 would break.
fn peer_pid(stream: &UnixStream) -> std::io::Result<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    Ok(getsockopt(stream, PeerCredentials)?.pid())
}

/// Forwards each call to the daemon's loop and waits for its answer.
struct Service {
    requests: mpsc::Sender<Request>,
}

impl Service {
    async fn ask(&self, call: Call) -> ttrpc::Result<Reply> {
        let (reply, answer) = oneshot::channel();
        let stopping = || {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::UNAVAILABLE,
                "pinkeeper is stopping",
            ))
        };
        self.requests
            .send(Request { call, reply })
            .await
            .map_err(|_| stopping())?;
        match answer.await.map_err(|_| stopping())? {
            Ok(reply) => Ok(reply),
            Err(refusal) => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                refusal.code,
                refusal.message,
            ))),
        }
    }
}

fn mismatch() -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::INTERNAL,
        "the daemon answered another call",
    ))
}

#[async_trait::async_trait]
impl pb::Control for Service {
    async fn status(
        &self,
        _: &TtrpcContext,
        _: pb::StatusRequest,
    ) -> ttrpc::Result<pb::StatusResponse> {
        match self.ask(Call::Status).await? {
            Reply::Status(r) => Ok(*r),
            _ => Err(mismatch()),
        }
    }

    async fn list(
        &self,
        _: &TtrpcContext,
        req: pb::ListRequest,
    ) -> ttrpc::Result<pb::ListResponse> {
        match self.ask(Call::List(req)).await? {
            Reply::List(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn pin(&self, _: &TtrpcContext, req: pb::PinRequest) -> ttrpc::Result<pb::PinResponse> {
        match self.ask(Call::Pin(req)).await? {
            Reply::Pin(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn unpin(
        &self,
        _: &TtrpcContext,
        req: pb::UnpinRequest,
    ) -> ttrpc::Result<pb::UnpinResponse> {
        match self.ask(Call::Unpin(req)).await? {
            Reply::Unpin(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn history(
        &self,
        _: &TtrpcContext,
        req: pb::HistoryRequest,
    ) -> ttrpc::Result<pb::HistoryResponse> {
        match self.ask(Call::History(req)).await? {
            Reply::History(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn reconcile(
        &self,
        _: &TtrpcContext,
        req: pb::ReconcileRequest,
    ) -> ttrpc::Result<pb::ReconcileResponse> {
        match self.ask(Call::Reconcile(req)).await? {
            Reply::Reconcile(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }
}

#[cfg(test)]
mod tests;
