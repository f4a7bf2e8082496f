//! The command line's parts shared by the subcommands.

pub mod node;
