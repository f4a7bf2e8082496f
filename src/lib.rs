//! pinkeeper keeps K3s air-gap images pinned in containerd across K3s restarts.
//!
//! Data flows one way: observations (containerd's events and listings, the images directory)
//! go into the pure [`engine`], whose decisions are carried out by the thin I/O modules
//! ([`containerd`], [`ledger`]) and fed back as outcomes. [`daemon`] wires them together.
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod config;
pub mod containerd;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod engine;
pub mod inventory;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod reconnect;
pub mod record;
pub mod replay;
