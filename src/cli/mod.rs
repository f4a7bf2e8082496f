//! The `pinkeeper` command line: every subcommand, parsed by clap and run here. Each file owns
//! one command (or a family: `operator.rs` for the calls to the running daemon); `node.rs`
//! owns the node's flags they share. Commands decide nothing about pins themselves: the
//! daemon (`run`) and the engine do, and `doctor` reads with the engine's rules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub(crate) mod doctor;
pub(crate) mod inventory;
pub(crate) mod node;
pub(crate) mod operator;
pub(crate) mod record;
pub(crate) mod replay;
pub(crate) mod run;

/// Keeps K3s air-gap images pinned in containerd across K3s restarts.
#[derive(Parser)]
#[command(name = "pinkeeper", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon next to K3s.
    Run(run::RunArgs),
    /// Where the daemon stands: containerd connection, last sweep, intents, images at risk.
    Status(operator::StatusArgs),
    /// The images pinkeeper keeps pinned: state, pinned now, archive, why, last restored.
    List(operator::ListArgs),
    /// Keep an image pinned: record an intent and set io.cri-containerd.pinned now.
    Pin(operator::PinArgs),
    /// Stop keeping an image pinned: release the intent and remove io.cri-containerd.pinned.
    Unpin(operator::UnpinArgs),
    /// What pinkeeper decided and did, newest first, from the ledger.
    History(operator::HistoryArgs),
    /// Read the images directory and list every image now, as after a reconnection.
    Reconcile(operator::ReconcileArgs),
    /// Replay a fixture (JSON lines of containerd events and directives) through the engine
    /// offline and print every decision.
    Replay {
        /// The fixture file.
        file: PathBuf,
        /// Print one JSON object per decision instead of a line of text
        #[arg(long)]
        json: bool,
        /// The engine's quiet time before checking K3s's re-pins, as the daemon that was
        /// recorded had it (`pinkeeper run --settle-ms`)
        #[arg(long, value_name = "MS", default_value_t = crate::config::DEFAULT_SETTLE_MS)]
        settle_ms: u64,
    },
    /// Record containerd's image events and the images directory to a file that
    /// `pinkeeper replay` runs offline (for bug reports). Read-only; stops at Ctrl-C.
    Record(record::RecordArgs),
    /// List the files of K3s's images directory with their format, compression, the image
    /// names each provides and any error. Reads the directory itself: no daemon needed.
    Inventory(inventory::InventoryArgs),
    /// Check this node (containerd's version, the images directory, the ledger, K3s or RKE2,
    /// images unpinned right now) and say what to fix. Works without the daemon where it can.
    /// Exit code 1 if a check failed.
    Doctor(doctor::DoctorArgs),
}

/// Parses the command line and runs the subcommand; returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Status(args) => operator::status(args),
        Command::List(args) => operator::list(args),
        Command::Pin(args) => operator::pin(args),
        Command::Unpin(args) => operator::unpin(args),
        Command::History(args) => operator::history(args),
        Command::Reconcile(args) => operator::reconcile(args),
        Command::Replay {
            file,
            json,
            settle_ms,
        } => replay::replay(&file, json, settle_ms),
        Command::Record(args) => record::run(args),
        Command::Inventory(args) => inventory::inventory(&args),
        Command::Doctor(args) => doctor::main(args),
    }
}

/// A bad flag or config file: the message on stderr, exit code 2.
pub(crate) fn usage_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("pinkeeper: {e}");
    ExitCode::from(2)
}
