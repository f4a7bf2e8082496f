//! pinkeeper keeps K3s air-gap images pinned in containerd across K3s restarts.
//!
//! Data flows one way: observations (containerd's events and listings, the images directory)
//! go into the pure [`engine`], whose decisions are carried out by one executor
//! (`daemon::executor`) through the image-store trait ([`store`]: containerd, or in memory)
//! and a journal ([`ledger`]), and fed back as outcomes. [`daemon`] wires them to the sockets,
//! the directory and the timers; `replay`, `reconcile --dry-run` and the simulation (`sim/`)
//! run the same executor against the in-memory store.
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod cli;
pub(crate) mod config;
pub mod containerd;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod engine;
pub(crate) mod escape;
pub mod inventory;
pub mod ledger;
pub(crate) mod logging;
pub mod memory;
pub mod replay;
pub mod store;

/// The single-threaded runtime every subcommand runs on; `Err` (after saying why on stderr)
/// is the exit code to return.
pub fn runtime() -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("pinkeeper: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        })
}
