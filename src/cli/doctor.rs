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
use crate::inventory::{CachedFile, Scanner};
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
pub const JSON_VERSION: u32 = 1;

/// The containerd socket of both K3s and RKE2 (FACTS.md section 1).
const K3S_SOCKET: &str = crate::config::DEFAULT_CONTAINERD_SOCKET;

/// What the running daemon says about itself, via its control socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonView {
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
}

/// Where the doctor looks: the same settings as `pinkeeper run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorSettings {
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

/// The outcome of one check. Ordered from good to bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// Works, with a caveat, or could not be checked.
    Warn,
    /// pinkeeper cannot do its job on this node until this is fixed.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check: what was looked at, how it stands, and what the operator should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier: `control-socket`, `containerd`, `images-dir`, `ledger`, `program`,
    /// `at-risk`.
    pub name: &'static str,
    /// How it stands.
    pub status: Status,
    /// What was found. Lines after the first list items (names, files).
    pub detail: String,
    /// What the operator should do; empty when the status is ok.
    pub fix: String,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = fix.into();
        self
    }
}

/// The doctor's findings, in a fixed order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Every check made.
    pub checks: Vec<Check>,
}

/// The JSON document (documented in README.md: add fields, never rename or remove them).
#[derive(Serialize)]
struct ReportJson<'a> {
    version: u32,
    status: Status,
    checks: &'a [Check],
}

impl Report {
    /// The worst status of any check (ok for no checks).
    pub fn status(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// 0 when no check failed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.status() == Status::Fail)
    }

    /// Pretty-printed JSON: `{"version": 1, "status": "fail", "checks": [{"name", "status",
    /// "detail", "fix"}]}`.
    pub fn to_json(&self) -> String {
        let json = ReportJson {
            version: JSON_VERSION,
            status: self.status(),
            checks: &self.checks,
        };
        // Strings and enums only: serialising cannot fail.
        serde_json::to_string_pretty(&json).unwrap_or_default()
    }

    /// Human text: one block per check (status, name, the detail, the fix), then a summary.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let indent = "       ";
        for check in &self.checks {
            out.push_str(&format!("{:<6} {}\n", check.status.label(), check.name));
            wrap_into(&mut out, indent, "", &check.detail);
            if !check.fix.is_empty() {
                wrap_into(&mut out, indent, "fix: ", &check.fix);
            }
            out.push('\n');
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        out.push_str(&format!(
            "{} failed, {} warning(s), {} ok\n",
            count(Status::Fail),
            count(Status::Warn),
            count(Status::Ok)
        ));
        out
    }
}

/// Appends `text` word-wrapped to [`TEXT_WIDTH`], every line indented; `lead` starts the first
/// line and the lines after it hang past it. `\n` in the text starts a new line; a line's own
/// leading spaces (list items, `  - name`) are kept on its continuation lines.
fn wrap_into(out: &mut String, indent: &str, lead: &str, text: &str) {
    let hang = " ".repeat(lead.chars().count());
    for (i, paragraph) in text.split('\n').enumerate() {
        let body = paragraph.trim_start_matches(' ');
        let pad = " ".repeat(paragraph.len() - body.len());
        let item = if body.starts_with("- ") { "  " } else { "" };
        let first = format!("{indent}{}{pad}", if i == 0 { lead } else { &hang });
        let continuation = format!("{indent}{hang}{pad}{item}");
        let mut line = first;
        let mut fresh = true;
        let mut words: Vec<String> = body
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        // A list marker stays with its item: never a lone `-` at the end of a line.
        if words.len() > 1 && words[0] == "-" {
            let item = words.remove(1);
            words[0] = format!("- {item}");
        }
        for word in &words {
            if !fresh && line.chars().count() + 1 + word.chars().count() > TEXT_WIDTH {
                out.push_str(&line);
                out.push('\n');
                line = continuation.clone();
                fresh = true;
            }
            if !fresh {
                line.push(' ');
            }
            line.push_str(word);
            fresh = false;
        }
        out.push_str(&line);
        out.push('\n');
    }
}

// ---------------------------------------------------------------------------------------------
// containerd versions and the pin's version gates (FACTS.md section 4)

/// A containerd release number, as far as the pin's gates need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerdVersion {
    /// Major.
    pub major: u64,
    /// Minor (0 if absent).
    pub minor: u64,
    /// Patch (0 if absent).
    pub patch: u64,
    /// An alpha, beta, rc or dev build *before* that release.
    pub prerelease: bool,
}

impl ContainerdVersion {
    /// Whether this is `major.minor.patch` or later (a prerelease of it is earlier).
    pub fn at_least(&self, major: u64, minor: u64, patch: u64) -> bool {
        (self.major, self.minor, self.patch, !self.prerelease) >= (major, minor, patch, true)
    }
}

/// Parses what containerd's Version call (or `containerd --version`) reports: `v1.7.24`,
/// `1.6.20~ds1` (Debian), `2.1.9+unknown`, `v2.0.0-rc.1`, `v1.7.23-k3s2` (K3s's build).
/// A whole line such as `containerd github.com/containerd/containerd v1.7.24 abc` works too: its
/// first token that reads as a version is taken. `None` if nothing does.
pub fn parse_version(text: &str) -> Option<ContainerdVersion> {
    let text = text.trim();
    parse_one(text).or_else(|| text.split_whitespace().find_map(parse_one))
}

fn parse_one(token: &str) -> Option<ContainerdVersion> {
    let s = token.strip_prefix(['v', 'V']).unwrap_or(token);
    let core_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (core, rest) = s.split_at(core_end);
    // Only a separator may follow the numbers: `~` (Debian), `+` (build metadata), `-` (a
    // prerelease or a distribution's own build) or a space.
    if !(rest.is_empty() || rest.starts_with(['~', '+', '-', ' '])) {
        return None;
    }
    let mut numbers = core.split('.').map(|p| p.parse::<u64>().ok());
    let major = numbers.next()??;
    let minor = numbers.next().unwrap_or(Some(0))?;
    let patch = numbers.next().unwrap_or(Some(0))?;
    // A fourth number is not containerd's scheme; refuse rather than guess.
    if numbers.next().is_some() {
        return None;
    }
    // Semver makes anything after `-` a prerelease, but builds of a release carry suffixes
    // too: K3s's `-k3s2`, `git describe`'s `-15-gabc123` (commits *after* the tag), Ubuntu's
    // `-0ubuntu1`. Only the markers containerd's own prereleases use count as one.
    let prerelease = rest.strip_prefix('-').is_some_and(|suffix| {
        let suffix = suffix.to_ascii_lowercase();
        ["alpha", "beta", "rc", "pre", "dev"]
            .iter()
            .any(|marker| suffix.starts_with(marker))
    });
    Some(ContainerdVersion {
        major,
        minor,
        patch,
        prerelease,
    })
}

