//! The operator API, `pinkeeper.v1` (proto/pinkeeper/v1/control.proto), over ttrpc on a
//! root-only unix socket.
//!
//! It owns the control socket (stale and live sockets, mode 0600, the peer's uid checked on
//! every connection) and turns each call into a [`Request`] for the daemon's loop, which
//! answers from the engine and the ledger. It decides nothing itself and never touches
//! containerd or the ledger. [`client`] is the CLI's side.

pub mod cli;
pub mod client;

use std::os::fd::RawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use ttrpc::asynchronous::{Server, TtrpcContext};
use ttrpc::security_extension::{AcceptHook, HookError, HookOutput};

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
}

/// The daemon's answer to a [`Call`] of the same kind.
#[derive(Debug)]
pub enum Reply {
    /// To `Status`.
    Status(pb::StatusResponse),
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

/// The served control socket. Dropping it (or [`ControlServer::stop`]) stops serving; `stop`
/// also removes the socket file if it is still this one.
pub struct ControlServer {
    server: Server,
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
                let peer = peer_of(&stream)
                    .map(|(_, pid)| format!(" (pid {pid})"))
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
    // SAFETY: umask only swaps the process's file mode creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
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
    let listener = ttrpc::asynchronous::transport::Listener::try_from(listener)
        .map_err(|e| io(e.to_string()))?;
    let service: Arc<dyn pb::Control + Send + Sync> = Arc::new(Service { requests });
    let mut server = Server::new()
        .add_listener(listener)
        .set_accept_hook(RootOnly {
            // SAFETY: geteuid cannot fail.
            own_uid: unsafe { libc::geteuid() },
        })
        .register_service(pb::create_control(service));
    server.start().await.map_err(|e| io(format!("{e:?}")))?;
    info!(socket = %path.display(), "serving the control API");
    Ok(ControlServer {
        server,
        path: path.to_path_buf(),
        inode,
    })
}

impl ControlServer {
    /// Stops serving and removes the socket file, unless another process replaced it.
    pub async fn stop(mut self) {
        self.server.shutdown().await.ok();
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            std::fs::remove_file(&self.path).ok();
        }
    }
}

/// The queue's size, for the daemon to create the channel.
pub fn channel() -> (mpsc::Sender<Request>, mpsc::Receiver<Request>) {
    mpsc::channel(QUEUE)
}

/// Refuses every peer but root (and the daemon's own user, for a daemon run unprivileged in a
/// test): the socket's mode already keeps others out; this holds if the mode is loosened.
#[derive(Debug)]
struct RootOnly {
    own_uid: u32,
}

impl AcceptHook for RootOnly {
    fn on_accept(&self, fd: RawFd) -> Result<HookOutput, HookError> {
        match peer_uid(fd) {
            Ok((uid, _)) if uid == 0 || uid == self.own_uid => Ok(HookOutput {
                data: Default::default(),
                payload_transform: None,
            }),
            Ok((uid, pid)) => {
                warn!(
                    uid,
                    pid, "refused a control connection: only root may use pinkeeper's API"
                );
                Err(HookError::Rejected(format!("uid {uid} is not root")))
            }
            Err(e) => {
                warn!("refused a control connection: cannot read its credentials: {e}");
                Err(HookError::Io(e))
            }
        }
    }
}

/// The peer's uid and pid (`SO_PEERCRED`).
fn peer_uid(fd: RawFd) -> std::io::Result<(u32, i32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; `fd` is a socket the
    // server owns for the duration of this call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

fn peer_of(stream: &UnixStream) -> std::io::Result<(u32, i32)> {
    use std::os::fd::AsRawFd;
    peer_uid(stream.as_raw_fd())
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
            Reply::Status(r) => Ok(r),
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

/// Whether `name` matches an operator's pattern: shell-style `*` and `?` when it has any,
/// else a substring.
pub fn matches(pattern: &str, name: &str) -> bool {
    if pattern.is_empty() {
        return true;
    }
    if !pattern.contains(['*', '?']) {
        return name.contains(pattern);
    }
    glob(pattern.as_bytes(), name.as_bytes())
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point: linear in practice.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("", "docker.io/library/a:1"));
        assert!(matches("library/a", "docker.io/library/a:1"));
        assert!(!matches("library/b", "docker.io/library/a:1"));
        assert!(matches("*/a:*", "docker.io/library/a:1"));
        assert!(matches("docker.io/*", "docker.io/library/a:1"));
        assert!(!matches("docker.io/*:2", "docker.io/library/a:1"));
        assert!(matches("*a:?", "docker.io/library/a:1"));
        assert!(!matches("a:?", "docker.io/library/a:1"));
        assert!(matches("**", ""));
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/pk.sock");
        let first = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Live: refused, and the socket is left alone.
        match bind(&path) {
            Err(ControlError::InUse { peer, .. }) => assert!(peer.contains("pid")),
            other => panic!("expected InUse, got {other:?}"),
        }
        // Stale: the listener is gone, the file stays (as after kill -9).
        drop(first);
        assert!(path.exists());
        bind(&path).unwrap();
        // Not a socket.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(ControlError::NotASocket { .. })));
    }
}
