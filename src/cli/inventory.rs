//! `pinkeeper inventory`: reads the images directory itself (no daemon) and prints what each
//! file provides, with `src/inventory/`'s scanner and report.

use std::process::ExitCode;

use crate::cli::node::NodeArgs;
use crate::cli::usage_error;
use crate::config::Overrides;

/// Arguments of `pinkeeper inventory`.
#[derive(clap::Args)]
pub(crate) struct InventoryArgs {
    /// The node's settings.
    #[command(flatten)]
    node: NodeArgs,
    /// Print JSON (the shape is documented in README.md) instead of a table
    #[arg(long)]
    json: bool,
}

/// Exit 0 once the directory was read (broken files are part of the output), 1 if it
/// cannot be read, 2 on bad usage (a flag, or the config file).
pub(crate) fn inventory(args: &InventoryArgs) -> ExitCode {
    let settings = match args.node.resolve(Overrides::default()) {
        Ok(s) => s,
        Err(e) => return usage_error(&e),
    };
    let dir = &settings.images_dir;
    let problem = match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => None,
        Ok(_) => Some("is not a directory".to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist".to_string()),
        Err(e) => Some(format!("cannot be examined: {e}")),
    };
    if let Some(problem) = problem {
        eprintln!(
            "pinkeeper: the images directory {} {problem}; pass K3s's <data-dir>/agent/images \
             with --images-dir DIR",
            crate::escape::path(dir)
        );
        return ExitCode::FAILURE;
    }
    let inventory = match crate::inventory::Scanner::new(dir).scan() {
        Ok(inventory) => inventory,
        Err(e) => {
            eprintln!("pinkeeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The report takes the scan's strings: one copy in memory, not two.
    let report = crate::inventory::report::Report::from_inventory(dir, inventory);
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = if args.json {
        report.write_json(&mut out)
    } else {
        report.write_table(&mut out)
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = written.and_then(|()| out.flush());
    ExitCode::SUCCESS
}