/// How much of the pin a containerd honours (FACTS.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinSupport {
    /// Below 1.6.22 / 1.7.3: CRI ignores `io.cri-containerd.pinned` altogether.
    Ignored,
    /// 1.6.22 to 1.6.24, 1.7.3 to 1.7.9: CRI reads the label when it loads an image, but a
    /// label-only change does not reach its cache until containerd restarts.
    AfterRestart,
    /// 1.6.25+, 1.7.10+, 2.x: a label change is seen at once.
    Full,
}

/// The gate a version falls under.
pub fn pin_support(v: &ContainerdVersion) -> PinSupport {
    let gate = |honoured: (u64, u64, u64), live: (u64, u64, u64)| {
        if v.at_least(live.0, live.1, live.2) {
            PinSupport::Full
        } else if v.at_least(honoured.0, honoured.1, honoured.2) {
            PinSupport::AfterRestart
        } else {
            PinSupport::Ignored
        }
    };
    match (v.major, v.minor) {
        // Every 2.x (its prereleases too) came after both fixes.
        (major, _) if major >= 2 => PinSupport::Full,
        (1, 6) => gate((1, 6, 22), (1, 6, 25)),
        (1, 7) => gate((1, 7, 3), (1, 7, 10)),
        // There was no 1.8: containerd went from 1.7 to 2.0. Anything later has both fixes.
        (1, minor) if minor > 7 => PinSupport::Full,
        _ => PinSupport::Ignored,
    }
}

/// The kubelet half of the gate, which the doctor cannot check from here.
const KUBELET_NOTE: &str = "kubelet skips pinned images in its GC from Kubernetes 1.29 (or with a \
     backport of kubernetes PR #119986); pinkeeper cannot check kubelet's version, see `kubectl \
     get nodes -o wide`";

