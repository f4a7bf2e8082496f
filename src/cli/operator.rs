//! The operator's subcommands that talk to the daemon: `status`, `list`, `pin`, `unpin`,
//! `history`, `reconcile`. Each prints a table, or JSON with `--json` (the API's messages as
//! they are), and exits 0 when done, 1 when it failed, 2 on bad usage (clap).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::control::client::{Client, ClientError};
use crate::control::pb;
use crate::inventory::report::plain_table;
use crate::replay::format_millis;

/// Flags every subcommand has.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Common {
    /// The daemon's control socket
    #[arg(long, value_name = "PATH", default_value = crate::config::DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `pinkeeper status`.
#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    common: Common,
}

/// `pinkeeper list`.
#[derive(clap::Args, Debug)]
pub(crate) struct ListArgs {
    /// Only images whose name matches: `*` and `?` wildcards, else a substring
    #[arg(value_name = "NAME-PATTERN")]
    pattern: Option<String>,
    /// Include released intents (unpinned by an operator, deleted records)
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    common: Common,
}

/// `pinkeeper pin`.
#[derive(clap::Args, Debug)]
pub(crate) struct PinArgs {
    /// The image name (as `pinkeeper list` or `ctr -n k8s.io images ls` shows it)
    name: String,
    #[command(flatten)]
    common: Common,
}

/// `pinkeeper unpin`.
#[derive(clap::Args, Debug)]
pub(crate) struct UnpinArgs {
    /// The image name
    name: String,
    /// Every name of the same image (aliases included): CRI keeps an image pinned while any
    /// of its names is
    #[arg(long)]
    all_names: bool,
    #[command(flatten)]
    common: Common,
}

/// `pinkeeper history`.
#[derive(clap::Args, Debug)]
pub(crate) struct HistoryArgs {
    /// Only this image
    name: Option<String>,
    /// At most this many entries, newest first
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(flatten)]
    common: Common,
}

/// `pinkeeper reconcile`.
#[derive(clap::Args, Debug)]
pub(crate) struct ReconcileArgs {
    /// Print what would change, change nothing
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    common: Common,
}

