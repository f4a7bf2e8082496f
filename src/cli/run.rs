//! `pinkeeper run`: resolves the settings, sets up logging and the runtime, and hands over to
//! the daemon (`src/daemon/`). Nothing of the daemon's own work happens here.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::node::NodeArgs;
use crate::cli::usage_error;
use crate::config::Overrides;

/// Arguments of `pinkeeper run`.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
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

fn init_logging(format: crate::config::LogFormat) {
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
        crate::config::LogFormat::Text => {
            // Every control character of an event is escaped (a file name's newline cannot
            // forge a line); colours only on a terminal (src/logging.rs).
            let ansi = std::io::stderr().is_terminal();
            logs.with_writer(crate::logging::Escaping::new(std::io::stderr, ansi))
                .with_ansi(ansi)
                .init()
        }
        // One object per line, the event's fields at the top level beside `timestamp`,
        // `level` and `target`: what log shippers (and `kubectl logs | jq`) expect. serde_json
        // escapes control characters itself.
        crate::config::LogFormat::Json => logs
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .init(),
    }
}

/// Runs the daemon until SIGTERM; exit 2 on a bad flag or config file, 1 on a failure.
pub(crate) fn run(args: RunArgs) -> ExitCode {
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
    let runtime = match crate::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let engine = crate::engine::Config {
        program_label: settings.program.label().to_string(),
        settle: settings.settle_ms,
        ..Default::default()
    };
    match runtime.block_on(crate::daemon::run(settings, engine)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging goes to stderr: one line says it all.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
