//! `pinkeeper doctor`: checks a node and says what to fix.
//!
//! Owns the checks and their report (a table for people, JSON for programs). It works without
//! the daemon where it can: it asks containerd itself (Version, and one List when it has to
//! work out the images at risk), reads the images directory the way the daemon does, reads the
//! ledger when no running pinkeeper holds it, and looks for K3s and RKE2 installs on disk. What
//! only the running daemon knows comes in as a [`DaemonView`], from the control socket.
//!
//! It never creates anything: the ledger is opened only if its file exists (opening an existing
//! ledger commits one empty transaction and repairs the file after an unclean stop, as the
//! daemon's own start does). It never writes to containerd or to the images directory.
//!
//! Here: the command, its settings and the order of the checks. The checks are in
//! `checks.rs` (control socket, containerd, images directory), `ledger.rs` (the ledger, the
//! images at risk), `program.rs` (K3s or RKE2) and `versions.rs` (containerd's version
//! gates); `report.rs` renders them.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::cli::node::NodeArgs;
use crate::config::{ConfigError, Overrides, Program, Settings};
use crate::containerd::Containerd;
use crate::engine::{self, cri_pinned, ImageRecord, Intent, IntentState, Risk, CRI_PIN, PINNED};
use crate::inventory::{Scanner, StoredCache};
use crate::ledger::{Ledger, LedgerError, FILE_NAME};

/// How long the containerd probe (connect, then Version) may take: a doctor must answer fast,
/// and a containerd that needs longer than this is not well either.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the one listing of the at-risk check may take (10,000 images list in well under a
/// second; this only stops a hung containerd from hanging the doctor).
const LIST_TIMEOUT: Duration = Duration::from_secs(20);
/// Names listed in a detail at most; the rest are counted.
const MAX_NAMED: usize = 20;
/// Width of the text output.
const TEXT_WIDTH: usize = 96;
/// The `version` field of the JSON output.
pub(crate) const JSON_VERSION: u32 = 1;

/// The containerd socket of both K3s and RKE2 (FACTS.md section 1).
const K3S_SOCKET: &str = crate::config::DEFAULT_CONTAINERD_SOCKET;

/// What the running daemon says about itself, via its control socket.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DaemonView {
    /// The daemon is subscribed to containerd.
    pub connected: bool,
    /// containerd's version as the daemon saw it; empty if unknown.
    pub containerd_version: String,
    /// The ledger file the daemon has open.
    pub ledger_path: PathBuf,
    /// Intents held or swept (not released).
    pub intents_held: usize,
    /// Image names with an intent held but unpinned right now.
    pub at_risk: Vec<String>,
    /// Why the daemon cannot write its ledger now; empty when it can.
    pub ledger_problem: String,
    /// A damaged ledger the daemon moved aside at start; empty if none.
    pub ledger_recovered: String,
    /// The daemon's last check of CRI's view.
    pub cri: kubelet::DaemonCri,
}

/// Where the doctor looks: the same settings as `pinkeeper run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DoctorSettings {
    /// containerd's gRPC socket.
    pub containerd_socket: PathBuf,
    /// containerd namespace K3s imports into.
    pub namespace: String,
    /// K3s's images directory.
    pub images_dir: PathBuf,
    /// The ledger's directory.
    pub state_dir: PathBuf,
    /// The daemon's control socket.
    pub control_socket: PathBuf,
    /// K3s or RKE2, as pinkeeper is set to follow.
    pub program: Program,
}