/// Runs one call on a small runtime and prints its answer.
fn call<T, F, Fut>(common: &Common, ask: F, show: impl FnOnce(&T) -> String) -> ExitCode
where
    T: serde::Serialize,
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let runtime = match crate::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let answer = runtime.block_on(async {
        let client = Client::connect(&common.control_socket)?;
        ask(client).await
    });
    match answer {
        Ok(reply) => {
            let text = if common.json {
                match serde_json::to_string_pretty(&reply) {
                    Ok(json) => json + "\n",
                    Err(e) => {
                        eprintln!("pinkeeper: cannot print the answer as JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                show(&reply)
            };
            // A closed pipe (`| head`) is not worth a message.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pinkeeper: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pinkeeper status`.
pub(crate) fn status(args: StatusArgs) -> ExitCode {
    call(
        &args.common,
        |c| async move { c.status().await },
        show_status,
    )
}

/// `pinkeeper list`.
pub(crate) fn list(args: ListArgs) -> ExitCode {
    let req = pb::ListRequest {
        pattern: args.pattern.unwrap_or_default(),
        all: args.all,
        ..Default::default()
    };
    call(
        &args.common,
        |c| async move { c.list(req).await },
        |r: &pb::ListResponse| show_list(&r.intents),
    )
}

/// `pinkeeper pin`.
pub(crate) fn pin(args: PinArgs) -> ExitCode {
    let name = args.name;
    call(
        &args.common,
        |c| async move { c.pin(&name).await },
        show_pin,
    )
}

/// `pinkeeper unpin`.
pub(crate) fn unpin(args: UnpinArgs) -> ExitCode {
    let (name, all) = (args.name, args.all_names);
    call(
        &args.common,
        |c| async move { c.unpin(&name, all).await },
        show_unpin,
    )
}

/// `pinkeeper history`.
pub(crate) fn history(args: HistoryArgs) -> ExitCode {
    let req = pb::HistoryRequest {
        name: args.name.unwrap_or_default(),
        limit: args.limit,
    };
    call(
        &args.common,
        |c| async move { c.history(req).await },
        show_history,
    )
}

/// `pinkeeper reconcile`.
pub(crate) fn reconcile(args: ReconcileArgs) -> ExitCode {
    let dry_run = args.dry_run;
    call(
        &args.common,
        |c| async move { c.reconcile(dry_run).await },
        show_reconcile,
    )
}

fn when(ms: u64) -> String {
    if ms == 0 {
        "never".into()
    } else {
        format_millis(ms)
    }
}

fn show_status(s: &pb::StatusResponse) -> String {
    let mut out = String::new();
    let line = |out: &mut String, key: &str, value: String| {
        out.push_str(&format!("{key:<16}{value}\n"));
    };
    line(
        &mut out,
        "pinkeeper",
        format!("{}, running since {}", s.version, when(s.started_ms)),
    );
    let containerd = if s.connected {
        format!(
            "connected to {} ({}) since {}, namespace {}",
            s.containerd_socket,
            if s.containerd_version.is_empty() {
                "version unknown"
            } else {
                &s.containerd_version
            },
            when(s.connected_since_ms),
            s.namespace
        )
    } else {
        format!(
            "NOT connected to {} (K3s stopped or restarting?); pinkeeper keeps trying",
            s.containerd_socket
        )
    };
    line(&mut out, "containerd", containerd);
    let sweep = match &s.last_sweep {
        None => "none seen since pinkeeper started".to_string(),
        Some(w) => format!(
            "{} ({}): {} swept, {} restored by pinkeeper ({} archive gone, {} not re-pinned{}), {} left to K3s",
            when(w.started_ms),
            if w.seen_live { "seen live" } else { "found after reconnecting" },
            w.swept,
            w.restored_archive_gone + w.restored_not_repinned + w.restored_policy,
            w.restored_archive_gone,
            w.restored_not_repinned,
            if w.restored_policy == 0 {
                String::new()
            } else {
                format!(", {} kept by policy", w.restored_policy)
            },
            w.repinned_by_k3s
        ),
    };
    line(&mut out, "last sweep", sweep);
    line(
        &mut out,
        "intents",
        format!(
            "{} held, {} swept (awaiting K3s or pinkeeper), {} released",
            s.intents_held, s.intents_swept, s.intents_released
        ),
    );
    line(
        &mut out,
        "restored",
        format!("{} pin(s) restored so far", s.pins_restored),
    );
    let read = if s.images_dir_read_ms == 0 {
        "not read yet".to_string()
    } else if s.images_dir_broken == 0 {
        format!(
            "read {}, {} read(s) since start",
            when(s.images_dir_read_ms),
            s.images_dir_scans
        )
    } else {
        format!(
            "read {}, {} read(s) since start, {} file(s) K3s cannot import \
             (`pinkeeper inventory` lists them)",
            when(s.images_dir_read_ms),
            s.images_dir_scans,
            s.images_dir_broken
        )
    };
    line(
        &mut out,
        "archives",
        format!("{} gone from {} ({read})", s.archives_gone, s.images_dir),
    );
    let risk = if s.at_risk.is_empty() {
        "none: every intent is pinned".to_string()
    } else {
        let shown: Vec<&str> = s.at_risk.iter().take(10).map(String::as_str).collect();
        format!(
            "{} unpinned now: {}{}",
            s.at_risk.len(),
            shown.join(", "),
            if s.at_risk.len() > 10 { ", ..." } else { "" }
        )
    };
    line(&mut out, "at risk", risk);
    line(&mut out, "last reconcile", when(s.last_reconcile_ms));
    let cri = if s.cri_checked_ms == 0 {
        "not checked yet (after connecting, each sweep and each reconcile)".to_string()
    } else if !s.cri_problem.is_empty() {
        format!(
            "cannot be read ({}): {}; pinkeeper protects by the label",
            when(s.cri_checked_ms),
            s.cri_problem
        )
    } else if s.cri_unpinned.is_empty() {
        format!(
            "every held image pinned ({}{})",
            when(s.cri_checked_ms),
            if s.cri_unlisted == 0 {
                String::new()
            } else {
                format!("; {} not listed by CRI", s.cri_unlisted)
            }
        )
    } else {
        let shown: Vec<&str> = s.cri_unpinned.iter().take(10).map(String::as_str).collect();
        format!(
            "{} held image(s) UNPINNED for kubelet ({}): {}{}; run `pinkeeper doctor`",
            s.cri_unpinned.len(),
            when(s.cri_checked_ms),
            shown.join(", "),
            if s.cri_unpinned.len() > 10 {
                ", ..."
            } else {
                ""
            }
        )
    };
    line(&mut out, "kubelet (CRI)", cri);
    let disk = match &s.disk {
        None if s.disk_problem.is_empty() => "not checked yet".to_string(),
        None => format!("cannot be worked out: {}", s.disk_problem),
        Some(d) => {
            let percent = |b: u64| {
                if d.imagefs_size_bytes == 0 {
                    0.0
                } else {
                    b as f64 * 100.0 / d.imagefs_size_bytes as f64
                }
            };
            let mut text = format!(
                "pinned images hold {} ({:.0}% of {}, {:.0}% used of {}); image GC thresholds \
                 {}% / {}% ({})",
                crate::disk::human(d.pinned_bytes),
                percent(d.pinned_bytes),
                d.imagefs,
                percent(d.imagefs_used_bytes),
                crate::disk::human(d.imagefs_size_bytes),
                d.gc_high_percent,
                d.gc_low_percent,
                d.gc_thresholds_from
            );
            if !d.thresholds_problem.is_empty() {
                text.push_str(&format!("; {}", d.thresholds_problem));
            }
            if !d.warning.is_empty() {
                text.push_str(&format!("\n  WARNING: {}", d.warning));
            }
            text
        }
    };
    line(&mut out, "disk", disk);
    let keep = if s.keep.is_empty() {
        "no pattern (images kept by policy: none)".to_string()
    } else {
        s.keep.join(", ")
    };
    line(&mut out, "keep", keep);
    if s.config_reloaded_ms != 0 {
        let reload = if s.config_reload_error.is_empty() {
            format!("{}: applied", when(s.config_reloaded_ms))
        } else {
            format!(
                "{}: NOT APPLIED ({}); the settings in force stay",
                when(s.config_reloaded_ms),
                s.config_reload_error
            )
        };
        line(&mut out, "config reloaded", reload);
    }
    let ledger = if s.ledger_problem.is_empty() {
        s.ledger_path.clone()
    } else {
        format!(
            "{}: CANNOT BE WRITTEN ({}); {} change(s) held in memory, {} failed write(s); \
             pinkeeper keeps protecting from memory and retries",
            s.ledger_path, s.ledger_problem, s.ledger_pending, s.ledger_write_errors
        )
    };
    line(&mut out, "ledger", ledger);
    if !s.ledger_recovered.is_empty() {
        line(&mut out, "ledger damaged", s.ledger_recovered.clone());
    }
    out
}

fn show_list(intents: &[pb::IntentInfo]) -> String {
    if intents.is_empty() {
        return "no intents\n".into();
    }
    let rows: Vec<[String; 7]> = intents
        .iter()
        .map(|i| {
            let pinned = match (i.exists, i.pinned_now) {
                (false, _) => "gone",
                (true, true) => "yes",
                (true, false) => "NO",
            };
            [
                i.name.clone(),
                i.state.clone(),
                pinned.to_string(),
                match i.cri.as_str() {
                    "" => "-".to_string(),
                    "unpinned" => "NO".to_string(),
                    "pinned" => "yes".to_string(),
                    other => other.to_string(),
                },
                i.archive.clone(),
                if i.last_restored_ms == 0 {
                    "-".to_string()
                } else {
                    format!("{} ({}x)", when(i.last_restored_ms), i.restores)
                },
                if i.released_because.is_empty() {
                    i.why.clone()
                } else {
                    format!("released: {}", i.released_because)
                },
            ]
        })
        .collect();
    plain_table(
        &[
            "IMAGE",
            "STATE",
            "PINNED",
            "CRI",
            "ARCHIVE",
            "LAST RESTORED",
            "WHY",
        ],
        rows,
    )
}

fn show_pin(r: &pb::PinResponse) -> String {
    let name = r.intent.as_ref().map_or("", |i| i.name.as_str());
    if r.was_pinned {
        format!("{name} was already pinned; pinkeeper now keeps it pinned across K3s restarts\n")
    } else {
        format!("pinned {name} (io.cri-containerd.pinned=pinned); pinkeeper keeps it pinned across K3s restarts\n")
    }
}

fn show_unpin(r: &pb::UnpinResponse) -> String {
    let mut out = String::new();
    for name in &r.names {
        out.push_str(&format!(
            "unpinned {name}: intent released, io.cri-containerd.pinned removed\n"
        ));
    }
    for warning in &r.warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out
}

fn show_history(r: &pb::HistoryResponse) -> String {
    if r.entries.is_empty() {
        return "no history\n".into();
    }
    let rows: Vec<[String; 4]> = r
        .entries
        .iter()
        .map(|h| {
            [
                when(h.at_ms),
                h.action.clone(),
                h.name.clone(),
                h.detail.clone(),
            ]
        })
        .collect();
    plain_table(&["TIME", "ACTION", "IMAGE", "DETAIL"], rows)
}

fn show_reconcile(r: &pb::ReconcileResponse) -> String {
    if r.decisions.is_empty() {
        return if r.dry_run {
            "nothing would change\n".into()
        } else {
            "nothing to change: the ledger and containerd agree\n".into()
        };
    }
    let head = if r.dry_run {
        "dry run: nothing was changed; a reconcile would do this:\n"
    } else {
        ""
    };
    let rows: Vec<[String; 3]> = r
        .decisions
        .iter()
        .map(|d| [d.action.clone(), d.name.clone(), d.detail.clone()])
        .collect();
    format!(
        "{head}{}",
        plain_table(&["ACTION", "IMAGE", "DETAIL"], rows)
    )
}