/// The status, detail and fix for containerd `version` (as reported) at `socket`.
fn version_verdict(version: &str, source: &str) -> (Status, String, String) {
    let Some(parsed) = parse_version(version) else {
        return (
            Status::Warn,
            format!(
                "{source} reports version {version:?}, which pinkeeper cannot read: it cannot \
                 tell whether CRI honours io.cri-containerd.pinned (from 1.6.22 / 1.7.3) and \
                 sees a label-only change at once (from 1.6.25 / 1.7.10). {KUBELET_NOTE}."
            ),
            "check `containerd --version` (K3s: `k3s ctr version`): 1.6.25+, 1.7.10+ or 2.x is \
             needed for a restored pin to protect the image at once"
                .into(),
        );
    };
    match pin_support(&parsed) {
        PinSupport::Full => (
            Status::Ok,
            format!(
                "{source}: version {version}, which honours io.cri-containerd.pinned and sees a \
                 label-only change at once (1.6.25+ / 1.7.10+ / 2.x). {KUBELET_NOTE}."
            ),
            String::new(),
        ),
        PinSupport::AfterRestart => (
            Status::Warn,
            format!(
                "{source}: version {version}, below 1.6.25 / 1.7.10: CRI honours \
                 io.cri-containerd.pinned, but a label-only change does not reach CRI's image \
                 cache, so a pin pinkeeper restores only takes effect after containerd restarts \
                 (with the next K3s restart); until then kubelet's image GC may still delete \
                 that image. {KUBELET_NOTE}."
            ),
            "upgrade containerd to 1.6.25+, 1.7.10+ or 2.x (with K3s: upgrade K3s, its \
             containerd is built in); until then, after pinkeeper restored pins, restart K3s \
             (`systemctl restart k3s` or `k3s-agent`) so that CRI loads them"
                .into(),
        ),
        PinSupport::Ignored => (
            Status::Fail,
            format!(
                "{source}: version {version}, below 1.6.22 / 1.7.3: CRI does not honour \
                 io.cri-containerd.pinned at all, so kubelet's image GC may delete any image, \
                 pinned or not, and a pin pinkeeper restores protects nothing. {KUBELET_NOTE}."
            ),
            "upgrade containerd to 1.6.25+, 1.7.10+ or 2.x (with K3s: upgrade K3s, its \
             containerd is built in)"
                .into(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// K3s or RKE2 on this node

/// What was found of each program on the node, as paths of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Programs {
    k3s: Vec<String>,
    rke2: Vec<String>,
}

/// Looks for K3s and RKE2 installs under `root` (`/` on a node, a temp dir in tests): data
/// dirs, config dirs, binaries (also on `path_var`, a `PATH` value whose dirs are read under
/// `root`) and systemd units.
fn detect_programs(root: &Path, path_var: Option<&OsStr>) -> Programs {
    let under = |node_path: &Path| root.join(node_path.strip_prefix("/").unwrap_or(node_path));
    let mut found = Programs::default();
    // The same file may be reachable by two paths (/lib is /usr/lib on merged-usr systems):
    // it is listed once.
    let mut seen = std::collections::HashSet::new();
    let mut note = |list: &mut Vec<String>, node_path: PathBuf, exists: bool| {
        if !exists {
            return;
        }
        let real = std::fs::canonicalize(under(&node_path)).unwrap_or_else(|_| node_path.clone());
        if seen.insert(real) {
            list.push(node_path.display().to_string());
        }
    };
    for (program, names) in [
        ("k3s", ["k3s.service", "k3s-agent.service"]),
        ("rke2", ["rke2-server.service", "rke2-agent.service"]),
    ] {
        let mut list = Vec::new();
        for dir in ["/var/lib/rancher", "/etc/rancher"] {
            let path = Path::new(dir).join(program);
            let exists = under(&path).is_dir();
            note(&mut list, path, exists);
        }
        let mut bin_dirs: Vec<PathBuf> = vec!["/usr/local/bin".into(), "/opt/rke2/bin".into()];
        if let Some(path_var) = path_var {
            bin_dirs.extend(std::env::split_paths(path_var).filter(|d| d.is_absolute()));
        }
        for dir in bin_dirs {
            let path = dir.join(program);
            let exists = under(&path).is_file();
            note(&mut list, path, exists);
        }
        for dir in [
            "/etc/systemd/system",
            "/usr/local/lib/systemd/system",
            "/lib/systemd/system",
            "/usr/lib/systemd/system",
        ] {
            for unit in names {
                let path = Path::new(dir).join(unit);
                let exists = under(&path).is_file();
                note(&mut list, path, exists);
            }
        }
        match program {
            "k3s" => found.k3s = list,
            _ => found.rke2 = list,
        }
    }
    found
}

fn check_program(settings: &DoctorSettings, programs: &Programs) -> Check {
    const NAME: &str = "program";
    let evidence = |list: &[String]| list.join(", ");
    let set = settings.program;
    let other = match set {
        Program::K3s => Program::Rke2,
        Program::Rke2 => Program::K3s,
    };
    let found = |program: Program| match program {
        Program::K3s => &programs.k3s,
        Program::Rke2 => &programs.rke2,
    };
    let name = set.display_name();
    let (label, flag) = (set.label(), set.as_str());
    let (default_dir, default_socket) = (set.default_images_dir(), set.default_containerd_socket());
    let (other_name, other_label, other_dir) = (
        other.display_name(),
        other.label(),
        other.default_images_dir(),
    );
    let socket_note = if settings.containerd_socket == Path::new(default_socket) {
        String::new()
    } else {
        format!(
            " pinkeeper is set to containerd at {}, not {default_socket} (K3s's and RKE2's own \
             containerd): right only if {name} runs with --container-runtime-endpoint or a \
             different containerd.",
            settings.containerd_socket.display()
        )
    };
    let dir_differs = settings.images_dir != Path::new(default_dir);
    match (found(set).is_empty(), found(other).is_empty()) {
        (false, true) => {
            let mut detail = format!(
                "{name} is installed ({}). pinkeeper follows {name}'s sweep of {label}, the label \
                 {name} pins with (--program {flag}).",
                evidence(found(set))
            );
            detail.push_str(&socket_note);
            if dir_differs {
                detail.push_str(&format!(
                    " pinkeeper reads the images directory {}, not {name}'s default \
                     {default_dir}: right only if {name} runs with --data-dir DIR and this is \
                     DIR/agent/images.",
                    settings.images_dir.display()
                ));
            }
            if dir_differs || !socket_note.is_empty() {
                Check::new(NAME, Status::Warn, detail).fix(format!(
                    "make --images-dir and --containerd-socket (images_dir, containerd_socket in \
                     the config) match what {name} uses: <data-dir>/agent/images and \
                     {default_socket} by default"
                ))
            } else {
                Check::new(NAME, Status::Ok, detail)
            }
        }
        (true, false) => {
            let mut fix = format!(
                "run pinkeeper with --program {} (program = \"{}\" in the config file)",
                other.as_str(),
                other.as_str()
            );
            if !dir_differs {
                fix.push_str(&format!(
                    ", which also makes {other_dir} its images directory"
                ));
            }
            Check::new(
                NAME,
                Status::Fail,
                format!(
                    "{other_name} is installed ({}), not {name}, but pinkeeper is set to follow \
                     {name} (--program {flag}). {other_name} pins with {other_label} and imports \
                     from {other_dir}; pinkeeper follows {label} only, so it would take \
                     {other_name}'s startup sweep for an operator's unpin and release its \
                     intents instead of restoring the pins. (Both use the containerd socket \
                     {K3S_SOCKET}.)",
                    evidence(found(other))
                ),
            )
            .fix(fix)
        }
        (false, false) => Check::new(
            NAME,
            Status::Warn,
            format!(
                "both K3s ({}) and RKE2 ({}) are installed. pinkeeper is set to follow {name} \
                 (--program {flag}) and its label {label}; {other_name} pins with {other_label} \
                 and imports from {other_dir}.",
                evidence(&programs.k3s),
                evidence(&programs.rke2)
            ),
        )
        .fix(format!(
            "make sure the running one is {name} (`systemctl status k3s k3s-agent rke2-server \
             rke2-agent`); if it is {other_name}, run pinkeeper with --program {}",
            other.as_str()
        )),
        (true, true) => Check::new(
            NAME,
            Status::Warn,
            format!(
                "neither K3s nor RKE2 is installed in the usual places (/var/lib/rancher/k3s, \
                 /etc/rancher/k3s, /usr/local/bin/k3s or k3s on PATH, k3s.service or \
                 k3s-agent.service, and the same for rke2). pinkeeper is set to follow {name} \
                 (--program {flag}): its label {label}, the images directory {} and the \
                 containerd socket {}.",
                settings.images_dir.display(),
                settings.containerd_socket.display()
            ),
        )
        .fix(
            "run pinkeeper on a K3s or RKE2 node with --program set to it; if it is installed \
             elsewhere, make --images-dir and --containerd-socket match what it uses",
        ),
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
pub async fn examine(settings: &DoctorSettings, daemon: Result<DaemonView, String>) -> Report {
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
        LedgerRead::Read { cached, .. } => cached.clone(),
        _ => Vec::new(),
    };
    let images_dir = check_images_dir(&settings.images_dir, cached);
    let ledger_check = check_ledger(settings, &ledger);
    let program = check_program(
        settings,
        &detect_programs(&host.root, host.path_var.as_deref()),
    );
    let at_risk = check_at_risk(&daemon, &probe, &ledger).await;
    Report {
        checks: vec![
            control,
            containerd,
            images_dir,
            ledger_check,
            program,
            at_risk,
        ],
    }
}

fn check_control(settings: &DoctorSettings, daemon: &Result<DaemonView, String>) -> Check {
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
enum Probe {
    /// Connected; Version answered.
    Reached { client: Containerd, version: String },
    /// Not reachable: status (fail, or warn for a permission problem), what happened, the fix.
    Unreachable {
        status: Status,
        detail: String,
        fix: String,
    },
}

async fn probe_containerd(settings: &DoctorSettings) -> Probe {
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

fn check_containerd(
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

fn check_images_dir(dir: &Path, cached: Vec<CachedFile>) -> Check {
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
    let inventory = match Scanner::new(dir).with_cache(cached).scan() {
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

/// What the doctor could learn of the ledger.
enum LedgerRead {
    /// The running daemon answered: its own ledger.
    HeldByDaemon {
        path: PathBuf,
        intents: usize,
        /// Why the daemon cannot write it now; empty when it can.
        problem: String,
        /// A damaged ledger the daemon moved aside; empty if none.
        recovered: String,
    },
    /// No ledger file.
    Missing { path: PathBuf },
    /// Another process (a running pinkeeper) holds it.
    Busy { path: PathBuf },
    /// This user cannot open it.
    NoAccess { path: PathBuf, reason: String },
    /// It cannot be opened or read.
    Broken { path: PathBuf, error: String },
    /// Read.
    Read {
        path: PathBuf,
        intents: Vec<Intent>,
        cached: Vec<CachedFile>,
    },
}

fn read_ledger(state_dir: &Path) -> LedgerRead {
    let path = state_dir.join(FILE_NAME);
    // `Ledger::open` creates the directory and the file: a doctor must not, so it only
    // opens a ledger that is there.
    match path.try_exists() {
        Ok(true) => {}
        Ok(false) => return LedgerRead::Missing { path },
        Err(e) => {
            return LedgerRead::NoAccess {
                reason: e.to_string(),
                path,
            }
        }
    }
    // redb opens the file read-write; a permission problem is the user's, not a damaged file.
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        if e.kind() == ErrorKind::PermissionDenied {
            return LedgerRead::NoAccess {
                reason: e.to_string(),
                path,
            };
        }
    }
    // Read without writing (a damaged file is reported, never panicked on nor rewritten),
    // and closed at once: a pinkeeper starting now must not find it held.
    match Ledger::inspect(state_dir) {
        Ok(Some(contents)) => match contents.problem() {
            Some(problem) => LedgerRead::Broken {
                error: problem,
                path,
            },
            None => LedgerRead::Read {
                cached: contents.cached,
                intents: contents.intents,
                path,
            },
        },
        Ok(None) => LedgerRead::Missing { path },
        Err(LedgerError::Busy { .. }) => LedgerRead::Busy { path },
        Err(e) => LedgerRead::Broken {
            error: e.to_string(),
            path,
        },
    }
}

fn check_ledger(settings: &DoctorSettings, ledger: &LedgerRead) -> Check {
    const NAME: &str = "ledger";
    match ledger {
        LedgerRead::HeldByDaemon { path, problem, .. } if !problem.is_empty() => Check::new(
            NAME,
            Status::Fail,
            format!(
                "the running pinkeeper cannot write {}: {problem}. It keeps protecting from \
                 memory and retries; what it learns meanwhile is lost if it stops before the \
                 ledger can be written",
                crate::escape::path(path)
            ),
        ),
        LedgerRead::HeldByDaemon {
            path, recovered, ..
        } if !recovered.is_empty() => Check::new(
            NAME,
            Status::Warn,
            format!(
                "{} is in use by the running pinkeeper; at its start {recovered}",
                crate::escape::path(path)
            ),
        ),
        LedgerRead::HeldByDaemon { path, intents, .. } => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{} is in use by the running pinkeeper, with {intents} intent(s) held",
                path.display()
            ),
        ),
        LedgerRead::Missing { path } => Check::new(
            NAME,
            Status::Warn,
            format!(
                "no ledger at {}: pinkeeper has not run with --state-dir {} yet, so it holds no \
                 intent and protects nothing (the doctor does not create it)",
                path.display(),
                settings.state_dir.display()
            ),
        )
        .fix(
            "start pinkeeper while the archives are still in the images directory: it learns \
             every pinned image when it connects; if it runs with another --state-dir, pass that \
             one",
        ),
        LedgerRead::Busy { path } => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{} is in use by a running pinkeeper (it holds the file, so the doctor cannot \
                 read it; its control socket did not answer either)",
                path.display()
            ),
        ),
        LedgerRead::NoAccess { path, reason } => Check::new(
            NAME,
            Status::Warn,
            format!("cannot open the ledger {}: {reason}", path.display()),
        )
        .fix("run `pinkeeper doctor` as root"),
        LedgerRead::Broken { path, error } => {
            Check::new(NAME, Status::Fail, error.clone()).fix(format!(
                "stop pinkeeper, move the file aside (mv {p} {p}.broken) and start pinkeeper \
                 again: it re-learns every image that is pinned now, but forgets the intents of \
                 images that are unpinned right now",
                p = path.display()
            ))
        }
        LedgerRead::Read { path, intents, .. } => {
            let count = |state: IntentState| intents.iter().filter(|i| i.state == state).count();
            Check::new(
                NAME,
                Status::Ok,
                format!(
                    "{}: {} intent(s) held, {} swept by K3s and not restored yet, {} released",
                    path.display(),
                    count(IntentState::Held),
                    count(IntentState::Swept),
                    count(IntentState::Released)
                ),
            )
        }
    }
}

/// Intents held or swept whose image is unpinned right now, and those whose image is gone.
#[derive(Debug, Default, PartialEq, Eq)]
struct AtRisk {
    held: usize,
    unpinned: Vec<String>,
    gone: Vec<String>,
}

fn at_risk(intents: &[Intent], images: &[ImageRecord]) -> AtRisk {
    let by_name: BTreeMap<&str, &ImageRecord> =
        images.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut risk = AtRisk::default();
    for intent in intents.iter().filter(|i| i.state.keeps_pinned()) {
        risk.held += 1;
        let record = by_name.get(intent.name.as_str());
        let pinned_now = record.is_some_and(|r| cri_pinned(&r.labels));
        match engine::risk(intent.state, pinned_now, record.is_some()) {
            Some(Risk::Gone) => risk.gone.push(intent.name.clone()),
            Some(Risk::Unpinned) => risk.unpinned.push(intent.name.clone()),
            None => {}
        }
    }
    risk.unpinned.sort();
    risk.gone.sort();
    risk
}

/// `a, b, c` or the first [`MAX_NAMED`] one per line and a count of the rest.
fn name_list(names: &[String]) -> String {
    let mut out = String::new();
    for name in names.iter().take(MAX_NAMED) {
        out.push_str(&format!("\n  - {name}"));
    }
    if names.len() > MAX_NAMED {
        out.push_str(&format!("\n  - and {} more", names.len() - MAX_NAMED));
    }
    out
}

const REPAIR: &str = "run `pinkeeper reconcile` to restore their pins now (or `pinkeeper pin \
                      NAME` for one image); a stopped pinkeeper repairs them as soon as it \
                      starts and connects (`systemctl start pinkeeper`)";

async fn check_at_risk(
    daemon: &Result<DaemonView, String>,
    probe: &Probe,
    ledger: &LedgerRead,
) -> Check {
    const NAME: &str = "at-risk";
    if let Ok(view) = daemon {
        if view.at_risk.is_empty() {
            return Check::new(
                NAME,
                Status::Ok,
                format!(
                    "the running pinkeeper reports every one of its {} intent(s) pinned",
                    view.intents_held
                ),
            );
        }
        return Check::new(
            NAME,
            Status::Fail,
            format!(
                "{} of the {} image(s) pinkeeper keeps pinned are unpinned right now, so \
                 kubelet's image GC may delete them:{}",
                view.at_risk.len(),
                view.intents_held,
                name_list(&view.at_risk)
            ),
        )
        .fix(REPAIR);
    }
    let cannot_tell = |why: String, fix: &str| {
        Check::new(
            NAME,
            Status::Warn,
            format!("cannot tell which images are at risk: {why}"),
        )
        .fix(fix)
    };
    let intents = match ledger {
        LedgerRead::Read { intents, .. } => intents,
        LedgerRead::Missing { .. } => {
            return cannot_tell(
                "there is no ledger, so pinkeeper holds no intent".into(),
                "see the ledger check",
            )
        }
        LedgerRead::Busy { .. } => {
            return cannot_tell(
                "a running pinkeeper holds the ledger and its control socket did not answer".into(),
                "check again once `pinkeeper doctor` can reach the daemon's control socket",
            )
        }
        LedgerRead::NoAccess { .. }
        | LedgerRead::Broken { .. }
        | LedgerRead::HeldByDaemon { .. } => {
            return cannot_tell("the ledger cannot be read".into(), "see the ledger check")
        }
    };
    let Probe::Reached { client, .. } = probe else {
        return cannot_tell(
            "containerd cannot be reached".into(),
            "see the containerd check",
        );
    };
    let images = match tokio::time::timeout(LIST_TIMEOUT, client.list()).await {
        Ok(Ok(images)) => images,
        Ok(Err(e)) => return cannot_tell(e.to_string(), "run `pinkeeper doctor` again"),
        Err(_) => {
            return cannot_tell(
                format!(
                    "containerd did not list its images within {} s",
                    LIST_TIMEOUT.as_secs()
                ),
                "run `pinkeeper doctor` again; if containerd stays this slow, check K3s's \
                 containerd log (/var/lib/rancher/k3s/agent/containerd/containerd.log)",
            )
        }
    };
    let risk = at_risk(intents, &images);
    if risk.unpinned.is_empty() && risk.gone.is_empty() {
        return Check::new(
            NAME,
            Status::Ok,
            format!(
                "every one of the {} image(s) with an intent in the ledger carries {CRI_PIN}",
                risk.held
            ),
        );
    }
    let mut detail = format!(
        "{} of the {} image(s) pinkeeper keeps pinned are at risk (from the ledger and \
         containerd's listing: pinkeeper is not answering, so nothing restores them until it \
         runs).",
        risk.unpinned.len() + risk.gone.len(),
        risk.held
    );
    let mut fix = Vec::new();
    if !risk.unpinned.is_empty() {
        detail.push_str(&format!(
            "\n{} lack {CRI_PIN}={PINNED}, so kubelet's image GC may delete them:{}",
            risk.unpinned.len(),
            name_list(&risk.unpinned)
        ));
        fix.push(REPAIR.to_string());
    }
    if !risk.gone.is_empty() {
        detail.push_str(&format!(
            "\n{} are no longer in containerd at all:{}",
            risk.gone.len(),
            name_list(&risk.gone)
        ));
        fix.push(
            "an image that is gone cannot be pinned again: put its archive back into the images \
             directory (or pull it) if it is still needed; pinkeeper releases its intent when it \
             next runs"
                .to_string(),
        );
    }
    Check::new(NAME, Status::Fail, detail).fix(fix.join("; "))
}

// ---------------------------------------------------------------------------------------------
// the command

/// `pinkeeper doctor`: checks the node and says what to fix. Exit code 0 when nothing failed,
/// 1 when something did, 2 for bad usage.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
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
    pub fn settings(&self) -> Result<DoctorSettings, ConfigError> {
        let flags = Overrides {
            control_socket: self.control_socket.clone(),
            ..Overrides::default()
        };
        self.node.resolve(flags).map(DoctorSettings::from)
    }
}

/// The running daemon's view of itself, through its control socket.
pub async fn ask_daemon(socket: &Path) -> Result<DaemonView, String> {
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
    })
}

/// Runs `pinkeeper doctor` and prints the report on stdout.
pub fn main(args: DoctorArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("pinkeeper: {e}");
            return ExitCode::from(2);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_IMAGES_DIR, RKE2_IMAGES_DIR, RKE2_PIN};
    use crate::engine::{Origin, K3S_PIN};

    fn v(major: u64, minor: u64, patch: u64, prerelease: bool) -> Option<ContainerdVersion> {
        Some(ContainerdVersion {
            major,
            minor,
            patch,
            prerelease,
        })
    }

    #[test]
    fn versions_parse_as_containerd_and_distributions_write_them() {
        let cases = [
            ("v1.7.24", v(1, 7, 24, false)),
            ("1.7.24", v(1, 7, 24, false)),
            ("1.6.20~ds1", v(1, 6, 20, false)),
            ("1.7.24~ds1", v(1, 7, 24, false)),
            ("2.1.9+unknown", v(2, 1, 9, false)),
            ("v2.0.0-rc.1", v(2, 0, 0, true)),
            ("v2.0.0-beta.2", v(2, 0, 0, true)),
            ("v1.7.0-alpha.1", v(1, 7, 0, true)),
            ("1.7.10-RC.0", v(1, 7, 10, true)),
            ("v2.1.0-dev", v(2, 1, 0, true)),
            ("v1.7.23-k3s2", v(1, 7, 23, false)),
            ("v1.6.8-k3s1", v(1, 6, 8, false)),
            ("v1.7.24-15-g1a2b3c4", v(1, 7, 24, false)),
            ("1.7.12-0ubuntu2~22.04.1", v(1, 7, 12, false)),
            ("  v1.6.25\n", v(1, 6, 25, false)),
            ("1.7", v(1, 7, 0, false)),
            ("2", v(2, 0, 0, false)),
            ("V1.6.22", v(1, 6, 22, false)),
            (
                "containerd github.com/containerd/containerd v1.7.24 88bf19b2",
                v(1, 7, 24, false),
            ),
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
                v(1, 6, 20, false),
            ),
            (
                "containerd github.com/containerd/containerd/v2 2.1.9+unknown ",
                v(2, 1, 9, false),
            ),
            ("", None),
            ("unknown", None),
            ("v", None),
            ("1..2", None),
            ("1.6.", None),
            ("1.6x", None),
            ("1.2.3.4", None),
            ("-1.6.20", None),
            ("99999999999999999999999.1", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_version(text), expected, "{text:?}");
        }
    }

    #[test]
    fn gates_follow_facts_section_4() {
        use PinSupport::*;
        let cases = [
            ("1.5.18", Ignored),
            ("0.9.0", Ignored),
            ("1.6.0", Ignored),
            ("1.6.20~ds1", Ignored),
            ("1.6.21", Ignored),
            ("1.6.22-rc.0", Ignored),
            ("1.6.22", AfterRestart),
            ("1.6.24", AfterRestart),
            ("1.6.25-rc.1", AfterRestart),
            ("1.6.25", Full),
            ("1.6.38", Full),
            ("1.7.0", Ignored),
            ("1.7.2", Ignored),
            ("v1.7.3-beta.0", Ignored),
            ("v1.7.3", AfterRestart),
            ("1.7.9-k3s1", AfterRestart),
            ("1.7.10-rc.0", AfterRestart),
            ("1.7.10", Full),
            ("v1.7.23-k3s2", Full),
            ("1.7.24~ds1", Full),
            ("1.8.0", Full),
            ("v2.0.0-rc.1", Full),
            ("2.0.0", Full),
            ("2.1.9+unknown", Full),
            ("3.0.0", Full),
        ];
        for (text, expected) in cases {
            let parsed = parse_version(text).unwrap();
            assert_eq!(pin_support(&parsed), expected, "{text}");
        }
    }

    #[test]
    fn verdicts_say_what_each_gate_means() {
        let (status, detail, fix) = version_verdict("1.6.20~ds1", "containerd at /s");
        assert_eq!(status, Status::Fail);
        assert!(detail.contains("does not honour") && detail.contains("1.29"));
        assert!(detail.contains("1.6.20~ds1"), "{detail}");
        assert!(fix.contains("upgrade"));

        let (status, detail, fix) = version_verdict("v1.7.5", "containerd at /s");
        assert_eq!(status, Status::Warn);
        assert!(
            detail.contains("a pin pinkeeper restores only takes effect after containerd restarts"),
            "{detail}"
        );
        assert!(detail.contains("1.29") && fix.contains("restart K3s"));

        let (status, detail, fix) = version_verdict("2.1.9+unknown", "containerd at /s");
        assert_eq!(status, Status::Ok);
        assert!(detail.contains("2.1.9+unknown") && detail.contains("1.29"));
        assert!(fix.is_empty());

        let (status, detail, _) = version_verdict("weird", "containerd at /s");
        assert_eq!(status, Status::Warn);
        assert!(detail.contains("\"weird\""));
    }

    fn touch(root: &Path, node_path: &str) {
        let path = root.join(node_path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    fn mkdir(root: &Path, node_path: &str) {
        std::fs::create_dir_all(root.join(node_path.trim_start_matches('/'))).unwrap();
    }

    #[test]
    fn programs_are_found_under_a_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(detect_programs(r, None), Programs::default());

        mkdir(r, "/var/lib/rancher/k3s/agent/images");
        touch(r, "/etc/systemd/system/k3s.service");
        touch(r, "/usr/local/bin/k3s");
        let found = detect_programs(r, Some(OsStr::new("/usr/local/bin:/usr/bin:relative")));
        assert_eq!(
            found.k3s,
            vec![
                "/var/lib/rancher/k3s",
                "/usr/local/bin/k3s",
                "/etc/systemd/system/k3s.service"
            ]
        );
        assert!(found.rke2.is_empty());

        // RKE2 from PATH and a packaged unit; /lib is a link to /usr/lib (merged /usr):
        // the unit is listed once.
        touch(r, "/opt/tools/rke2");
        touch(r, "/usr/lib/systemd/system/rke2-agent.service");
        std::os::unix::fs::symlink(r.join("usr/lib"), r.join("lib")).unwrap();
        let found = detect_programs(r, Some(OsStr::new("/opt/tools")));
        assert_eq!(
            found.rke2,
            vec!["/opt/tools/rke2", "/lib/systemd/system/rke2-agent.service"]
        );
        assert_eq!(found.k3s.len(), 3);
        // not a file: a directory named like the binary does not count
        let other = tempfile::tempdir().unwrap();
        mkdir(other.path(), "/usr/local/bin/k3s");
        assert_eq!(detect_programs(other.path(), None), Programs::default());
    }

    fn settings(dir: &Path) -> DoctorSettings {
        DoctorSettings {
            containerd_socket: dir.join("containerd.sock"),
            namespace: "k8s.io".into(),
            images_dir: dir.join("images"),
            state_dir: dir.join("state"),
            control_socket: dir.join("pk.sock"),
            program: Program::K3s,
        }
    }

    fn k3s_defaults() -> DoctorSettings {
        DoctorSettings {
            containerd_socket: K3S_SOCKET.into(),
            namespace: "k8s.io".into(),
            images_dir: DEFAULT_IMAGES_DIR.into(),
            state_dir: "/var/lib/pinkeeper".into(),
            control_socket: "/run/pinkeeper/pinkeeper.sock".into(),
            program: Program::K3s,
        }
    }

    fn rke2_defaults() -> DoctorSettings {
        DoctorSettings {
            images_dir: RKE2_IMAGES_DIR.into(),
            program: Program::Rke2,
            ..k3s_defaults()
        }
    }

    #[test]
    fn program_check_compares_with_pinkeepers_settings() {
        let k3s = Programs {
            k3s: vec!["/var/lib/rancher/k3s".into()],
            rke2: vec![],
        };
        let rke2 = Programs {
            k3s: vec![],
            rke2: vec!["/usr/local/bin/rke2".into()],
        };
        let both = Programs {
            k3s: k3s.k3s.clone(),
            rke2: rke2.rke2.clone(),
        };
        let check = check_program(&k3s_defaults(), &k3s);
        assert_eq!(check.status, Status::Ok, "{check:?}");
        assert!(check.detail.contains(K3S_PIN) && check.fix.is_empty());

        let mut custom = k3s_defaults();
        custom.images_dir = "/srv/k3s/agent/images".into();
        let check = check_program(&custom, &k3s);
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("--data-dir"), "{check:?}");

        let check = check_program(&k3s_defaults(), &rke2);
        assert_eq!(check.status, Status::Fail);
        assert!(check.detail.contains(RKE2_PIN) && check.detail.contains(RKE2_IMAGES_DIR));
        assert!(check.detail.contains("/usr/local/bin/rke2"));
        assert!(check.fix.contains("--program rke2"), "{check:?}");
        assert!(check.fix.contains(RKE2_IMAGES_DIR), "{check:?}");

        assert_eq!(check_program(&k3s_defaults(), &both).status, Status::Warn);
        let check = check_program(&k3s_defaults(), &Programs::default());
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("neither"));
        assert!(check.detail.contains("--program k3s"), "{check:?}");
    }

    #[test]
    fn program_check_follows_the_configured_program() {
        let k3s = Programs {
            k3s: vec!["/var/lib/rancher/k3s".into()],
            rke2: vec![],
        };
        let rke2 = Programs {
            k3s: vec![],
            rke2: vec!["/var/lib/rancher/rke2".into()],
        };
        // RKE2 set and installed: fine.
        let check = check_program(&rke2_defaults(), &rke2);
        assert_eq!(check.status, Status::Ok, "{check:?}");
        assert!(check.detail.contains(RKE2_PIN) && check.detail.contains("--program rke2"));
        assert!(check.fix.is_empty());
        // RKE2 set with K3s's images dir: the dir is compared with RKE2's default.
        let mut k3s_dir = rke2_defaults();
        k3s_dir.images_dir = DEFAULT_IMAGES_DIR.into();
        let check = check_program(&k3s_dir, &rke2);
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains(RKE2_IMAGES_DIR), "{check:?}");
        // RKE2 set, K3s installed: fails, says to switch back.
        let check = check_program(&rke2_defaults(), &k3s);
        assert_eq!(check.status, Status::Fail, "{check:?}");
        assert!(check.detail.contains("K3s is installed") && check.detail.contains(K3S_PIN));
        assert!(check.fix.contains("--program k3s"), "{check:?}");
        // An explicit images dir is the operator's: the fix does not claim to change it.
        let mut custom = rke2_defaults();
        custom.images_dir = "/srv/images".into();
        let check = check_program(&custom, &k3s);
        assert!(!check.fix.contains("images directory"), "{check:?}");
        // Both: a warning naming the one set.
        let both = Programs {
            k3s: k3s.k3s.clone(),
            rke2: rke2.rke2.clone(),
        };
        let check = check_program(&rke2_defaults(), &both);
        assert_eq!(check.status, Status::Warn);
        assert!(check.fix.contains("running one is RKE2") && check.fix.contains("--program k3s"));
    }

    fn intent(name: &str, state: IntentState) -> Intent {
        Intent {
            name: name.to_string(),
            digest: Some("sha256:abc".into()),
            source: None,
            labels: Default::default(),
            state,
            origin: Origin::SeenPinned,
            since: 1,
            restores: 0,
            last_restored: None,
            released_because: None,
            k3s_pinned: false,
        }
    }

    fn record(name: &str, labels: &[(&str, &str)]) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            digest: Some("sha256:abc".into()),
        }
    }

    #[test]
    fn at_risk_is_held_or_swept_and_unpinned_or_gone() {
        let intents = [
            intent("pinned", IntentState::Held),
            intent("swept", IntentState::Swept),
            intent("held-unpinned", IntentState::Held),
            intent("released", IntentState::Released),
            intent("gone", IntentState::Held),
            intent("lookalike", IntentState::Held),
        ];
        let images = [
            record("pinned", &[(CRI_PIN, PINNED)]),
            record("swept", &[("io.cri-containerd.image", "managed")]),
            record("held-unpinned", &[(K3S_PIN, PINNED)]),
            record("released", &[]),
            // the look-alike label does nothing (FACTS.md section 1)
            record("lookalike", &[("io.cri.containerd.pinned", PINNED)]),
        ];
        let risk = at_risk(&intents, &images);
        assert_eq!(risk.held, 5);
        assert_eq!(risk.unpinned, vec!["held-unpinned", "lookalike", "swept"]);
        assert_eq!(risk.gone, vec!["gone"]);
    }

    #[test]
    fn report_json_shape_and_exit_code() {
        let mut report = Report {
            checks: vec![
                Check::new("containerd", Status::Ok, "fine"),
                Check::new("ledger", Status::Warn, "no ledger").fix("start it"),
            ],
        };
        assert_eq!(report.exit_code(), 0);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "status": "warn",
                "checks": [
                    {"name": "containerd", "status": "ok", "detail": "fine", "fix": ""},
                    {"name": "ledger", "status": "warn", "detail": "no ledger", "fix": "start it"}
                ]
            })
        );
        report
            .checks
            .push(Check::new("at-risk", Status::Fail, "a:\n  - x").fix("reconcile"));
        assert_eq!(report.exit_code(), 1);
        assert_eq!(report.status(), Status::Fail);
        let text = report.to_table();
        assert!(
            text.starts_with("ok     containerd\n       fine\n"),
            "{text}"
        );
        assert!(text.contains("WARN   ledger\n       no ledger\n       fix: start it\n"));
        assert!(
            text.contains("FAIL   at-risk\n       a:\n         - x\n"),
            "{text}"
        );
        assert!(text.ends_with("1 failed, 1 warning(s), 1 ok\n"), "{text}");
        assert_eq!(Report::default().exit_code(), 0);
    }

    #[test]
    fn text_wraps_and_keeps_list_items_indented() {
        let long = "word ".repeat(60);
        let detail = format!("{long}\n  - {long}");
        let mut out = String::new();
        wrap_into(&mut out, "       ", "fix: ", &detail);
        for line in out.lines() {
            assert!(line.chars().count() <= TEXT_WIDTH, "{line:?}");
            assert!(line.starts_with("       "), "{line:?}");
        }
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("       fix: word"));
        assert!(lines[1].starts_with("            word"));
        let item = lines.iter().position(|l| l.contains("- word")).unwrap();
        assert!(lines[item].starts_with("              - word"), "{out}");
        assert!(lines[item + 1].starts_with("                word"), "{out}");
        // a word longer than the width stays whole on its own line
        let mut out = String::new();
        wrap_into(&mut out, "", "", &format!("a {} b", "x".repeat(200)));
        assert_eq!(out.lines().count(), 3);
        // nor is a list item split from its marker
        let mut out = String::new();
        let long = "x".repeat(200);
        wrap_into(&mut out, "   ", "", &format!("names:\n  - {long}"));
        assert_eq!(out, format!("   names:\n     - {long}\n"));
    }

    fn host(root: &Path) -> Host {
        Host {
            root: root.to_path_buf(),
            path_var: None,
        }
    }

    fn status_of(report: &Report, name: &str) -> Status {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name} check in {report:?}"))
            .status
    }

    fn check<'a>(report: &'a Report, name: &str) -> &'a Check {
        report.checks.iter().find(|c| c.name == name).unwrap()
    }

    #[tokio::test]
    async fn a_bare_node_without_daemon_or_containerd() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let report = examine_on(&s, Err("not wired".into()), &host(dir.path())).await;
        let names: Vec<_> = report.checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "control-socket",
                "containerd",
                "images-dir",
                "ledger",
                "program",
                "at-risk"
            ]
        );
        assert_eq!(status_of(&report, "control-socket"), Status::Warn);
        assert!(check(&report, "control-socket")
            .detail
            .contains("not wired"));
        let containerd = check(&report, "containerd");
        assert_eq!(containerd.status, Status::Fail);
        assert!(
            containerd.detail.contains("does not exist"),
            "{containerd:?}"
        );
        assert!(containerd.fix.contains("systemctl status k3s"));
        assert_eq!(status_of(&report, "images-dir"), Status::Warn);
        assert_eq!(status_of(&report, "ledger"), Status::Warn);
        assert_eq!(status_of(&report, "program"), Status::Warn);
        assert_eq!(status_of(&report, "at-risk"), Status::Warn);
        assert_eq!(report.exit_code(), 1);
        // The doctor creates nothing.
        assert!(!s.state_dir.exists());
        for check in &report.checks {
            assert_eq!(
                check.fix.is_empty(),
                check.status == Status::Ok,
                "{check:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_refusing_socket_and_a_broken_archive() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        // A socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&s.containerd_socket).unwrap());
        std::fs::create_dir_all(&s.images_dir).unwrap();
        std::fs::write(s.images_dir.join("broken.tar.gz"), b"not gzip").unwrap();
        std::fs::write(s.images_dir.join("notes.md"), b"ignored").unwrap();
        let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
        let containerd = check(&report, "containerd");
        assert!(containerd.detail.contains("refuses"), "{containerd:?}");
        let images = check(&report, "images-dir");
        assert_eq!(images.status, Status::Warn);
        assert!(images.detail.contains("broken.tar.gz"), "{images:?}");
        assert!(
            images.detail.contains("1 file(s) K3s imports"),
            "{images:?}"
        );

        std::fs::remove_dir_all(&s.images_dir).unwrap();
        std::fs::write(&s.images_dir, b"a file").unwrap();
        let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
        assert_eq!(status_of(&report, "images-dir"), Status::Fail);
    }

    #[tokio::test]
    async fn the_ledger_read_busy_and_broken() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        {
            let mut ledger = Ledger::open(&s.state_dir).unwrap();
            let a = intent("a", IntentState::Held);
            let b = intent("b", IntentState::Swept);
            let c = intent("c", IntentState::Released);
            ledger
                .apply(&[
                    crate::ledger::Change::Save(&a),
                    crate::ledger::Change::Save(&b),
                    crate::ledger::Change::Save(&c),
                ])
                .unwrap();
        }
        let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
        let ledger = check(&report, "ledger");
        assert_eq!(ledger.status, Status::Ok);
        assert!(
            ledger
                .detail
                .contains("1 intent(s) held, 1 swept by K3s and not restored yet, 1 released"),
            "{ledger:?}"
        );
        // containerd is not there: the at-risk check cannot be made
        let risk = check(&report, "at-risk");
        assert_eq!(risk.status, Status::Warn);
        assert!(risk.detail.contains("containerd cannot be reached"));

        {
            let _held = Ledger::open(&s.state_dir).unwrap();
            let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
            let ledger = check(&report, "ledger");
            assert_eq!(ledger.status, Status::Ok);
            assert!(ledger.detail.contains("in use by a running pinkeeper"));
            assert!(check(&report, "at-risk")
                .detail
                .contains("holds the ledger"));
        }

        std::fs::write(s.state_dir.join(FILE_NAME), b"garbage, not a database").unwrap();
        let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
        let ledger = check(&report, "ledger");
        assert_eq!(ledger.status, Status::Fail);
        assert!(ledger.detail.contains("ledger.redb"), "{ledger:?}");
        assert!(ledger.fix.contains("move the file aside"), "{ledger:?}");
        assert_eq!(report.exit_code(), 1);
    }

    #[tokio::test]
    async fn the_daemons_view_is_used_when_it_answers() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let view = DaemonView {
            connected: true,
            containerd_version: "1.7.5".into(),
            ledger_path: "/var/lib/pinkeeper/ledger.redb".into(),
            intents_held: 4,
            at_risk: vec!["docker.io/library/db:2".into()],
            ledger_problem: String::new(),
            ledger_recovered: String::new(),
        };
        let report = examine_on(&s, Ok(view.clone()), &host(dir.path())).await;
        assert_eq!(status_of(&report, "control-socket"), Status::Ok);
        let ledger = check(&report, "ledger");
        assert_eq!(ledger.status, Status::Ok);
        assert!(ledger.detail.contains("/var/lib/pinkeeper/ledger.redb"));
        assert!(ledger.detail.contains("4 intent(s)"));
        let risk = check(&report, "at-risk");
        assert_eq!(risk.status, Status::Fail);
        assert!(risk.detail.contains("docker.io/library/db:2"));
        assert!(risk.fix.contains("pinkeeper reconcile"));
        // The doctor cannot reach containerd, the daemon can: its version's gate applies.
        let containerd = check(&report, "containerd");
        assert_eq!(containerd.status, Status::Fail);
        assert!(containerd.detail.contains("1.7.5") && containerd.detail.contains("restarts"));

        let quiet = DaemonView {
            connected: false,
            at_risk: vec![],
            ..view
        };
        let report = examine_on(&s, Ok(quiet), &host(dir.path())).await;
        assert_eq!(status_of(&report, "control-socket"), Status::Warn);
        assert!(check(&report, "control-socket")
            .detail
            .contains("not connected to containerd"));
        assert_eq!(status_of(&report, "at-risk"), Status::Ok);
    }

    #[test]
    fn many_names_are_cut_at_twenty() {
        let names: Vec<String> = (0..25).map(|i| format!("img{i:02}")).collect();
        let list = name_list(&names);
        assert_eq!(
            list.lines().filter(|l| l.starts_with("  - img")).count(),
            20
        );
        assert!(list.ends_with("\n  - and 5 more"));
    }

    #[test]
    fn settings_come_from_the_config_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(&config, "state_dir = \"/srv/pk\"\nnamespace = \"other\"\n").unwrap();
        let args = DoctorArgs {
            node: NodeArgs {
                config: Some(config.clone()),
                namespace: Some("k8s.io".into()),
                ..NodeArgs::default()
            },
            control_socket: None,
            json: false,
        };
        let s = args.settings().unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/srv/pk"));
        assert_eq!(s.namespace, "k8s.io");
        assert_eq!(s.containerd_socket, PathBuf::from(K3S_SOCKET));
        assert_eq!(s.program, Program::K3s);
        assert_eq!(s.images_dir, PathBuf::from(DEFAULT_IMAGES_DIR));
        let mut rke2 = args.clone();
        rke2.node.program = Some("rke2".into());
        let s = rke2.settings().unwrap();
        assert_eq!(s.program, Program::Rke2);
        assert_eq!(s.images_dir, PathBuf::from(RKE2_IMAGES_DIR));
        std::fs::write(&config, "program = \"rke2\"\n").unwrap();
        assert_eq!(args.settings().unwrap().program, Program::Rke2);
        let mut missing = args.clone();
        missing.node.config = Some(dir.path().join("missing.toml"));
        assert!(missing.settings().is_err());
        let mut bad = args;
        bad.node.containerd_socket = Some("relative".into());
        assert!(bad.settings().is_err());
    }
}
