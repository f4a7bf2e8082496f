//! The CLI's side of the control API: connect to the socket with errors an operator can act
//! on, and one method per call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pb;

/// How long a call may take; a reconcile lists every image, so it gets longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the CLI could not get an answer. Exit code 1.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// No daemon listens.
    #[error(
        "pinkeeper is not running: nothing listens on {path} ({reason}); start it \
         (systemctl start pinkeeper) or pass the daemon's --control-socket"
    )]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The socket is root-only.
    #[error("permission denied on {path}: pinkeeper's control socket is root-only; run this as root (sudo pinkeeper ...)")]
    PermissionDenied {
        /// The socket.
        path: PathBuf,
    },
    /// The daemon dropped the connection without an answer.
    #[error(
        "the daemon on {path} closed the connection without an answer ({reason}): it serves \
         root only and refuses other users (its log says so), or it is stopping"
    )]
    Closed {
        /// The socket.
        path: PathBuf,
        /// ttrpc's error.
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Refused {
        /// ttrpc status code.
        code: ttrpc::Code,
        /// The daemon's message.
        message: String,
    },
    /// Anything else.
    #[error("control socket {path}: {reason}")]
    Other {
        /// The socket.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

/// A connection to the daemon.
pub(crate) struct Client {
    inner: pb::ControlClient,
    path: PathBuf,
}

impl Client {
    /// Connects to the control socket.
    pub(crate) fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: path.to_path_buf(),
            },
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            }
            _ => ClientError::Other {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        })?;
        let socket = ttrpc::asynchronous::transport::Socket::try_from(stream).map_err(|e| {
            ClientError::Other {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(Client {
            inner: pb::ControlClient::new(ttrpc::asynchronous::Client::new(socket)),
            path: path.to_path_buf(),
        })
    }

    fn error(&self, e: ttrpc::Error) -> ClientError {
        match e {
            ttrpc::Error::RpcStatus(status) => ClientError::Refused {
                code: status.code(),
                message: status.message,
            },
            ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed => ClientError::Closed {
                path: self.path.clone(),
                reason: format!("{e:?}"),
            },
            ttrpc::Error::Socket(ref s) | ttrpc::Error::Others(ref s)
                if s.contains("closed")
                    || s.contains("eof")
                    || s.contains("Receive packet")
                    || s.contains("reset")
                    // The daemon closed it while the request was still being written.
                    || s.contains("Broken pipe") =>
            {
                ClientError::Closed {
                    path: self.path.clone(),
                    reason: s.clone(),
                }
            }
            other => ClientError::Other {
                path: self.path.clone(),
                reason: format!("{other:?}"),
            },
        }
    }

    fn ctx(timeout: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_duration(timeout)
    }

    /// `Status`.
    pub(crate) async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.inner
            .status(Self::ctx(CALL_TIMEOUT), &pb::StatusRequest {})
            .await
            .map_err(|e| self.error(e))
    }

    /// `List`, every page of it: asks for [`super::LIST_PAGE`] intents at a time and follows
    /// `next_page_token` (a daemon from before paging answers everything at once).
    pub(crate) async fn list(
        &self,
        mut req: pb::ListRequest,
    ) -> Result<pb::ListResponse, ClientError> {
        req.page_size = super::LIST_PAGE;
        req.page_token.clear();
        let mut intents = Vec::new();
        loop {
            let page = self
                .inner
                .list(Self::ctx(CALL_TIMEOUT), &req)
                .await
                .map_err(|e| self.error(e))?;
            intents.extend(page.intents);
            if page.next_page_token.is_empty() {
                break;
            }
            if page.next_page_token <= req.page_token {
                return Err(ClientError::Other {
                    path: self.path.clone(),
                    reason: format!(
                        "the daemon's list pages do not advance (next page after {:?} again); \
                         restart it (systemctl restart pinkeeper) and report this",
                        page.next_page_token
                    ),
                });
            }
            req.page_token = page.next_page_token;
        }
        Ok(pb::ListResponse {
            intents,
            next_page_token: String::new(),
        })
    }

    /// `Pin`.
    pub(crate) async fn pin(&self, name: &str) -> Result<pb::PinResponse, ClientError> {
        let req = pb::PinRequest {
            name: name.to_string(),
        };
        self.inner
            .pin(Self::ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| self.error(e))
    }

    /// `Unpin`.
    pub(crate) async fn unpin(
        &self,
        name: &str,
        all_names: bool,
    ) -> Result<pb::UnpinResponse, ClientError> {
        let req = pb::UnpinRequest {
            name: name.to_string(),
            all_names,
        };
        self.inner
            .unpin(Self::ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| self.error(e))
    }

    /// `History`.
    pub(crate) async fn history(
        &self,
        req: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse, ClientError> {
        self.inner
            .history(Self::ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| self.error(e))
    }

    /// `Reconcile`.
    pub(crate) async fn reconcile(
        &self,
        dry_run: bool,
    ) -> Result<pb::ReconcileResponse, ClientError> {
        self.inner
            .reconcile(
                Self::ctx(RECONCILE_TIMEOUT),
                &pb::ReconcileRequest { dry_run },
            )
            .await
            .map_err(|e| self.error(e))
    }
}
