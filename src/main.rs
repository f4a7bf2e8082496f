//! The `pinkeeper` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pinkeeper::cli::node::NodeArgs;
use pinkeeper::config::Overrides;
use pinkeeper::control::cli;

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
    Run(RunArgs),
    /// Where the daemon stands: containerd connection, last sweep, intents, images at risk.
    Status(cli::StatusArgs),
    /// The images pinkeeper keeps pinned: state, pinned now, archive, why, last restored.
    List(cli::ListArgs),
    /// Keep an image pinned: record an intent and set io.cri-containerd.pinned now.
    Pin(cli::PinArgs),
    /// Stop keeping an image pinned: release the intent and remove io.cri-containerd.pinned.
    Unpin(cli::UnpinArgs),
    /// What pinkeeper decided and did, newest first, from the ledger.
    History(cli::HistoryArgs),
    /// Read the images directory and list every image now, as after a reconnection.
    Reconcile(cli::ReconcileArgs),
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
        #[arg(long, value_name = "MS", default_value_t = pinkeeper::config::DEFAULT_SETTLE_MS)]
        settle_ms: u64,
    },
    /// Record containerd's image events and the images directory to a file that
    /// `pinkeeper replay` runs offline (for bug reports). Read-only; stops at Ctrl-C.
    Record(pinkeeper::record::RecordArgs),
    /// List the files of K3s's images directory with their format, compression, the image
    /// names each provides and any error. Reads the directory itself: no daemon needed.
    Inventory(InventoryArgs),
    /// Check this node (containerd's version, the images directory, the ledger, K3s or RKE2,
    /// images unpinned right now) and say what to fix. Works without the daemon where it can.
    /// Exit code 1 if a check failed.
    Doctor(pinkeeper::doctor::DoctorArgs),
}

#[derive(clap::Args)]
struct InventoryArgs {
    /// The node's settings.
    #[command(flatten)]
    node: NodeArgs,
    /// Print JSON (the shape is documented in README.md) instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The node's settings.
    #[command(flatten)]
    node: NodeArgs,
    /// The operator API's socket [default: /run/pinkeeper/pinkeeper.sock]
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Quiet time after the last image event of a K3s start-up before pinkeeper checks that
    /// K3s re-pinned every image whose archive is still there [default: 3000]
    #[arg(long, value_name = "MS")]
    settle_ms: Option<u64>,
    /// Log lines on stderr as text (no colours unless stderr is a terminal) or as one JSON
    /// object per line [default: text]
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Write metrics to this node-exporter textfile-collector file (absolute, ending in
    /// .prom) [default: off]
    #[arg(long, value_name = "PATH")]
    metrics_textfile: Option<PathBuf>,
    /// Serve metrics on this loopback address, e.g. 127.0.0.1:9977 [default: off]
    #[arg(long, value_name = "IP:PORT")]
    metrics_address: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Status(args) => cli::status(args),
        Command::List(args) => cli::list(args),
        Command::Pin(args) => cli::pin(args),
        Command::Unpin(args) => cli::unpin(args),
        Command::History(args) => cli::history(args),
        Command::Reconcile(args) => cli::reconcile(args),
        Command::Replay {
            file,
            json,
            settle_ms,
        } => replay(&file, json, settle_ms),
        Command::Record(args) => pinkeeper::record::run(args),
        Command::Inventory(args) => inventory(&args),
        Command::Doctor(args) => pinkeeper::doctor::main(args),
    }
}

fn init_logging(format: pinkeeper::config::LogFormat) {
    use std::io::IsTerminal;
    // The gRPC stack's own debug lines are noise for an operator; PINKEEPER_LOG can still
    // turn them on by naming them (`h2=debug`). notify says "info" when a watched directory
    // is deleted, which pinkeeper handles.
    let wanted = std::env::var("PINKEEPER_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(format!(
        "h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,notify=warn,{wanted}"
    ))
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        pinkeeper::config::LogFormat::Text => {
            // Every control character of an event is escaped (a file name's newline cannot
            // forge a line); colours only on a terminal (src/logging.rs).
            let ansi = std::io::stderr().is_terminal();
            logs.with_writer(pinkeeper::logging::Escaping::new(std::io::stderr, ansi))
                .with_ansi(ansi)
                .init()
        }
        // One object per line, the event's fields at the top level beside `timestamp`,
        // `level` and `target`: what log shippers (and `kubectl logs | jq`) expect. serde_json
        // escapes control characters itself.
        pinkeeper::config::LogFormat::Json => logs
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .init(),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let flags = Overrides {
        control_socket: args.control_socket,
        settle_ms: args.settle_ms,
        log_format: args.log_format,
        metrics_textfile: args.metrics_textfile,
        metrics_address: args.metrics_address,
        ..Overrides::default()
    };
    let settings = match args.node.resolve(flags) {
        Ok(s) => s,
        Err(e) => return usage_error(&e),
    };
    init_logging(settings.log_format);
    let runtime = match pinkeeper::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let engine = pinkeeper::engine::Config {
        program_label: settings.program.label().to_string(),
        settle: settings.settle_ms,
        ..Default::default()
    };
    match runtime.block_on(pinkeeper::daemon::run(settings, engine)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging goes to stderr: one line says it all.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("pinkeeper: {e}");
    ExitCode::from(2)
}

/// Exit 0 once the directory was read (broken files are part of the output), 1 if it
/// cannot be read, 2 on bad usage (a flag, or the config file).
fn inventory(args: &InventoryArgs) -> ExitCode {
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
            pinkeeper::escape::path(dir)
        );
        return ExitCode::FAILURE;
    }
    let inventory = match pinkeeper::inventory::Scanner::new(dir).scan() {
        Ok(inventory) => inventory,
        Err(e) => {
            eprintln!("pinkeeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The report takes the scan's strings: one copy in memory, not two.
    let report = pinkeeper::inventory::report::Report::from_inventory(dir, inventory);
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

fn replay(file: &std::path::Path, json: bool, settle_ms: u64) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pinkeeper: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let mut replay = pinkeeper::replay::Replay::new(pinkeeper::engine::Config {
        settle: settle_ms,
        ..Default::default()
    });
    let result = replay.run(&text);
    let mut out = String::new();
    for (at, decision) in &replay.decisions {
        let line = if json {
            pinkeeper::replay::decision_json(at.wall, decision).map(|v| v.to_string())
        } else {
            pinkeeper::replay::describe(at.wall, decision)
        };
        if let Some(line) = line {
            out.push_str(&line);
            out.push('\n');
        }
    }
    use std::io::Write;
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinkeeper: {}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}