impl From<Settings> for DoctorSettings {
    fn from(s: Settings) -> Self {
        DoctorSettings {
            containerd_socket: s.containerd_socket,
            namespace: s.namespace,
            images_dir: s.images_dir,
            state_dir: s.state_dir,
            control_socket: s.control_socket,
            program: s.program,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the checks

/// Where the host's files are: `/` and `PATH` on a node, a temp dir in tests.
struct Host {
    root: PathBuf,
    path_var: Option<OsString>,
}

impl Host {
    fn this_node() -> Host {
        Host {
            root: PathBuf::from("/"),
            path_var: std::env::var_os("PATH"),
        }
    }
}

/// Checks the node. `daemon` is the running pinkeeper's answer, or why its control socket
/// could not be used; every check that can be made without it still is.
pub(crate) async fn examine(
    settings: &DoctorSettings,
    daemon: Result<DaemonView, String>,
) -> Report {
    examine_on(settings, daemon, &Host::this_node()).await
}

async fn examine_on(
    settings: &DoctorSettings,
    daemon: Result<DaemonView, String>,
    host: &Host,
) -> Report {
    let control = check_control(settings, &daemon);
    let probe = probe_containerd(settings).await;
    let containerd = check_containerd(settings, &probe, daemon.as_ref().ok());
    let ledger = match &daemon {
        Ok(view) => LedgerRead::HeldByDaemon {
            path: view.ledger_path.clone(),
            intents: view.intents_held,
            problem: view.ledger_problem.clone(),
            recovered: view.ledger_recovered.clone(),
        },
        Err(_) => read_ledger(&settings.state_dir),
    };
    let cached = match &ledger {
        LedgerRead::Read { cached, .. } => (**cached).clone(),
        _ => StoredCache::default(),
    };
    let images_dir = check_images_dir(&settings.images_dir, cached);
    let ledger_check = check_ledger(settings, &ledger);
    let program = check_program(
        settings,
        &detect_programs(&host.root, host.path_var.as_deref()),
    );
    let at_risk = check_at_risk(&daemon, &probe, &ledger).await;
    let kubelet = kubelet::check_kubelet(&daemon, &probe, &ledger).await;
    let disk = kubelet::check_disk(&daemon);
    Report {
        checks: vec![
            control,
            containerd,
            images_dir,
            ledger_check,
            program,
            at_risk,
            kubelet,
            disk,
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// the command

/// `pinkeeper doctor`: checks the node and says what to fix. Exit code 0 when nothing failed,
/// 1 when something did, 2 for bad usage.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DoctorArgs {
    /// The node's settings, as `pinkeeper run` takes them.
    #[command(flatten)]
    pub node: NodeArgs,
    /// The running pinkeeper's control socket [default: /run/pinkeeper/pinkeeper.sock]
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

impl DoctorArgs {
    /// The settings, resolved as `pinkeeper run` resolves them (defaults, the config file,
    /// the flags).
    pub(crate) fn settings(&self) -> Result<DoctorSettings, ConfigError> {
        let flags = Overrides {
            control_socket: self.control_socket.clone(),
            ..Overrides::default()
        };
        self.node.resolve(flags).map(DoctorSettings::from)
    }
}

/// The running daemon's view of itself, through its control socket.
pub(crate) async fn ask_daemon(socket: &Path) -> Result<DaemonView, String> {
    let client = crate::control::client::Client::connect(socket).map_err(|e| e.to_string())?;
    let status = client.status().await.map_err(|e| e.to_string())?;
    Ok(DaemonView {
        connected: status.connected,
        containerd_version: status.containerd_version,
        ledger_path: PathBuf::from(status.ledger_path),
        intents_held: (status.intents_held + status.intents_swept) as usize,
        at_risk: status.at_risk,
        ledger_problem: status.ledger_problem,
        ledger_recovered: status.ledger_recovered,
        cri: kubelet::DaemonCri {
            checked_ms: status.cri_checked_ms,
            problem: status.cri_problem,
            unpinned: status.cri_unpinned,
            disk: status.disk,
            disk_problem: status.disk_problem,
        },
    })
}

/// Runs `pinkeeper doctor` and prints the report on stdout.
pub(crate) fn main(args: DoctorArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(e) => return crate::cli::usage_error(&e),
    };
    let runtime = match crate::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = runtime.block_on(async {
        let daemon = ask_daemon(&settings.control_socket).await;
        examine(&settings, daemon).await
    });
    let text = if args.json {
        report.to_json() + "\n"
    } else {
        report.to_table()
    };
    use std::io::Write;
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    ExitCode::from(report.exit_code())
}

mod checks;
mod kubelet;
mod ledger;
mod program;
mod report;
mod versions;

use checks::*;
use ledger::*;
use program::*;
pub(crate) use report::{Check, Report, Status};
use versions::*;

#[cfg(test)]
mod tests;
