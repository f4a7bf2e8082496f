//! The checks of what pinkeeper depends on: its own control socket, containerd, the images
//! directory.

use super::*;

pub(super) fn check_control(
    settings: &DoctorSettings,
    daemon: &Result<DaemonView, String>,
) -> Check {
    const NAME: &str = "control-socket";
    let socket = settings.control_socket.display();
    match daemon {
        Ok(view) if view.connected => Check::new(
            NAME,
            Status::Ok,
            format!("pinkeeper answers on {socket} and is subscribed to containerd's events"),
        ),
        Ok(_) => Check::new(
            NAME,
            Status::Warn,
            format!(
                "pinkeeper answers on {socket} but is not connected to containerd: it does not \
                 see K3s's sweep now (normal for a few seconds while K3s restarts)"
            ),
        )
        .fix(format!(
            "if this lasts, check that containerd is up ({}) and pinkeeper's log \
             (`journalctl -u pinkeeper`)",
            match settings.program {
                Program::K3s => "`systemctl status k3s` or `k3s-agent`",
                Program::Rke2 => "`systemctl status rke2-server` or `rke2-agent`",
            }
        )),
        Err(reason) => {
            let file = match std::fs::symlink_metadata(&settings.control_socket) {
                Ok(meta) => {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        "the socket exists".to_string()
                    } else {
                        "the path exists but is not a socket".to_string()
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    "there is no socket there: pinkeeper is not running, or runs with another \
                     --control-socket"
                        .to_string()
                }
                Err(e) => format!("the socket cannot be examined: {e}"),
            };
            Check::new(
                NAME,
                Status::Warn,
                format!(
                    "pinkeeper did not answer on {socket} ({reason}); {file}. The checks below \
                     were made without it."
                ),
            )
            .fix(format!(
                "check `systemctl status pinkeeper` (start it with `systemctl start pinkeeper`) \
                 and pass its socket with --control-socket if it is not {socket}"
            ))
        }
    }
}

/// What the containerd probe found.
pub(super) enum Probe {
    /// Connected; Version answered.
    Reached { client: Containerd, version: String },
    /// Not reachable: status (fail, or warn for a permission problem), what happened, the fix.
    Unreachable {
        status: Status,
        detail: String,
        fix: String,
    },
}

pub(super) async fn probe_containerd(settings: &DoctorSettings) -> Probe {
    let socket = &settings.containerd_socket;
    let shown = socket.display();
    let (name, units) = match settings.program {
        Program::K3s => ("K3s", "`systemctl status k3s` or `k3s-agent`"),
        Program::Rke2 => ("RKE2", "`systemctl status rke2-server` or `rke2-agent`"),
    };
    let down_fix = format!(
        "start {name} ({units}: containerd runs inside it and restarts with it), or pass the \
         socket it uses with --containerd-socket ({name}: {K3S_SOCKET})"
    );
    // A plain connect first: its error kind says exactly what is wrong, where the gRPC
    // stack's error is a string.
    if let Err(e) = std::os::unix::net::UnixStream::connect(socket) {
        let (status, what, fix) = match e.kind() {
            ErrorKind::NotFound => (Status::Fail, "does not exist".to_string(), down_fix.clone()),
            ErrorKind::ConnectionRefused => (
                Status::Fail,
                "refuses connections: containerd is down or restarting".to_string(),
                down_fix.clone(),
            ),
            ErrorKind::PermissionDenied => (
                Status::Warn,
                "cannot be opened by this user (permission denied)".to_string(),
                "run `pinkeeper doctor` as root".to_string(),
            ),
            _ => (
                Status::Fail,
                format!("cannot be connected to: {e}"),
                down_fix.clone(),
            ),
        };
        return Probe::Unreachable {
            status,
            detail: format!("containerd's socket {shown} {what}"),
            fix,
        };
    }
    let unreachable = |detail: String| Probe::Unreachable {
        status: Status::Fail,
        detail,
        fix: down_fix.clone(),
    };
    let client = match tokio::time::timeout(
        PROBE_TIMEOUT,
        Containerd::connect(socket, &settings.namespace),
    )
    .await
    {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return unreachable(e.to_string()),
        Err(_) => {
            return unreachable(format!(
                "containerd at {shown} did not accept a connection within {} s",
                PROBE_TIMEOUT.as_secs()
            ))
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, client.version()).await {
        Ok(Ok(version)) => Probe::Reached { client, version },
        Ok(Err(e)) => unreachable(e.to_string()),
        Err(_) => unreachable(format!(
            "containerd at {shown} did not answer Version within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

pub(super) fn check_containerd(
    settings: &DoctorSettings,
    probe: &Probe,
    daemon: Option<&DaemonView>,
) -> Check {
    const NAME: &str = "containerd";
    match probe {
        Probe::Reached { version, .. } => {
            let source = format!("containerd at {}", settings.containerd_socket.display());
            let (status, detail, fix) = version_verdict(version, &source);
            Check::new(NAME, status, detail).fix(fix)
        }
        Probe::Unreachable {
            status,
            detail,
            fix,
        } => {
            // The daemon may reach containerd where the doctor cannot (another user, or other
            // flags than the daemon's): its version still says whether pins work.
            let known = daemon
                .map(|d| d.containerd_version.as_str())
                .filter(|v| !v.is_empty());
            match known {
                Some(version) => {
                    let (gate, gate_detail, gate_fix) =
                        version_verdict(version, "the running pinkeeper's containerd");
                    let fix = [fix.as_str(), gate_fix.as_str()]
                        .iter()
                        .filter(|f| !f.is_empty())
                        .copied()
                        .collect::<Vec<_>>()
                        .join("; ");
                    Check::new(
                        NAME,
                        (*status).max(gate),
                        format!("{detail}. {gate_detail}"),
                    )
                    .fix(fix)
                }
                None => Check::new(
                    NAME,
                    *status,
                    format!(
                        "{detail}. Without it the doctor cannot tell whether pins work here: CRI \
                         honours io.cri-containerd.pinned from containerd 1.6.22 / 1.7.3 and \
                         sees a label-only change at once from 1.6.25 / 1.7.10. {KUBELET_NOTE}."
                    ),
                )
                .fix(fix.clone()),
            }
        }
    }
}

pub(super) fn check_images_dir(dir: &Path, cached: StoredCache) -> Check {
    const NAME: &str = "images-dir";
    let shown = dir.display();
    let set_it = "if K3s runs with --data-dir DIR, pass DIR/agent/images with --images-dir \
                  (images_dir in the config)";
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Check::new(
                NAME,
                Status::Fail,
                format!("the images directory {shown} is not a directory"),
            )
            .fix(format!(
                "point --images-dir at K3s's images directory; {set_it}"
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Check::new(
                NAME,
                Status::Warn,
                format!(
                    "the images directory {shown} does not exist: K3s imports no archive at \
                     start, so every image it pinned before is swept and left unpinned, and \
                     only pinkeeper restores it"
                ),
            )
            .fix(set_it)
        }
        Err(e) => {
            return Check::new(
                NAME,
                Status::Fail,
                format!("the images directory {shown} cannot be examined: {e}"),
            )
            .fix("run `pinkeeper doctor` as root")
        }
    }
    // The ledger's cache of earlier reads spares reading every unchanged archive again.
    let inventory = match Scanner::new(dir).with_stored(cached).scan() {
        Ok(inventory) => inventory,
        Err(e) => {
            return Check::new(NAME, Status::Fail, e.to_string())
                .fix("run `pinkeeper doctor` as root, and check the directory's permissions")
        }
    };
    let names = inventory.provided().len();
    let broken: Vec<_> = inventory.errors().collect();
    let mut detail = format!(
        "{shown}: {} file(s) K3s imports, providing {names} image name(s)",
        inventory.files.len()
    );
    if !inventory.skipped.is_empty() {
        detail.push_str(&format!(
            "; {} path(s) not read (see `pinkeeper inventory`)",
            inventory.skipped.len()
        ));
    }
    if broken.is_empty() {
        return Check::new(NAME, Status::Ok, detail);
    }
    detail.push_str(&format!(
        "; {} file(s) with errors (a broken archive provides nothing, K3s's import of it fails \
         too):",
        broken.len()
    ));
    for file in broken.iter().take(MAX_NAMED) {
        let error = file.error.as_deref().unwrap_or_default();
        detail.push_str(&format!("\n  - {error}"));
    }
    if broken.len() > MAX_NAMED {
        detail.push_str(&format!("\n  - and {} more", broken.len() - MAX_NAMED));
    }
    Check::new(NAME, Status::Warn, detail).fix(
        "replace or remove the broken files (`pinkeeper inventory` lists them); a list's \
         skipped lines are not pulled",
    )
}
